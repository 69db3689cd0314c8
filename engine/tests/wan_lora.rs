//! Wan LoRAs against diffusers: the reference cases in tests/fixtures/wan-lora
//! (tools/fixtures/make_wan_lora_cases.py: PEFT with and without the
//! `transformer.` prefix, ComfyUI/original names with alphas, `lora_A`/`lora_B`
//! with `diff_b`, musubi, full `diff` deltas) through the conformance runner
//! in f32 and f16; the same LoRA on the single-file (original-key) transformer;
//! and the refusals, each before any GPU work and naming the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use motif_engine::error::LoadError;
use motif_engine::models::source::{ModelSource, ModelSpec};
use motif_engine::weights::safetensors::write;
use motif_engine::weights::{FileDType, LoraFile, LoraTarget, SafetensorsFile, WeightSet};
#[path = "common/lora_cases.rs"]
mod lora_cases;
use lora_cases::{case_set_passes_in_f32_and_f16, fixtures, manifest};

#[test]
fn wan_lora_cases_match_diffusers_in_f32_and_f16() {
    case_set_passes_in_f32_and_f16("wan-lora");
}

#[test]
fn every_wan_lora_case_differs_from_the_plain_model_beyond_both_budgets() {
    // Otherwise a runner that ignored the LoRA would pass the cases above.
    let dir = fixtures().join("wan-lora");
    let tensors = SafetensorsFile::open(dir.join("cases.safetensors")).unwrap();
    let plain = tensors.to_f32("no_lora.sample").unwrap();
    let mut layouts = Vec::new();
    for case in manifest(&dir)["cases"].as_array().unwrap() {
        let Some(file) = case["inputs"].get("lora_file") else {
            continue;
        };
        let out = &case["outputs"][0];
        let expected = tensors.to_f32(out["tensor"].as_str().unwrap()).unwrap();
        let diff = expected
            .iter()
            .zip(&plain)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        let max = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = out["tolerance_max_abs"].as_f64().unwrap() as f32;
        assert!(
            diff > 100.0 * tol && diff > 3e-2 * max,
            "{file}: differs by only {diff} (f32 tolerance {tol}, f16 budget {})",
            3e-2 * max
        );
        layouts.push(file.as_str().unwrap().to_string());
    }
    layouts.sort();
    assert_eq!(
        layouts,
        [
            "comfy.safetensors",
            "comfy_ab.safetensors",
            "diff.safetensors",
            "musubi.safetensors",
            "peft.safetensors",
            "peft_bare.safetensors"
        ]
    );
}

fn wan_lora(name: &str) -> String {
    fixtures()
        .join("wan-lora")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn wan_folder(loras: Vec<(String, f32)>) -> Result<ModelSource, LoadError> {
    ModelSource::open(&ModelSpec {
        model: fixtures().join("wan-a").to_string_lossy().into(),
        loras,
        ..Default::default()
    })
}

fn wan_single_file(loras: Vec<(String, f32)>) -> Result<ModelSource, LoadError> {
    let dir = fixtures().join("wan-files").join("bf16");
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();
    ModelSource::open(&ModelSpec {
        model: path("transformer.safetensors"),
        text_encoder: Some(path("umt5.safetensors")),
        vae: Some(path("vae.safetensors")),
        transformer_config: Some(
            fixtures()
                .join("wan-a/transformer")
                .to_string_lossy()
                .into(),
        ),
        loras,
        ..Default::default()
    })
}

#[test]
fn a_wan_lora_fuses_the_same_update_into_the_single_file_transformer() {
    // The single file is wan-a's transformer in bf16 with the original key
    // names: the LoRA must reach the same weights through the key aliases.
    let lora = LoraFile::open(Path::new(&wan_lora("comfy_ab.safetensors"))).unwrap();
    let loras = vec![(Arc::new(lora), 0.6f32)];
    let single = wan_single_file(Vec::new()).unwrap();
    let files = single.wan_files().unwrap();
    let (base_file, fused_file) = (
        files.transformer().unwrap().weights,
        files.transformer_with_loras(&loras).unwrap().weights,
    );
    let folder = fixtures().join("wan-a/transformer");
    let base_folder = WeightSet::open_dir(&folder).unwrap();
    let fused_folder = WeightSet::open_dir(&folder)
        .unwrap()
        .with_loras(&loras, LoraTarget::Transformer)
        .unwrap();
    let shapes = base_folder.key_shapes();
    for key in [
        "blocks.0.attn1.to_q.weight",
        "blocks.1.ffn.net.2.weight",
        "blocks.0.attn2.to_out.0.bias",
        "condition_embedder.time_embedder.linear_2.weight",
    ] {
        let shape = &shapes[key];
        let read = |set: &WeightSet| set.read_f32(key, shape).unwrap();
        let from_file: Vec<f32> = (read(&fused_file).iter().zip(read(&base_file)))
            .map(|(f, b)| f - b)
            .collect();
        let from_folder: Vec<f32> = (read(&fused_folder).iter().zip(read(&base_folder)))
            .map(|(f, b)| f - b)
            .collect();
        let max = from_folder.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(max > 1e-2, "{key}: the LoRA changed nothing");
        for (a, b) in from_file.iter().zip(&from_folder) {
            assert!((a - b).abs() <= 1e-5 * max, "{key}: {a} vs {b}");
        }
    }
}

/// Writes a LoRA file of f32 tensors.
fn write_lora(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| bytemuck::cast_slice(v).to_vec())
        .collect();
    let list: Vec<(&str, FileDType, &[usize], &[u8])> = tensors
        .iter()
        .zip(&bytes)
        .map(|((k, s, _), b)| (k.as_str(), FileDType::F32, s.as_slice(), b.as_slice()))
        .collect();
    write(path, &list).unwrap();
}

/// ComfyUI-named factors of one module: down [r, inp], up [out, r].
fn comfy(module: &str, out: usize, inp: usize, r: usize) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (
            format!("diffusion_model.{module}.lora_down.weight"),
            vec![r, inp],
            vec![0.1; r * inp],
        ),
        (
            format!("diffusion_model.{module}.lora_up.weight"),
            vec![out, r],
            vec![0.1; out * r],
        ),
    ]
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("motif-wan-lora-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn loras_that_do_not_fit_are_refused_before_any_gpu_work() {
    // No GPU exists in this test: each refusal comes from opening the model.
    let dir = scratch("bad");
    let path = |n: &str| dir.join(n).to_string_lossy().into_owned();

    // An AnimateDiff (SD) LoRA given to Wan, and a Wan LoRA given to AnimateDiff.
    let sd_lora = fixtures()
        .join("lora/kohya.safetensors")
        .to_string_lossy()
        .into_owned();
    match wan_folder(vec![(sd_lora.clone(), 1.0)]) {
        Err(LoadError::LoraFamily {
            path, lora, model, ..
        }) => {
            assert!(path.ends_with("kohya.safetensors"));
            assert_eq!(
                (lora, model),
                ("Stable Diffusion / AnimateDiff", "a Wan model")
            );
        }
        other => panic!("expected a family refusal, got {other:?}"),
    }
    match wan_single_file(vec![(sd_lora, 1.0)]) {
        Err(LoadError::LoraFamily { path, .. }) => assert!(path.ends_with("kohya.safetensors")),
        other => panic!("expected a family refusal, got {other:?}"),
    }
    let animatediff = ModelSource::open(&ModelSpec {
        model: fixtures().join("lora").to_string_lossy().into(),
        loras: vec![(wan_lora("musubi.safetensors"), 1.0)],
        ..Default::default()
    });
    match animatediff {
        Err(LoadError::LoraFamily {
            path, lora, key, ..
        }) => {
            assert!(path.ends_with("musubi.safetensors"));
            assert_eq!(lora, "Wan");
            assert!(key.starts_with("lora_unet_blocks_"), "{key}");
        }
        other => panic!("expected a family refusal, got {other:?}"),
    }

    // Another model size: factors for a 48-wide model on the 24-wide one.
    let wide = path("wide.safetensors");
    write_lora(Path::new(&wide), &comfy("blocks.0.self_attn.q", 48, 48, 2));
    match wan_folder(vec![(wide.clone(), 1.0)]) {
        Err(LoadError::TensorShape {
            path,
            key,
            expected,
            found,
        }) => {
            assert!(path.ends_with("wide.safetensors"));
            assert_eq!(key, "diffusion_model.blocks.0.self_attn.q.lora_up.weight");
            assert_eq!((expected, found), (vec![24, 2], vec![48, 2]));
        }
        other => panic!("expected a shape refusal, got {other:?}"),
    }
    // The same on the single-file (original-key) transformer.
    match wan_single_file(vec![(wide, 1.0)]) {
        Err(LoadError::TensorShape { path, .. }) => assert!(path.ends_with("wide.safetensors")),
        other => panic!("expected a shape refusal, got {other:?}"),
    }
    // A full difference of the wrong shape.
    let diff = path("diff.safetensors");
    write_lora(
        Path::new(&diff),
        &[(
            "diffusion_model.blocks.1.ffn.0.diff".into(),
            vec![96, 24],
            vec![0.0; 96 * 24],
        )],
    );
    match wan_folder(vec![(diff, 1.0)]) {
        Err(LoadError::TensorShape {
            key,
            expected,
            found,
            ..
        }) => {
            assert_eq!(key, "diffusion_model.blocks.1.ffn.0.diff");
            assert_eq!((expected, found), (vec![48, 24], vec![96, 24]));
        }
        other => panic!("expected a shape refusal, got {other:?}"),
    }

    // A module the model does not have (a third block on the 2-block
    // model): the LoRA is refused whole, naming the key.
    let deep = path("deep.safetensors");
    let mut t = comfy("blocks.0.self_attn.q", 24, 24, 2);
    t.extend(comfy("blocks.2.self_attn.q", 24, 24, 2));
    write_lora(Path::new(&deep), &t);
    let m = wan_folder(vec![(deep, 1.0)]).unwrap_err().to_string();
    assert!(
        m.contains("deep.safetensors")
            && m.contains("1 of this LoRA's 2 Wan transformer modules")
            && m.contains("diffusion_model.blocks.2.self_attn.q.lora_down.weight"),
        "{m}"
    );

    // A `.diff` in an SD LoRA stays refused: only Wan LoRAs carry them.
    let sd_diff = path("sd_diff.safetensors");
    write_lora(
        Path::new(&sd_diff),
        &[(
            "lora_unet_down_blocks_0_attentions_0_proj_in.diff".into(),
            vec![16, 16],
            vec![0.0; 256],
        )],
    );
    let m = ModelSource::open(&ModelSpec {
        model: fixtures().join("lora").to_string_lossy().into(),
        loras: vec![(sd_diff, 1.0)],
        ..Default::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        m.contains("sd_diff.safetensors") && m.contains("Wan LoRAs only"),
        "{m}"
    );

    // The fitting LoRAs open (the refusals above are not from the model).
    for name in ["peft", "comfy", "musubi", "diff"] {
        wan_folder(vec![(wan_lora(&format!("{name}.safetensors")), 1.0)]).unwrap();
        wan_single_file(vec![(wan_lora(&format!("{name}.safetensors")), 1.0)]).unwrap();
    }
}
