//! Reading the Wan reference case sets (tests/fixtures/wan-a, wan-b; format
//! motif-cases-v1, docs/CASES.md's Wan section) for the model tests, and
//! judging an output by the case's tolerance (f32) or docs/CASES.md's fixed
//! f16 budget.
#![allow(dead_code)]

use std::path::PathBuf;

use motif_engine::weights::SafetensorsFile;
use motif_engine::{DType, Gpu, GpuOptions};
use serde_json::Value;

/// One expected tensor of a case.
pub struct Expected {
    pub name: String,
    pub tensor: String,
    pub tolerance: f32,
}

pub struct Case {
    pub name: String,
    pub inputs: Value,
    pub outputs: Vec<Expected>,
    pub debug_outputs: Vec<Expected>,
}

pub struct CaseSet {
    pub dir: PathBuf,
    pub cases: Vec<Case>,
    pub tensors: SafetensorsFile,
}

/// The set `name` under tests/fixtures (repo-relative).
pub fn case_set(name: &str) -> CaseSet {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("cases.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join("cases.json").display())),
    )
    .expect("cases.json parses");
    let expected = |list: &Value| -> Vec<Expected> {
        list.as_array()
            .map(|a| {
                a.iter()
                    .map(|o| Expected {
                        name: o["name"].as_str().expect("output name").to_string(),
                        tensor: o["tensor"].as_str().expect("output tensor").to_string(),
                        tolerance: o["tolerance_max_abs"].as_f64().expect("tolerance") as f32,
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let cases = manifest["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| Case {
            name: c["name"].as_str().expect("case name").to_string(),
            inputs: c["inputs"].clone(),
            outputs: expected(&c["outputs"]),
            debug_outputs: expected(&c["debug_outputs"]),
        })
        .zip(manifest["cases"].as_array().expect("cases"))
        .map(|(case, raw)| (raw["component"].as_str().unwrap_or("").to_string(), case))
        .collect::<Vec<_>>();
    let tensors = SafetensorsFile::open(
        dir.join(manifest["tensors"].as_str().unwrap_or("cases.safetensors")),
    )
    .expect("cases.safetensors opens");
    CaseSet {
        dir,
        cases: cases.into_iter().map(|(_, c)| c).collect(),
        tensors,
    }
}

/// The cases of `component` in set `name`.
pub fn cases_of(name: &str, component: &str) -> (CaseSet, Vec<usize>) {
    let set = case_set(name);
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(set.dir.join("cases.json")).expect("cases.json"),
    )
    .expect("cases.json parses");
    let picked = manifest["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .enumerate()
        .filter(|(_, c)| c["component"] == component)
        .map(|(i, _)| i)
        .collect();
    (set, picked)
}

impl CaseSet {
    pub fn f32s(&self, key: &str) -> Vec<f32> {
        self.tensors
            .to_f32(key)
            .unwrap_or_else(|e| panic!("{key}: {e}"))
    }

    pub fn i64s(&self, key: &str) -> Vec<i64> {
        self.tensors
            .to_i64(key)
            .unwrap_or_else(|e| panic!("{key}: {e}"))
    }

    pub fn shape(&self, key: &str) -> Vec<usize> {
        self.tensors
            .info(key)
            .unwrap_or_else(|| panic!("{key} missing"))
            .shape
            .clone()
    }

    /// The tensor an input names.
    pub fn input_key(case: &Case, input: &str) -> String {
        case.inputs[input]["tensor"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: input {input} is not a tensor", case.name))
            .to_string()
    }
}

/// The budget an output is judged by: the case's tolerance in f32; in f16
/// storage max(tolerance, 3e-2 · max|expected|) (docs/CASES.md).
pub fn budget(dtype: DType, tolerance: f32, expected: &[f32]) -> f32 {
    match dtype {
        DType::F32 => tolerance,
        DType::F16 => tolerance.max(3e-2 * expected.iter().fold(0f32, |m, v| m.max(v.abs()))),
    }
}

/// max |got − want| (NaN counts as infinite).
pub fn max_abs_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "output length");
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            let e = (g - w).abs();
            if e.is_nan() {
                f32::INFINITY
            } else {
                e
            }
        })
        .fold(0f32, f32::max)
}

/// The software driver (or any adapter) storing tensors in `dtype`; an
/// adapter without f16 storage fails the f16 runs rather than skip them.
pub fn gpu_in(dtype: DType) -> Gpu {
    let gpu = Gpu::new(GpuOptions {
        precision: Some(dtype),
        ..Default::default()
    })
    .expect("a GPU adapter (install mesa-vulkan-drivers)");
    assert!(
        dtype == DType::F32 || gpu.has_f16(),
        "the adapter has no f16 storage"
    );
    gpu
}
