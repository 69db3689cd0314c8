//! `motif generate` on a Wan 2.1 diffusers folder (the reference set
//! tests/fixtures/wan-a, random weights at tiny widths, loaded as a user's
//! download is): an MP4 any player opens, the recipe with the sampler and
//! the shift, `--from` replaying the same frames; and the settings Wan
//! cannot take, refused before any file appears with what to pass instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wan() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wan-a")
        .to_string_lossy()
        .into_owned()
}

mod common;

fn scratch(name: &str) -> PathBuf {
    common::temp_dir(name)
}

/// `motif ARGS` in `dir`, with no model or precision from the caller's
/// environment.
fn motif(dir: &Path, args: &[&str]) -> Output {
    common::motif_command(args, &[])
        .current_dir(dir)
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .output()
        .expect("motif runs")
}

/// 48x32, 5 frames (two latent frames), 2 steps.
fn tiny<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    sized(model, ("48", "32", "5"), extra)
}

fn sized<'a>(
    model: &'a str,
    (w, h, f): (&'a str, &'a str, &'a str),
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec![
        "generate",
        "a red ball bouncing on grass",
        "--model",
        model,
        "--width",
        w,
        "--height",
        h,
        "--frames",
        f,
        "--steps",
        "2",
        "--seed",
        "7",
    ];
    a.extend_from_slice(extra);
    a
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_wan_folder_generates_an_mp4_with_its_recipe_and_replays_it() {
    let dir = scratch("mp4");
    let model = wan();
    let o = motif(
        &dir,
        &tiny(
            &model,
            &["--shift", "5", "--scheduler", "unipc", "-o", "a.mp4"],
        ),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let probe = Command::new("ffprobe")
        .args(["-v", "error", "-count_frames", "-show_entries"])
        .args([
            "stream=codec_name,width,height,nb_read_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(dir.join("a.mp4"))
        .output()
        .expect("ffprobe runs (apt-get install ffmpeg)");
    assert_eq!(
        String::from_utf8_lossy(&probe.stdout).trim(),
        "h264,48,32,5"
    );
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a.json")).unwrap()).unwrap();
    assert_eq!(recipe["scheduler"], "unipc");
    assert_eq!(recipe["shift"], 5.0);
    assert_eq!(recipe["fps"], 16.0, "Wan's own frame rate");
    // The same recipe gives the same frames (PNG frames compare exactly).
    let o = motif(&dir, &["generate", "--from", "a.json", "-o", "b"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = motif(
        &dir,
        &tiny(&model, &["--shift", "5", "--scheduler", "unipc", "-o", "c"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let frames = |d: &str| png_frames(&dir.join(d));
    assert_eq!(frames("b").len(), 5);
    assert_eq!(frames("b"), frames("c"));
    // Another shift is another clip.
    let o = motif(
        &dir,
        &tiny(&model, &["--shift", "2", "--scheduler", "unipc", "-o", "d"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(frames("b"), frames("d"));
}

#[test]
fn settings_wan_cannot_take_are_refused_with_what_to_pass() {
    let dir = scratch("refused");
    let model = wan();
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/models/default")
        .to_string_lossy()
        .into_owned();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (sized(&model, ("48", "32", "6"), &[]), "pass 5 or 9"),
        (sized(&model, ("40", "32", "5"), &[]), "pass 32 or 48"),
        (
            tiny(&model, &["--camera", "zoom-in"]),
            "`camera` is not supported",
        ),
        (
            tiny(&model, &["--motion", "3"]),
            "`motion` is not supported",
        ),
        (tiny(&model, &["--scheduler", "ddim"]), "scheduler ddim"),
        (
            sized(&bundled, ("32", "32", "4"), &["--shift", "3"]),
            "`shift` is not supported",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend_from_slice(&["-o", "x.mp4"]);
        let o = motif(&dir, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert!(!dir.join("x.mp4").exists(), "{args:?} left a file");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
}

#[test]
fn a_wan_lora_changes_the_clip_at_its_weight_and_misfits_are_refused() {
    let dir = scratch("lora");
    let model = wan();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let lora = |name: &str, weight: &str| {
        format!(
            "{}:{weight}",
            fixtures.join("wan-lora").join(name).display()
        )
    };
    let (with, zero) = (
        lora("comfy.safetensors", "0.7"),
        lora("comfy.safetensors", "0"),
    );
    for (out, extra) in [
        ("plain", vec![]),
        ("with", vec!["--lora", with.as_str()]),
        ("zero", vec!["--lora", zero.as_str()]),
    ] {
        let mut args = tiny(&model, &extra);
        args.extend_from_slice(&["-o", out]);
        let o = motif(&dir, &args);
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
    }
    // The frames' pixels (each PNG also carries its recipe, which names the LoRA).
    let pixels = |d: &str| {
        common::pngs(&dir.join(d))
            .iter()
            .map(|p| image::open(p).unwrap().to_rgb8().into_raw())
            .collect::<Vec<_>>()
    };
    assert_eq!(pixels("plain").len(), 5);
    assert_ne!(pixels("plain"), pixels("with"), "the LoRA changed nothing");
    assert_eq!(pixels("plain"), pixels("zero"), "weight 0 is no LoRA");

    // An AnimateDiff LoRA on Wan: refused before any file appears.
    let sd = format!("{}:0.5", fixtures.join("lora/kohya.safetensors").display());
    let mut args = tiny(&model, &["--lora", sd.as_str()]);
    args.extend_from_slice(&["-o", "x.mp4"]);
    let o = motif(&dir, &args);
    assert!(!o.status.success(), "an SD LoRA was accepted");
    let e = stderr(&o);
    assert!(
        e.contains("kohya.safetensors") && e.contains("this LoRA is for Stable Diffusion"),
        "{e}"
    );
    assert!(
        !dir.join("x.mp4").exists() && !e.contains("panicked"),
        "{e}"
    );
}

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// A still with a gradient per channel (`tint` changes it).
fn write_png(path: &Path, (w, h): (u32, u32), tint: u8) {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([(x * 5) as u8, (y * 7) as u8, tint])
    })
    .save(path)
    .unwrap();
}

/// All PNG frames of an output folder, in order.
fn png_frames(dir: &Path) -> Vec<Vec<u8>> {
    common::pngs(dir)
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

#[test]
fn wan_image_to_video_folders_animate_a_still_and_end_on_a_last_one() {
    // wan-i2v (Wan2.1-I2V layout) and wan-flf2v (first-last frame): the
    // reference sets' folders, loaded as a user's download is.
    let dir = scratch("i2v");
    write_png(&dir.join("first.png"), (48, 32), 40);
    write_png(&dir.join("other.png"), (48, 32), 220);
    write_png(&dir.join("last.png"), (60, 40), 200);
    let (i2v, flf) = (fixture("wan-i2v"), fixture("wan-flf2v"));

    let o = motif(&dir, &tiny(&i2v, &["--image", "first.png", "-o", "a"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_frames(&dir.join("a")).len(), 5);
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/recipe.json")).unwrap()).unwrap();
    assert_eq!(recipe["image"], "first.png");
    // The still conditions the clip: another still, another clip.
    let o = motif(&dir, &tiny(&i2v, &["--image", "other.png", "-o", "b"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(png_frames(&dir.join("a")), png_frames(&dir.join("b")));

    // First-last frame, a last image of another size (resized as diffusers does).
    let args = sized(
        &flf,
        ("32", "48", "9"),
        &[
            "--image",
            "first.png",
            "--last-image",
            "last.png",
            "-o",
            "c.mp4",
        ],
    );
    let o = motif(&dir, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("c.json")).unwrap()).unwrap();
    assert_eq!(recipe["last_image"], "last.png");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_stills_and_image_to_video_folders_are_refused_before_any_output() {
    let dir = scratch("i2v-refused");
    write_png(&dir.join("first.png"), (48, 32), 40);
    write_png(&dir.join("tiny.png"), (12, 20), 40);
    std::fs::write(dir.join("broken.png"), b"not a png at all").unwrap();
    let (i2v, flf, t2v) = (fixture("wan-i2v"), fixture("wan-flf2v"), wan());
    // An image-to-video folder whose model_index.json names no image encoder.
    let no_encoder = dir.join("no-encoder");
    std::fs::create_dir_all(&no_encoder).unwrap();
    for entry in std::fs::read_dir(&i2v).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if path.is_dir() && name != "image_encoder" && name != "image_processor" {
            let to = no_encoder.join(&name);
            std::fs::create_dir_all(&to).unwrap();
            for f in std::fs::read_dir(&path).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
            }
        }
    }
    let mut index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(&i2v).join("model_index.json")).unwrap(),
    )
    .unwrap();
    index["image_encoder"] = serde_json::json!([null, null]);
    index["image_processor"] = serde_json::json!([null, null]);
    std::fs::write(no_encoder.join("model_index.json"), index.to_string()).unwrap();
    let no_encoder = no_encoder.to_string_lossy().into_owned();

    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            tiny(&i2v, &["--image", "broken.png"]),
            "broken.png: cannot read the image",
        ),
        (
            tiny(&i2v, &["--image", "tiny.png"]),
            "12x20 pixels; at least 16x16",
        ),
        (
            tiny(&flf, &["--last-image", "first.png"]),
            "needs a first image too",
        ),
        (
            tiny(
                &flf,
                &["--image", "first.png", "--last-image", "broken.png"],
            ),
            "broken.png",
        ),
        (tiny(&i2v, &[]), "image-to-video model: give it the still"),
        (
            tiny(&flf, &["--image", "first.png"]),
            "first-last-frame model: give it the last frame too",
        ),
        (
            tiny(&i2v, &["--image", "first.png", "--last-image", "first.png"]),
            "`last_image` is not supported",
        ),
        (
            tiny(&t2v, &["--image", "first.png"]),
            "`image` is not supported",
        ),
        (
            tiny(&i2v, &["--image", "first.png", "--strength", "0.5"]),
            "`strength` is not supported",
        ),
        (
            tiny(&no_encoder, &["--image", "first.png"]),
            "names no image encoder",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend_from_slice(&["-o", "x.mp4"]);
        let o = motif(&dir, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert!(!dir.join("x.mp4").exists(), "{args:?} left a file");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wan_ti2v_folder_makes_text_to_video_and_animates_a_still() {
    // wan-ti2v (Wan 2.2 TI2V-5B layout: expand_timesteps, the 48-channel
    // VAE), loaded as a user's download is: one model for both.
    let dir = scratch("ti2v");
    write_png(&dir.join("first.png"), (64, 32), 40);
    write_png(&dir.join("other.png"), (50, 70), 220);
    let ti2v = fixture("wan-ti2v");
    let clip = ("64", "32", "5");

    let o = motif(&dir, &sized(&ti2v, clip, &["-o", "t2v"]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_frames(&dir.join("t2v")).len(), 5);
    let o = motif(
        &dir,
        &sized(&ti2v, clip, &["--image", "first.png", "-o", "a"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(png_frames(&dir.join("a")).len(), 5);
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("a/recipe.json")).unwrap()).unwrap();
    assert_eq!(recipe["image"], "first.png");
    // TI2V-5B's own frame rate, not Wan 2.1's 16.
    assert_eq!(recipe["fps"], 24.0);
    // The still conditions the clip (another one, of another size, is
    // resized to the clip): not the text-to-video clip, not the first still's.
    let o = motif(
        &dir,
        &sized(&ti2v, clip, &["--image", "other.png", "-o", "b"]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert_ne!(png_frames(&dir.join("a")), png_frames(&dir.join("t2v")));
    assert_ne!(png_frames(&dir.join("a")), png_frames(&dir.join("b")));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wan_ti2v_folder_refuses_sizes_off_32_and_a_last_image() {
    let dir = scratch("ti2v-refused");
    write_png(&dir.join("first.png"), (64, 32), 40);
    let ti2v = fixture("wan-ti2v");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        // Multiples of 16 that Wan 2.1 takes: the 2.2 VAE's 16 × the 2x2 patch.
        (
            sized(&ti2v, ("48", "32", "5"), &[]),
            "--width 48: not a multiple of 32 (what the model's latents need); pass 32 or 64",
        ),
        (
            sized(&ti2v, ("64", "80", "5"), &["--image", "first.png"]),
            "--height 80: not a multiple of 32 (what the model's latents need); pass 64 or 96",
        ),
        (
            sized(
                &ti2v,
                ("64", "32", "5"),
                &["--image", "first.png", "--last-image", "first.png"],
            ),
            "`last_image` is not supported by the model",
        ),
    ];
    for (args, expected) in cases {
        let mut args = args;
        args.extend_from_slice(&["-o", "x.mp4"]);
        let o = motif(&dir, &args);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(stderr(&o).contains(expected), "{args:?}: {}", stderr(&o));
        assert!(!dir.join("x.mp4").exists(), "{args:?} left a file");
        assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
