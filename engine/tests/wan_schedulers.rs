//! Wan's samplers against diffusers 0.42: every `scheduler` case of the Wan
//! reference case sets (tests/fixtures/wan-a, wan-b; docs/CASES.md, "Wan")
//! run through the public scheduler API as WanPipeline drives it — no
//! scaling of the initial latents, `step` once per timestep — then the
//! flow samplers' algebra, the shift override and the kind resolution.
//!
//! The schedulers compute in f32 on the CPU whatever the GPU precision, so
//! there is no f16 variant: f16 mode only widens the runner's budget.

use std::path::{Path, PathBuf};

use motif_engine::schedulers::{Scheduler, SchedulerConfig, SchedulerKind, SchedulerOptions};
use motif_engine::weights::SafetensorsFile;
use motif_engine::EngineError;
use serde_json::{json, Value};

fn case_sets() -> [PathBuf; 2] {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    [fixtures.join("wan-a"), fixtures.join("wan-b")]
}

fn tensor_input(tensors: &SafetensorsFile, case: &Value, name: &str) -> Vec<f32> {
    let key = case["inputs"][name]["tensor"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: input `{name}` is not a tensor", case["name"]));
    tensors.to_f32(key).unwrap()
}

/// Runs one scheduler case; returns one report line per listed output and
/// whether all passed.
fn run_case(dir: &Path, tensors: &SafetensorsFile, case: &Value) -> (Vec<String>, bool) {
    let name = case["name"].as_str().unwrap();
    let config_path = dir.join(case["inputs"]["scheduler_config"].as_str().unwrap());
    let steps = case["inputs"]["steps"].as_u64().unwrap() as usize;
    let noise_init = tensor_input(tensors, case, "noise_init");
    let model_output = tensor_input(tensors, case, "model_output");
    assert!(
        case["inputs"].get("noise").is_none(),
        "{name}: the flow samplers draw no noise"
    );

    let config = SchedulerConfig::load(&config_path).unwrap();
    let mut scheduler = Scheduler::new(&config, None, None).unwrap();
    scheduler.set_timesteps(steps).unwrap();
    let n = scheduler.timesteps().len();
    let len = noise_init.len();
    assert_eq!(model_output.len(), n * len, "{name}: model_output rows");

    let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    // WanPipeline passes the initial noise as is (no init_noise_sigma).
    assert_eq!(scheduler.init_noise_sigma(), 1.0);
    let mut sample = noise_init.clone();
    let sample0 = widen(&sample);
    let mut prev = Vec::new();
    for i in 0..n {
        let out = scheduler
            .step(&model_output[i * len..(i + 1) * len], i, &sample, None)
            .unwrap();
        prev.extend(widen(&out.prev_sample));
        sample = out.prev_sample;
    }
    let computed = |output: &str| -> Vec<f64> {
        match output {
            "timesteps" => scheduler.timesteps().to_vec(),
            "sigmas" => widen(scheduler.sigmas().expect("flow samplers have sigmas")),
            "sample0" => sample0.clone(),
            "prev_sample" => prev.clone(),
            other => panic!("{name}: output `{other}` is not a scheduler output"),
        }
    };

    let mut lines = Vec::new();
    let mut all_ok = true;
    for output in case["outputs"].as_array().unwrap() {
        let out_name = output["name"].as_str().unwrap();
        let want = tensors.to_f32(output["tensor"].as_str().unwrap()).unwrap();
        let got = computed(out_name);
        assert_eq!(got.len(), want.len(), "{name} {out_name}: value count");
        let err = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - *w as f64).abs())
            .fold(0.0, f64::max);
        let exact = output["exact"].as_bool().unwrap_or(false);
        let tolerance = output["tolerance_max_abs"].as_f64().unwrap();
        let ok = if exact { err == 0.0 } else { err <= tolerance };
        all_ok &= ok;
        lines.push(format!(
            "{name} {out_name} {err:.3e} {} {}",
            if exact {
                "exact".to_string()
            } else {
                format!("{tolerance:.1e}")
            },
            if ok { "ok" } else { "FAIL" }
        ));
    }
    (lines, all_ok)
}

#[test]
fn every_wan_scheduler_case_matches_diffusers() {
    let mut report = Vec::new();
    let mut failed = 0;
    let mut cases = 0;
    let mut kinds = Vec::new();
    for dir in case_sets() {
        let manifest: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        let tensors = SafetensorsFile::open(dir.join("cases.safetensors")).unwrap();
        for case in manifest["cases"].as_array().unwrap() {
            if case["component"] != "scheduler" {
                continue;
            }
            cases += 1;
            let config_path = dir.join(case["inputs"]["scheduler_config"].as_str().unwrap());
            let class = SchedulerConfig::load(&config_path)
                .unwrap()
                .class_name()
                .map(str::to_string);
            kinds.push(class);
            let (lines, ok) = run_case(&dir, &tensors, case);
            failed += usize::from(!ok);
            report.extend(lines);
        }
    }
    let report = report.join("\n");
    eprintln!("{report}");
    assert_eq!(failed, 0, "failing cases:\n{report}");
    // Both sets, both samplers, three step counts each.
    assert_eq!(cases, 12, "{report}");
    for class in ["UniPCMultistepScheduler", "FlowMatchEulerDiscreteScheduler"] {
        assert_eq!(
            kinds.iter().filter(|k| k.as_deref() == Some(class)).count(),
            6
        );
    }
}

/// Wan 2.1's shipped scheduler config (UniPC, flow_shift 3 or 5 by model).
fn wan_unipc(extra: Value) -> SchedulerConfig {
    let mut value = json!({
        "_class_name": "UniPCMultistepScheduler",
        "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
        "disable_corrector": [], "dynamic_thresholding_ratio": 0.995,
        "final_sigmas_type": "zero", "flow_shift": 3.0, "lower_order_final": true,
        "num_train_timesteps": 1000, "predict_x0": true, "prediction_type": "flow_prediction",
        "rescale_betas_zero_snr": false, "sample_max_value": 1.0, "solver_order": 2,
        "solver_p": null, "solver_type": "bh2", "steps_offset": 0, "thresholding": false,
        "timestep_spacing": "linspace", "trained_betas": null, "use_beta_sigmas": false,
        "use_exponential_sigmas": false, "use_flow_sigmas": true, "use_karras_sigmas": false
    });
    for (k, v) in extra.as_object().unwrap() {
        value[k] = v.clone();
    }
    SchedulerConfig::from_json(value, Path::new("wan/scheduler_config.json")).unwrap()
}

fn flow_euler(shift: f64) -> SchedulerConfig {
    SchedulerConfig::from_json(
        json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": shift}),
        Path::new("flow/scheduler_config.json"),
    )
    .unwrap()
}

fn animatediff() -> SchedulerConfig {
    SchedulerConfig::from_json(
        json!({"_class_name": "DDIMScheduler", "beta_schedule": "linear",
               "beta_start": 0.00085, "beta_end": 0.012}),
        Path::new("ad/scheduler_config.json"),
    )
    .unwrap()
}

fn build(config: &SchedulerConfig, kind: Option<SchedulerKind>, shift: Option<f64>) -> Scheduler {
    Scheduler::with_options(
        config,
        SchedulerOptions {
            kind,
            shift,
            ..Default::default()
        },
    )
    .unwrap()
}

fn error(result: Result<impl Sized, EngineError>) -> String {
    match result {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    }
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

/// A model that knows x₀ and ε predicts the exact velocity ε − x₀; on the
/// straight flow path every flow sampler, of any order, then lands on x₀.
#[test]
fn flow_samplers_recover_x0_from_a_perfect_model() {
    let x0 = values(64, 1);
    let eps = values(64, 2);
    let velocity: Vec<f32> = eps.iter().zip(&x0).map(|(e, x)| e - x).collect();
    for (config, solver_order) in [
        (wan_unipc(json!({})), 2),
        (wan_unipc(json!({"solver_order": 1})), 1),
        (wan_unipc(json!({"solver_type": "bh1"})), 2),
        (wan_unipc(json!({"disable_corrector": [0, 2]})), 2),
        (wan_unipc(json!({"final_sigmas_type": "sigma_min"})), 2),
        (flow_euler(3.0), 1),
    ] {
        for steps in [1, 2, 5, 12] {
            let mut s = build(&config, None, None);
            s.set_timesteps(steps).unwrap();
            let sigmas = s.sigmas().unwrap().to_vec();
            let mut sample = s.add_noise(&x0, &eps, s.timesteps()[0]).unwrap();
            for i in 0..s.timesteps().len() {
                let out = s.step(&velocity, i, &sample, None).unwrap();
                let x0_err = max_abs_diff(&out.pred_original, &x0);
                assert!(x0_err < 1e-5, "{i}: x0 off by {x0_err}");
                sample = out.prev_sample;
            }
            // The last σ is 0 or σ_min: the sample is x₀ + σ_last·(ε − x₀).
            let last = *sigmas.last().unwrap();
            let expected: Vec<f32> = x0
                .iter()
                .zip(&eps)
                .map(|(x, e)| (1.0 - last) * x + last * e)
                .collect();
            let err = max_abs_diff(&sample, &expected);
            assert!(
                err < 2e-5,
                "{:?} order {solver_order}, {steps} steps: final sample off by {err}",
                config.class_name()
            );
        }
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn timesteps_follow_diffusers_conventions() {
    // UniPC: σ = shift(linspace(1, 1/1000, n + 1)[:-1]), the first nudged
    // to 1 − 1e-6; timesteps truncated from σ·1000 (WAN_CASES.md: [999, 750]
    // for shift 3 and 2 steps).
    let mut unipc = build(&wan_unipc(json!({})), None, None);
    unipc.set_timesteps(2).unwrap();
    assert_eq!(unipc.timesteps(), [999.0, 750.0]);
    assert!(unipc.timesteps_are_integer());
    assert_eq!(unipc.sigmas().unwrap()[2], 0.0);
    // FlowMatchEuler: shifted twice, float timesteps ([1000, 8.93]).
    let mut euler = build(&flow_euler(3.0), None, None);
    euler.set_timesteps(2).unwrap();
    assert_eq!(euler.timesteps()[0], 1000.0);
    assert!(
        (euler.timesteps()[1] - 8.93).abs() < 5e-3,
        "{:?}",
        euler.timesteps()
    );
    assert!(!euler.timesteps_are_integer());
    assert_eq!(euler.scale_model_input(&[0.5], 0).unwrap(), [0.5]);
}

#[test]
fn shift_overrides_the_config_and_falls_back_to_the_other_class_s_name() {
    let config = wan_unipc(json!({}));
    let mut default = build(&config, None, None);
    let mut shifted = build(&config, None, Some(5.0));
    let mut wan_b = build(&wan_unipc(json!({"flow_shift": 5.0})), None, None);
    for s in [&mut default, &mut shifted, &mut wan_b] {
        s.set_timesteps(4).unwrap();
    }
    assert_ne!(default.sigmas(), shifted.sigmas());
    assert_eq!(shifted.sigmas(), wan_b.sigmas());
    assert_eq!(shifted.timesteps(), wan_b.timesteps());

    // `euler` on Wan's UniPC config is flow-matching Euler with the
    // config's flow_shift; --shift overrides it there too.
    let mut euler = build(&config, Some(SchedulerKind::Euler), None);
    assert_eq!(euler.kind(), SchedulerKind::FlowMatchEuler);
    let mut reference = build(&flow_euler(3.0), None, None);
    let mut euler5 = build(&config, Some(SchedulerKind::Euler), Some(5.0));
    let mut reference5 = build(&flow_euler(5.0), None, None);
    for s in [&mut euler, &mut reference, &mut euler5, &mut reference5] {
        s.set_timesteps(6).unwrap();
    }
    assert_eq!(euler.sigmas(), reference.sigmas());
    assert_eq!(euler5.sigmas(), reference5.sigmas());
    assert_ne!(euler.sigmas(), euler5.sigmas());

    // UniPC on a FlowMatchEuler config: flow sigmas with its `shift`.
    let mut unipc_on_euler = build(&flow_euler(3.0), Some(SchedulerKind::UniPc), None);
    unipc_on_euler.set_timesteps(4).unwrap();
    assert_eq!(unipc_on_euler.sigmas(), default.sigmas());
}

#[test]
fn kinds_resolve_by_name_and_mismatches_are_refused() {
    assert_eq!(
        "unipc".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::UniPc
    );
    assert_eq!(
        "flow-euler".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::FlowMatchEuler
    );
    assert_eq!(
        SchedulerKind::from_class_name("FlowMatchEulerDiscreteScheduler"),
        Some(SchedulerKind::FlowMatchEuler)
    );
    assert!(SchedulerKind::FLOW_MATCHING
        .iter()
        .all(|k| k.is_flow_matching() && SchedulerKind::ALL.contains(k)));
    assert!(SchedulerKind::DIFFUSION
        .iter()
        .all(|k| !k.is_flow_matching()));

    let wan = wan_unipc(json!({}));
    let message = error(Scheduler::new(&wan, Some(SchedulerKind::Ddim), None));
    assert!(
        message.contains("wan/scheduler_config.json") && message.contains("unipc or euler"),
        "{message}"
    );
    let message = error(Scheduler::new(
        &animatediff(),
        Some(SchedulerKind::UniPc),
        None,
    ));
    assert!(
        message.contains("ad/scheduler_config.json") && message.contains("dpm++2m"),
        "{message}"
    );
    let message = error(Scheduler::with_options(
        &animatediff(),
        SchedulerOptions {
            shift: Some(3.0),
            ..Default::default()
        },
    ));
    assert!(message.contains("shift"), "{message}");
    let message = error(Scheduler::with_options(
        &wan,
        SchedulerOptions {
            shift: Some(-1.0),
            ..Default::default()
        },
    ));
    assert!(message.contains("positive"), "{message}");
}

#[test]
fn unsupported_unipc_settings_name_the_file_and_field() {
    for (extra, field) in [
        (
            json!({"use_flow_sigmas": false, "prediction_type": "epsilon"}),
            "use_flow_sigmas",
        ),
        (json!({"solver_order": 3}), "solver_order"),
        (json!({"solver_type": "bh3"}), "solver_type"),
        (json!({"predict_x0": false}), "predict_x0"),
        (
            json!({"use_dynamic_shifting": true}),
            "use_dynamic_shifting",
        ),
        (json!({"use_karras_sigmas": true}), "use_karras_sigmas"),
        (json!({"final_sigmas_type": "one"}), "final_sigmas_type"),
        (json!({"lower_order_final": false}), "lower_order_final"),
        (json!({"disable_corrector": [0.5]}), "disable_corrector"),
        (json!({"flow_shift": 0.0}), "flow_shift"),
        (json!({"timestep_spacing": "uniform"}), "timestep_spacing"),
    ] {
        let message = error(Scheduler::new(&wan_unipc(extra), None, None));
        assert!(
            message.contains("wan/scheduler_config.json") && message.contains(field),
            "{field}: {message}"
        );
    }
    let bad_euler = SchedulerConfig::from_json(
        json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": true}),
        Path::new("flow/scheduler_config.json"),
    )
    .unwrap();
    assert!(error(Scheduler::new(&bad_euler, None, None)).contains("use_dynamic_shifting"));
}

#[test]
fn steps_run_in_order_and_add_noise_follows_the_schedule() {
    let mut s = build(&flow_euler(3.0), None, None);
    s.set_timesteps(4).unwrap();
    let t = s.timesteps()[1];
    let sigma = s.sigmas().unwrap()[1];
    let noisy = s.add_noise(&[1.0], &[3.0], t).unwrap();
    assert_eq!(noisy, [(1.0 - sigma) * 1.0 + sigma * 3.0]);
    assert!(error(s.add_noise(&[1.0], &[1.0], 123.25)).contains("not in the schedule"));
    // Image-to-video starts part-way, then steps in order.
    s.step(&[0.0], 1, &noisy, None).unwrap();
    assert!(error(s.step(&[0.0], 3, &noisy, None)).contains("in order"));

    let mut u = build(&wan_unipc(json!({})), None, None);
    let start = u.set_timesteps_for_strength(10, 0.5).unwrap();
    assert_eq!(start, 5);
    // Starting part-way there is no corrector and order 1 first.
    let x = u
        .add_noise(&[1.0, -1.0], &[0.5, 0.5], u.timesteps()[start])
        .unwrap();
    let out = u.step(&[0.1, 0.2], start, &x, None).unwrap();
    assert!(out.prev_sample.iter().all(|v| v.is_finite()));
}
