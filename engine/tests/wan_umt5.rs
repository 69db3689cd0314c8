//! The UMT5 text encoder against transformers on the Wan reference case
//! sets (tests/fixtures/wan-a, wan-b): every `text_encoder` case, its
//! outputs and debug outputs, in f32 (the case's tolerance) and f16
//! (docs/CASES.md's budget), with blocks resident and streamed; the
//! relative-position buckets against transformers' table; bad folders.

mod common;
#[path = "common/wan_cases.rs"]
mod wan_cases;

use std::path::Path;

use motif_engine::error::LoadError;
use motif_engine::models::umt5::{relative_position_buckets, BlockResidency, UMT5EncoderModel};
use motif_engine::{DType, EngineError, Tensor};
use wan_cases::*;

fn rows(values: &[i64], shape: &[usize]) -> Vec<Vec<u32>> {
    values
        .chunks(shape[1])
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

/// Runs every text_encoder case of `set`, printing one line per compared
/// output; panics naming every output over its budget.
fn run_set(set_name: &str, dtype: DType, residency: BlockResidency) {
    let gpu = gpu_in(dtype);
    let (set, picked) = cases_of(set_name, "text_encoder");
    assert!(!picked.is_empty(), "{set_name} has text_encoder cases");
    let model = UMT5EncoderModel::from_dir(&gpu, &set.dir.join("text_encoder"), residency)
        .unwrap_or_else(|e| panic!("{set_name}: loading the text encoder: {e}"));
    let mut failures = Vec::new();
    for &i in &picked {
        let case = &set.cases[i];
        let ids_key = CaseSet::input_key(case, "input_ids");
        let mask_key = CaseSet::input_key(case, "attention_mask");
        let shape = set.shape(&ids_key);
        let ids = rows(&set.i64s(&ids_key), &shape);
        let mask = rows(&set.i64s(&mask_key), &shape);
        let mut seen: Vec<(String, Vec<f32>)> = Vec::new();
        let out = model
            .forward_observed(&gpu, &ids, &mask, &mut |name, t: &Tensor| {
                seen.push((name.to_string(), t.to_f32(&gpu)?));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        seen.push(("last_hidden_state".into(), out.to_f32(&gpu).unwrap()));
        for (kind, expected) in [("output", &case.outputs), ("debug", &case.debug_outputs)] {
            // The bucket table is integer, compared exactly by its own test.
            for e in expected
                .iter()
                .filter(|e| e.name != "relative_position_bucket")
            {
                let want = set.f32s(&e.tensor);
                let Some((_, got)) = seen.iter().find(|(n, _)| *n == e.name) else {
                    failures.push(format!("{} {kind} {}: not produced", case.name, e.name));
                    continue;
                };
                let err = max_abs_err(got, &want);
                let b = budget(dtype, e.tolerance, &want);
                let ok = err <= b;
                println!(
                    "{} {:?} {dtype} {kind} {}: max_abs_err {err:.3e} budget {b:.1e} {}",
                    case.name,
                    residency,
                    e.name,
                    if ok { "ok" } else { "FAIL" }
                );
                if !ok {
                    failures.push(format!("{} {kind} {}: {err:e} > {b:e}", case.name, e.name));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{set_name} {dtype}: {failures:#?}");
}

#[test]
fn wan_a_text_encoder_f32() {
    run_set("wan-a", DType::F32, BlockResidency::Resident);
}

#[test]
fn wan_a_text_encoder_f32_streamed() {
    run_set("wan-a", DType::F32, BlockResidency::Streamed);
}

#[test]
fn wan_a_text_encoder_f16() {
    run_set("wan-a", DType::F16, BlockResidency::Resident);
}

#[test]
fn wan_b_text_encoder_f32() {
    run_set("wan-b", DType::F32, BlockResidency::Streamed);
}

#[test]
fn wan_b_text_encoder_f16() {
    run_set("wan-b", DType::F16, BlockResidency::Streamed);
}

/// transformers' bucket table where the case set records it (L <= 64).
#[test]
fn relative_position_buckets_match_transformers() {
    let mut checked = 0;
    for set_name in ["wan-a", "wan-b"] {
        let (set, picked) = cases_of(set_name, "text_encoder");
        for &i in &picked {
            let case = &set.cases[i];
            let Some(e) = case
                .debug_outputs
                .iter()
                .find(|e| e.name == "relative_position_bucket")
            else {
                continue;
            };
            let shape = set.shape(&e.tensor);
            let want: Vec<u32> = set.i64s(&e.tensor).iter().map(|&v| v as u32).collect();
            let cfg: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(set.dir.join("text_encoder/config.json")).unwrap(),
            )
            .unwrap();
            let got = relative_position_buckets(
                shape[0],
                cfg["relative_attention_num_buckets"].as_u64().unwrap() as usize,
                cfg["relative_attention_max_distance"].as_u64().unwrap() as usize,
            );
            assert_eq!(got, want, "{}: relative_position_bucket", case.name);
            checked += 1;
        }
    }
    // Long sequences reach the logarithmic and the clamped buckets too.
    let long = relative_position_buckets(512, 32, 128);
    assert_eq!(long[511], 31, "distance 511 after the query: last bucket");
    assert_eq!(
        long[511 * 512],
        15,
        "distance 511 before the query: last backward bucket"
    );
    assert_eq!(long[0], 0);
    println!("{checked} recorded bucket tables compared");
}

/// Copies a text_encoder folder with an edited config.json.
fn edited_copy(set_name: &str, edit: impl Fn(&mut serde_json::Value)) -> tempdir::Dir {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(set_name)
        .join("text_encoder");
    let dir = tempdir::Dir::new("umt5");
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    dir
}

mod tempdir {
    /// A scratch folder removed when dropped.
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "motif-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn a_config_that_disagrees_with_the_weights_names_file_and_key() {
    let gpu = gpu_in(DType::F32);
    for residency in [BlockResidency::Resident, BlockResidency::Streamed] {
        let dir = edited_copy("wan-a", |c| {
            c["d_ff"] = serde_json::json!(c["d_ff"].as_u64().unwrap() * 2)
        });
        let err = match UMT5EncoderModel::from_dir(&gpu, dir.path(), residency) {
            Err(e) => e,
            Ok(_) => panic!("a d_ff that disagrees with the weights loads ({residency:?})"),
        };
        match &err {
            EngineError::Load(LoadError::TensorShape { path, key, .. }) => {
                assert!(key.contains("DenseReluDense.wi_0.weight"), "{err}");
                assert!(path.to_string_lossy().ends_with(".safetensors"), "{err}");
            }
            other => panic!("expected a tensor shape error, got {other}"),
        }
    }
    let dir = edited_copy("wan-a", |c| {
        c["feed_forward_proj"] = serde_json::json!("relu")
    });
    let err = UMT5EncoderModel::from_dir(&gpu, dir.path(), BlockResidency::Resident)
        .err()
        .expect("refused");
    assert!(
        matches!(err, EngineError::Load(LoadError::Config { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("config.json") && err.to_string().contains("relu"),
        "{err}"
    );
    let dir = edited_copy("wan-a", |c| c["num_layers"] = serde_json::json!(5));
    let err = UMT5EncoderModel::from_dir(&gpu, dir.path(), BlockResidency::Streamed)
        .err()
        .expect("refused");
    assert!(
        matches!(&err, EngineError::Load(LoadError::MissingTensor { key, .. }) if key.contains("block.2.")),
        "{err}"
    );
}
