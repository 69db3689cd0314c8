//! The denoising loop moves no latent-sized data between the CPU and the
//! GPU: the host ↔ device copies counted in the gpu layer, per step, on the
//! fixture models (cases-b for AnimateDiff, wan-a for Wan) at a tiny size.
//! Each test opens its own GPU so that no other test's copies are counted.

use motif_engine::models::source::ModelSource;
use motif_engine::pipelines::{AnimateDiff, Camera, Event, Family, Request, RgbImage, Wan};
use motif_engine::schedulers::SchedulerKind;
use motif_engine::{Gpu, GpuOptions, TransferStats};

fn pipeline(gpu: &Gpu) -> AnimateDiff {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases-b");
    AnimateDiff::load(gpu, &ModelSource::folder(&dir)).unwrap()
}

fn request(p: &AnimateDiff, steps: usize) -> Request {
    let mut r = Request::new("a red ball", p.defaults());
    (r.width, r.height, r.frames, r.steps, r.seed) = (24, 16, 3, steps, 9);
    r.guidance = 7.5;
    r
}

/// Latent values of `request`'s clip: 4 channels, 3 frames, 4 x 6 (the
/// fixture's VAE scales by 4).
const LATENT_VALUES: u64 = 4 * 3 * 4 * 6;

/// The copies of each step of a generation: from the `Started` event (or
/// the step before) to the step's own event.
fn per_step(gpu: &Gpu, p: &impl Family, req: &Request) -> Vec<TransferStats> {
    let mut steps = Vec::new();
    let mut total = 0;
    p.generate(gpu, req, &mut |e| {
        match e {
            Event::Started { steps } => {
                total = steps;
                gpu.reset_transfer_stats()
            }
            Event::Step { .. } => {
                steps.push(gpu.transfer_stats());
                gpu.reset_transfer_stats();
            }
            _ => {}
        }
        true
    })
    .unwrap();
    // A still starts part-way (strength): fewer steps than asked for.
    assert_eq!(steps.len(), total);
    assert!(
        total > 1 && total <= req.steps,
        "{total} of {} steps",
        req.steps
    );
    steps
}

/// No single copy as large as the latents in f16.
fn assert_no_latent_sized(what: &str, steps: &[TransferStats]) {
    for (k, s) in steps.iter().enumerate() {
        assert!(
            s.largest_upload < LATENT_VALUES * 2 && s.largest_download < LATENT_VALUES * 2,
            "{what}, step {k}: a latent-sized copy ({LATENT_VALUES} latent values): {s:?}"
        );
    }
}

/// Every step copies the same, whatever the number of steps.
fn assert_constant(what: &str, short: &[TransferStats], long: &[TransferStats]) {
    let first = short[0];
    for (k, s) in short.iter().chain(long).enumerate() {
        assert_eq!(
            (s.uploads, s.upload_bytes, s.downloads, s.download_bytes),
            (
                first.uploads,
                first.upload_bytes,
                first.downloads,
                first.download_bytes
            ),
            "{what}: step {k} copies differently from the first ({first:?}): {s:?}"
        );
    }
}

/// No copy in any step beyond what the model's forward pass makes itself
/// (`model`: a step of a single-step scheduler without camera or still,
/// which uploads the timestep, a few bytes, and downloads nothing): the
/// latents, the scheduler's history, camera guidance and the still stay
/// on the GPU, and nothing comes back.
fn assert_no_step_copies(what: &str, steps: &[TransferStats], model: &TransferStats) {
    assert_eq!(model.downloads, 0, "{model:?}");
    for (k, s) in steps.iter().enumerate() {
        assert_eq!(
            (s.uploads, s.upload_bytes, s.downloads),
            (model.uploads, model.upload_bytes, 0),
            "{what}, step {k} copies more than the model's own step ({model:?}): {s:?}"
        );
    }
}

/// The copies per step of `req` at its step count and at `long` steps,
/// every step copying the same.
fn short_and_long(
    what: &str,
    gpu: &Gpu,
    p: &impl Family,
    req: &Request,
    long: usize,
) -> Vec<TransferStats> {
    let short = per_step(gpu, p, req);
    let mut req = req.clone();
    req.steps = long;
    let long = per_step(gpu, p, &req);
    assert_constant(what, &short, &long);
    [short, long].concat()
}

/// A step of the fixture UNet with DDIM, nothing else: the model's own
/// copies.
fn unet_step(gpu: &Gpu, p: &AnimateDiff) -> TransferStats {
    let mut req = request(p, 2);
    req.scheduler = Some(SchedulerKind::Ddim);
    let steps = per_step(gpu, p, &req);
    assert_no_latent_sized("ddim", &steps);
    steps[0]
}

#[test]
fn a_denoising_step_copies_no_latents_between_cpu_and_gpu() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let p = pipeline(&gpu);
    for kind in [SchedulerKind::Ddim, SchedulerKind::Euler] {
        let what = format!("{kind}");
        let mut req = request(&p, 2);
        req.scheduler = Some(kind);
        let short = per_step(&gpu, &p, &req);
        req.steps = 5;
        let long = per_step(&gpu, &p, &req);
        assert_constant(&what, &short, &long);
        assert_no_latent_sized(&what, &short);
        assert_no_latent_sized(&what, &long);
        assert_eq!(short[0].downloads, 0, "{what}: {:?}", short[0]);
    }
}

#[test]
fn dpm_solver_keeps_its_history_on_the_gpu() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let p = pipeline(&gpu);
    for karras in [false, true] {
        let mut req = request(&p, 2);
        (req.scheduler, req.karras) = (Some(SchedulerKind::DpmPp2m), Some(karras));
        // Five steps: three second-order ones read the last x0.
        let what = format!("dpm++2m, karras {karras}");
        let steps = short_and_long(&what, &gpu, &p, &req, 5);
        assert_no_step_copies(&what, &steps, &unet_step(&gpu, &p));
    }
}

#[test]
fn unipc_keeps_its_history_on_the_gpu() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wan-a");
    let mut wan = Wan::load(&gpu, &ModelSource::folder(&dir)).unwrap();
    wan.set_max_sequence_length(32);
    let mut req = Request::new("a red ball rolls", wan.defaults());
    (req.width, req.height, req.frames, req.steps, req.seed) = (48, 32, 5, 2, 9);
    (req.guidance, req.negative) = (5.0, "blurry".into());
    // The transformer's own copies: a flow-matching Euler step.
    req.scheduler = Some(SchedulerKind::FlowMatchEuler);
    let model = per_step(&gpu, &wan, &req)[0];
    assert!(model.largest_upload < 16 * 2 * 4 * 6 * 2, "{model:?}");
    req.scheduler = Some(SchedulerKind::UniPc);
    // Four steps: the corrector and the second-order predictor read the
    // last two x0 and the last predictor's sample.
    let steps = short_and_long("unipc", &gpu, &wan, &req, 4);
    assert_no_step_copies("unipc", &steps, &model);
}

#[test]
fn camera_guidance_runs_on_the_gpu() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let p = pipeline(&gpu);
    for (camera, kind) in [
        (Camera::PanLeft, SchedulerKind::Ddim),
        (Camera::ZoomIn, SchedulerKind::DpmPp2m),
    ] {
        let mut req = request(&p, 2);
        (req.camera, req.scheduler) = (Some(camera), Some(kind));
        // Guidance pulls in the first two thirds of the steps.
        let what = format!("camera {camera:?}, {kind}");
        let steps = short_and_long(&what, &gpu, &p, &req, 5);
        assert_no_step_copies(&what, &steps, &unet_step(&gpu, &p));
    }
}

#[test]
fn image_anchoring_runs_on_the_gpu() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let p = pipeline(&gpu);
    let (width, height) = (24, 16);
    let still = RgbImage {
        width,
        height,
        data: (0..width * height * 3)
            .map(|i| (i % 7) as f32 / 7.0)
            .collect(),
    };
    for kind in [SchedulerKind::Ddim, SchedulerKind::Euler] {
        let mut req = request(&p, 3);
        (req.image, req.strength, req.scheduler) = (Some(still.clone()), 0.7, Some(kind));
        let what = format!("still, {kind}");
        let steps = short_and_long(&what, &gpu, &p, &req, 6);
        assert_no_step_copies(&what, &steps, &unet_step(&gpu, &p));
    }
}

#[test]
fn lcm_uploads_only_its_step_noise() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let p = pipeline(&gpu);
    let mut req = request(&p, 3);
    req.scheduler = Some(SchedulerKind::Lcm);
    let short = per_step(&gpu, &p, &req);
    req.steps = 5;
    let long = per_step(&gpu, &p, &req);
    // LCM re-noises with noise drawn on the CPU (the run's generator) in
    // every step but the last: that upload is the one latent-sized copy.
    let (short_last, long_last) = (short[short.len() - 1], long[long.len() - 1]);
    let noised: Vec<_> = short[..short.len() - 1]
        .iter()
        .chain(&long[..long.len() - 1])
        .copied()
        .collect();
    assert_constant("lcm", &noised, &[]);
    assert_constant("lcm, last step", &[short_last], &[long_last]);
    assert_no_latent_sized("lcm, last step", &[short_last, long_last]);
    for s in &noised {
        assert_eq!(s.largest_upload, LATENT_VALUES * 4, "{s:?}");
        assert_eq!(s.uploads, short_last.uploads + 1, "{s:?}");
        assert_eq!(s.downloads, 0, "{s:?}");
    }
}

#[test]
fn euler_ancestral_uploads_only_its_step_noise() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let p = pipeline(&gpu);
    let mut req = request(&p, 2);
    req.scheduler = Some(SchedulerKind::EulerAncestral);
    let short = per_step(&gpu, &p, &req);
    req.steps = 4;
    let long = per_step(&gpu, &p, &req);
    assert_constant("euler-a", &short, &long);
    for s in short.iter().chain(&long) {
        // The noise, f32, is the one latent-sized copy.
        assert_eq!(s.largest_upload, LATENT_VALUES * 4, "{s:?}");
        assert_eq!(s.downloads, 0, "{s:?}");
    }
}

#[test]
fn previews_download_only_their_rgb_values() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let p = pipeline(&gpu);
    let mut req = request(&p, 2);
    req.previews = true;
    let short = per_step(&gpu, &p, &req);
    req.steps = 4;
    let long = per_step(&gpu, &p, &req);
    assert_constant("previews", &short, &long);
    for s in short.iter().chain(&long) {
        // One download: the RGB projection, 3 f32 per latent pixel.
        assert_eq!(s.downloads, 1, "{s:?}");
        assert_eq!(s.download_bytes, 3 * 3 * 4 * 6 * 4, "{s:?}");
        assert!(s.largest_upload < LATENT_VALUES * 2, "{s:?}");
    }
}

/// The bundled model's 8-step clip (its card's size: 128x128, 16 frames;
/// guidance 7.5, seed 7): prints each step's copies and wall time, and the
/// whole generation's. A measurement, not a check (timings are never
/// asserted): `cargo test --release -p motif-engine --test host_transfers
/// -- --ignored --nocapture`.
#[test]
#[ignore]
fn bundled_clip_copies_and_times_per_step() {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/default");
    let p = AnimateDiff::load(&gpu, &ModelSource::folder(&dir)).unwrap();
    let mut req = Request::new("a yellow star spinning over the sea at night", p.defaults());
    (req.steps, req.seed, req.guidance) = (8, 7, 7.5);
    println!("load average at start: {}", load.trim());
    let start = std::time::Instant::now();
    gpu.reset_transfer_stats();
    let mut last = std::time::Instant::now();
    let mut before_steps = TransferStats::default();
    let mut steps = Vec::new();
    p.generate(&gpu, &req, &mut |e| {
        match e {
            Event::Started { .. } => {
                before_steps = gpu.transfer_stats();
                gpu.reset_transfer_stats();
                last = std::time::Instant::now();
            }
            Event::Step { index, .. } => {
                let s = gpu.transfer_stats();
                gpu.reset_transfer_stats();
                let ms = last.elapsed().as_secs_f64() * 1e3;
                last = std::time::Instant::now();
                println!(
                    "step {index}: {ms:.0} ms, uploads {} ({} B, largest {}), downloads {} ({} B, largest {})",
                    s.uploads,
                    s.upload_bytes,
                    s.largest_upload,
                    s.downloads,
                    s.download_bytes,
                    s.largest_download
                );
                steps.push(ms);
            }
            _ => {}
        }
        true
    })
    .unwrap();
    let after = gpu.transfer_stats();
    println!("before the steps (prompts, noise): {before_steps:?}");
    println!("after the steps (decode, frames): {after:?}");
    println!(
        "steps: {:.0} ms mean, whole generation {:.1} s; load average at end: {}",
        steps.iter().sum::<f64>() / steps.len() as f64,
        start.elapsed().as_secs_f64(),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}

/// Bytes copied per step, by what the step runs: the bundled model at its
/// card's size (128x128, 16 frames, guidance 7.5) with DDIM, DPM-Solver++
/// 2M, a camera move and a still; and the Wan fixture (wan-a) with
/// flow-matching Euler and UniPC. A measurement for docs/PERFORMANCE.md,
/// not a check: `cargo test --release -p motif-engine --test
/// host_transfers -- --ignored --nocapture copies_per_step_by_control`.
#[test]
#[ignore]
fn copies_per_step_by_control() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let report = |what: &str, steps: &[TransferStats]| {
        let n = steps.len() as u64;
        let sum = |f: fn(&TransferStats) -> u64| steps.iter().map(f).sum::<u64>() / n;
        println!(
            "{what}: per step {} uploads ({} B), {} downloads ({} B)",
            sum(|s| s.uploads),
            sum(|s| s.upload_bytes),
            sum(|s| s.downloads),
            sum(|s| s.download_bytes)
        );
    };
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/default");
    let p = AnimateDiff::load(&gpu, &ModelSource::folder(&dir)).unwrap();
    let base = {
        let mut r = Request::new("a yellow star spinning over the sea at night", p.defaults());
        (r.steps, r.seed, r.guidance) = (3, 7, 7.5);
        r
    };
    println!(
        "bundled model, {}x{}, {} frames, batch 2, {}",
        base.width,
        base.height,
        base.frames,
        gpu.precision()
    );
    let mut dpm = base.clone();
    dpm.scheduler = Some(SchedulerKind::DpmPp2m);
    let mut camera = base.clone();
    camera.camera = Some(Camera::PanLeft);
    let mut still = base.clone();
    (still.steps, still.strength) = (4, 0.75);
    still.image = Some(RgbImage {
        width: 64,
        height: 64,
        data: (0..64 * 64 * 3).map(|i| (i % 11) as f32 / 11.0).collect(),
    });
    for (what, req) in [
        ("ddim", &base),
        ("dpm++2m", &dpm),
        ("ddim + camera", &camera),
        ("ddim + still", &still),
    ] {
        report(what, &per_step(&gpu, &p, req));
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wan-a");
    let mut wan = Wan::load(&gpu, &ModelSource::folder(&dir)).unwrap();
    wan.set_max_sequence_length(32);
    let mut req = Request::new("a red ball rolls", wan.defaults());
    (req.width, req.height, req.frames, req.steps, req.seed) = (48, 32, 5, 3, 9);
    (req.guidance, req.negative) = (5.0, "blurry".into());
    println!("wan-a fixture, 48x32, 5 frames (latents 16 x 2 x 4 x 6), guidance 5");
    for kind in [SchedulerKind::FlowMatchEuler, SchedulerKind::UniPc] {
        req.scheduler = Some(kind);
        report(&kind.to_string(), &per_step(&gpu, &wan, &req));
    }
}
