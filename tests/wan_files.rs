//! Wan from the files users have: wan-a re-saved as single files with the
//! original key names (tests/fixtures/wan-files, tools/fixtures/make_wan_files.py)
//! in bf16 and in fp8 (scaled e4m3fn transformer, e5m2 text encoder) passes
//! `motif conformance` in f32, the tokenizer read from the UMT5 file's
//! `spiece_model` tensor; and bad files are refused before any GPU work
//! (with an adapter that does not exist, the file's error comes first),
//! naming the file and what to pass instead, leaving no output file.

use std::path::Path;
use std::process::Output;

use motif_engine::weights::safetensors::{self, FileDType};
use motif_engine::weights::SafetensorsFile;

mod common;

fn fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wan-files")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

fn motif(dir: &Path, args: &[&str]) -> Output {
    common::motif_command(args, &[])
        .current_dir(dir)
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .env_remove("MOTIF_ADAPTER")
        .output()
        .expect("motif runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn wan_a_as_bf16_and_fp8_single_files_passes_conformance_in_f32() {
    let dir = common::temp_dir("wan-files-conformance");
    for set in ["bf16", "fp8"] {
        let o = motif(&dir, &["conformance", &fixture(set), "--precision", "f32"]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{set}: {out}\n{}", stderr(&o));
        assert!(out.contains("12 passed, 0 failed"), "{set}: {out}");
    }
}

/// A copy of `src` with `edit` applied to its tensors (name, dtype, shape, bytes).
fn rewrite(
    src: &str,
    dst: &Path,
    edit: impl Fn(&mut Vec<(String, FileDType, Vec<usize>, Vec<u8>)>),
) -> String {
    let file = SafetensorsFile::open(src).unwrap();
    let mut tensors: Vec<(String, FileDType, Vec<usize>, Vec<u8>)> = file
        .names()
        .map(|k| {
            let info = file.info(k).unwrap();
            (
                k.to_string(),
                info.dtype,
                info.shape.clone(),
                file.bytes(k).unwrap().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let refs: Vec<(&str, FileDType, &[usize], &[u8])> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.as_str(), *d, s.as_slice(), b.as_slice()))
        .collect();
    safetensors::write(dst, &refs).unwrap();
    dst.to_string_lossy().into_owned()
}

#[test]
fn bad_files_are_refused_before_gpu_work_naming_the_file_and_what_to_pass() {
    let dir = common::temp_dir("wan-files-refused");
    let transformer = fixture("bf16/transformer.safetensors");
    let umt5 = fixture("bf16/umt5.safetensors");
    let vae = fixture("bf16/vae.safetensors");

    // An fp8 scaled transformer with one scale gone.
    let unscaled = rewrite(
        &fixture("fp8/transformer.safetensors"),
        &dir.join("transformer_fp8_scaled_broken.safetensors"),
        |t| t.retain(|(k, ..)| k != "blocks.1.ffn.2.scale_weight"),
    );
    // A bf16 transformer cut off in the middle of its last tensor.
    let truncated = dir.join("transformer_truncated.safetensors");
    let bytes = std::fs::read(&transformer).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let truncated = truncated.to_string_lossy().into_owned();
    // A UMT5 file whose SentencePiece model is not one.
    let bad_spm = rewrite(&umt5, &dir.join("umt5_bad_spiece.safetensors"), |t| {
        for (k, _, shape, b) in t.iter_mut() {
            if k == "spiece_model" {
                *b = b"\xff\xff\xff not a model".to_vec();
                *shape = vec![b.len()];
            }
        }
    });

    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["--model", &umt5, "--vae", &vae],
            vec!["umt5.safetensors", "UMT5 text encoder", "--text-encoder"],
        ),
        (
            vec!["--model", &transformer, "--vae", &vae],
            vec!["transformer.safetensors", "--text-encoder FILE"],
        ),
        (
            vec!["--model", &transformer, "--text-encoder", &umt5],
            vec!["transformer.safetensors", "--vae FILE"],
        ),
        (
            vec![
                "--model",
                &transformer,
                "--text-encoder",
                &vae,
                "--vae",
                &vae,
            ],
            vec!["vae.safetensors", "pass it as --vae"],
        ),
        (
            vec!["--model", &unscaled, "--text-encoder", &umt5, "--vae", &vae],
            vec![
                "transformer_fp8_scaled_broken.safetensors",
                "blocks.1.ffn.2.scale_weight",
                "bf16/fp16 file",
            ],
        ),
        (
            vec![
                "--model",
                &truncated,
                "--text-encoder",
                &umt5,
                "--vae",
                &vae,
            ],
            vec![
                "transformer_truncated.safetensors",
                "truncated",
                "download it again",
            ],
        ),
        (
            vec![
                "--model",
                &transformer,
                "--text-encoder",
                &bad_spm,
                "--vae",
                &vae,
            ],
            vec![
                "umt5_bad_spiece.safetensors",
                "`spiece_model` tensor (the tokenizer) is damaged",
                "SentencePiece",
                "download the text encoder again",
            ],
        ),
    ];
    for (files, expected) in cases {
        let mut args = vec![
            "--adapter",
            "no-such-gpu",
            "generate",
            "a red ball",
            "--width",
            "48",
            "--height",
            "32",
            "--frames",
            "5",
            "--steps",
            "2",
            "-o",
            "x.mp4",
        ];
        args.extend_from_slice(&files);
        let o = motif(&dir, &args);
        common::assert_refused_before_gpu(&o, &format!("{files:?}"), &expected, &dir.join("x.mp4"));
    }
}

#[test]
fn a_transformer_whose_heads_its_shapes_cannot_tell_is_refused_naming_the_file() {
    // The conformance sets give a config for the tiny model (its heads are
    // not Wan's 128 wide); from the CLI, without one, its 24-wide width
    // cannot say its heads: refused naming the file.
    let dir = common::temp_dir("wan-files-heads");
    let o = motif(
        &dir,
        &[
            "generate",
            "a red ball",
            "--model",
            &fixture("bf16/transformer.safetensors"),
            "--text-encoder",
            &fixture("bf16/umt5.safetensors"),
            "--vae",
            &fixture("bf16/vae.safetensors"),
            "-o",
            "x.mp4",
        ],
    );
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(
        e.contains("transformer.safetensors") && e.contains("128-wide heads"),
        "{e}"
    );
    assert!(!dir.join("x.mp4").exists());
}
