//! `motif generate` end to end on the bundled default model
//! (assets/models/default) at tiny sizes: every output
//! format, the recipe (sidecar and embedded), reproducibility by seed and by
//! `--from`, image animation, JSON progress, and the bad-input cases, which
//! must fail before any file appears.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn model() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/models/default")
        .to_string_lossy()
        .into_owned()
}

/// A kohya LoRA for the LoRA fixture model, whose widths differ from the bundled model's.
const LORA_OTHER_MODEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/lora/kohya.safetensors"
);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-gen-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn motif(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_motif"))
        .current_dir(dir)
        .args(args)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .output()
        .expect("motif runs")
}

/// A tiny generation: 24x16, 3 frames, 2 steps.
fn tiny<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "generate",
        "a red ball bouncing on grass",
        "--model",
        model,
        "--width",
        "24",
        "--height",
        "16",
        "--frames",
        "3",
        "--steps",
        "2",
    ];
    a.extend_from_slice(extra);
    a
}

/// Like `tiny` without width and frames, for cases that set them.
fn plain<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "generate",
        "a red ball",
        "--model",
        model,
        "--height",
        "16",
        "--steps",
        "2",
    ];
    a.extend_from_slice(extra);
    a
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "motif failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names
}

fn png_frames(folder: &Path) -> Vec<Vec<u8>> {
    let mut names: Vec<String> = files_in(folder)
        .into_iter()
        .filter(|n| n.ends_with(".png"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|n| image::open(folder.join(n)).unwrap().to_rgb8().into_raw())
        .collect()
}

fn ffprobe(path: &Path) -> serde_json::Value {
    let out = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-count_frames",
            "-show_streams",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .expect("ffprobe runs (install ffmpeg; CI does)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn writes_mp4_gif_webp_and_png_frames_with_the_recipe() {
    let dir = scratch("formats");
    let m = model();
    for name in ["clip.mp4", "clip.gif", "clip.webp", "frames"] {
        let out = motif(
            &dir,
            &tiny(&m, &["--seed", "5", "--fps", "12", "-o", name, "--quiet"]),
        );
        ok(&out);
        let path = dir.join(name);
        assert!(path.exists(), "{name} missing");
        // The recipe is embedded and in the sidecar, and says what was asked.
        let recipe: serde_json::Value =
            serde_json::from_str(&motif_video::read_recipe(&path).unwrap()).unwrap();
        assert_eq!(recipe["prompt"], "a red ball bouncing on grass");
        assert_eq!(
            (recipe["seed"].as_u64(), recipe["frames"].as_u64()),
            (Some(5), Some(3))
        );
        assert_eq!(recipe["model"], m.as_str());
        let sidecar: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(motif_video::sidecar_path(&path)).unwrap(),
        )
        .unwrap();
        assert_eq!(sidecar, recipe);
    }
    let probe = ffprobe(&dir.join("clip.mp4"));
    let s = &probe["streams"][0];
    assert_eq!(s["codec_name"], "h264");
    assert_eq!(s["pix_fmt"], "yuv420p");
    assert_eq!(
        (s["width"].as_u64(), s["height"].as_u64()),
        (Some(24), Some(16))
    );
    assert_eq!(s["nb_read_frames"], "3");
    assert_eq!(s["r_frame_rate"], "12/1");
    assert_eq!(png_frames(&dir.join("frames")).len(), 3);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_same_seed_and_a_remix_give_the_same_frames() {
    let dir = scratch("seed");
    let m = model();
    ok(&motif(&dir, &tiny(&m, &["--seed", "11", "-o", "a", "-q"])));
    ok(&motif(&dir, &tiny(&m, &["--seed", "11", "-o", "b", "-q"])));
    ok(&motif(&dir, &tiny(&m, &["--seed", "12", "-o", "c", "-q"])));
    let (a, b, c) = (
        png_frames(&dir.join("a")),
        png_frames(&dir.join("b")),
        png_frames(&dir.join("c")),
    );
    assert_eq!(a, b, "same seed, different frames");
    assert_ne!(a, c, "different seeds, same frames");
    // --from the sidecar reproduces the clip bit for bit; a flag beside it overrides.
    ok(&motif(
        &dir,
        &["generate", "--from", "a/recipe.json", "-o", "d", "-q"],
    ));
    assert_eq!(png_frames(&dir.join("d")), a);
    ok(&motif(
        &dir,
        &[
            "generate",
            "--from",
            "a/recipe.json",
            "--seed",
            "12",
            "-o",
            "e",
            "-q",
        ],
    ));
    assert_eq!(png_frames(&dir.join("e")), c);
    // No seed: a random one, printed in the recipe.
    ok(&motif(&dir, &tiny(&m, &["-o", "f", "-q"])));
    let recipe: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("f/recipe.json")).unwrap()).unwrap();
    assert!(recipe["seed"].is_u64());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn animates_a_still_and_reports_json_events() {
    let dir = scratch("image");
    let m = model();
    let still = image::RgbImage::from_fn(40, 30, |x, y| {
        image::Rgb([(x * 6) as u8, (y * 8) as u8, 128])
    });
    still.save(dir.join("still.png")).unwrap();
    let out = motif(
        &dir,
        &tiny(
            &m,
            &[
                "--image",
                "still.png",
                "--strength",
                "0.5",
                "--seed",
                "3",
                "-o",
                "anim.gif",
                "--json",
            ],
        ),
    );
    ok(&out);
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON event per line"))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    assert_eq!(kinds.first(), Some(&"start"));
    assert_eq!(kinds.last(), Some(&"done"));
    // strength 0.5 of 2 steps leaves one denoising step.
    assert_eq!(
        kinds.iter().filter(|k| **k == "step").count(),
        1,
        "{kinds:?}"
    );
    assert_eq!(kinds.iter().filter(|k| **k == "decoded").count(), 3);
    assert!(dir.join("anim.gif").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_input_fails_before_any_file_is_written() {
    let dir = scratch("bad");
    let m = model();
    std::fs::write(dir.join("not-an-image.png"), b"nope").unwrap();
    std::fs::write(dir.join("not-a-recipe.json"), b"{\"prompt\": 1}").unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            tiny(&m, &["--camera", "sideways"]),
            "unknown camera move `sideways`",
        ),
        (tiny(&m, &["--scheduler", "heun"]), "--scheduler"),
        (tiny(&m, &["--style", "baroque"]), "unknown style `baroque`"),
        (plain(&m, &["--width", "30", "--frames", "3"]), "--width 30"),
        (
            plain(&m, &["--width", "24", "--frames", "0"]),
            "--frames 0: expected at least 1",
        ),
        (tiny(&m, &["--motion", "7"]), "--motion 7"),
        (
            tiny(&m, &["--image", "not-an-image.png"]),
            "not-an-image.png",
        ),
        (tiny(&m, &["--image", "missing.png"]), "missing.png"),
        (
            tiny(&m, &["--lora", "missing.safetensors:0.7"]),
            "missing.safetensors",
        ),
        (tiny("/no/such/model", &[]), "/no/such/model"),
        // A LoRA made for another model: named, with the expected shape.
        (tiny(&m, &["--lora", LORA_OTHER_MODEL]), "kohya.safetensors"),
        (
            plain(&m, &["--width", "24", "--frames", "4", "--strength", "0"]),
            "--strength 0",
        ),
        (
            vec!["generate", "--from", "not-a-recipe.json"],
            "not-a-recipe.json",
        ),
        (vec!["generate", "--model", &m], "no prompt"),
        (tiny(&m, &["-o", "clip.avi"]), "clip.avi"),
    ];
    for (args, expected) in cases {
        let mut args = args.clone();
        if !args.contains(&"-o") {
            args.extend_from_slice(&["-o", "out.mp4"]);
        }
        let out = motif(&dir, &args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(
            stderr.contains(expected),
            "{args:?}: expected `{expected}` in:\n{stderr}"
        );
        let left: Vec<String> = files_in(&dir)
            .into_iter()
            .filter(|n| n != "not-an-image.png" && n != "not-a-recipe.json")
            .collect();
        assert!(left.is_empty(), "{args:?} left files: {left:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clips_longer_than_the_motion_window_run_through_context_windows() {
    // The bundled model's motion modules see 32 frames at a time; 34 frames
    // run as overlapping windows (FreeNoise, checked against diffusers by
    // the cases-b pipeline conformance case).
    let dir = scratch("long");
    let m = model();
    ok(&motif(
        &dir,
        &plain(
            &m,
            &[
                "--width", "24", "--frames", "34", "--seed", "2", "-o", "long", "-q",
            ],
        ),
    ));
    assert_eq!(png_frames(&dir.join("long")).len(), 34);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn styles_and_models_are_listed() {
    let dir = scratch("lists");
    let out = motif(&dir, &["styles"]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    for name in [
        "cinematic",
        "anime",
        "watercolor",
        "claymation",
        "pixel-art",
        "3d-render",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{text}"
        );
    }
    // A models folder with one model in it.
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let link = models.join("tiny");
    std::os::unix::fs::symlink(model(), &link).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_motif"))
        .arg("models")
        .env("MOTIF_MODELS", &models)
        .env("HF_HUB_CACHE", dir.join("no-cache"))
        .output()
        .unwrap();
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("tiny")
            && text.contains("models folder")
            && text.contains("merged motion UNet")
            && text.contains("AnimateDiff")
            && text.contains("bundled"),
        "{text}"
    );
    // ... and usable by name.
    let out = Command::new(env!("CARGO_BIN_EXE_motif"))
        .current_dir(&dir)
        .args(tiny("tiny", &["-o", "named.gif", "-q"]))
        .env("MOTIF_MODELS", &models)
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap();
    ok(&out);
    assert!(dir.join("named.gif").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_camera_move_uses_the_models_motion_lora_when_it_ships_one() {
    let dir = scratch("camera-lora");
    // The fixture model, linked entry by entry, plus motion_loras/.
    let folder = dir.join("model");
    std::fs::create_dir_all(&folder).unwrap();
    for entry in std::fs::read_dir(model()).unwrap() {
        let entry = entry.unwrap();
        std::os::unix::fs::symlink(entry.path(), folder.join(entry.file_name())).unwrap();
    }
    let m = folder.to_string_lossy().into_owned();
    let args = |extra: &[&'static str]| -> Vec<String> {
        let mut a: Vec<String> = tiny(&m, &["--seed", "4", "-q"])
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |a: Vec<String>| {
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        motif(&dir, &refs)
    };
    ok(&run(args(&["--camera", "pan-left", "-o", "warp"])));
    // A motion LoRA (PEFT names) on the first motion module's attention.
    let (r, c) = (2usize, 64usize);
    let down: Vec<f32> = (0..r * c)
        .map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.05)
        .collect();
    let up: Vec<f32> = (0..c * r)
        .map(|i| ((i * 5 % 13) as f32 - 6.0) * 0.05)
        .collect();
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (db, ub) = (bytes(&down), bytes(&up));
    let base = "unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q";
    let (ka, kb) = (
        format!("{base}.lora_A.weight"),
        format!("{base}.lora_B.weight"),
    );
    std::fs::create_dir_all(folder.join("motion_loras")).unwrap();
    let lora = folder.join("motion_loras/pan-left.safetensors");
    use motif_engine::weights::FileDType;
    motif_engine::weights::safetensors::write(
        &lora,
        &[
            (&ka, FileDType::F32, &[r, c], &db),
            (&kb, FileDType::F32, &[c, r], &ub),
        ],
    )
    .unwrap();
    let out = run(args(&["--camera", "pan-left", "-o", "lora"]));
    ok(&out);
    let lora_arg = format!("{}:1", lora.display());
    let mut explicit = args(&["-o", "explicit"]);
    explicit.extend(["--lora".to_string(), lora_arg]);
    ok(&run(explicit));
    let (warp, with_lora, explicit) = (
        png_frames(&dir.join("warp")),
        png_frames(&dir.join("lora")),
        png_frames(&dir.join("explicit")),
    );
    assert_ne!(warp, with_lora, "the motion LoRA changed nothing");
    // The shipped LoRA replaces the warp: the same as fusing it by hand
    // with no camera move.
    assert_eq!(with_lora, explicit);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_interrupted_run_leaves_nothing() {
    let dir = scratch("interrupt");
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_motif"))
        .current_dir(&dir)
        .args([
            "generate",
            "a red ball",
            "--model",
            &m,
            "--width",
            "64",
            "--height",
            "64",
            "--frames",
            "4",
            "--steps",
            "400",
            "-o",
            "clip.mp4",
            "--json",
        ])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first step event, then press Ctrl-C.
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        let line = lines.next().expect("a step event before the end").unwrap();
        if line.contains("\"step\"") {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{status:?}");
    assert_eq!(files_in(&dir), Vec::<String>::new());
    let _ = std::fs::remove_dir_all(&dir);
}
