//! Operator benchmarks for `motif bench --ops`: the performance record that
//! later kernel work is measured against. Each case runs a warm-up, then
//! `iters` repetitions in one submission; the time per run comes from GPU
//! timestamps where the adapter has them, else from the wall clock.

use std::time::Instant;

use crate::error::Result;
use crate::gpu::{DType, Gpu};
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
