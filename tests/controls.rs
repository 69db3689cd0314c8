//! The creative controls, measured on the bundled default model's frames:
//! `--image` keeps the still as the first frame, `--motion` raises the
//! frame-to-frame change, `--style` presets give different pictures, and
//! `--camera` moves the content the named way (measured at the model's
//! default size: the one default-size run of the suite, since a 2-step
//! clip has no layout yet to move).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-ctl-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn motif(dir: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_motif"))
        .current_dir(dir)
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .output()
        .expect("motif runs");
    assert!(
        out.status.success(),
        "motif {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A frame: RGB in [0, 1], row-major.
struct Frame {
    w: usize,
    h: usize,
    rgb: Vec<f32>,
}

impl Frame {
    fn read(path: &Path) -> Frame {
        let img = image::open(path).unwrap().to_rgb8();
        Frame {
            w: img.width() as usize,
            h: img.height() as usize,
            rgb: img.as_raw().iter().map(|&v| v as f32 / 255.0).collect(),
        }
    }

    fn gray(&self) -> Vec<f32> {
        self.rgb
            .chunks(3)
            .map(|p| (p[0] + p[1] + p[2]) / 3.0)
            .collect()
    }
}

fn frames(folder: &Path) -> Vec<Frame> {
    let mut names: Vec<_> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    names.sort();
    names.iter().map(|p| Frame::read(p)).collect()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32
}

/// Mean absolute change between consecutive frames.
fn frame_change(clip: &[Frame]) -> f32 {
    clip.windows(2)
        .map(|p| mean_abs_diff(&p[0].rgb, &p[1].rgb))
        .sum::<f32>()
        / (clip.len() - 1) as f32
}

/// A tiny generation on the bundled model: 64x64, 4 frames, 2 steps.
fn tiny(dir: &Path, out: &str, extra: &[&str]) -> Vec<Frame> {
    let mut args = vec![
        "generate",
        "a red ball bouncing on grass",
        "--width",
        "64",
        "--height",
        "64",
        "--frames",
        "4",
        "--steps",
        "2",
        "--seed",
        "3",
        "-q",
        "-o",
        out,
    ];
    args.extend_from_slice(extra);
    motif(dir, &args);
    frames(&dir.join(out))
}

/// A still like the model's world: sky over grass, a red ball.
fn write_still(path: &Path, size: u32) -> Vec<f32> {
    let img = image::RgbImage::from_fn(size, size, |x, y| {
        let (u, v) = (x as f32 / size as f32, y as f32 / size as f32);
        let (dx, dy) = (u - 0.4, v - 0.45);
        if dx * dx + dy * dy < 0.03 {
            image::Rgb([230, 30, 25])
        } else if v > 0.62 {
            image::Rgb([60, 150, 55])
        } else {
            let t = v / 0.62;
            image::Rgb([
                (70.0 + 120.0 * t) as u8,
                (130.0 + 90.0 * t) as u8,
                (235.0 + 20.0 * t) as u8,
            ])
        }
    });
    img.save(path).unwrap();
    img.as_raw().iter().map(|&v| v as f32 / 255.0).collect()
}

#[test]
fn an_animated_still_is_the_first_frame() {
    let dir = scratch("image");
    let still = write_still(&dir.join("still.png"), 64);
    let with = tiny(&dir, "with", &["--image", "still.png"]);
    let without = tiny(&dir, "without", &[]);
    let (near, far) = (
        mean_abs_diff(&with[0].rgb, &still),
        mean_abs_diff(&without[0].rgb, &still),
    );
    eprintln!("first frame vs the still: {near:.4} with --image, {far:.4} without");
    assert!(
        near <= 0.06,
        "first frame {near:.4} from the still (limit 0.06)"
    );
    assert!(
        far > 0.06,
        "the check cannot tell: {far:.4} without --image"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn more_motion_means_more_frame_to_frame_change() {
    let dir = scratch("motion");
    let still = frame_change(&tiny(&dir, "m0", &["--motion", "0"]));
    let lively = frame_change(&tiny(&dir, "m4", &["--motion", "4"]));
    eprintln!("mean frame-to-frame change: {still:.4} at --motion 0, {lively:.4} at --motion 4");
    assert!(
        lively > 1.3 * still,
        "--motion 4 ({lively:.4}) should change frames clearly more than --motion 0 ({still:.4})"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn two_style_presets_give_different_clips() {
    let dir = scratch("styles");
    let neon = tiny(&dir, "neon", &["--style", "neon"]);
    let pixel = tiny(&dir, "pixel", &["--style", "pixel-art"]);
    let plain = tiny(&dir, "plain", &[]);
    let d = |a: &[Frame], b: &[Frame]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| mean_abs_diff(&x.rgb, &y.rgb))
            .sum::<f32>()
            / a.len() as f32
    };
    let (np, nn, pn) = (d(&neon, &pixel), d(&neon, &plain), d(&pixel, &plain));
    eprintln!("clip distances: neon-pixel {np:.3}, neon-plain {nn:.3}, pixel-plain {pn:.3}");
    // The neon preset asks for a dark background: darker frames.
    let mean = |c: &[Frame]| {
        c.iter().flat_map(|f| f.rgb.iter()).sum::<f32>() / (c.len() * c[0].rgb.len()) as f32
    };
    assert!(np > 0.1 && nn > 0.05 && pn > 0.05, "styles too alike");
    assert!(mean(&neon) < mean(&pixel), "neon should be the darker clip");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The horizontal and vertical content shift from `a` to `b` that best
/// matches them (mean absolute difference over the overlap), within ±max.
fn best_shift(a: &Frame, b: &Frame, max: i64) -> (i64, i64) {
    let (ga, gb) = (a.gray(), b.gray());
    let (w, h) = (a.w as i64, a.h as i64);
    let mut best = (f32::MAX, 0, 0);
    for dy in -max..=max {
        for dx in -max..=max {
            let mut sum = 0.0;
            let mut n = 0;
            for y in (max..h - max).step_by(2) {
                for x in (max..w - max).step_by(2) {
                    let (sx, sy) = (x - dx, y - dy);
                    sum += (gb[(y * w + x) as usize] - ga[(sy * w + sx) as usize]).abs();
                    n += 1;
                }
            }
            let e = sum / n as f32;
            if e < best.0 {
                best = (e, dx, dy);
            }
        }
    }
    (best.1, best.2)
}

/// The scale about the centre that best maps `a` onto `b` (> 1: content grew).
fn best_scale(a: &Frame, b: &Frame) -> f32 {
    let (ga, gb) = (a.gray(), b.gray());
    let (w, h) = (a.w, a.h);
    let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
    let mut best = (f32::MAX, 1.0);
    for i in 0..=16 {
        let s = 0.7 + 0.05 * i as f32;
        let mut sum = 0.0;
        let mut n = 0;
        for y in h / 4..3 * h / 4 {
            for x in w / 4..3 * w / 4 {
                let sx = ((x as f32 - cx) / s + cx).round() as usize;
                let sy = ((y as f32 - cy) / s + cy).round() as usize;
                sum += (gb[y * w + x] - ga[sy.min(h - 1) * w + sx.min(w - 1)]).abs();
                n += 1;
            }
        }
        let e = sum / n as f32;
        if e < best.0 {
            best = (e, s);
        }
    }
    best.1
}

#[test]
fn camera_moves_show_in_the_frames_at_the_default_size() {
    // The suite's default-size run: the README's command, no --model, with
    // a pan and a zoom (128x128, 16 frames, the card's 8 steps).
    let dir = scratch("camera");
    let run = |camera: &str| {
        motif(
            &dir,
            &[
                "generate",
                "a red ball bouncing on grass",
                "--seed",
                "3",
                "--camera",
                camera,
                "-q",
                "-o",
                camera,
            ],
        );
        frames(&dir.join(camera))
    };
    let pan = run("pan-left");
    assert_eq!((pan.len(), pan[0].w, pan[0].h), (16, 128, 128));
    // Content shift, summed over hops of 4 frames (a whole-clip hop can
    // exceed what a shift search over the overlap finds).
    let hops = [(0, 4), (4, 8), (8, 12), (12, 15)];
    let shifts: Vec<(i64, i64)> = hops
        .iter()
        .map(|&(a, b)| best_shift(&pan[a], &pan[b], 12))
        .collect();
    let dx: i64 = shifts.iter().map(|s| s.0).sum();
    let dy: i64 = shifts.iter().map(|s| s.1).sum();
    eprintln!("pan-left: content shifts {shifts:?}, total ({dx}, {dy}) px");
    assert!(
        dx <= -8 && dx.abs() > dy.abs(),
        "pan-left should move the content left: ({dx}, {dy})"
    );

    let zoom = run("zoom-in");
    let scale = best_scale(&zoom[0], &zoom[15]);
    eprintln!("zoom-in: content scale {scale:.2} from frame 0 to 15");
    assert!(
        scale >= 1.1,
        "zoom-in should enlarge the content: scale {scale:.2}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
