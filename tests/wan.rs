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
    let frames = |d: &str| {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(d))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "png"))
            .collect();
        names.sort();
        names
            .iter()
            .map(|p| std::fs::read(p).unwrap())
            .collect::<Vec<_>>()
    };
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
        let mut names: Vec<_> = std::fs::read_dir(dir.join(d))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "png"))
            .collect();
        names.sort();
        names
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
