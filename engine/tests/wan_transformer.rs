//! The Wan transformer against diffusers on the Wan reference case sets
//! (tests/fixtures/wan-a, wan-b): every `transformer` case (integer and
//! fractional timesteps, batch 1 and 2), its output and every debug output
//! (rotary tables, patch embedding, conditions, each block, the head), in
//! f32 (the case's tolerance) and f16 (docs/CASES.md's budget), with
//! blocks resident and streamed; bad folders.

mod common;
#[path = "common/wan_cases.rs"]
mod wan_cases;

use std::path::Path;

use motif_engine::error::LoadError;
use motif_engine::models::umt5::BlockResidency;
use motif_engine::models::wan_transformer::{rope_tables, WanTransformer3DModel, ROPE_THETA};
use motif_engine::{DType, EngineError, Tensor};
use wan_cases::*;

/// [B, C, S] → [B, S, C] (diffusers' Conv3d output against our tokens).
fn channels_last(x: &[f32], b: usize, c: usize, s: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for bi in 0..b {
        for ci in 0..c {
            for si in 0..s {
                out[(bi * s + si) * c + ci] = x[(bi * c + ci) * s + si];
            }
        }
    }
    out
}

fn run_set(set_name: &str, dtype: DType, residency: BlockResidency) {
    let gpu = gpu_in(dtype);
    let (set, picked) = cases_of(set_name, "transformer");
    assert!(!picked.is_empty(), "{set_name} has transformer cases");
    let mut failures = Vec::new();
    for &i in &picked {
        let case = &set.cases[i];
        let which = case.inputs["transformer"].as_str().unwrap_or("transformer");
        let model = WanTransformer3DModel::from_dir(&gpu, &set.dir.join(which), residency)
            .unwrap_or_else(|e| panic!("{set_name}: loading {which}: {e}"));
        let cfg = model.config.clone();
        let hs_key = CaseSet::input_key(case, "hidden_states");
        let hs_shape = set.shape(&hs_key);
        let hs = Tensor::from_f32(&gpu, &set.f32s(&hs_key), &hs_shape, dtype).unwrap();
        let ts_key = CaseSet::input_key(case, "timestep");
        let timesteps: Vec<f32> = match set.tensors.info(&ts_key).unwrap().dtype {
            motif_engine::weights::FileDType::I64 => {
                set.i64s(&ts_key).iter().map(|&t| t as f32).collect()
            }
            _ => set.f32s(&ts_key),
        };
        let ehs_key = CaseSet::input_key(case, "encoder_hidden_states");
        let ehs = Tensor::from_f32(&gpu, &set.f32s(&ehs_key), &set.shape(&ehs_key), dtype).unwrap();

        let mut seen: Vec<(String, Vec<f32>)> = Vec::new();
        let out = model
            .forward_observed(
                &gpu,
                &hs,
                &timesteps,
                &ehs,
                None,
                &mut |name, t: &Tensor| {
                    seen.push((name.to_string(), t.to_f32(&gpu)?));
                    Ok(())
                },
            )
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        seen.push(("sample".into(), out.to_f32(&gpu).unwrap()));
        // The rotary tables as diffusers hands them to attention: [1, S, 1, D],
        // each angle repeated for the two channels of its pair.
        let [pt, ph, pw] = cfg.patch_size;
        let grid = [hs_shape[2] / pt, hs_shape[3] / ph, hs_shape[4] / pw];
        let (cos, sin) = rope_tables(cfg.rope_split(), grid, ROPE_THETA);
        let pairs = |t: &[f32]| t.iter().flat_map(|&v| [v, v]).collect::<Vec<f32>>();
        seen.push(("rotary_cos".into(), pairs(&cos)));
        seen.push(("rotary_sin".into(), pairs(&sin)));

        let b = hs_shape[0];
        let tokens: usize = grid.iter().product();
        for (kind, expected) in [("output", &case.outputs), ("debug", &case.debug_outputs)] {
            for e in expected {
                let mut want = set.f32s(&e.tensor);
                if e.name == "patch_embedding" {
                    want = channels_last(&want, b, cfg.inner_dim(), tokens);
                }
                let Some((_, got)) = seen.iter().find(|(n, _)| *n == e.name) else {
                    failures.push(format!("{} {kind} {}: not produced", case.name, e.name));
                    continue;
                };
                let err = max_abs_err(got, &want);
                let bgt = budget(dtype, e.tolerance, &want);
                let ok = err <= bgt;
                println!(
                    "{} {residency:?} {dtype} {kind} {}: max_abs_err {err:.3e} budget {bgt:.1e} {}",
                    case.name,
                    e.name,
                    if ok { "ok" } else { "FAIL" }
                );
                if !ok {
                    failures.push(format!(
                        "{} {kind} {}: {err:e} > {bgt:e}",
                        case.name, e.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{set_name} {dtype}: {failures:#?}");
}

#[test]
fn wan_a_transformer_f32() {
    run_set("wan-a", DType::F32, BlockResidency::Resident);
}

#[test]
fn wan_a_transformer_f16() {
    run_set("wan-a", DType::F16, BlockResidency::Resident);
}

#[test]
fn wan_b_transformer_f32_streamed() {
    run_set("wan-b", DType::F32, BlockResidency::Streamed);
}

#[test]
fn wan_b_transformer_f16() {
    run_set("wan-b", DType::F16, BlockResidency::Resident);
}

/// Copies a transformer folder with an edited config.json.
fn edited_copy(edit: impl Fn(&mut serde_json::Value)) -> std::path::PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wan-a/transformer");
    let dir = std::env::temp_dir().join(format!(
        "motif-wan-transformer-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dir
}

#[test]
fn bad_folders_are_refused_with_file_and_key() {
    let gpu = gpu_in(DType::F32);
    for residency in [BlockResidency::Resident, BlockResidency::Streamed] {
        let dir =
            edited_copy(|c| c["ffn_dim"] = serde_json::json!(c["ffn_dim"].as_u64().unwrap() + 8));
        let err = WanTransformer3DModel::from_dir(&gpu, &dir, residency)
            .err()
            .expect("refused");
        match &err {
            EngineError::Load(LoadError::TensorShape { path, key, .. }) => {
                assert!(key.contains("ffn.net.0.proj.weight"), "{err}");
                assert!(path.to_string_lossy().ends_with(".safetensors"), "{err}");
            }
            other => panic!("expected a tensor shape error ({residency:?}), got {other}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    // image_dim without added_kv_proj_dim: half an image-to-video config.
    let dir = edited_copy(|c| c["image_dim"] = serde_json::json!(1280));
    let err = WanTransformer3DModel::from_dir(&gpu, &dir, BlockResidency::Resident)
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("image_dim Some(1280) and added_kv_proj_dim None")
            && msg.contains("config.json"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // A latent size that is not a multiple of the patch is refused by name.
    let model = WanTransformer3DModel::from_dir(
        &gpu,
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wan-a/transformer"),
        BlockResidency::Resident,
    )
    .unwrap();
    let hs = Tensor::zeros(&gpu, &[1, 16, 2, 5, 6], DType::F32).unwrap();
    let ehs = Tensor::zeros(&gpu, &[1, 8, model.config.text_dim], DType::F32).unwrap();
    let err = model
        .forward(&gpu, &hs, &[500.0], &ehs, None)
        .expect_err("a latent height of 5 with patch 2 is refused");
    assert!(
        matches!(
            err,
            EngineError::Shape {
                op: "wan_transformer",
                ..
            }
        ),
        "{err}"
    );
}
