//! The default model travels with the binary: a copy of `motif` in a folder
//! of its own, run from an unrelated folder with every data and cache folder
//! fresh, makes a clip from the default model, which it unpacks once into
//! the cache folder (MOTIF_CACHE_DIR) and reuses; nothing points back into
//! the source tree. A cache folder that cannot be written is named, with
//! what to set.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::{motif_command_at, temp_dir};

/// A copy of the built binary with a home, data, cache and working folder of
/// its own, all empty.
struct Installed {
    root: PathBuf,
    bin: PathBuf,
    cwd: PathBuf,
    cache: PathBuf,
    env: Vec<(String, String)>,
}

impl Installed {
    fn new(name: &str) -> Installed {
        let root = temp_dir(name);
        let bin = root.join("bin").join("motif");
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        std::fs::copy(common::MOTIF, &bin).unwrap();
        let [cwd, home, data, cache, hf] =
            ["cwd", "home", "data", "cache", "hf"].map(|d| root.join(d));
        for d in [&cwd, &home, &data] {
            std::fs::create_dir_all(d).unwrap();
        }
        let s = |p: &Path| p.to_str().unwrap().to_string();
        let env = vec![
            ("HOME".into(), s(&home)),
            ("XDG_DATA_HOME".into(), s(&data)),
            ("XDG_CACHE_HOME".into(), s(&home.join(".cache"))),
            ("XDG_CONFIG_HOME".into(), s(&home.join(".config"))),
            ("MOTIF_CACHE_DIR".into(), s(&cache)),
            ("MOTIF_MODELS".into(), s(&data.join("models"))),
            ("MOTIF_OUTPUTS".into(), s(&data.join("outputs"))),
            ("HF_HOME".into(), s(&hf)),
            ("HF_HUB_CACHE".into(), s(&hf.join("hub"))),
        ];
        Installed {
            root,
            bin,
            cwd,
            cache,
            env,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        // Another test thread forking while this one's copy of the binary
        // was still open for writing holds that descriptor in its child
        // until the child execs: running the copy then fails with "text
        // file busy" (ETXTBSY) for that moment, so that is tried again.
        for _ in 0..50 {
            match motif_command_at(&self.bin, args, &env)
                .current_dir(&self.cwd)
                // The caller's choice of model would hide the default.
                .env_remove("MOTIF_MODEL")
                .env_remove("MOTIF_PRECISION")
                .output()
            {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(std::time::Duration::from_millis(100))
                }
                other => return other.unwrap(),
            }
        }
        panic!("{}: still busy after 5 s", self.bin.display())
    }

    /// A tiny clip from the default model: 64x64, 4 frames, 2 steps.
    fn generate(&self, out: &str) -> Output {
        self.run(&[
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
            "5",
            "-q",
            "-o",
            out,
        ])
    }

    /// What is in CACHE/bundled (the unpacked copies and any temporary
    /// folder left behind).
    fn unpacked(&self) -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(self.cache.join("bundled"))
            .map(|entries| entries.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        found.sort();
        found
    }
}

/// Each copy holds the binary and an unpacked model (about 100 MB): left
/// behind, every test run would fill the temporary folder.
impl Drop for Installed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn succeeded(out: &Output) {
    assert!(out.status.success(), "motif failed:\n{}", text(out));
}

#[test]
fn a_copied_binary_makes_a_clip_from_the_default_model_it_carries() {
    let motif = Installed::new("copy");
    let source_tree = env!("CARGO_MANIFEST_DIR");

    let out = motif.generate("first.gif");
    succeeded(&out);
    let clip = motif.cwd.join("first.gif");
    assert!(
        std::fs::metadata(&clip)
            .map(|m| m.len() > 0)
            .unwrap_or(false),
        "{} was not written",
        clip.display()
    );
    // One copy, complete, and no temporary folder left.
    let unpacked = motif.unpacked();
    assert_eq!(unpacked.len(), 1, "{unpacked:?}");
    let copy = &unpacked[0];
    let name = copy.file_name().unwrap().to_str().unwrap();
    assert!(name.starts_with("default-"), "{name}");
    for file in [
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
    ] {
        assert!(copy.join(file).is_file(), "{file} missing in {copy:?}");
    }

    // `motif models` lists the default as bundled, at the unpacked copy,
    // and nothing under the source tree.
    let out = motif.run(&["models"]);
    succeeded(&out);
    let listing = String::from_utf8_lossy(&out.stdout);
    let mut lines = listing.lines();
    let default = lines
        .find(|l| l.starts_with("default"))
        .unwrap_or_else(|| panic!("no default listed:\n{listing}"));
    assert!(
        default.contains("bundled") && default.contains("AnimateDiff"),
        "{default}"
    );
    assert_eq!(
        lines.next().map(str::trim),
        copy.to_str(),
        "the default is not the unpacked copy:\n{listing}"
    );
    assert!(
        !listing.contains(source_tree),
        "the listing points into the source tree {source_tree}:\n{listing}"
    );

    // A second run uses that copy as it is: a file put beside it stays, the
    // weights are not written again, no second copy appears.
    let marker = copy.join("kept-between-runs");
    std::fs::write(&marker, b"").unwrap();
    let weights = copy.join("unet/diffusion_pytorch_model.safetensors");
    let written = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let out = motif.generate("second.gif");
    succeeded(&out);
    assert!(motif.cwd.join("second.gif").is_file());
    assert!(marker.is_file(), "the unpacked copy was replaced");
    assert_eq!(
        std::fs::metadata(&weights).unwrap().modified().unwrap(),
        written,
        "the weights were written again"
    );
    assert_eq!(motif.unpacked(), unpacked);
    // The same seed on the same copy: the same clip.
    assert_eq!(
        std::fs::read(&clip).unwrap(),
        std::fs::read(motif.cwd.join("second.gif")).unwrap()
    );
}

#[test]
fn first_runs_started_together_unpack_one_copy() {
    let motif = Installed::new("race");
    let env: Vec<(&str, &str)> = motif
        .env
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let children: Vec<_> = (0..4)
        .map(|_| {
            motif_command_at(&motif.bin, &["models"], &env)
                .current_dir(&motif.cwd)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    for out in &outputs {
        succeeded(out);
    }
    let unpacked = motif.unpacked();
    assert_eq!(unpacked.len(), 1, "{unpacked:?}");
    for out in &outputs {
        let listing = String::from_utf8_lossy(&out.stdout);
        assert!(listing.contains(unpacked[0].to_str().unwrap()), "{listing}");
    }
}

#[test]
fn a_cache_folder_that_cannot_be_written_is_named() {
    let mut motif = Installed::new("unwritable");
    // A folder under a plain file cannot be made, even by root.
    let file = motif.cwd.join("a-file");
    std::fs::write(&file, b"").unwrap();
    let cache = file.join("cache");
    for (k, v) in &mut motif.env {
        if k == "MOTIF_CACHE_DIR" {
            *v = cache.to_str().unwrap().to_string();
        }
    }
    let out = motif.generate("never.gif");
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(cache.to_str().unwrap()) && stderr.contains("MOTIF_CACHE_DIR"),
        "{stderr}"
    );
    assert!(!motif.cwd.join("never.gif").exists());
}

#[test]
fn a_damaged_copy_is_refused_by_name() {
    let motif = Installed::new("damaged");
    succeeded(&motif.run(&["models"]));
    let copy = motif.unpacked().remove(0);
    let weights = copy.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let out = motif.generate("never.gif");
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(copy.to_str().unwrap())
            && stderr.contains("vae/diffusion_pytorch_model.safetensors")
            && stderr.contains("delete"),
        "{stderr}"
    );
    assert!(!motif.cwd.join("never.gif").exists());
}
