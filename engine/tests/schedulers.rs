//! The schedulers against diffusers: the reference cases in
//! tests/fixtures/schedulers (written by tools/fixtures/make_scheduler_cases.py)
//! through the conformance runner, in f32 and f16 mode; then the API's
//! algebra and error paths.

use std::path::{Path, PathBuf};

use motif_engine::conformance::{self, ConformanceOptions, Line};
use motif_engine::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use motif_engine::{DType, EngineError, Gpu, GpuOptions};
use serde_json::{json, Value};

fn case_set() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("engine/ has a parent")
        .join("tests/fixtures/schedulers")
}

/// Runs the scheduler case set on `gpu` with debug outputs; returns the
/// lines and the number of outputs the manifest lists.
fn run_case_set(gpu: &Gpu) -> (Vec<Line>, usize, Vec<String>) {
    let dir = case_set();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    let listed: usize = cases
        .iter()
        .map(|c| {
            c["outputs"].as_array().map_or(0, Vec::len)
                + c["debug_outputs"].as_array().map_or(0, Vec::len)
        })
        .sum();
    let names = cases
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    let opts = ConformanceOptions {
        components: Some(vec!["scheduler".into()]),
        debug: true,
    };
    let mut lines = Vec::new();
    conformance::run(gpu, &dir, &opts, |l| lines.push(l.clone())).expect("case set runs");
    (lines, listed, names)
}

fn check_lines(lines: &[Line], listed: usize, names: &[String], precision: &str) {
    let mut report = String::new();
    let mut ok = 0;
    for line in lines {
        match line {
            Line::Output {
                case,
                output,
                max_abs_err,
                tolerance,
                ok: pass,
                ..
            } => {
                report += &format!("{case} {output} {max_abs_err:.3e} {tolerance:.1e} {pass}\n");
                ok += usize::from(*pass);
            }
            Line::CaseError { case, error } => report += &format!("{case}: ERROR {error}\n"),
        }
    }
    assert_eq!(
        (ok, lines.len()),
        (listed, listed),
        "{precision}: every listed output must be computed and pass:\n{report}"
    );
    for name in names {
        assert!(
            lines
                .iter()
                .any(|l| matches!(l, Line::Output { case, .. } if case == name)),
            "{precision}: case {name} produced no output"
        );
    }
}

#[test]
fn reference_cases_match_diffusers_in_f32_and_f16_mode() {
    let gpu = Gpu::new(GpuOptions {
        precision: Some(DType::F32),
        ..Default::default()
    })
    .expect("a GPU adapter (install mesa-vulkan-drivers)");
    let (lines, listed, names) = run_case_set(&gpu);
    assert!(names.len() >= 10 && listed >= 50);
    check_lines(&lines, listed, &names, "f32");

    // Schedulers compute in f32 on the CPU whatever the storage precision;
    // f16 mode only widens the runner's budget.
    match Gpu::new(GpuOptions {
        precision: Some(DType::F16),
        ..Default::default()
    }) {
        Ok(gpu) => {
            let (lines, listed, names) = run_case_set(&gpu);
            check_lines(&lines, listed, &names, "f16");
        }
        Err(EngineError::F16Unsupported { adapter }) => {
            eprintln!("f16 mode skipped: adapter {adapter} has no SHADER_F16");
        }
        Err(e) => panic!("{e}"),
    }
}

/// AnimateDiff's scheduler settings, for `class`, with `extra` on top.
fn config(class: &str, extra: Value) -> SchedulerConfig {
    let mut value = json!({
        "_class_name": class,
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "linear",
        "steps_offset": 1,
        "clip_sample": false,
        "set_alpha_to_one": true,
        "timestep_spacing": "linspace",
    });
    for (k, v) in extra.as_object().unwrap() {
        value[k] = v.clone();
    }
    SchedulerConfig::from_json(value, Path::new("test/scheduler_config.json")).unwrap()
}

fn scheduler(kind: SchedulerKind, karras: bool) -> Scheduler {
    // DDIM with linspace spacing steps to t − 1000÷N, which is not the next
    // listed timestep (diffusers' behaviour, covered by the reference
    // cases); leading spacing keeps its trajectory on the schedule.
    let extra = if kind == SchedulerKind::Ddim {
        json!({"timestep_spacing": "leading"})
    } else {
        json!({})
    };
    Scheduler::new(
        &config(kind.class_name(), extra),
        None,
        Some(karras).filter(|_| kind.supports_karras()),
    )
    .unwrap()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A model that knows the clean latents x₀ predicts the noise consistent with
/// the current sample; every scheduler must then land on x₀ exactly (up to
/// float32 rounding) at the end of the schedule. This checks each update
/// rule's algebra independently of the reference cases.
#[test]
fn every_scheduler_recovers_x0_from_a_perfect_model() {
    let x0 = values(64, 1);
    let eps = values(64, 2);
    for kind in SchedulerKind::DIFFUSION {
        for karras in [false, true] {
            if karras && !kind.supports_karras() {
                continue;
            }
            let mut s = scheduler(kind, karras);
            s.set_timesteps(8).unwrap();
            let timesteps = s.timesteps().to_vec();
            let mut sample = s.add_noise(&x0, &eps, timesteps[0]).unwrap();
            for (i, _) in timesteps.iter().enumerate() {
                // Euler-type samples are x₀ + σ·ε, the others √ᾱ·x₀ + √(1−ᾱ)·ε:
                // a perfect denoiser answers (x − x₀)/σ and ε respectively.
                let model_output: Vec<f32> = match (kind, s.sigmas()) {
                    (SchedulerKind::Euler | SchedulerKind::EulerAncestral, Some(sigmas)) => sample
                        .iter()
                        .zip(&x0)
                        .map(|(x, x0)| (x - x0) / sigmas[i])
                        .collect(),
                    _ => eps.clone(),
                };
                let noise = s.needs_noise(i).then_some(eps.as_slice());
                let out = s.step(&model_output, i, &sample, noise).unwrap();
                let x0_err = max_abs_diff(&out.pred_original, &x0);
                assert!(
                    x0_err < 1e-4,
                    "{kind} karras={karras} step {i}: x0 estimate off by {x0_err}"
                );
                sample = out.prev_sample;
            }
            let err = max_abs_diff(&sample, &x0);
            assert!(
                err < 1e-4,
                "{kind} karras={karras}: final sample off by {err}"
            );
        }
    }
}

fn argument_error(result: Result<impl Sized, EngineError>) -> String {
    match result {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn bad_config_values_are_rejected_with_the_file_and_field() {
    for (class, extra, field) in [
        (
            "DDIMScheduler",
            json!({"beta_schedule": "cosine"}),
            "beta_schedule",
        ),
        (
            "EulerDiscreteScheduler",
            json!({"prediction_type": "flow"}),
            "prediction_type",
        ),
        (
            "EulerAncestralDiscreteScheduler",
            json!({"prediction_type": "sample"}),
            "prediction_type",
        ),
        (
            "DDIMScheduler",
            json!({"timestep_spacing": "uniform"}),
            "timestep_spacing",
        ),
        (
            "DPMSolverMultistepScheduler",
            json!({"algorithm_type": "sde-dpmsolver++"}),
            "algorithm_type",
        ),
        (
            "DPMSolverMultistepScheduler",
            json!({"solver_order": 3}),
            "solver_order",
        ),
        (
            "DPMSolverMultistepScheduler",
            json!({"use_lu_lambdas": true}),
            "use_lu_lambdas",
        ),
        (
            "DDIMScheduler",
            json!({"thresholding": true}),
            "thresholding",
        ),
        (
            "DDIMScheduler",
            json!({"num_train_timesteps": 0}),
            "num_train_timesteps",
        ),
        (
            "DDIMScheduler",
            json!({"beta_start": "small"}),
            "beta_start",
        ),
        (
            "DDIMScheduler",
            json!({"clip_sample": "yes"}),
            "clip_sample",
        ),
        (
            "LCMScheduler",
            json!({"original_inference_steps": 2000}),
            "original_inference_steps",
        ),
        ("PNDMScheduler", json!({}), "_class_name"),
    ] {
        let message = argument_error(Scheduler::new(&config(class, extra), None, None));
        assert!(
            message.contains("test/scheduler_config.json") && message.contains(field),
            "{class} {field}: {message}"
        );
    }
    // Any class's config serves another scheduler, as diffusers' from_config.
    let pndm = config("PNDMScheduler", json!({"skip_prk_steps": true}));
    assert!(Scheduler::new(&pndm, Some(SchedulerKind::Lcm), None).is_ok());
    // Karras sigmas exist for Euler and DPM-Solver only.
    let message = argument_error(Scheduler::new(&pndm, Some(SchedulerKind::Ddim), Some(true)));
    assert!(message.contains("Karras"), "{message}");
    assert!("dpm++2m".parse::<SchedulerKind>().unwrap() == SchedulerKind::DpmPp2m);
    assert!(argument_error("dpm2".parse::<SchedulerKind>()).contains("euler-a"));
}

#[test]
fn non_finite_config_numbers_parse_and_clip_the_dpm_schedule() {
    let path = std::env::temp_dir().join(format!("motif-sched-{}.json", std::process::id()));
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear",
        "beta_start": 0.00085, "beta_end": 0.012, "lambda_min_clipped": -Infinity}"#;
    std::fs::write(&path, text).unwrap();
    let unclipped = SchedulerConfig::load(&path);
    std::fs::remove_file(&path).unwrap();
    let mut s = Scheduler::new(&unclipped.unwrap(), None, None).unwrap();
    s.set_timesteps(10).unwrap();
    assert_eq!(s.timesteps()[0], 999.0);
    // λ at t = 999 is about −2.4 for these betas: a clip above it must
    // start the schedule lower.
    let clipped = config(
        "DPMSolverMultistepScheduler",
        json!({"lambda_min_clipped": -2.0}),
    );
    let mut s = Scheduler::new(&clipped, None, None).unwrap();
    s.set_timesteps(10).unwrap();
    assert!(s.timesteps()[0] < 990.0, "{:?}", s.timesteps());
}

#[test]
fn step_counts_order_and_lengths_are_checked() {
    for kind in SchedulerKind::DIFFUSION {
        let mut s = scheduler(kind, false);
        assert!(argument_error(s.set_timesteps(0)).contains("0 inference steps"));
        assert!(s.set_timesteps(1001).is_err());
        // No step before set_timesteps.
        assert!(
            argument_error(s.step(&[0.0; 4], 0, &[0.0; 4], Some(&[0.0; 4])))
                .contains("set_timesteps")
        );
        s.set_timesteps(4).unwrap();
        let n = s.timesteps().len();
        assert!(s.step(&[0.0; 4], n, &[0.0; 4], Some(&[0.0; 4])).is_err());
        assert!(
            argument_error(s.step(&[0.0; 3], 0, &[0.0; 4], Some(&[0.0; 4])))
                .contains("model_output")
        );
        assert!(argument_error(s.step(&[0.0; 4], 0, &[0.0; 4], Some(&[0.0; 5]))).contains("noise"));
        if s.needs_noise(0) {
            assert!(argument_error(s.step(&[0.0; 4], 0, &[0.0; 4], None)).contains("no noise"));
        }
        s.step(&[0.1; 4], 0, &[1.0; 4], Some(&[0.0; 4])).unwrap();
        assert!(
            argument_error(s.step(&[0.1; 4], 2, &[1.0; 4], Some(&[0.0; 4]))).contains("in order")
        );
        s.step(&[0.1; 4], 1, &[1.0; 4], Some(&[0.0; 4])).unwrap();
    }
    let mut lcm = scheduler(SchedulerKind::Lcm, false);
    assert!(argument_error(lcm.set_timesteps(51)).contains("original_inference_steps"));
    // Euler ancestral draws noise in every step; LCM in all but the last.
    let mut a = scheduler(SchedulerKind::EulerAncestral, false);
    a.set_timesteps(3).unwrap();
    lcm.set_timesteps(3).unwrap();
    assert_eq!(
        (0..3).map(|i| a.needs_noise(i)).collect::<Vec<_>>(),
        [true; 3]
    );
    assert_eq!(
        (0..3).map(|i| lcm.needs_noise(i)).collect::<Vec<_>>(),
        [true, true, false]
    );
    let ddim = scheduler(SchedulerKind::Ddim, false);
    assert!(!ddim.needs_noise(0));
}

#[test]
fn strength_starts_part_way_and_add_noise_follows_the_schedule() {
    let mut s = scheduler(SchedulerKind::Euler, false);
    assert_eq!(s.set_timesteps_for_strength(10, 0.6).unwrap(), 4);
    assert_eq!(s.set_timesteps_for_strength(10, 1.0).unwrap(), 0);
    assert!(s.set_timesteps_for_strength(10, 0.0).is_err());
    assert!(s.set_timesteps_for_strength(10, 0.05).is_err());
    let start = s.set_timesteps_for_strength(10, 0.5).unwrap();
    let t = s.timesteps()[start];
    let sigma = s.sigmas().unwrap()[start];
    let noisy = s.add_noise(&[1.0, 2.0], &[0.5, -0.5], t).unwrap();
    assert_eq!(noisy, vec![1.0 + 0.5 * sigma, 2.0 - 0.5 * sigma]);
    assert!(argument_error(s.add_noise(&[1.0], &[1.0], 123.25)).contains("not in the schedule"));
    // The run may begin at the start index, then continues in order.
    s.step(&[0.0, 0.0], start, &noisy, None).unwrap();
    s.step(&[0.0, 0.0], start + 1, &noisy, None).unwrap();
    assert!(!s.timesteps_are_integer());

    let ddim = scheduler(SchedulerKind::Ddim, false);
    assert!(ddim.timesteps_are_integer());
    assert!(ddim.add_noise(&[1.0], &[1.0], 0.5).is_err());
    // t = 0: ᾱ_0 = 1 − β_0.
    let a0 = 1.0f32 - 0.00085;
    let noisy = ddim.add_noise(&[1.0], &[1.0], 0.0).unwrap();
    assert!((noisy[0] - (a0.sqrt() + (1.0 - a0).sqrt())).abs() < 1e-6);
}
