//! `MOTIF_MODELS` pointing at a ComfyUI `models/` folder (issue 26 point 5):
//! a folder laid out as ComfyUI keeps it (`diffusion_models/`, `unet/`,
//! `text_encoders/`, `clip/`, `vae/`, `loras/`, `checkpoints/`,
//! `animatediff_models/`) is built in a temporary folder from the tiny
//! fixtures (tests/fixtures/wan-files, tests/fixtures/single-file);
//! `motif models` lists each file with family, role, variant, dtype and size,
//! read from its header; names from the listing work as --model,
//! --text-encoder, --vae, --lora and --motion-adapter; and a name that is
//! unknown, ambiguous or of the wrong kind is refused before GPU work,
//! naming the file and what to pass.

use std::path::{Path, PathBuf};
use std::process::Output;

use motif_engine::weights::safetensors::{self, FileDType};
use motif_engine::weights::SafetensorsFile;

mod common;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// `motif ARGS` in `dir` with `models` as MOTIF_MODELS and nothing of the
/// caller's models, adapter or Hugging Face cache.
fn motif(dir: &Path, models: &Path, args: &[&str]) -> Output {
    common::motif_command(args, &[])
        .current_dir(dir)
        .env("MOTIF_MODELS", models)
        .env("HF_HOME", dir.join("no-hf-cache"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("MOTIF_MODEL")
        .env_remove("MOTIF_PRECISION")
        .env_remove("MOTIF_ADAPTER")
        .output()
        .expect("motif runs")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Puts `src` at `models/rel` (a copy: a symlink would do as well, and
/// copies also work where symlinks need privileges).
fn place(models: &Path, rel: &str, src: &Path) {
    let dst = models.join(rel);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(src, &dst).unwrap();
}

type Tensor = (String, FileDType, Vec<usize>, Vec<u8>);

fn write(path: &Path, tensors: &[Tensor]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let refs: Vec<(&str, FileDType, &[usize], &[u8])> = tensors
        .iter()
        .map(|(k, d, s, b)| (k.as_str(), *d, s.as_slice(), b.as_slice()))
        .collect();
    safetensors::write(path, &refs).unwrap();
}

/// `count` values from a fixed sequence in [-amplitude, amplitude].
fn values(count: usize, seed: u64, amplitude: f32) -> Vec<f32> {
    let mut state = seed;
    (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let unit = (state >> 40) as f32 / (1u64 << 24) as f32;
            (unit * 2.0 - 1.0) * amplitude
        })
        .collect()
}

/// bf16 bytes (the upper half of each f32; the values need no rounding
/// to be weights).
fn bf16(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
        .collect()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The tiny bf16 Wan transformer widened to 128 (one Wan-sized head, which
/// a file alone can say; the fixture's 24-wide one needs a config), random
/// weights: what ComfyUI's `diffusion_models/wan2.1_t2v_*.safetensors`
/// holds, at the smallest size the CLI runs from a file.
fn wide_transformer(path: &Path) {
    let file = SafetensorsFile::open(fixture("wan-files/bf16/transformer.safetensors")).unwrap();
    let tensors: Vec<Tensor> = file
        .names()
        .enumerate()
        .map(|(i, k)| {
            let shape: Vec<usize> = (file.info(k).unwrap().shape.iter())
                .map(|&d| match d {
                    24 => 128,
                    48 => 256,
                    144 => 768,
                    d => d,
                })
                .collect();
            let count = shape.iter().product();
            let bytes = if k.contains("norm") && k.ends_with("weight") {
                bf16(&vec![1.0; count])
            } else {
                bf16(&values(count, i as u64, 0.05))
            };
            (k.to_string(), FileDType::BF16, shape, bytes)
        })
        .collect();
    write(path, &tensors);
}

/// A Wan LoRA in ComfyUI's naming for a 1.3B transformer (width 1536), rank 4.
fn wan_lora(path: &Path) {
    let mut tensors = Vec::new();
    for (i, m) in ["self_attn.q", "self_attn.k"].iter().enumerate() {
        let base = format!("diffusion_model.blocks.0.{m}");
        tensors.push((
            format!("{base}.lora_down.weight"),
            FileDType::BF16,
            vec![4, 1536],
            bf16(&values(4 * 1536, i as u64, 0.01)),
        ));
        tensors.push((
            format!("{base}.lora_up.weight"),
            FileDType::BF16,
            vec![1536, 4],
            bf16(&values(4 * 1536, 10 + i as u64, 0.01)),
        ));
    }
    write(path, &tensors);
}

/// A kohya LoRA for the tiny SD1.5 checkpoint's first attention query, in
/// its LDM naming (what ComfyUI's `loras/` holds for SD1.5).
fn sd_lora(path: &Path) {
    let ckpt = SafetensorsFile::open(fixture("single-file/sd15_tiny_ldm.safetensors")).unwrap();
    let key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight";
    let shape = &ckpt.info(key).expect("the tiny checkpoint's to_q").shape;
    let (out, inp, rank) = (shape[0], shape[1], 2);
    let name = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q";
    write(
        path,
        &[
            (
                format!("{name}.lora_down.weight"),
                FileDType::F32,
                vec![rank, inp],
                f32_bytes(&values(rank * inp, 1, 0.5)),
            ),
            (
                format!("{name}.lora_up.weight"),
                FileDType::F32,
                vec![out, rank],
                f32_bytes(&values(out * rank, 2, 0.5)),
            ),
            (
                format!("{name}.alpha"),
                FileDType::F32,
                vec![],
                2f32.to_le_bytes().to_vec(),
            ),
        ],
    );
}

/// A ComfyUI models/ folder holding the tiny fixtures under the names
/// ComfyUI users' files have.
fn comfy_folder(root: &Path) -> PathBuf {
    let models = root.join("models");
    let wan = |rel: &str| fixture(&format!("wan-files/{rel}"));
    place(
        &models,
        "diffusion_models/wan2.1_t2v_tiny_bf16.safetensors",
        &wan("bf16/transformer.safetensors"),
    );
    place(
        &models,
        "unet/wan2.1_t2v_tiny_fp8_e4m3fn_scaled.safetensors",
        &wan("fp8/transformer.safetensors"),
    );
    place(
        &models,
        "text_encoders/umt5_tiny_bf16.safetensors",
        &wan("bf16/umt5.safetensors"),
    );
    place(
        &models,
        "vae/wan_2.1_vae.safetensors",
        &wan("bf16/vae.safetensors"),
    );
    place(
        &models,
        "checkpoints/sd15_tiny.safetensors",
        &fixture("single-file/sd15_tiny_ldm.safetensors"),
    );
    place(
        &models,
        "animatediff_models/mm_tiny_v2.safetensors",
        &fixture("single-file/mm_tiny_v2.safetensors"),
    );
    wan_lora(&models.join("loras/wan/wan_lightx2v_tiny_rank4.safetensors"));
    sd_lora(&models.join("loras/sd15_tiny_style.safetensors"));
    models
}

/// The listing's line for `name` (the name column is the line's start).
fn line<'a>(listing: &'a str, name: &str) -> &'a str {
    listing
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("`{name}` is not listed:\n{listing}"))
}

#[test]
fn motif_models_lists_a_comfyui_folder_with_family_variant_role_dtype_and_size() {
    let dir = common::temp_dir("listing");
    let models = comfy_folder(&dir);
    wide_transformer(&models.join("diffusion_models/wan2.1_t2v_wide_bf16.safetensors"));
    place(
        &models,
        "clip/umt5_tiny_fp8_e5m2.safetensors",
        &fixture("wan-files/fp8/umt5.safetensors"),
    );
    // A download cut short: listed, with how much it lacks.
    let whole = std::fs::read(fixture("wan-files/bf16/transformer.safetensors")).unwrap();
    std::fs::write(
        models.join("diffusion_models/wan_cut.safetensors"),
        &whole[..whole.len() - 1000],
    )
    .unwrap();
    let o = motif(&dir, &models, &["models"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    // What it listed before: the bundled model.
    assert!(line(&out, "default").contains("bundled"), "{out}");
    let expect = [
        (
            "wan2.1_t2v_tiny_bf16",
            &[
                "diffusion_models",
                "Wan",
                "transformer",
                "T2V",
                "bf16",
                "54 KiB",
            ][..],
        ),
        (
            "wan2.1_t2v_wide_bf16",
            &[
                "diffusion_models",
                "Wan",
                "transformer",
                "width 128 T2V",
                "bf16",
            ],
        ),
        (
            "wan2.1_t2v_tiny_fp8_e4m3fn_scaled",
            &["unet", "Wan", "transformer", "fp8 e4m3fn scaled"],
        ),
        (
            "umt5_tiny_bf16",
            &["text_encoders", "Wan", "text encoder (UMT5)", "bf16"],
        ),
        (
            "umt5_tiny_fp8_e5m2",
            &["clip", "Wan", "text encoder (UMT5)", "fp8 e5m2"],
        ),
        (
            "wan_2.1_vae",
            &["vae", "Wan", "VAE", "16 latent channels", "bf16"],
        ),
        (
            "wan_lightx2v_tiny_rank4",
            &["loras", "Wan", "LoRA", "1.3B, rank 4", "bf16"],
        ),
        (
            "sd15_tiny_style",
            &["loras", "AnimateDiff-SD", "LoRA", "f32"],
        ),
        (
            "sd15_tiny",
            &[
                "checkpoints",
                "AnimateDiff-SD",
                "checkpoint",
                "SD1.5",
                "f16",
            ],
        ),
        (
            "mm_tiny_v2",
            &["animatediff_models", "AnimateDiff-SD", "motion module"],
        ),
        (
            "wan_cut",
            &["Wan", "transformer", "TRUNCATED: 1000 bytes short"],
        ),
    ];
    for (name, wants) in expect {
        let l = line(&out, name);
        for want in wants {
            assert!(l.contains(want), "`{name}`: expected `{want}` in: {l}");
        }
    }
}

fn generate_args<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "generate",
        "a red ball bouncing on grass",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "2",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    args
}

fn recipe(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_wan_model_generates_from_names_only_and_takes_the_one_fitting_part_saying_so() {
    let dir = common::temp_dir("wan-by-name");
    let models = comfy_folder(&dir);
    wide_transformer(&models.join("diffusion_models/wan2.1_t2v_wide_bf16.safetensors"));
    let o = motif(
        &dir,
        &models,
        &generate_args(&[
            "--model",
            "wan2.1_t2v_wide_bf16",
            "--text-encoder",
            "umt5_tiny_bf16",
            "--vae",
            "vae/wan_2.1_vae",
            "--frames",
            "1",
            "-o",
            "a.mp4",
        ]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("a.mp4").is_file());
    // The recipe keeps the names, so that it replays on another machine
    // whose folder holds the same files.
    let r = recipe(&dir.join("a.json"));
    assert_eq!(r["model"], "wan2.1_t2v_wide_bf16");
    assert_eq!(r["text_encoder"], "umt5_tiny_bf16");
    assert_eq!(r["vae"], "vae/wan_2.1_vae");

    // The transformer alone, by its name under the folder: the folder's
    // one UMT5 and one Wan VAE fit it, and it says it takes them.
    let o = motif(
        &dir,
        &models,
        &generate_args(&[
            "--model",
            "diffusion_models/wan2.1_t2v_wide_bf16",
            "--frames",
            "1",
            "-o",
            "b.mp4",
        ]),
    );
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains("--text-encoder: using text_encoders/umt5_tiny_bf16")
            && e.contains("--vae: using vae/wan_2.1_vae"),
        "{e}"
    );
    let r = recipe(&dir.join("b.json"));
    assert_eq!(r["text_encoder"], "text_encoders/umt5_tiny_bf16");
    assert_eq!(r["vae"], "vae/wan_2.1_vae");
}

#[test]
fn an_animatediff_model_generates_from_names_with_a_lora_by_name() {
    let dir = common::temp_dir("sd-by-name");
    let models = comfy_folder(&dir);
    let o = motif(
        &dir,
        &models,
        &generate_args(&[
            "--model",
            "sd15_tiny",
            "--motion-adapter",
            "mm_tiny_v2",
            "--lora",
            "sd15_tiny_style:0.7",
            "--frames",
            "4",
            "-o",
            "a.mp4",
        ]),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(dir.join("a.mp4").is_file());
    let r = recipe(&dir.join("a.json"));
    assert_eq!(r["loras"][0][0], "sd15_tiny_style", "{r}");
}

#[test]
fn names_that_are_unknown_ambiguous_or_the_wrong_part_are_refused_before_gpu_work() {
    let dir = common::temp_dir("refused");
    let models = comfy_folder(&dir);
    // Two UMT5 files and two Wan VAEs that fit the transformer.
    place(
        &models,
        "clip/umt5_tiny_fp8_e5m2.safetensors",
        &fixture("wan-files/fp8/umt5.safetensors"),
    );
    place(
        &models,
        "vae/wan2.1_vae_copy.safetensors",
        &fixture("wan-files/bf16/vae.safetensors"),
    );
    // The same file name in two subfolders.
    place(
        &models,
        "unet/wan2.1_t2v_tiny_bf16.safetensors",
        &fixture("wan-files/bf16/transformer.safetensors"),
    );
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        // A UMT5 file given as --model, by name.
        (
            vec!["--model", "umt5_tiny_bf16"],
            vec![
                "umt5_tiny_bf16.safetensors",
                "UMT5 text encoder",
                "--text-encoder",
            ],
        ),
        // A transformer without a text encoder, two fitting in the folder.
        (
            vec![
                "--model",
                "diffusion_models/wan2.1_t2v_tiny_bf16",
                "--vae",
                "wan_2.1_vae",
            ],
            vec![
                "wan2.1_t2v_tiny_bf16.safetensors",
                "--text-encoder NAME",
                "clip/umt5_tiny_fp8_e5m2",
                "text_encoders/umt5_tiny_bf16",
            ],
        ),
        // Nor a VAE, two fitting.
        (
            vec![
                "--model",
                "diffusion_models/wan2.1_t2v_tiny_bf16",
                "--text-encoder",
                "umt5_tiny_bf16",
            ],
            vec!["--vae NAME", "vae/wan2.1_vae_copy", "vae/wan_2.1_vae"],
        ),
        // One name, two files.
        (
            vec!["--model", "wan2.1_t2v_tiny_bf16"],
            vec![
                "--model wan2.1_t2v_tiny_bf16",
                "names 2 files",
                "diffusion_models/wan2.1_t2v_tiny_bf16",
                "unet/wan2.1_t2v_tiny_bf16",
            ],
        ),
        // Unknown names: the nearest files for that flag.
        (
            vec![
                "--model",
                "diffusion_models/wan2.1_t2v_tiny_bf16",
                "--vae",
                "wan21_vae",
            ],
            vec![
                "--vae wan21_vae",
                "no such file",
                "nearest",
                "vae/wan_2.1_vae",
            ],
        ),
        (
            vec!["--model", "sd15_tiny", "--lora", "sd15_tiny_styel"],
            vec!["--lora sd15_tiny_styel", "nearest", "loras/sd15_tiny_style"],
        ),
        (
            vec!["--model", "wan2.1_t2v_tny"],
            vec!["--model wan2.1_t2v_tny", "nearest", "wan2.1_t2v_tiny_bf16"],
        ),
        // A VAE named as the text encoder.
        (
            vec![
                "--model",
                "diffusion_models/wan2.1_t2v_tiny_bf16",
                "--text-encoder",
                "wan_2.1_vae",
                "--vae",
                "wan_2.1_vae",
            ],
            vec!["wan_2.1_vae.safetensors", "pass it as --vae"],
        ),
    ];
    for (files, expected) in cases {
        let mut args = vec!["--adapter", "no-such-gpu"];
        args.extend(generate_args(&["--frames", "1", "-o", "x.mp4"]));
        args.extend_from_slice(&files);
        let o = motif(&dir, &models, &args);
        common::assert_refused_before_gpu(&o, &format!("{files:?}"), &expected, &dir.join("x.mp4"));
    }
}

/// A models folder with the image-to-video files ComfyUI users have
/// (tests/fixtures/wan-i2v-files, under the real files' names).
fn i2v_folder(root: &Path) -> PathBuf {
    let models = root.join("models");
    let i2v = |rel: &str| fixture(&format!("wan-i2v-files/{rel}"));
    for (rel, src) in [
        (
            "diffusion_models/wan2.1_i2v_480p_14B_fp16.safetensors",
            "i2v/transformer.safetensors",
        ),
        (
            "diffusion_models/wan2.1_flf2v_720p_14B_fp16.safetensors",
            "flf2v/transformer.safetensors",
        ),
        (
            "clip_vision/clip_vision_h.safetensors",
            "i2v/clip_vision.safetensors",
        ),
        (
            "text_encoders/umt5_xxl_fp16.safetensors",
            "i2v/umt5.safetensors",
        ),
        ("vae/wan_2.1_vae.safetensors", "i2v/vae.safetensors"),
    ] {
        place(&models, rel, &i2v(src));
    }
    models
}

#[test]
fn image_to_video_files_are_listed_and_the_image_encoder_is_found_in_clip_vision() {
    let dir = common::temp_dir("i2v-folder");
    let models = i2v_folder(&dir);
    let o = motif(&dir, &models, &["models"]);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{out}\n{}", stderr(&o));
    for (name, wanted) in [
        (
            "wan2.1_i2v_480p_14B_fp16",
            &["Wan", "transformer", "I2V", "f16"][..],
        ),
        (
            "wan2.1_flf2v_720p_14B_fp16",
            &["Wan", "transformer", "FLF2V", "f16"],
        ),
        (
            "clip_vision_h",
            &["Wan", "image encoder (CLIP vision)", "width 24", "f16"],
        ),
    ] {
        let l = line(&out, name);
        for want in wanted {
            assert!(l.contains(want), "`{name}`: expected `{want}` in: {l}");
        }
    }
    // By name alone: the text encoder, the VAE and the image encoder are
    // the folder's, said aloud. (The tiny model's head count is not in
    // its shapes, so it stops there, before the GPU.)
    let args = [
        "--adapter",
        "no-such-gpu",
        "generate",
        "a red ball",
        "--model",
        "wan2.1_i2v_480p_14B_fp16",
        "-o",
        "x.mp4",
    ];
    let o = motif(&dir, &models, &args);
    let e = stderr(&o);
    assert!(
        e.contains("--image-encoder: using clip_vision/clip_vision_h"),
        "{e}"
    );
    assert!(
        e.contains("--text-encoder: using text_encoders/umt5_xxl_fp16"),
        "{e}"
    );
    assert!(e.contains("--vae: using vae/wan_2.1_vae"), "{e}");
    common::assert_refused_before_gpu(&o, "i2v by name", &["clip_vision_h"], &dir.join("x.mp4"));
    // Without clip_vision/: where it looked.
    std::fs::remove_dir_all(models.join("clip_vision")).unwrap();
    let o = motif(&dir, &models, &args);
    common::assert_refused_before_gpu(
        &o,
        "i2v without clip_vision/",
        &[
            "wan2.1_i2v_480p_14B_fp16",
            "--image-encoder",
            "clip_vision",
            "does not exist",
        ],
        &dir.join("x.mp4"),
    );
}
