//! `motif bench --coop`: the check on a tensor-core GPU. Every
//! cooperative-matrix kernel (matmul, convolution, attention) against the
//! CPU reference and the portable kernels on odd sizes, batches, fused
//! epilogues and the models' shapes, each timed. It drives the engine only
//! through its public API (`*_with_kernel`, the references, the GPU timer),
//! so it sits here above the engine library.

use std::time::Instant;

use motif_engine::error::{EngineError, Result};
use motif_engine::gpu::Gpu;
use motif_engine::ops::attention::{
    attention, attention_reference, AttentionKernel, AttentionOptions,
};
use motif_engine::ops::conv2d::{
    conv2d_output_shape, conv2d_reference, conv2d_residual_with_kernel, Conv2dKernel,
    Conv2dOptions, Conv2dResidual,
};
use motif_engine::ops::matmul::{
    coop_supported, matmul_reference, matmul_with_kernel, MatmulKernel, MatmulOptions,
};
use motif_engine::ops::Activation;
use motif_engine::tensor::{DType, Tensor};

/// One case of [`coop_check`].
#[derive(Debug, Clone)]
pub struct CoopCase {
    pub name: String,
    /// `[batch..] MxKxN`, and the options.
    pub shape: String,
    /// Largest |coop − reference| (over sampled rows for the largest case).
    pub max_error: f32,
    /// The allowed error (the engine's tolerance rule for f16).
    pub tolerance: f32,
    /// Largest |coop − portable kernel|.
    pub vs_portable: f32,
    pub passed: bool,
    /// Time of one product on the coop kernel (GPU timestamps where the
    /// adapter has them, else wall time around a synchronize).
    pub ms: f64,
    pub tflops: f64,
    pub gpu_timed: bool,
    /// What went wrong, when the case could not run at all.
    pub error: Option<String>,
}

impl CoopCase {
    /// A case that could not run at all, reported with its error.
    fn failed(name: impl Into<String>, shape: String, e: &EngineError) -> CoopCase {
        CoopCase {
            name: name.into(),
            shape,
            max_error: f32::NAN,
            tolerance: f32::NAN,
            vs_portable: f32::NAN,
            passed: false,
            ms: f64::NAN,
            tflops: f64::NAN,
            gpu_timed: false,
            error: Some(e.to_string()),
        }
    }
}

/// The largest allowed |gpu − reference| for an output summing
/// `reduction_len` products: engine/tests/common's tolerance rule for f16
/// (f32 accumulation error about √K ulps, plus the rounding of the f16 output).
fn tolerance_f16(reduction_len: usize, ref_max_abs: f32) -> f32 {
    let scale = ref_max_abs.max(1e-3);
    let accumulation = f32::EPSILON * 4.0 * (4.0 + (reduction_len as f32).sqrt());
    (accumulation + 4.0 * 2f32.powi(-11)) * scale
}

/// Uniform values in [-1, 1) from a fixed seed (xorshift: no dependence on
/// a crate's generator for a check that compares against itself).
fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let e = (x - y).abs();
        if e.is_nan() {
            f32::INFINITY
        } else {
            m.max(e)
        }
    })
}

struct CheckCase {
    name: &'static str,
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
    transpose_b: bool,
    bias: bool,
    activation: Activation,
    alpha: f32,
    /// Rows of `a` (of its first item) the CPU reference computes; 0: all.
    reference_rows: usize,
}

fn check_cases() -> Vec<CheckCase> {
    let case = |name, a_shape: &[usize], b_shape: &[usize], transpose_b| CheckCase {
        name,
        a_shape: a_shape.to_vec(),
        b_shape: b_shape.to_vec(),
        transpose_b,
        bias: false,
        activation: Activation::None,
        alpha: 1.0,
        reference_rows: 0,
    };
    vec![
        case("odd sizes", &[7, 129], &[129, 33], false),
        case("one row, one column", &[1, 5], &[5, 1], false),
        case("batched b", &[3, 33, 70], &[3, 70, 45], false),
        CheckCase {
            bias: true,
            activation: Activation::GeluErf,
            ..case("linear K=77 bias gelu", &[129, 77], &[100, 77], true)
        },
        CheckCase {
            alpha: 0.125,
            activation: Activation::Silu,
            ..case(
                "attention-like alpha silu",
                &[2, 64, 40],
                &[2, 77, 40],
                true,
            )
        },
        CheckCase {
            bias: true,
            activation: Activation::QuickGelu,
            ..case(
                "shared weight bias quick_gelu",
                &[4, 65, 320],
                &[320, 130],
                false,
            )
        },
        // Whole tiles along M and N with a K tail: the unchecked staging
        // hands over to the checked one for the last step of K.
        case("whole tiles, K tail", &[256, 1000], &[1000, 384], false),
        case(
            "whole tiles, K tail, b transposed",
            &[2, 128, 999],
            &[2, 256, 999],
            true,
        ),
        CheckCase {
            bias: true,
            ..case("sd15 linear 4096x320x320", &[4096, 320], &[320, 320], true)
        },
        CheckCase {
            bias: true,
            activation: Activation::GeluTanh,
            ..case("sd15 ff 1024x320x1280", &[1024, 320], &[1280, 320], true)
        },
        CheckCase {
            reference_rows: 48,
            ..case("square 4096^3", &[4096, 4096], &[4096, 4096], false)
        },
    ]
}

/// Times `run` (one product) on the GPU: one warm-up, then `iters` runs.
fn time_product(gpu: &Gpu, iters: usize, run: &dyn Fn() -> Result<Tensor>) -> Result<(f64, bool)> {
    drop(run()?);
    gpu.synchronize()?;
    let timer = gpu.start_timer();
    let start = Instant::now();
    for _ in 0..iters {
        drop(run()?);
    }
    gpu.synchronize()?;
    let wall = start.elapsed().as_secs_f64() / iters as f64;
    if timer {
        if let Some((seconds, timed)) = gpu.stop_timer()? {
            if timed > 0 {
                return Ok((seconds / timed as f64, true));
            }
        }
    }
    Ok((wall, false))
}

fn run_case(gpu: &Gpu, c: &CheckCase, seed: u64) -> Result<CoopCase> {
    let dtype = DType::F16;
    let a_vals = random(c.a_shape.iter().product(), seed);
    let b_vals = random(c.b_shape.iter().product(), seed + 1);
    let a = Tensor::from_f32(gpu, &a_vals, &c.a_shape, dtype)?;
    let b = Tensor::from_f32(gpu, &b_vals, &c.b_shape, dtype)?;
    // The reference starts from the values as stored.
    let a_vals = a.to_f32(gpu)?;
    let b_vals = b.to_f32(gpu)?;
    let rb = c.b_shape.len();
    let n = if c.transpose_b {
        c.b_shape[rb - 2]
    } else {
        c.b_shape[rb - 1]
    };
    let ra = c.a_shape.len();
    let (m, k) = (c.a_shape[ra - 2], c.a_shape[ra - 1]);
    let batch: usize = c.a_shape[..ra - 2].iter().product();
    let bias = if c.bias {
        Some(Tensor::from_f32(gpu, &random(n, seed + 2), &[n], dtype)?)
    } else {
        None
    };
    let bias_vals = bias.as_ref().map(|t| t.to_f32(gpu)).transpose()?;
    let opts = MatmulOptions {
        transpose_b: c.transpose_b,
        bias: bias.as_ref(),
        activation: c.activation,
        alpha: c.alpha,
        ..MatmulOptions::default()
    };
    let coop = || matmul_with_kernel(gpu, &a, &b, &opts, MatmulKernel::Coop);
    let got = coop()?.to_f32(gpu)?;
    let portable = matmul_with_kernel(gpu, &a, &b, &opts, MatmulKernel::Tiled)?.to_f32(gpu)?;

    let (want, got_checked) = if c.reference_rows == 0 {
        let want = matmul_reference(
            &a_vals,
            &c.a_shape,
            &b_vals,
            &c.b_shape,
            bias_vals.as_deref(),
            None,
            &opts,
        );
        (want, &got[..])
    } else {
        let rows = c.reference_rows.min(m);
        let want = matmul_reference(
            &a_vals[..rows * k],
            &[rows, k],
            &b_vals,
            &c.b_shape[rb - 2..],
            bias_vals.as_deref(),
            None,
            &opts,
        );
        (want, &got[..rows * n])
    };
    let ref_max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tolerance = tolerance_f16(k, ref_max);
    let max_error = max_abs_diff(got_checked, &want);
    let vs_portable = max_abs_diff(&got, &portable);
    let (seconds, gpu_timed) = time_product(gpu, 3, &coop)?;
    let flops = 2.0 * (batch * m * n * k) as f64;
    let mut shape = format!(
        "{}{m}x{k}x{n}",
        if batch > 1 {
            format!("{batch}x ")
        } else {
            String::new()
        }
    );
    if c.transpose_b {
        shape.push_str(" bT");
    }
    if c.bias {
        shape.push_str(" +bias");
    }
    if c.activation != Activation::None {
        shape.push_str(&format!(" {:?}", c.activation));
    }
    if c.alpha != 1.0 {
        shape.push_str(&format!(" alpha={}", c.alpha));
    }
    Ok(CoopCase {
        name: c.name.to_string(),
        shape,
        max_error,
        tolerance,
        vs_portable,
        passed: max_error <= tolerance && vs_portable <= 2.0 * tolerance,
        ms: seconds * 1e3,
        tflops: flops / seconds / 1e12,
        gpu_timed,
        error: None,
    })
}

struct ConvCase {
    name: &'static str,
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    opts: Conv2dOptions,
    bias: bool,
    /// The residual's scale, when one is fused.
    residual: Option<f32>,
    /// Compare with the CPU reference (else only with the portable kernel).
    reference: bool,
}

fn conv_cases() -> Vec<ConvCase> {
    let case = |name, x_shape, w_shape, opts| ConvCase {
        name,
        x_shape,
        w_shape,
        opts,
        bias: true,
        residual: None,
        reference: true,
    };
    let same = Conv2dOptions::same(3, 1);
    vec![
        ConvCase {
            bias: false,
            ..case("conv 3x3 odd sizes", [2, 5, 9, 11], [7, 5, 3, 3], same)
        },
        case(
            "conv 3x3 stride 2, padding right and bottom, silu",
            [1, 20, 12, 13],
            [130, 20, 3, 3],
            Conv2dOptions {
                stride: 2,
                padding: [0, 1, 0, 1],
                activation: Activation::Silu,
            },
        ),
        ConvCase {
            residual: Some(0.5),
            ..case(
                "conv 1x1 + residual",
                [3, 40, 6, 7],
                [9, 40, 1, 1],
                Conv2dOptions::default(),
            )
        },
        ConvCase {
            residual: Some(1.0),
            ..case(
                "sd15 resnet conv 320, 32x32",
                [1, 320, 32, 32],
                [320, 320, 3, 3],
                same,
            )
        },
        ConvCase {
            reference: false,
            ..case(
                "sd15 conv 320, 2x 64x64",
                [2, 320, 64, 64],
                [320, 320, 3, 3],
                same,
            )
        },
        ConvCase {
            reference: false,
            ..case(
                "vae conv 128, 256x256",
                [1, 128, 256, 256],
                [128, 128, 3, 3],
                same,
            )
        },
    ]
}

fn run_conv_case(gpu: &Gpu, c: &ConvCase, seed: u64) -> Result<CoopCase> {
    let dtype = DType::F16;
    let x = Tensor::from_f32(
        gpu,
        &random(c.x_shape.iter().product(), seed),
        &c.x_shape,
        dtype,
    )?;
    let w = Tensor::from_f32(
        gpu,
        &random(c.w_shape.iter().product(), seed + 1),
        &c.w_shape,
        dtype,
    )?;
    let cout = c.w_shape[0];
    let bias = if c.bias {
        Some(Tensor::from_f32(
            gpu,
            &random(cout, seed + 2),
            &[cout],
            dtype,
        )?)
    } else {
        None
    };
    let out_shape = conv2d_output_shape(c.x_shape, c.w_shape, &c.opts).ok_or_else(|| {
        EngineError::Argument {
            op: "coop_check",
            message: format!("case {} has no output", c.name),
        }
    })?;
    let residual = match c.residual {
        Some(_) => Some(Tensor::from_f32(
            gpu,
            &random(out_shape.iter().product(), seed + 3),
            &out_shape,
            dtype,
        )?),
        None => None,
    };
    let fused = residual
        .as_ref()
        .zip(c.residual)
        .map(|(r, scale)| Conv2dResidual { residual: r, scale });
    let run = |kernel| {
        conv2d_residual_with_kernel(gpu, &x, &w, bias.as_ref(), &c.opts, fused.as_ref(), kernel)
    };
    let got = run(Conv2dKernel::Coop)?.to_f32(gpu)?;
    let portable = run(Conv2dKernel::Tiled)?.to_f32(gpu)?;
    let reduction = c.w_shape[1] * c.w_shape[2] * c.w_shape[3];
    let (max_error, tolerance) = if c.reference {
        let mut want = conv2d_reference(
            &x.to_f32(gpu)?,
            c.x_shape,
            &w.to_f32(gpu)?,
            c.w_shape,
            bias.as_ref().map(|b| b.to_f32(gpu)).transpose()?.as_deref(),
            &c.opts,
        );
        if let (Some(r), Some(scale)) = (&residual, c.residual) {
            for (v, r) in want.iter_mut().zip(r.to_f32(gpu)?) {
                *v = (*v + r) * scale;
            }
        }
        let ref_max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        (max_abs_diff(&got, &want), tolerance_f16(reduction, ref_max))
    } else {
        let ref_max = portable.iter().fold(0f32, |m, v| m.max(v.abs()));
        (0.0, tolerance_f16(reduction, ref_max))
    };
    let vs_portable = max_abs_diff(&got, &portable);
    let (seconds, gpu_timed) = time_product(gpu, 3, &|| run(Conv2dKernel::Coop))?;
    let (portable_s, _) = time_product(gpu, 1, &|| run(Conv2dKernel::Tiled))?;
    let flops = 2.0 * (out_shape.iter().product::<usize>() * reduction) as f64;
    Ok(CoopCase {
        name: format!(
            "{} (portable {:.3} ms, {:.1}x)",
            c.name,
            portable_s * 1e3,
            portable_s / seconds
        ),
        shape: format!(
            "x {:?} w {:?} stride {} pad {:?}{}{}",
            c.x_shape,
            c.w_shape,
            c.opts.stride,
            c.opts.padding,
            if c.bias { " +bias" } else { "" },
            c.residual
                .map_or(String::new(), |s| format!(" +residual*{s}")),
        ),
        max_error,
        tolerance,
        vs_portable,
        passed: max_error <= tolerance && vs_portable <= 2.0 * tolerance,
        ms: seconds * 1e3,
        tflops: flops / seconds / 1e12,
        gpu_timed,
        error: None,
    })
}

struct AttentionCase {
    name: &'static str,
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
    /// Compare with the CPU reference (else only with the portable kernel).
    reference: bool,
}

fn attention_cases() -> Vec<AttentionCase> {
    let case = |name, batch, lq, lk, heads, head_dim| AttentionCase {
        name,
        batch,
        lq,
        lk,
        heads,
        head_dim,
        causal: false,
        reference: true,
    };
    vec![
        case("attention odd sizes", 2, 70, 45, 2, 40),
        case("attention head dim 8", 2, 16, 16, 1, 8),
        AttentionCase {
            causal: true,
            ..case("attention causal, CLIP-like", 1, 77, 77, 4, 64)
        },
        case("attention head dim 80, cross 77 keys", 2, 129, 77, 2, 80),
        case("motion-module attention, 16 frames", 64, 16, 16, 8, 40),
        AttentionCase {
            reference: false,
            ..case("sd15 attention 4096 tokens, 8 x 40", 2, 4096, 4096, 8, 40)
        },
        AttentionCase {
            reference: false,
            ..case("sd15 attention 1024 tokens, 8 x 80", 2, 1024, 1024, 8, 80)
        },
        case("attention head dim 160, 333 keys", 1, 256, 333, 2, 160),
        AttentionCase {
            causal: true,
            ..case(
                "attention causal, head dim 128, 2000 tokens",
                1,
                2000,
                2000,
                2,
                128,
            )
        },
        AttentionCase {
            reference: false,
            ..case(
                "wan attention 32760 tokens, 12 x 128",
                1,
                32760,
                32760,
                12,
                128,
            )
        },
    ]
}

fn run_attention_case(gpu: &Gpu, c: &AttentionCase, seed: u64) -> Result<CoopCase> {
    let dtype = DType::F16;
    let channels = c.heads * c.head_dim;
    let q_shape = [c.batch, c.lq, channels];
    let k_shape = [c.batch, c.lk, channels];
    // Scores of a few units, as trained projections give.
    let scaled = |n: usize, s: u64| random(n, s).iter().map(|x| 2.0 * x).collect::<Vec<_>>();
    let q = Tensor::from_f32(
        gpu,
        &scaled(c.batch * c.lq * channels, seed),
        &q_shape,
        dtype,
    )?;
    let k = Tensor::from_f32(
        gpu,
        &scaled(c.batch * c.lk * channels, seed + 1),
        &k_shape,
        dtype,
    )?;
    let v = Tensor::from_f32(
        gpu,
        &random(c.batch * c.lk * channels, seed + 2),
        &k_shape,
        dtype,
    )?;
    let opts = |kernel| AttentionOptions {
        causal: c.causal,
        kernel: Some(kernel),
        ..Default::default()
    };
    let run = |kernel| attention(gpu, &q, &k, &v, c.heads, &opts(kernel));
    let got = run(AttentionKernel::Coop)?.to_f32(gpu)?;
    let portable = run(AttentionKernel::Tiled)?.to_f32(gpu)?;
    // Outputs are averages of v (|v| < 1): the f16 tolerance of a sum of
    // head_dim products bounds the scores' error, and P is rounded to f16.
    let tolerance = tolerance_f16(c.head_dim, 1.0) + 4.0 * 2f32.powi(-11);
    let max_error = if c.reference {
        let want = attention_reference(
            &q.to_f32(gpu)?,
            &k.to_f32(gpu)?,
            &v.to_f32(gpu)?,
            c.batch,
            c.lq,
            c.lk,
            c.heads,
            &opts(AttentionKernel::Tiled),
        );
        max_abs_diff(&got, &want)
    } else {
        0.0
    };
    let vs_portable = max_abs_diff(&got, &portable);
    let (seconds, gpu_timed) = time_product(gpu, 3, &|| run(AttentionKernel::Coop))?;
    let (portable_s, _) = time_product(gpu, 1, &|| run(AttentionKernel::Tiled))?;
    // QKᵀ and PV, as attention FLOPs are counted.
    let flops = 4.0 * (c.batch * c.heads * c.lq * c.lk * c.head_dim) as f64;
    Ok(CoopCase {
        name: format!(
            "{} (portable {:.3} ms, {:.1}x)",
            c.name,
            portable_s * 1e3,
            portable_s / seconds
        ),
        shape: format!(
            "{}x {}q {}k {}h x {}{}",
            c.batch,
            c.lq,
            c.lk,
            c.heads,
            c.head_dim,
            if c.causal { " causal" } else { "" }
        ),
        max_error,
        tolerance,
        vs_portable,
        passed: max_error <= tolerance && vs_portable <= 2.0 * tolerance,
        ms: seconds * 1e3,
        tflops: flops / seconds / 1e12,
        gpu_timed,
        error: None,
    })
}

/// Runs the tensor-core kernel on the check's shapes (odd sizes, batches,
/// bias and activations, K = 77, SD1.5's 4096x320x320, 4096³) against the
/// CPU reference and the portable kernel, and times each; then timing-only
/// entries: the portable kernel on 4096³, and both kernels on the shapes of
/// `shapes` (`MxKxN` or `MxKxNt`; `--coop-shapes`, or `MOTIF_COOP_SHAPES`). Fails with
/// [`EngineError::Argument`] when the adapter has no usable cooperative
/// matrices. A case that fails to run is reported with its error, not
/// returned as one, so that one broken case does not hide the others.
pub fn coop_check(gpu: &Gpu, shapes: &[String]) -> Result<Vec<CoopCase>> {
    if !coop_supported(gpu, DType::F16) {
        return Err(EngineError::Argument {
            op: "coop_check",
            message: format!(
                "adapter {} has no cooperative matrices of f16 x f16 -> f32 16x16x16 with \
                 32-invocation subgroups (or MOTIF_NO_COOP is set)",
                gpu.adapter().name
            ),
        });
    }
    let mut cases = Vec::new();
    for (i, c) in check_cases().iter().enumerate() {
        let case = run_case(gpu, c, 17 * i as u64 + 3).unwrap_or_else(|e| {
            CoopCase::failed(c.name, format!("{:?} x {:?}", c.a_shape, c.b_shape), &e)
        });
        cases.push(case);
    }
    // The convolutions (implicit products), against the CPU reference where
    // it is affordable and always against the portable kernel.
    for (i, c) in conv_cases().iter().enumerate() {
        let case = run_conv_case(gpu, c, 31 * i as u64 + 5).unwrap_or_else(|e| {
            CoopCase::failed(c.name, format!("x {:?} w {:?}", c.x_shape, c.w_shape), &e)
        });
        cases.push(case);
    }
    // The attention kernel, against the CPU reference where it is
    // affordable and always against the portable kernel.
    for (i, c) in attention_cases().iter().enumerate() {
        let case = run_attention_case(gpu, c, 43 * i as u64 + 7).unwrap_or_else(|e| {
            let shape = format!(
                "{}x {}q {}k {}h x {}",
                c.batch, c.lq, c.lk, c.heads, c.head_dim
            );
            CoopCase::failed(c.name, shape, &e)
        });
        cases.push(case);
    }
    // The portable kernel on the square case, for the speed-up; then any
    // shapes to time from `shapes` (`MxKxN` or `MxKxNt` for a transposed
    // b) on both kernels.
    let mut timings = vec![(
        "portable kernel",
        [4096, 4096, 4096],
        false,
        MatmulKernel::Tiled,
    )];
    for item in shapes.iter().filter(|s| !s.is_empty()) {
        let transpose_b = item.ends_with('t');
        let dims: Vec<usize> = item
            .trim_end_matches('t')
            .split('x')
            .filter_map(|d| d.parse().ok())
            .collect();
        let [m, k, n] = dims[..] else {
            return Err(EngineError::Argument {
                op: "--coop-shapes",
                message: format!("expected MxKxN or MxKxNt, found `{item}`"),
            });
        };
        timings.push(("coop kernel", [m, k, n], transpose_b, MatmulKernel::Coop));
        timings.push((
            "portable kernel",
            [m, k, n],
            transpose_b,
            MatmulKernel::Tiled,
        ));
    }
    for (i, (name, [m, k, n], transpose_b, kernel)) in timings.into_iter().enumerate() {
        let shape = format!("{m}x{k}x{n}{}", if transpose_b { " bT" } else { "" });
        let timed = (|| -> Result<CoopCase> {
            let b_shape = if transpose_b { [n, k] } else { [k, n] };
            let a = Tensor::from_f32(gpu, &random(m * k, 101 + i as u64), &[m, k], DType::F16)?;
            let b = Tensor::from_f32(gpu, &random(k * n, 202 + i as u64), &b_shape, DType::F16)?;
            let opts = MatmulOptions {
                transpose_b,
                ..Default::default()
            };
            let run = || matmul_with_kernel(gpu, &a, &b, &opts, kernel);
            let (seconds, gpu_timed) = time_product(gpu, 3, &run)?;
            Ok(CoopCase {
                name: format!("{name} (timing only)"),
                shape: shape.clone(),
                max_error: 0.0,
                tolerance: 0.0,
                vs_portable: 0.0,
                passed: true,
                ms: seconds * 1e3,
                tflops: 2.0 * (m * n * k) as f64 / seconds / 1e12,
                gpu_timed,
                error: None,
            })
        })();
        cases.push(
            timed.unwrap_or_else(|e| CoopCase::failed(format!("{name} (timing only)"), shape, &e)),
        );
    }
    Ok(cases)
}
