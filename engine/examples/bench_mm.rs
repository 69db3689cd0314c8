//! Times matmul and conv2d on the default adapter and prints GFLOP/s.
//!
//! cargo run --release -p motif-engine --example bench_mm -- \
//!     [mm|conv|all] [f32|f16] [repeats] [auto|tiled|packed]
//!
//! matmul: 1024^3 with a plain and a transposed b (`MKN=m,k,n` for another
//! size, transposed b); conv2d: 3x3, stride 1, padding 1, 320 -> 320
//! channels on 64x64, with bias. Each measurement uploads random inputs,
//! warms up (pipeline compilation), then records `RUNS` operators into one
//! submission and waits for it; the best of `repeats` is reported, since the
//! machine may be shared with other work, with the process's CPU time per
//! run (which such load inflates less).

use std::time::Instant;

use motif_engine::ops::conv2d::{self, Conv2dKernel, Conv2dOptions};
use motif_engine::ops::matmul::{self, MatmulKernel, MatmulOptions};
use motif_engine::{DType, Gpu, GpuOptions, Result, Tensor};

const RUNS: usize = 6;

fn random(n: usize, seed: u32) -> Vec<f32> {
    // A small LCG: the values only need to be non-trivial.
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

/// CPU seconds this process has used (all threads), from /proc (Linux only;
/// 0 elsewhere).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which is in parentheses): utime, stime are 14 and 15.
    let rest = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<f64> = rest
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    if fields.len() < 13 {
        return 0.0;
    }
    (fields[11] + fields[12]) / 100.0
}

/// Best wall seconds per run of `op` over `repeats` timed submissions, and
/// the CPU seconds per run (which other load on the machine inflates less).
fn time(gpu: &Gpu, repeats: usize, op: impl Fn() -> Result<Tensor>) -> Result<(f64, f64)> {
    op()?;
    gpu.synchronize()?;
    let mut best = f64::INFINITY;
    let cpu0 = cpu_seconds();
    for _ in 0..repeats {
        let start = Instant::now();
        for _ in 0..RUNS {
            op()?;
        }
        gpu.synchronize()?;
        best = best.min(start.elapsed().as_secs_f64() / RUNS as f64);
    }
    Ok((best, (cpu_seconds() - cpu0) / (repeats * RUNS) as f64))
}

fn bench_matmul(gpu: &Gpu, dtype: DType, repeats: usize, kernel: MatmulKernel) -> Result<()> {
    let custom: Option<Vec<usize>> = std::env::var("MKN")
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect());
    let sizes = match custom.as_deref() {
        Some(&[m, k, n]) => vec![(m, k, n, true)],
        _ => vec![(1024, 1024, 1024, false), (1024, 1024, 1024, true)],
    };
    for (m, k, n, transpose_b) in sizes {
        let a = Tensor::from_f32(gpu, &random(m * k, 1), &[m, k], dtype)?;
        let b_shape = if transpose_b { [n, k] } else { [k, n] };
        let b = Tensor::from_f32(gpu, &random(k * n, 2), &b_shape, dtype)?;
        let opts = MatmulOptions {
            transpose_b,
            ..Default::default()
        };
        let (s, cpu) = time(gpu, repeats, || {
            matmul::matmul_with_kernel(gpu, &a, &b, &opts, kernel)
        })?;
        let flop = 2.0 * (m * n * k) as f64;
        println!(
            "matmul {m}x{k}x{n} transpose_b={transpose_b} {dtype} {kernel:?}: {:.1} ms, {:.1} GFLOP/s \
             (CPU time {:.1} ms per run)",
            s * 1e3,
            flop / s / 1e9,
            cpu * 1e3
        );
    }
    Ok(())
}

fn bench_conv(gpu: &Gpu, dtype: DType, repeats: usize, kernel: Conv2dKernel) -> Result<()> {
    let (n, c, h, w) = (1, 320, 64, 64);
    let x = Tensor::from_f32(gpu, &random(n * c * h * w, 3), &[n, c, h, w], dtype)?;
    let wt = Tensor::from_f32(gpu, &random(c * c * 9, 4), &[c, c, 3, 3], dtype)?;
    let bias = Tensor::from_f32(gpu, &random(c, 5), &[c], dtype)?;
    let opts = Conv2dOptions::same(3, 1);
    let (s, cpu) = time(gpu, repeats, || {
        conv2d::conv2d_with_kernel(gpu, &x, &wt, Some(&bias), &opts, kernel)
    })?;
    let flop = 2.0 * (n * c * h * w * c * 9) as f64;
    println!(
        "conv2d 3x3 {c}->{c} {h}x{w} {dtype} {kernel:?}: {:.1} ms, {:.1} GFLOP/s \
         (CPU time {:.1} ms per run)",
        s * 1e3,
        flop / s / 1e9,
        cpu * 1e3
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let which = args.first().map_or("all", String::as_str);
    let dtype = match args.get(1).map(String::as_str) {
        Some("f16") => DType::F16,
        _ => DType::F32,
    };
    let repeats = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(3);
    let (mm_kernel, conv_kernel) = match args.get(3).map(String::as_str) {
        Some("tiled") => (MatmulKernel::Tiled, Conv2dKernel::Tiled),
        Some("packed") => (MatmulKernel::Packed, Conv2dKernel::Packed),
        _ => (MatmulKernel::Auto, Conv2dKernel::Auto),
    };
    let gpu = Gpu::new(GpuOptions {
        precision: Some(dtype),
        ..Default::default()
    })?;
    println!("adapter: {}", gpu.adapter());
    if which == "mm" || which == "all" {
        bench_matmul(&gpu, dtype, repeats, mm_kernel)?;
    }
    if which == "conv" || which == "all" {
        bench_conv(&gpu, dtype, repeats, conv_kernel)?;
    }
    Ok(())
}
