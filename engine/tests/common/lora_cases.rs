//! A LoRA case set (tests/fixtures/lora, wan-lora) through the conformance
//! runner: every listed output computed and passing, in f32 and f16.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use motif_engine::conformance::{self, ConformanceOptions, Line};
use motif_engine::{DType, EngineError, Gpu, GpuOptions};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

pub fn manifest(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap()
}

/// Runs the LoRA case set on `gpu` and checks that every listed output was
/// computed and passed.
fn run_and_check(gpu: &Gpu, set: &str, precision: &str) {
    let dir = fixtures().join(set);
    let cases = manifest(&dir)["cases"].as_array().unwrap().clone();
    let listed: usize = cases
        .iter()
        .map(|c| c["outputs"].as_array().unwrap().len())
        .sum();
    let opts = ConformanceOptions {
        components: None,
        debug: false,
    };
    let mut lines = Vec::new();
    conformance::run(gpu, &dir, &opts, |l| lines.push(l.clone())).expect("case set runs");
    let mut report = String::new();
    let mut passed = 0;
    for line in &lines {
        match line {
            Line::Output {
                case,
                output,
                max_abs_err,
                tolerance,
                ok,
                ..
            } => {
                report += &format!("{case} {output} {max_abs_err:.3e} {tolerance:.1e} {ok}\n");
                passed += usize::from(*ok);
            }
            Line::CaseError { case, error } => report += &format!("{case}: ERROR {error}\n"),
        }
    }
    eprintln!("{precision}:\n{report}");
    assert_eq!(
        (passed, lines.len()),
        (listed, listed),
        "{precision}: every listed output must be computed and pass:\n{report}"
    );
}

/// Every output of case set `set` (under tests/fixtures) computed and within
/// its tolerance, in f32 and, where the adapter has it, f16.
pub fn case_set_passes_in_f32_and_f16(set: &str) {
    let gpu = Gpu::new(GpuOptions {
        precision: Some(DType::F32),
        ..Default::default()
    })
    .expect("a GPU adapter (install mesa-vulkan-drivers)");
    run_and_check(&gpu, set, "f32");
    match Gpu::new(GpuOptions {
        precision: Some(DType::F16),
        ..Default::default()
    }) {
        Ok(gpu) => run_and_check(&gpu, set, "f16"),
        Err(EngineError::F16Unsupported { adapter }) => {
            eprintln!("f16 mode skipped: adapter {adapter} has no SHADER_F16");
        }
        Err(e) => panic!("{e}"),
    }
}
