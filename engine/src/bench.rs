//! Operator benchmarks for `motif bench --ops`: the performance record that
//! later kernel work is measured against. Each case runs a warm-up, then
//! `iters` repetitions in one submission; the time per run comes from GPU
//! timestamps where the adapter has them, else from the wall clock.

use std::time::Instant;

use crate::error::{EngineError, Result};
use crate::gpu::{DType, Gpu};
use crate::models::unet_motion::MotionOptions;
use crate::ops::{
    self, attention::AttentionOptions, conv2d::Conv2dOptions, matmul::MatmulOptions, Activation,
};
use crate::tensor::Tensor;

/// One measured case.
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub name: String,
    pub dtype: DType,
    /// Seconds per run: GPU timestamps if available, else wall clock.
    pub seconds: f64,
    /// Wall-clock seconds per run (includes submission and driver overhead).
    pub wall_seconds: f64,
    pub gpu_timed: bool,
    /// Floating-point operations per run (0 for memory-bound cases).
    pub flops: f64,
    /// Bytes read and written per run (memory-bound cases).
    pub bytes: f64,
}

impl BenchResult {
    /// The rate that matters for the case: GFLOP/s, or GB/s for memory-bound ops.
    pub fn rate(&self) -> (f64, &'static str) {
        if self.flops > 0.0 {
            (self.flops / self.seconds * 1e-9, "GFLOP/s")
        } else {
            (self.bytes / self.seconds * 1e-9, "GB/s")
        }
    }
}

fn random_tensor(gpu: &Gpu, shape: &[usize], dtype: DType, seed: u32) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // A cheap deterministic fill in [-1, 1): the values do not matter for timing.
    let mut state = seed.wrapping_mul(747796405).wrapping_add(2891336453);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_mul(747796405).wrapping_add(2891336453);
            (state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_f32(gpu, &data, shape, dtype)
}

fn measure(
    gpu: &Gpu,
    name: &str,
    dtype: DType,
    iters: usize,
    flops: f64,
    bytes: f64,
    mut run: impl FnMut() -> Result<Tensor>,
) -> Result<BenchResult> {
    // Warm-up: compiles the pipelines and fills the buffer pool.
    run()?;
    gpu.synchronize()?;
    let timed = gpu.start_timer();
    let start = Instant::now();
    for _ in 0..iters {
        run()?;
    }
    gpu.synchronize()?;
    let wall = start.elapsed().as_secs_f64() / iters as f64;
    let gpu_seconds = gpu
        .stop_timer()?
        .map(|(s, _)| s / iters as f64)
        .filter(|&s| s > 0.0);
    Ok(BenchResult {
        name: name.to_string(),
        dtype,
        seconds: gpu_seconds.unwrap_or(wall),
        wall_seconds: wall,
        gpu_timed: timed && gpu_seconds.is_some(),
        flops,
        bytes,
    })
}

/// The operator set of `motif bench --ops`, in `dtype`.
pub fn bench_ops(
    gpu: &Gpu,
    dtype: DType,
    iters: usize,
    mut report: impl FnMut(&BenchResult),
) -> Result<Vec<BenchResult>> {
    let es = dtype.size_bytes() as f64;
    let mut results = Vec::new();
    let mut push = |r: BenchResult| {
        report(&r);
        results.push(r);
    };

    // matmul 1024³
    let n = 1024;
    let a = random_tensor(gpu, &[n, n], dtype, 1)?;
    let b = random_tensor(gpu, &[n, n], dtype, 2)?;
    let opts = MatmulOptions::default();
    push(measure(
        gpu,
        "matmul 1024x1024x1024",
        dtype,
        iters,
        2.0 * (n * n * n) as f64,
        0.0,
        || ops::matmul::matmul(gpu, &a, &b, &opts),
    )?);
    drop((a, b));

    // conv 3x3, 320 -> 320 channels, 64x64 (SD's first UNet level at 512x512)
    let (c, hw) = (320, 64);
    let x = random_tensor(gpu, &[1, c, hw, hw], dtype, 3)?;
    let w = random_tensor(gpu, &[c, c, 3, 3], dtype, 4)?;
    let bias = random_tensor(gpu, &[c], dtype, 5)?;
    let copts = Conv2dOptions::same(3, 1);
    push(measure(
        gpu,
        "conv2d 3x3 320->320 64x64",
        dtype,
        iters,
        2.0 * (c * c * 9 * hw * hw) as f64,
        0.0,
        || ops::conv2d::conv2d(gpu, &x, &w, Some(&bias), &copts),
    )?);
    drop((x, w, bias));

    // attention: 4096 spatial tokens, 8 heads of 40 (SD's 64x64 level)
    let (l, heads, d) = (4096, 8, 40);
    let q = random_tensor(gpu, &[1, l, heads * d], dtype, 6)?;
    let k = random_tensor(gpu, &[1, l, heads * d], dtype, 7)?;
    let v = random_tensor(gpu, &[1, l, heads * d], dtype, 8)?;
    let aopts = AttentionOptions::default();
    push(measure(
        gpu,
        "attention 4096 tokens, 8 heads x 40",
        dtype,
        iters,
        4.0 * (heads * l * l * d) as f64,
        0.0,
        || ops::attention::attention(gpu, &q, &k, &v, heads, &aopts),
    )?);
    drop((q, k, v));

    // group norm + SiLU on [2, 320, 64, 64], 32 groups: memory-bound (read twice, write once)
    let shape = [2, 320, 64, 64];
    let numel: usize = shape.iter().product();
    let x = random_tensor(gpu, &shape, dtype, 9)?;
    let g = random_tensor(gpu, &[320], dtype, 10)?;
    let bt = random_tensor(gpu, &[320], dtype, 11)?;
    push(measure(
        gpu,
        "group_norm+silu [2,320,64,64]",
        dtype,
        iters,
        0.0,
        3.0 * numel as f64 * es,
        || ops::norm::group_norm(gpu, &x, 32, Some(&g), Some(&bt), 1e-5, true),
    )?);

    // elementwise add (residual): read two, write one
    let y = random_tensor(gpu, &shape, dtype, 12)?;
    push(measure(
        gpu,
        "add [2,320,64,64]",
        dtype,
        iters,
        0.0,
        3.0 * numel as f64 * es,
        || ops::add(gpu, &x, &y),
    )?);
    push(measure(
        gpu,
        "silu [2,320,64,64]",
        dtype,
        iters,
        0.0,
        2.0 * numel as f64 * es,
        || ops::elementwise::unary(gpu, &x, 1.0, Activation::Silu),
    )?);
    Ok(results)
}

/// SD1.5's UNet config (runwayml/stable-diffusion-v1-5 `unet/config.json`)
/// and the AnimateDiff v2 motion adapter's: the real-size model that
/// `motif bench --unet` times with random weights.
const SD15_UNET_CONFIG: &str = r#"{"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
 "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
 "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
 "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
 "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
 "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
const ADAPTER_V2_CONFIG: &str = r#"{"_class_name": "MotionAdapter", "block_out_channels": [320, 640, 1280, 1280],
 "motion_layers_per_block": 2, "motion_mid_block_layers_per_block": 1, "motion_norm_num_groups": 32,
 "motion_num_attention_heads": 8, "motion_max_seq_length": 32, "use_motion_mid_block": true}"#;

/// The workload of one UNet step.
#[derive(Debug, Clone, Copy)]
pub struct UNetBench {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    /// 2 = classifier-free guidance (uncond + cond).
    pub batch: usize,
}

impl UNetBench {
    /// AnimateDiff's usual workload: 512x512, 16 frames, batch 2.
    pub fn full_size() -> Self {
        UNetBench {
            width: 512,
            height: 512,
            frames: 16,
            batch: 2,
        }
    }

    /// What the software driver can run in reasonable time.
    pub fn reduced() -> Self {
        UNetBench {
            width: 128,
            height: 128,
            frames: 4,
            batch: 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct UNetReport {
    /// Milliseconds per step (None in plan mode).
    pub ms_per_step: Option<f64>,
    /// GPU-timestamp milliseconds per step, where the adapter has them.
    pub gpu_ms_per_step: Option<f64>,
    /// Peak bytes held by the buffer pool (weights + activations).
    pub peak_bytes: u64,
    /// Bytes of the weights alone.
    pub weight_bytes: u64,
}

/// Times `steps` UNet steps (after a warm-up) of SD1.5 + motion adapter v2
/// with random weights, or, on a plan-mode GPU, walks one step through the
/// allocator and reports its peak memory.
pub fn bench_unet(gpu: &Gpu, w: &UNetBench, steps: usize) -> Result<UNetReport> {
    use crate::models::unet_motion::{
        MotionAdapterConfig, UNetConfigFile, UNetMotionConfig, UNetMotionModel,
    };
    use crate::weights::{WeightSet, Weights};
    use std::path::Path;
    use std::sync::Arc;

    let unet: UNetConfigFile =
        serde_json::from_str(SD15_UNET_CONFIG).expect("embedded config parses");
    let adapter: MotionAdapterConfig =
        serde_json::from_str(ADAPTER_V2_CONFIG).expect("embedded config parses");
    let config = UNetMotionConfig::resolve(
        Path::new("(SD1.5 unet)"),
        &unet,
        Some((Path::new("(motion adapter v2)"), &adapter)),
    )?;
    gpu.reset_peak_memory();
    let model = UNetMotionModel::new(
        gpu,
        &Weights::new(Arc::new(WeightSet::synthetic()), gpu.precision()),
        config,
    )?;
    let weight_bytes = gpu.pool_stats().live_bytes;
    let dtype = gpu.precision();
    let (h, wd) = (w.height / 8, w.width / 8);
    let sample = random_tensor(gpu, &[w.batch, 4, w.frames, h, wd], dtype, 21)?;
    let context = random_tensor(gpu, &[w.batch * w.frames, 77, 768], dtype, 22)?;
    let step = || -> Result<Tensor> {
        model.forward(gpu, &sample, &[261.0], &context, &MotionOptions::default())
    };
    if gpu.is_plan() {
        step()?;
        let stats = gpu.pool_stats();
        return Ok(UNetReport {
            ms_per_step: None,
            gpu_ms_per_step: None,
            peak_bytes: stats.peak_allocated_bytes,
            weight_bytes,
        });
    }
    step()?;
    gpu.synchronize()?;
    let timed = gpu.start_timer();
    let start = Instant::now();
    for _ in 0..steps.max(1) {
        step()?;
        // One submission per step, as a sampler loop does.
        gpu.flush()?;
    }
    gpu.synchronize()?;
    let wall = start.elapsed().as_secs_f64() * 1e3 / steps.max(1) as f64;
    let gpu_ms = if timed {
        gpu.stop_timer()?
            .map(|(s, _)| s * 1e3 / steps.max(1) as f64)
    } else {
        None
    };
    Ok(UNetReport {
        ms_per_step: Some(wall),
        gpu_ms_per_step: gpu_ms,
        peak_bytes: gpu.pool_stats().peak_allocated_bytes,
        weight_bytes,
    })
}

/// The workload of `motif bench --model`: one model's generation, taken
/// apart the way `tools/bench/torch_side.py` takes diffusers' apart, so
/// that the two sides' figures line up one to one.
#[derive(Debug, Clone)]
pub struct PipelineBench {
    pub prompt: String,
    /// (width, height, frames); None: the model's own defaults (motif.json).
    pub size: Option<(usize, usize, usize)>,
    /// Whole generations to time, by step count (e.g. 4 and 25).
    pub steps: Vec<usize>,
    pub guidance: f32,
    /// Repetitions of each part (after a warm-up).
    pub iters: usize,
}

/// Seconds, per part; generation figures per step count.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PipelineReport {
    /// The workload that ran.
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub load_s: f64,
    /// From the start of loading to the first step's preview frames, in the
    /// first generation of the process (pipelines compiled on the way).
    pub first_preview_cold_s: f64,
    /// From the call to generate to the first step's preview frames, with
    /// everything compiled and loaded.
    pub first_preview_warm_s: f64,
    /// Both prompts (negative, positive) through the text encoder.
    pub clip_encode_s: f64,
    /// One UNet forward at batch 2 (guidance), with its output read back,
    /// as the sampling loop runs it.
    pub unet_step_s: f64,
    /// Every frame through the VAE decoder, read back.
    pub vae_decode_s: f64,
    /// (steps, seconds) of whole generations: prompts, sampling with
    /// previews, decode.
    pub generate_s: Vec<(usize, f64)>,
    pub weight_bytes: u64,
    pub peak_bytes: u64,
    /// GPU time of one UNet step per kernel (entry point), slowest first:
    /// (kernel, milliseconds, dispatches). Empty where the adapter has no
    /// timestamp queries.
    pub unet_step_kernels: Vec<(String, f64, u32)>,
    /// The same for one decode of every frame.
    pub vae_decode_kernels: Vec<(String, f64, u32)>,
}

/// Runs `work` once with every dispatch timed on the GPU and says the time
/// per kernel (entry point), slowest first, with the dispatch count: where a
/// part's time goes on this adapter. Empty where the adapter has no
/// timestamp queries.
fn kernel_profile(
    gpu: &Gpu,
    what: &str,
    say: &mut dyn FnMut(&str),
    work: impl FnOnce() -> Result<()>,
) -> Result<Vec<(String, f64, u32)>> {
    gpu.synchronize()?;
    if !gpu.start_timer() {
        return Ok(Vec::new());
    }
    work()?;
    let Some(kernels) = gpu.stop_timer_by_kernel()? else {
        return Ok(Vec::new());
    };
    let total: f64 = kernels.iter().map(|k| k.seconds).sum();
    let count: u32 = kernels.iter().map(|k| k.dispatches).sum();
    let mut line = format!(
        "{what} on the GPU: {:.1} ms in {count} dispatches;",
        total * 1e3
    );
    for k in &kernels {
        line.push_str(&format!(
            " {} {:.1} ms ({}),",
            k.kernel,
            k.seconds * 1e3,
            k.dispatches
        ));
    }
    say(line.trim_end_matches(','));
    Ok(kernels
        .into_iter()
        .map(|k| (k.kernel, k.seconds * 1e3, k.dispatches))
        .collect())
}

/// Mean seconds of `iters` runs. No warm-up: the first generation before
/// has compiled every pipeline and filled the pool with these shapes.
fn time_it<T>(gpu: &Gpu, iters: usize, mut run: impl FnMut() -> Result<T>) -> Result<f64> {
    gpu.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        run()?;
    }
    gpu.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// Loads `source` and times its parts and whole generations. `say`
/// receives a line per finished measurement (progress on slow adapters).
pub fn bench_pipeline(
    gpu: &Gpu,
    source: &crate::models::source::ModelSource,
    w: &PipelineBench,
    say: &mut dyn FnMut(&str),
) -> Result<PipelineReport> {
    use crate::pipelines::{AnimateDiff, Event, Family, Request};
    let mut report = PipelineReport::default();
    let t0 = Instant::now();
    let pipe = AnimateDiff::load(gpu, source)?;
    gpu.synchronize()?;
    report.load_s = t0.elapsed().as_secs_f64();
    report.weight_bytes = gpu.pool_stats().live_bytes;
    say(&format!("load: {:.2} s", report.load_s));

    let d = pipe.defaults();
    let (width, height, frames) = w.size.unwrap_or((d.width, d.height, d.frames));
    (report.width, report.height, report.frames) = (width, height, frames);
    let mut req = Request::new(w.prompt.clone(), pipe.defaults());
    req.width = width;
    req.height = height;
    req.frames = frames;
    req.guidance = w.guidance;
    req.previews = true;
    req.steps = w.steps.iter().copied().min().unwrap_or(4).max(1);
    pipe.validate(&req)?;

    // The first generation of the process: the first preview, cold.
    let mut first: Option<f64> = None;
    pipe.generate(gpu, &req, &mut |e| {
        if let (Event::Step { .. }, None) = (&e, first) {
            first = Some(t0.elapsed().as_secs_f64());
        }
        true
    })?;
    report.first_preview_cold_s = first.unwrap_or(f64::NAN);
    say(&format!(
        "first preview, cold (from load): {:.2} s",
        report.first_preview_cold_s
    ));

    let negative = req.negative.clone();
    report.clip_encode_s = time_it(gpu, w.iters, || {
        pipe.encode_prompts(gpu, &[negative.as_str(), w.prompt.as_str()], 0)
    })?;
    say(&format!("clip encode: {:.3} s", report.clip_encode_s));

    let s = pipe.scale_factor();
    let c = pipe.vae.config.latent_channels;
    let (h, wd, f) = (height / s, width / s, frames);
    let dim = pipe.text_encoder.config.hidden_size;
    let dtype = gpu.precision();
    let sample = random_tensor(gpu, &[2, c, f, h, wd], dtype, 31)?;
    let context = random_tensor(gpu, &[2 * f, MAX_TOKENS, dim], dtype, 32)?;
    report.unet_step_s = time_it(gpu, w.iters, || {
        pipe.unet
            .forward(gpu, &sample, &[501.0], &context, &MotionOptions::default())?
            .to_f32(gpu)
    })?;
    say(&format!("unet step: {:.3} s", report.unet_step_s));
    // One more step with every dispatch timed on the GPU, per kernel.
    report.unet_step_kernels = kernel_profile(gpu, "unet step", say, || {
        pipe.unet
            .forward(gpu, &sample, &[501.0], &context, &MotionOptions::default())
            .map(drop)
    })?;

    // In the pipeline's chunks of frames.
    let chunk = pipe.decode_chunk(height, width).min(f);
    let latent = random_tensor(gpu, &[chunk, c, h, wd], dtype, 33)?;
    let last = random_tensor(gpu, &[(f - 1) % chunk + 1, c, h, wd], dtype, 34)?;
    report.vae_decode_s = time_it(gpu, w.iters, || {
        for f0 in (0..f).step_by(chunk) {
            let z = if f0 + chunk <= f { &latent } else { &last };
            pipe.vae.decode_scaled(gpu, z)?.to_f32(gpu)?;
        }
        Ok(())
    })?;
    say(&format!(
        "vae decode ({f} frames): {:.3} s",
        report.vae_decode_s
    ));
    report.vae_decode_kernels = kernel_profile(gpu, "vae decode", say, || {
        for f0 in (0..f).step_by(chunk) {
            let z = if f0 + chunk <= f { &latent } else { &last };
            pipe.vae.decode_scaled(gpu, z)?;
        }
        Ok(())
    })?;

    for &steps in &w.steps {
        req.steps = steps;
        let start = Instant::now();
        let mut first: Option<f64> = None;
        pipe.generate(gpu, &req, &mut |e| {
            if let (Event::Step { .. }, None) = (&e, first) {
                first = Some(start.elapsed().as_secs_f64());
            }
            true
        })?;
        let total = start.elapsed().as_secs_f64();
        if report.first_preview_warm_s == 0.0 {
            report.first_preview_warm_s = first.unwrap_or(f64::NAN);
            say(&format!(
                "first preview, warm: {:.3} s",
                report.first_preview_warm_s
            ));
        }
        report.generate_s.push((steps, total));
        say(&format!("generate, {steps} steps: {total:.2} s"));
    }
    report.peak_bytes = gpu.pool_stats().peak_allocated_bytes;
    Ok(report)
}

/// Tokens per prompt (CLIP's context).
const MAX_TOKENS: usize = crate::text::tokenizer::MAX_LENGTH;

/// Peak device memory of one Wan generation by phase (`motif bench --plan
/// --wan`): bytes held by the buffer pool at its highest during text
/// encoding, denoising and decoding, with every model of the pipeline
/// loaded as `Wan::load` loads them (text encoder streamed block by block,
/// transformer and VAE resident).
#[derive(Debug, Clone)]
pub struct WanPlanReport {
    /// (width, height, frames) planned.
    pub size: (usize, usize, usize),
    /// Bytes of the resident weights (transformer, VAE, the text encoder's
    /// final norm) before any phase runs.
    pub weight_bytes: u64,
    pub text_encoding_peak: u64,
    pub denoising_peak: u64,
    pub decoding_peak: u64,
}

impl WanPlanReport {
    pub fn peak(&self) -> u64 {
        self.text_encoding_peak
            .max(self.denoising_peak)
            .max(self.decoding_peak)
    }
}

/// diffusers' `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` transformer config.
const WAN21_1_3B_TRANSFORMER: &str = r#"{"patch_size": [1, 2, 2], "num_attention_heads": 12,
 "attention_head_dim": 128, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
 "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30, "cross_attn_norm": true,
 "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}"#;

/// google/umt5-xxl's encoder (what every Wan 2.1 folder ships), with the
/// vocabulary cut to 1,000 rows: the embedding table never reaches the
/// device (only the prompt's rows are read, on the host), and the plan's
/// stand-in table would otherwise be computed whole on the host (4 GB).
const UMT5_XXL_PLAN: &str = r#"{"vocab_size": 1000, "d_model": 4096, "d_kv": 64,
 "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
 "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu"}"#;

/// diffusers' `Wan-AI/Wan2.2-TI2V-5B-Diffusers` transformer config.
const WAN22_TI2V_5B_TRANSFORMER: &str = r#"{"patch_size": [1, 2, 2], "num_attention_heads": 24,
 "attention_head_dim": 128, "in_channels": 48, "out_channels": 48, "text_dim": 4096,
 "freq_dim": 256, "ffn_dim": 14336, "num_layers": 30, "cross_attn_norm": true,
 "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024}"#;

/// The Wan 2.2 VAE's structure (TI2V-5B's vae/config.json; the latent
/// statistics do not change the memory).
fn wan22_vae_plan_config() -> serde_json::Value {
    serde_json::json!({"base_dim": 160, "decoder_base_dim": 256, "z_dim": 48,
        "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "temperal_downsample": [false, true, true],
        "is_residual": true, "in_channels": 12, "out_channels": 12, "patch_size": 2,
        "latents_mean": vec![0.0; 48], "latents_std": vec![1.0; 48]})
}

/// Which Wan model a plan walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanPlanModel {
    /// Wan2.1-T2V-1.3B with the Wan 2.1 VAE.
    T2v1_3B,
    /// Wan2.2-TI2V-5B with the Wan 2.2 VAE, image-to-video: the still
    /// encoded first, then a timestep per token (the larger form).
    Ti2v5B,
}

/// Walks one Wan 2.1 1.3B generation at `width` x `height` x `frames` on a
/// plan-mode GPU (no memory is taken, every allocation is counted at its
/// real size): the prompt and negative prompt through UMT5-XXL at 512
/// tokens, one denoising step (two transformer passes, guidance on) and the
/// decode of every latent frame.
pub fn plan_wan(gpu: &Gpu, width: usize, height: usize, frames: usize) -> Result<WanPlanReport> {
    plan_wan_model(gpu, WanPlanModel::T2v1_3B, width, height, frames)
}

/// [`plan_wan`] for `model`. For TI2V-5B the decoding phase also holds the
/// encode of the still (one frame through the encoder), which runs before
/// denoising and is counted with the denoising peak.
pub fn plan_wan_model(
    gpu: &Gpu,
    model: WanPlanModel,
    width: usize,
    height: usize,
    frames: usize,
) -> Result<WanPlanReport> {
    use crate::models::umt5::{BlockResidency, UMT5Config, UMT5EncoderModel};
    use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
    use crate::models::wan_vae::{AutoencoderKLWan, WanVaeConfig};
    use crate::weights::{WeightSet, Weights};
    use std::path::Path;
    use std::sync::Arc;

    if !gpu.is_plan() {
        return Err(EngineError::Argument {
            op: "plan_wan",
            message: "needs a plan-mode GPU (motif bench --plan)".into(),
        });
    }
    let ti2v = model == WanPlanModel::Ti2v5B;
    let multiple = if ti2v { 32 } else { 16 };
    if !width.is_multiple_of(multiple)
        || !height.is_multiple_of(multiple)
        || frames == 0
        || !(frames - 1).is_multiple_of(4)
    {
        return Err(EngineError::Argument {
            op: "plan_wan",
            message: format!(
                "{width}x{height}x{frames}: this Wan model takes sizes that are multiples of \
                 {multiple} and 1 + 4k frames"
            ),
        });
    }
    let config_err = |e: serde_json::Error| EngineError::Argument {
        op: "plan_wan",
        message: e.to_string(),
    };
    let te_config: UMT5Config = serde_json::from_str(UMT5_XXL_PLAN).map_err(config_err)?;
    let tr_config: WanTransformerConfig = serde_json::from_str(match ti2v {
        true => WAN22_TI2V_5B_TRANSFORMER,
        false => WAN21_1_3B_TRANSFORMER,
    })
    .map_err(config_err)?;
    let vae_config = match ti2v {
        true => WanVaeConfig::from_value(Path::new("(Wan 2.2 VAE)"), wan22_vae_plan_config())?,
        false => WanVaeConfig::from_value(Path::new("(Wan 2.1 VAE)"), serde_json::json!({}))?,
    };
    let w = Weights::new(Arc::new(WeightSet::synthetic()), gpu.precision());
    gpu.reset_peak_memory();
    let text_encoder = UMT5EncoderModel::new(gpu, &w, te_config, BlockResidency::Streamed)?;
    let transformer =
        WanTransformer3DModel::new(gpu, &w, tr_config.clone(), BlockResidency::Resident)?;
    let vae = AutoencoderKLWan::new(gpu, &w, vae_config)?;
    let weight_bytes = gpu.pool_stats().live_bytes;
    let dtype = gpu.precision();

    // Text encoding: prompt and negative prompt, 512 tokens each.
    let len = 512;
    let ids = vec![vec![1u32; len]; 2];
    let states = text_encoder.forward(gpu, &ids, &ids)?;
    let text_encoding_peak = gpu.pool_stats().peak_allocated_bytes;
    drop(states);
    // As the pipeline does between phases: the pool's free buffers go back.
    gpu.trim_pool();

    // Denoising: one step, the transformer on the prompt then the negative
    // (TI2V: after encoding the still, a timestep per token).
    gpu.reset_peak_memory();
    let sf = vae.config.spatial_scale_factor();
    let (f, h, w) = ((frames - 1) / 4 + 1, height / sf, width / sf);
    let z = vae.config.z_dim;
    let mut timesteps = vec![999.0];
    if ti2v {
        let still = Tensor::zeros(gpu, &[1, 3, 1, height, width], dtype)?;
        drop(vae.encode(gpu, &still)?);
        gpu.trim_pool();
        let per_frame = (h / 2) * (w / 2);
        timesteps = vec![999.0; f * per_frame];
        timesteps[..per_frame].fill(0.0);
    }
    let latents = Tensor::zeros(gpu, &[1, z, f, h, w], dtype)?;
    let context = Tensor::zeros(gpu, &[1, len, tr_config.text_dim], dtype)?;
    for _ in 0..2 {
        drop(transformer.forward(gpu, &latents, &timesteps, &context, None)?);
    }
    let denoising_peak = gpu.pool_stats().peak_allocated_bytes;
    drop(context);
    gpu.trim_pool();

    // Decoding: a latent frame at a time through the feature cache.
    gpu.reset_peak_memory();
    vae.decode_chunks(gpu, &latents, |_, _, chunk| {
        drop(chunk);
        Ok(())
    })?;
    let decoding_peak = gpu.pool_stats().peak_allocated_bytes;
    Ok(WanPlanReport {
        size: (width, height, frames),
        weight_bytes,
        text_encoding_peak,
        denoising_peak,
        decoding_peak,
    })
}

/// diffusers' `Wan-AI/Wan2.1-I2V-14B-480P-Diffusers` transformer config
/// (the 720P repository's is the same).
const WAN21_I2V_14B_TRANSFORMER: &str = r#"{"patch_size": [1, 2, 2], "num_attention_heads": 40,
 "attention_head_dim": 128, "in_channels": 36, "out_channels": 16, "text_dim": 4096,
 "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40, "cross_attn_norm": true,
 "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "rope_max_seq_len": 1024,
 "image_dim": 1280, "added_kv_proj_dim": 5120}"#;

/// Its image encoder, CLIP ViT-H/14 (`image_encoder/config.json`; ComfyUI's
/// clip_vision_h).
const CLIP_VIT_H: &str = r#"{"hidden_size": 1280, "intermediate_size": 5120,
 "num_hidden_layers": 32, "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
 "hidden_act": "gelu", "layer_norm_eps": 1e-5}"#;

/// Peak device memory of one Wan2.1-I2V-14B generation by phase.
#[derive(Debug, Clone)]
pub struct WanI2vPlanReport {
    /// The phases a text-to-video generation has too (weights: the
    /// transformer, the VAE and the image encoder).
    pub wan: WanPlanReport,
    /// The still through CLIP ViT-H and the conditioning video (the still,
    /// then zeros) through the VAE encoder.
    pub conditioning_peak: u64,
}

impl WanI2vPlanReport {
    pub fn peak(&self) -> u64 {
        self.wan.peak().max(self.conditioning_peak)
    }
}

/// Walks one Wan2.1-I2V-14B generation at `width` x `height` x `frames` on
/// a plan-mode GPU, as `Wan::load` loads it (UMT5-XXL streamed; the 14B
/// transformer, the VAE and CLIP ViT-H resident) and as the pipeline runs
/// it: the prompts, the conditioning (the still through the image encoder,
/// the conditioning video through the VAE encoder), one denoising step
/// (two passes of the 36-channel input with the 257 image tokens) and the
/// decode.
pub fn plan_wan_i2v(
    gpu: &Gpu,
    width: usize,
    height: usize,
    frames: usize,
) -> Result<WanI2vPlanReport> {
    use crate::models::clip_vision::{ClipVisionConfig, ClipVisionModel};
    use crate::models::umt5::{BlockResidency, UMT5Config, UMT5EncoderModel};
    use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
    use crate::models::wan_vae::{AutoencoderKLWan, WanVaeConfig};
    use crate::weights::{WeightSet, Weights};
    use std::path::Path;
    use std::sync::Arc;

    let argument = |message: String| EngineError::Argument {
        op: "plan_wan_i2v",
        message,
    };
    if !gpu.is_plan() {
        return Err(argument(
            "needs a plan-mode GPU (motif bench --plan)".into(),
        ));
    }
    if !width.is_multiple_of(16)
        || !height.is_multiple_of(16)
        || frames == 0
        || !(frames - 1).is_multiple_of(4)
    {
        return Err(argument(format!(
            "{width}x{height}x{frames}: Wan takes sizes that are multiples of 16 and 1 + 4k frames"
        )));
    }
    let config_err = |e: serde_json::Error| argument(e.to_string());
    let te_config: UMT5Config = serde_json::from_str(UMT5_XXL_PLAN).map_err(config_err)?;
    let tr_config: WanTransformerConfig =
        serde_json::from_str(WAN21_I2V_14B_TRANSFORMER).map_err(config_err)?;
    let clip_path = Path::new("(CLIP ViT-H/14)");
    let clip_config = ClipVisionConfig::from_value(
        clip_path,
        serde_json::from_str(CLIP_VIT_H).map_err(config_err)?,
    )?;
    let vae_config = WanVaeConfig::from_value(Path::new("(Wan 2.1 VAE)"), serde_json::json!({}))?;
    let w = Weights::new(Arc::new(WeightSet::synthetic()), gpu.precision());
    gpu.reset_peak_memory();
    let text_encoder = UMT5EncoderModel::new(gpu, &w, te_config, BlockResidency::Streamed)?;
    let transformer =
        WanTransformer3DModel::new(gpu, &w, tr_config.clone(), BlockResidency::Resident)?;
    let vae = AutoencoderKLWan::new(gpu, &w, vae_config)?;
    let size = clip_config.image_size;
    let image_encoder = ClipVisionModel::new(gpu, &w, clip_config)?;
    let weight_bytes = gpu.pool_stats().live_bytes;
    let dtype = gpu.precision();

    let len = 512;
    let ids = vec![vec![1u32; len]; 2];
    drop(text_encoder.forward(gpu, &ids, &ids)?);
    let text_encoding_peak = gpu.pool_stats().peak_allocated_bytes;
    gpu.trim_pool();

    // Conditioning: the still, then the video [1, 3, F, H, W] encoded.
    gpu.reset_peak_memory();
    let pixels = Tensor::zeros(gpu, &[1, 3, size, size], dtype)?;
    let image_embeds = image_encoder.penultimate_hidden_state(gpu, &pixels)?;
    drop(pixels);
    let video = Tensor::zeros(gpu, &[1, 3, frames, height, width], dtype)?;
    drop(vae.encode(gpu, &video)?);
    drop(video);
    let conditioning_peak = gpu.pool_stats().peak_allocated_bytes;
    gpu.trim_pool();

    // Denoising: one step, two passes over noise + mask + condition.
    gpu.reset_peak_memory();
    let (f, h, wd) = ((frames - 1) / 4 + 1, height / 8, width / 8);
    let input = Tensor::zeros(gpu, &[1, tr_config.in_channels, f, h, wd], dtype)?;
    let context = Tensor::zeros(gpu, &[1, len, tr_config.text_dim], dtype)?;
    for _ in 0..2 {
        drop(transformer.forward(gpu, &input, &[999.0], &context, Some(&image_embeds))?);
    }
    let denoising_peak = gpu.pool_stats().peak_allocated_bytes;
    drop((input, context, image_embeds));
    gpu.trim_pool();

    gpu.reset_peak_memory();
    let latents = Tensor::zeros(gpu, &[1, 16, f, h, wd], dtype)?;
    vae.decode_chunks(gpu, &latents, |_, _, chunk| {
        drop(chunk);
        Ok(())
    })?;
    let decoding_peak = gpu.pool_stats().peak_allocated_bytes;
    Ok(WanI2vPlanReport {
        wan: WanPlanReport {
            size: (width, height, frames),
            weight_bytes,
            text_encoding_peak,
            denoising_peak,
            decoding_peak,
        },
        conditioning_peak,
    })
}

/// Times one Wan2.1-1.3B denoising step (two transformer passes: prompt and
/// negative prompt, as guidance runs them) at `width` x `height` x `frames`
/// with random weights (`motif bench --wan`); the PyTorch side is
/// tools/bench/torch_side.py --wan-step. Returns seconds per step (wall
/// clock around a synchronize: the step is thousands of dispatches) and
/// the slowest kernels from the GPU timer where the adapter has one.
/// `layers`: only the first blocks of the 30 (a dry run on a CPU adapter).
pub fn bench_wan_step(
    gpu: &Gpu,
    width: usize,
    height: usize,
    frames: usize,
    iters: usize,
    layers: Option<usize>,
) -> Result<(f64, Vec<crate::gpu::GpuKernelTime>)> {
    use crate::models::umt5::BlockResidency;
    use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
    use crate::weights::{WeightSet, Weights};
    use std::sync::Arc;

    if !width.is_multiple_of(16)
        || !height.is_multiple_of(16)
        || frames == 0
        || !(frames - 1).is_multiple_of(4)
    {
        return Err(EngineError::Argument {
            op: "bench_wan_step",
            message: format!(
                "{width}x{height}x{frames}: Wan takes sizes that are multiples of 16 and 1 + 4k frames"
            ),
        });
    }
    let mut config: WanTransformerConfig =
        serde_json::from_str(WAN21_1_3B_TRANSFORMER).map_err(|e| EngineError::Argument {
            op: "bench_wan_step",
            message: e.to_string(),
        })?;
    if let Some(layers) = layers {
        if layers == 0 || layers > config.num_layers {
            return Err(EngineError::Argument {
                op: "bench_wan_step",
                message: format!("layers: expected 1..={}, found {layers}", config.num_layers),
            });
        }
        config.num_layers = layers;
    }
    let w = Weights::new(Arc::new(WeightSet::synthetic()), gpu.precision());
    let transformer =
        WanTransformer3DModel::new(gpu, &w, config.clone(), BlockResidency::Resident)?;
    let dtype = gpu.precision();
    let (f, h, wd) = ((frames - 1) / 4 + 1, height / 8, width / 8);
    let latents = Tensor::zeros(gpu, &[1, 16, f, h, wd], dtype)?;
    let context = Tensor::zeros(gpu, &[1, 512, config.text_dim], dtype)?;
    let step = || -> Result<()> {
        for _ in 0..2 {
            drop(transformer.forward(gpu, &latents, &[999.0], &context, None)?);
        }
        Ok(())
    };
    step()?;
    gpu.synchronize()?;
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        step()?;
    }
    gpu.synchronize()?;
    let seconds = start.elapsed().as_secs_f64() / iters.max(1) as f64;
    let mut kernels = Vec::new();
    if gpu.start_timer() {
        step()?;
        kernels = gpu.stop_timer_by_kernel()?.unwrap_or_default();
    }
    Ok((seconds, kernels))
}
