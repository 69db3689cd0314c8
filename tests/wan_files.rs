//! Wan from the files users have: wan-a re-saved as single files with the
//! original key names (tests/fixtures/wan-files, tools/fixtures/make_wan_files.py)
//! in bf16 and in fp8 (scaled e4m3fn transformer, e5m2 text encoder) passes
//! `motif conformance` in f32, the tokenizer read from the UMT5 file's
//! `spiece_model` tensor; and bad files are refused before any GPU work
//! (with an adapter that does not exist, the file's error comes first),
//! naming the file and what to pass instead, leaving no output file.
//! Image-to-video: wan-i2v and wan-flf2v re-saved as fp16 single files
//! (tests/fixtures/wan-i2v-files, tools/fixtures/make_wan_i2v_files.py: the
//! transformer in original names with `img_emb`/`k_img`, the image encoder
//! as ComfyUI's clip_vision files name it) pass in f32 and f16, and an I2V
//! transformer without its image encoder is refused saying where it looked.

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

fn i2v_fixture(rel: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/wan-i2v-files")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

#[test]
fn wan_i2v_and_flf2v_as_fp16_single_files_pass_conformance_in_f32_and_f16() {
    let dir = common::temp_dir("wan-i2v-files-conformance");
    for set in ["i2v", "flf2v"] {
        for precision in ["f32", "f16"] {
            let o = motif(
                &dir,
                &["conformance", &i2v_fixture(set), "--precision", precision],
            );
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{set} {precision}: {out}\n{}",
                stderr(&o)
            );
            assert!(
                out.contains("9 passed, 0 failed"),
                "{set} {precision}: {out}"
            );
        }
    }
}

#[test]
fn an_i2v_transformer_without_its_image_encoder_is_refused_naming_what_and_where() {
    // The engine alone (the server, the viewer): before any part loads,
    // the transformer file is named with the flag that gives the encoder.
    use motif_engine::models::source::{ModelSource, ModelSpec};
    let spec = ModelSpec {
        model: i2v_fixture("i2v/transformer.safetensors"),
        text_encoder: Some(i2v_fixture("i2v/umt5.safetensors")),
        vae: Some(i2v_fixture("i2v/vae.safetensors")),
        ..Default::default()
    };
    let Err(e) = ModelSource::open(&spec) else {
        panic!("an I2V transformer without its image encoder was accepted")
    };
    let e = e.to_string();
    for want in [
        "i2v/transformer.safetensors",
        "image-to-video",
        "image_dim 24",
        "none was given (--image-encoder)",
        "clip_vision",
    ] {
        assert!(e.contains(want), "expected `{want}` in: {e}");
    }
    // With the encoder it opens (headers only: nothing reaches a GPU).
    let spec = ModelSpec {
        image_encoder: Some(i2v_fixture("i2v/clip_vision.safetensors")),
        image_encoder_config: Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/wan-i2v/image_encoder")
                .to_string_lossy()
                .into_owned(),
        ),
        transformer_config: Some(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/wan-i2v/transformer")
                .to_string_lossy()
                .into_owned(),
        ),
        ..spec
    };
    ModelSource::open(&spec).unwrap_or_else(|e| panic!("{e}"));
}

/// `motif generate` with `models` as the models folder, on an adapter that
/// does not exist: every refusal must come before the GPU is opened.
fn refused_with_models(dir: &Path, models: &Path, files: &[&str], expected: &[&str]) {
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
    args.extend_from_slice(files);
    let o = common::motif_command(&args, &[])
        .current_dir(dir)
        .env("MOTIF_MODELS", models)
        .env("HF_HOME", dir.join("no-hf-cache"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .env_remove("MOTIF_ADAPTER")
        .output()
        .expect("motif runs");
    common::assert_refused_before_gpu(&o, &format!("{files:?}"), expected, &dir.join("x.mp4"));
}

#[test]
fn image_encoder_files_that_are_missing_or_do_not_fit_are_refused_before_gpu_work() {
    let dir = common::temp_dir("wan-i2v-files-refused");
    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    let i2v = i2v_fixture("i2v/transformer.safetensors");
    let flf2v = i2v_fixture("flf2v/transformer.safetensors");
    let clip = i2v_fixture("i2v/clip_vision.safetensors");
    let umt5 = i2v_fixture("i2v/umt5.safetensors");
    let vae = i2v_fixture("i2v/vae.safetensors");
    let parts = |model: &str| {
        vec![
            "--model".to_string(),
            model.to_string(),
            "--text-encoder".into(),
            umt5.clone(),
            "--vae".into(),
            vae.clone(),
        ]
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        // No encoder given, and the models folder has no clip_vision/.
        (
            parts(&i2v),
            vec![
                "transformer.safetensors",
                "CLIP vision image encoder 24 wide",
                "--image-encoder",
                "clip_vision",
                "does not exist",
            ],
        ),
        // A first-last-frame transformer (32-wide image tokens) with the
        // I2V set's 24-wide encoder.
        (
            [parts(&flf2v), vec!["--image-encoder".into(), clip.clone()]].concat(),
            vec!["clip_vision.safetensors", "24 wide", "32-wide image tokens"],
        ),
        // A text-to-video transformer takes none.
        (
            vec![
                "--model".into(),
                fixture("bf16/transformer.safetensors"),
                "--text-encoder".into(),
                fixture("bf16/umt5.safetensors"),
                "--vae".into(),
                fixture("bf16/vae.safetensors"),
                "--image-encoder".into(),
                clip.clone(),
            ],
            vec![
                "clip_vision.safetensors",
                "no image embedder",
                "leave --image-encoder out",
            ],
        ),
        // The text encoder given as the image encoder.
        (
            [parts(&i2v), vec!["--image-encoder".into(), umt5.clone()]].concat(),
            vec![
                "umt5.safetensors",
                "given as --image-encoder",
                "pass it as --text-encoder",
            ],
        ),
        // The image encoder given as the model.
        (
            parts(&clip),
            vec![
                "clip_vision.safetensors",
                "CLIP vision image encoder",
                "pass it as --image-encoder",
            ],
        ),
    ];
    for (files, expected) in cases {
        let files: Vec<&str> = files.iter().map(String::as_str).collect();
        refused_with_models(&dir, &models, &files, &expected);
    }
    // A clip_vision/ folder holding only an encoder of another width.
    let sub = models.join("clip_vision");
    std::fs::create_dir_all(&sub).unwrap();
    std::fs::copy(
        i2v_fixture("flf2v/clip_vision.safetensors"),
        sub.join("clip_vision_other.safetensors"),
    )
    .unwrap();
    let files = parts(&i2v);
    let files: Vec<&str> = files.iter().map(String::as_str).collect();
    refused_with_models(&dir, &models, &files, &["24 wide", "holds none that fits"]);
}
