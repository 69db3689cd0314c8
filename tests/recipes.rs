//! Recipes written by the release before the recipe type
//! (tests/fixtures/recipes, see its README) still load, from a sidecar and
//! from inside an MP4, a GIF, a WebP and a PNG folder, and a server-made job
//! and recipe too; and replayed with `--from` they make the same clips, byte
//! for byte (the recipe inside included).

use std::path::{Path, PathBuf};
use std::process::Command;

use motif_recipe::{CameraMove, Lora, Recipe, Scheduler};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/recipes")
}

fn read(name: &str) -> Recipe {
    let path = fixtures().join(name);
    let text = motif_video::read_recipe(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
    Recipe::from_json(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn old_recipes_load_from_sidecars_and_clips() {
    for (sidecar, clip) in [
        ("plain.json", "plain.mp4"),
        ("styled.json", "styled.gif"),
        ("still.json", "still.webp"),
        ("frames/recipe.json", "frames"),
    ] {
        let (a, b) = (read(sidecar), read(clip));
        assert_eq!(a, b, "{sidecar} and the recipe inside {clip}");
        a.validate().unwrap_or_else(|e| panic!("{sidecar}: {e}"));
        assert!(a.family_controls().is_empty());
    }
    let styled = read("styled.json");
    assert_eq!(styled.camera, Some(CameraMove::PanLeft));
    assert_eq!(styled.scheduler, Some(Scheduler::Euler));
    assert_eq!(
        (styled.karras, styled.style.as_deref()),
        (Some(true), Some("anime"))
    );
    let still = read("still.webp");
    assert_eq!(
        (still.image.as_deref(), still.strength),
        (Some("still.png"), Some(0.6))
    );
    let frames = read("frames");
    assert_eq!(frames.loras, vec![Lora("lora.safetensors".into(), 0.5)]);
    assert_eq!(frames.clip_skip, Some(1));

    // Made by the server: the served recipe, the one inside the stored clip,
    // and the job's fields as the job table keeps them.
    let served = read("server-recipe.json");
    assert_eq!(served.image.as_deref(), Some("(uploaded)"));
    assert_eq!(served.camera, Some(CameraMove::ZoomIn));
    let stored = read("server.webp");
    assert_eq!(stored.seed, served.seed);
    let job: motif_server::JobRequest = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("api-request.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(job.prompt(), "a cat, moving");
    assert_eq!(job.format(), motif_recipe::OutputFormat::Webp);
    assert_eq!(
        (job.recipe.motion, job.recipe.strength),
        (Some(1.5), Some(0.5))
    );
}

/// `motif generate --from` each old clip in a copy of the fixtures (the
/// recipes name the still and the LoRA relative to it): the same file.
#[test]
fn old_recipes_replay_to_the_same_clips() {
    let dir = std::env::temp_dir().join(format!("motif-recipes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("frames")).unwrap();
    for name in ["still.png", "lora.safetensors"] {
        std::fs::copy(fixtures().join(name), dir.join(name)).unwrap();
    }
    for (from, out) in [
        ("plain.json", "plain.mp4"),
        ("styled.gif", "styled.gif"),
        ("still.webp", "still.webp"),
        ("frames", "frames"),
    ] {
        let status = Command::new(env!("CARGO_BIN_EXE_motif"))
            .current_dir(&dir)
            .args(["generate", "-q", "--from"])
            .arg(fixtures().join(from))
            .args(["-o", &format!("new-{out}")])
            .env("XDG_RUNTIME_DIR", std::env::temp_dir())
            .env_remove("MOTIF_MODEL")
            .env_remove("MOTIF_PRECISION")
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "--from {from}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let files = |p: &Path| -> Vec<(String, Vec<u8>)> {
            if p.is_dir() {
                let mut v: Vec<_> = std::fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .map(|f| {
                        let name = f.file_name().unwrap().to_string_lossy().into_owned();
                        (name, std::fs::read(&f).unwrap())
                    })
                    .collect();
                v.sort();
                v
            } else {
                vec![(String::new(), std::fs::read(p).unwrap())]
            }
        };
        let (old, new) = (
            files(&fixtures().join(out)),
            files(&dir.join(format!("new-{out}"))),
        );
        assert_eq!(old.len(), new.len(), "{out}");
        for ((name, a), (_, b)) in old.iter().zip(&new) {
            assert!(a == b, "{out} {name}: the replayed clip differs");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--from` names what is wrong with a recipe: an unknown or ill-typed
/// field, a value out of range, a control the model's family lacks.
#[test]
fn bad_recipes_are_refused_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("motif-bad-recipes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for (fields, expected) in [
        (r#""promt": "a""#, "unknown field `promt`"),
        (r#""width": "wide""#, "`width`"),
        (r#""motion": 7"#, "--motion 7"),
        (r#""shift": 3.0"#, "`shift` is not supported by the model"),
        (
            r#""video": "in.mp4""#,
            "--video is not supported by any model family yet",
        ),
    ] {
        let path = dir.join("r.json");
        std::fs::write(
            &path,
            format!(r#"{{"format": "motif-recipe-v1", "prompt": "a ball", {fields}}}"#),
        )
        .unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_motif"))
            .current_dir(&dir)
            .args(["generate", "--from", "r.json", "-o", "out.mp4"])
            .env_remove("MOTIF_MODEL")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{fields} was accepted");
        assert!(
            stderr.contains(expected),
            "{fields}: `{expected}` not in {stderr}"
        );
        assert!(!dir.join("out.mp4").exists());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
