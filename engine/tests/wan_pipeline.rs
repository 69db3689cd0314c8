//! The Wan family end to end against diffusers' `WanPipeline` on the Wan
//! reference case sets (tests/fixtures/wan-a, wan-b): every `pipeline` case
//! (UniPC and flow-matching Euler, guidance on, non-square sizes, 5 and 9
//! frames) through the whole denoising loop — timesteps, prompt
//! embeddings, the latents after every step, the final latents and the
//! decoded frames — in f32 (the case's tolerances) and f16 (docs/CASES.md's
//! pipeline budget); and the family's refusals, before any GPU work.

mod common;
#[path = "common/wan_cases.rs"]
mod wan_cases;

use motif_engine::models::source::ModelSource;
use motif_engine::pipelines::{Family, ModelDefaults, Request, Wan};
use motif_engine::schedulers::SchedulerConfig;
use motif_engine::{DType, EngineError, Gpu, GpuOptions};
use wan_cases::*;

fn run_set(set_name: &str, dtype: DType) {
    let gpu = gpu_in(dtype);
    let (set, picked) = cases_of(set_name, "pipeline");
    assert!(!picked.is_empty(), "{set_name} has pipeline cases");
    let mut wan = Wan::load(&gpu, &ModelSource::folder(&set.dir))
        .unwrap_or_else(|e| panic!("{set_name}: loading: {e}"));
    let mut failures = Vec::new();
    for &i in &picked {
        let case = &set.cases[i];
        let inputs = &case.inputs;
        let config = set.dir.join(
            inputs["scheduler_config"]
                .as_str()
                .expect("scheduler_config"),
        );
        wan.set_scheduler_config(SchedulerConfig::load(&config).expect("scheduler config"));
        wan.set_max_sequence_length(inputs["max_sequence_length"].as_u64().unwrap_or(512) as usize);
        let defaults = ModelDefaults {
            width: inputs["width"].as_u64().expect("width") as usize,
            height: inputs["height"].as_u64().expect("height") as usize,
            frames: inputs["frames"].as_u64().expect("frames") as usize,
            steps: inputs["steps"].as_u64().expect("steps") as usize,
            guidance: inputs["guidance"].as_f64().expect("guidance") as f32,
            fps: 16.0,
            negative: inputs["negative_prompt"].as_str().unwrap_or("").to_string(),
            camera_prompts: Default::default(),
        };
        let mut req = Request::new(inputs["prompt"].as_str().expect("prompt"), &defaults);
        req.latents = Some(set.f32s(&CaseSet::input_key(case, "latents")));
        req.trace = true;
        let out = wan
            .generate(&gpu, &req, &mut |_| true)
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let trace = out.trace.as_ref().expect("trace asked for");
        for e in &case.outputs {
            let want = set.f32s(&e.tensor);
            let got: Vec<f32> = match e.name.as_str() {
                "timesteps" => trace.timesteps.iter().map(|&t| t as f32).collect(),
                "prompt_embeds" => trace.prompt_embeds.clone(),
                "step_latents" => trace.step_latents.concat(),
                "latents" => out.latents.clone(),
                "frames" => out.frames_f32.clone().expect("frames kept with the trace"),
                other => panic!("{}: unexpected output {other}", case.name),
            };
            let err = max_abs_err(&got, &want);
            // docs/CASES.md: the pipeline's f16 budget is 5e-2 · max|expected|.
            let allowed = match dtype {
                DType::F32 => e.tolerance,
                DType::F16 => e
                    .tolerance
                    .max(5e-2 * want.iter().fold(0f32, |m, v| m.max(v.abs()))),
            };
            println!(
                "{dtype:?} {} {}: {err:.3e} (allowed {allowed:.1e})",
                case.name, e.name
            );
            // NaN fails too.
            if err.is_nan() || err > allowed {
                failures.push(format!(
                    "{} {}: {err:.3e} > {allowed:.1e}",
                    case.name, e.name
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{dtype:?}: {failures:#?}");
}

#[test]
fn wan_a_pipeline_f32() {
    run_set("wan-a", DType::F32);
}

#[test]
fn wan_b_pipeline_f32() {
    run_set("wan-b", DType::F32);
}

#[test]
fn wan_a_pipeline_f16() {
    run_set("wan-a", DType::F16);
}

#[test]
fn wan_b_pipeline_f16() {
    run_set("wan-b", DType::F16);
}

/// Frames that are not 4k + 1, sizes that are not multiples of 16 and the
/// AnimateDiff family's controls are refused by name with what to pass.
#[test]
fn refusals_name_the_setting_and_the_valid_values() {
    let gpu = gpu_in(DType::F32);
    let set = case_set("wan-a");
    let wan = Wan::load(&gpu, &ModelSource::folder(&set.dir)).expect("loads");
    let base = Request::new("a red ball", wan.defaults());
    assert_eq!((base.width, base.height, base.frames), (832, 480, 81));
    let message = |req: &Request| match wan.validate(req) {
        Err(e) => e.to_string(),
        Ok(()) => panic!("accepted {req:?}"),
    };
    let mut r = base.clone();
    r.frames = 16;
    assert!(message(&r).contains("pass 13 or 17"), "{}", message(&r));
    let mut r = base.clone();
    r.width = 840;
    assert!(message(&r).contains("pass 832 or 848"), "{}", message(&r));
    let mut r = base.clone();
    r.motion = 3.0;
    assert!(
        matches!(wan.validate(&r), Err(EngineError::UnsupportedControl { ref control, .. }) if control == "motion")
    );
    let mut r = base.clone();
    r.camera = Some("zoom-in".parse().expect("a camera"));
    assert!(
        message(&r).contains("`camera` is not supported"),
        "{}",
        message(&r)
    );
    let mut r = base.clone();
    r.scheduler = Some(motif_engine::schedulers::SchedulerKind::Ddim);
    assert!(message(&r).contains("scheduler ddim"), "{}", message(&r));
    let mut r = base;
    r.shift = Some(0.0);
    assert!(message(&r).contains("shift"), "{}", message(&r));
}

/// Wan2.1-1.3B at its published 832x480x81 in f16, every phase walked on a
/// plan-mode GPU (figures in docs/PERFORMANCE.md, from `motif bench --plan
/// --wan`): text encoding (UMT5-XXL streamed block by block), denoising
/// and decoding (the decoder's full-resolution levels a frame at a time)
/// each fit an 8 GB card.
#[test]
fn wan_1_3b_every_phase_plans_under_8_gb_in_f16() {
    let gpu = Gpu::new(GpuOptions {
        precision: Some(DType::F16),
        plan: true,
        ..Default::default()
    })
    .expect("a plan-mode GPU");
    let r = motif_engine::bench::plan_wan(&gpu, 832, 480, 81).expect("plans");
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "weights {:.2} GiB; peaks: text encoding {:.2}, denoising {:.2}, decoding {:.2} GiB",
        gib(r.weight_bytes),
        gib(r.text_encoding_peak),
        gib(r.denoising_peak),
        gib(r.decoding_peak)
    );
    assert!(
        r.weight_bytes > 2 << 30,
        "the 1.3B transformer's weights are counted"
    );
    for (phase, bytes) in [
        ("text encoding", r.text_encoding_peak),
        ("denoising", r.denoising_peak),
        ("decoding", r.decoding_peak),
    ] {
        assert!(bytes < 8_000_000_000, "{phase}: peak {:.2} GiB", gib(bytes));
    }
}

/// A re-roll (same prompts, another seed) reads both prompt embeddings
/// from the disk cache: the text encoder does not run, and the clip is
/// byte for byte the one made without the cache. A changed prompt or
/// negative prompt misses; a damaged entry is ignored and written again.
#[test]
fn a_re_roll_reads_the_prompt_embeddings_from_the_cache() {
    use motif_engine::pipelines::prompt_cache::{PromptCache, DEFAULT_MAX_BYTES};
    let gpu = gpu_in(DType::F32);
    let set = case_set("wan-a");
    let dir = std::env::temp_dir().join(format!("motif-wan-prompt-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut wan = Wan::load(&gpu, &ModelSource::folder(&set.dir)).expect("loads");
    wan.set_max_sequence_length(32);
    wan.set_prompt_cache(Some(PromptCache::new(&dir, DEFAULT_MAX_BYTES)));
    let mut req = Request::new("a red ball rolls", wan.defaults());
    (req.width, req.height, req.frames, req.steps) = (48, 32, 5, 2);
    req.guidance = 5.0;
    req.negative = "blurry".into();
    let generate = |wan: &Wan, req: &Request| {
        wan.generate(&gpu, req, &mut |_| true)
            .expect("generates")
            .frames
    };
    req.seed = 1;
    generate(&wan, &req);
    assert_eq!(wan.text_encoder_runs(), 1);
    let entries = || std::fs::read_dir(&dir).map_or(0, |d| d.count());
    assert_eq!(entries(), 2, "one entry per prompt");

    req.seed = 2;
    let cached = generate(&wan, &req);
    assert_eq!(
        wan.text_encoder_runs(),
        1,
        "the re-roll ran the text encoder"
    );
    wan.set_prompt_cache(None);
    let uncached = generate(&wan, &req);
    assert_eq!(wan.text_encoder_runs(), 2);
    assert!(cached == uncached, "the cached embeddings changed the clip");

    wan.set_prompt_cache(Some(PromptCache::new(&dir, DEFAULT_MAX_BYTES)));
    req.prompt = "a blue ball rolls".into();
    generate(&wan, &req);
    assert_eq!(wan.text_encoder_runs(), 3, "a changed prompt misses");
    req.negative = "grainy".into();
    generate(&wan, &req);
    assert_eq!(
        wan.text_encoder_runs(),
        4,
        "a changed negative prompt misses"
    );
    assert_eq!(entries(), 4);

    // Damage every entry: each is ignored (a warning), encoded again and
    // rewritten, after which the next run hits.
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xFF;
        std::fs::write(&path, bytes).unwrap();
    }
    let again = generate(&wan, &req);
    assert_eq!(wan.text_encoder_runs(), 5, "a damaged entry was trusted");
    assert!(again == generate(&wan, &req));
    assert_eq!(
        wan.text_encoder_runs(),
        5,
        "the damaged entries were not rewritten"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
