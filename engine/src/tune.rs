//! The kernel tuner behind `motif bench --tune`: for each shape class the
//! models run, every kernel variant that can run here is checked — on a
//! small shape of the class against the CPU reference, on the class's
//! full-size shape against the portable kernel — and timed; the fastest
//! variant that computed right becomes the class's choice in the adapter's
//! tuning file (gpu/tuning.rs), which routing follows (ops/route.rs). A
//! variant that computes wrong results, or fails to run, is never chosen.
//!
//! Each variant runs through the same routing as the models: the tuner
//! installs a tuning that names it, then calls the op with that kernel.

use std::time::Instant;

use crate::error::Result;
use crate::gpu::tuning::{Choice, KernelName, Tuning, Variant};
use crate::gpu::{DType, Gpu};
use crate::ops::attention::{attention, attention_reference, AttentionKernel};
use crate::ops::conv2d::{conv2d_reference, conv2d_with_kernel, Conv2dKernel, Conv2dOptions};
use crate::ops::matmul::{matmul_reference, matmul_with_kernel, MatmulKernel, MatmulOptions};
use crate::ops::matmul_coop::{self, CoopProduct, CoopTiling};
use crate::ops::route;
use crate::tensor::Tensor;

/// One shape class to tune, by its full-size representative shape.
#[derive(Debug, Clone, PartialEq)]
pub enum ClassShape {
    /// `[m, k] x [k, n]` (`[n, k]` with `transpose_b`).
    Matmul {
        m: usize,
        k: usize,
        n: usize,
        transpose_b: bool,
    },
    /// NCHW input `x`, weight `[cout, cin, kh, kw]`, `same` padding.
    Conv2d { x: [usize; 4], w: [usize; 4] },
    /// `[batch, tokens, heads * head_dim]`, as many keys as queries.
    Attention {
        batch: usize,
        tokens: usize,
        heads: usize,
        head_dim: usize,
    },
}

impl ClassShape {
    fn op(&self) -> &'static str {
        match self {
            ClassShape::Matmul { .. } => "matmul",
            ClassShape::Conv2d { .. } => "conv2d",
            ClassShape::Attention { .. } => "attention",
        }
    }

    /// The routing class of this shape (ops/route.rs).
    pub fn class(&self, dtype: DType) -> String {
        match *self {
            ClassShape::Matmul {
                m,
                k,
                n,
                transpose_b,
            } => route::matmul_class(dtype, m, k, n, transpose_b),
            ClassShape::Conv2d { x, w } => {
                route::conv2d_class(dtype, w[0], w[1], [w[2], w[3]], x[2] * x[3])
            }
            ClassShape::Attention {
                tokens, head_dim, ..
            } => route::attention_class(dtype, head_dim, tokens, tokens, false),
        }
    }

    /// A small shape of the same layout (kernel size, head dim, transpose)
    /// that the CPU reference computes in a moment, with odd sizes so that
    /// every edge path runs.
    fn small(&self) -> ClassShape {
        match *self {
            ClassShape::Matmul { transpose_b, .. } => ClassShape::Matmul {
                m: 37,
                k: 77,
                n: 45,
                transpose_b,
            },
            ClassShape::Conv2d { w, .. } => ClassShape::Conv2d {
                x: [1, w[1].min(13), 9, 11],
                w: [w[0].min(19), w[1].min(13), w[2], w[3]],
            },
            ClassShape::Attention { head_dim, .. } => ClassShape::Attention {
                batch: 1,
                tokens: 45,
                heads: 2,
                head_dim,
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            ClassShape::Matmul {
                m,
                k,
                n,
                transpose_b,
            } => format!("{m}x{k}x{n}{}", if *transpose_b { " bT" } else { "" }),
            ClassShape::Conv2d { x, w } => format!("x {x:?} w {w:?}"),
            ClassShape::Attention {
                batch,
                tokens,
                heads,
                head_dim,
            } => format!("{batch}x {tokens} tokens {heads}h x {head_dim}"),
        }
    }

    /// Multiply-adds x 2 of one run.
    fn flops(&self) -> f64 {
        match *self {
            ClassShape::Matmul { m, k, n, .. } => 2.0 * (m * k * n) as f64,
            ClassShape::Conv2d { x, w } => {
                2.0 * (x[0] * x[2] * x[3] * w.iter().product::<usize>()) as f64
            }
            ClassShape::Attention {
                batch,
                tokens,
                heads,
                head_dim,
            } => 4.0 * (batch * heads * tokens * tokens * head_dim) as f64,
        }
    }

    /// Products summed into one output (the tolerance rule's K).
    fn reduction(&self) -> usize {
        match *self {
            ClassShape::Matmul { k, .. } => k,
            ClassShape::Conv2d { w, .. } => w[1] * w[2] * w[3],
            ClassShape::Attention { head_dim, .. } => head_dim,
        }
    }
}

/// The shape classes of the models' hot operators: SD1.5 UNet + AnimateDiff
/// (linear 320..1280 wide at 4096..256 tokens, 3x3 convolutions, attention
/// of head dim 40..160 and the motion modules' frames), the VAE decoder's
/// wide convolutions, and Wan2.1-1.3B's transformer (1536 wide, FFN 8960,
/// 12 heads of 128 over 32,760 tokens at 832x480x81). On CPU adapters the same classes at reduced sizes, so that
/// the machinery runs in seconds.
pub fn model_classes(gpu: &Gpu) -> Vec<ClassShape> {
    let mm = |m, k, n, transpose_b| ClassShape::Matmul {
        m,
        k,
        n,
        transpose_b,
    };
    let at = |tokens, heads, head_dim| ClassShape::Attention {
        batch: 1,
        tokens,
        heads,
        head_dim,
    };
    if gpu.adapter().is_cpu {
        return vec![
            mm(256, 320, 320, true),
            mm(64, 768, 320, true),
            ClassShape::Conv2d {
                x: [1, 32, 16, 16],
                w: [32, 32, 3, 3],
            },
            at(256, 2, 40),
        ];
    }
    // Most important first (`tune`'s budget may stop before the end): the
    // classes the side-by-side against PyTorch reports (matmul 4096³,
    // attention at 4,096 and 32,760 tokens), Wan's linear layers, SD's.
    vec![
        mm(4096, 4096, 4096, false),
        at(4096, 8, 40),
        at(32760, 12, 128),
        mm(32760, 1536, 1536, true),
        mm(32760, 1536, 8960, true),
        mm(8192, 320, 320, true),
        mm(8192, 320, 1280, true),
        mm(2048, 1280, 5120, true),
        ClassShape::Conv2d {
            x: [2, 320, 64, 64],
            w: [320, 320, 3, 3],
        },
        ClassShape::Conv2d {
            x: [1, 128, 256, 256],
            w: [128, 128, 3, 3],
        },
        ClassShape::Conv2d {
            x: [2, 640, 32, 32],
            w: [640, 640, 1, 1],
        },
        at(1024, 8, 80),
    ]
}

/// One variant's trial on one class.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trial {
    pub variant: Variant,
    /// Largest |variant − CPU reference| on the small shape, and the bound.
    pub small_error: f32,
    pub small_tolerance: f32,
    /// Largest |variant − portable kernel| on the full-size shape, and the
    /// bound (twice the rule's: both sides round).
    pub large_error: f32,
    pub large_tolerance: f32,
    pub ms: f64,
    pub tflops: f64,
    /// Both checks passed.
    pub correct: bool,
    /// Why it could not run, if it could not.
    pub error: Option<String>,
}

/// One class's trials and the chosen variant (None: no variant was right).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClassReport {
    pub op: &'static str,
    pub class: String,
    pub shape: String,
    pub trials: Vec<Trial>,
    pub chosen: Option<Variant>,
}

/// How a variant computes the class's op on given inputs.
pub type RunVariant<'a> = Box<dyn Fn(&Gpu, &Inputs) -> Result<Tensor> + 'a>;

/// A variant to try.
pub struct Candidate<'a> {
    pub variant: Variant,
    pub run: RunVariant<'a>,
}

/// The inputs of one trial shape, uploaded, with their stored values.
pub struct Inputs {
    pub shape: ClassShape,
    pub tensors: Vec<Tensor>,
    /// The stored values of `tensors`, for the CPU reference; empty for the
    /// full-size shapes, which are only compared with the portable kernel.
    values: Vec<Vec<f32>>,
}

/// The rule of engine/tests/common: f32 accumulation error about √K ulps,
/// plus the rounding of an f16 output.
pub fn tolerance(dtype: DType, reduction_len: usize, ref_max_abs: f32) -> f32 {
    let scale = ref_max_abs.max(1e-3);
    let accumulation = f32::EPSILON * 4.0 * (4.0 + (reduction_len as f32).sqrt());
    let storage = match dtype {
        DType::F32 => 0.0,
        DType::F16 => 4.0 * 2f32.powi(-11),
    };
    (accumulation + storage) * scale
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::INFINITY;
    }
    a.iter().zip(b).fold(0f32, |m, (x, y)| {
        let e = (x - y).abs();
        if e.is_nan() {
            f32::INFINITY
        } else {
            m.max(e)
        }
    })
}

/// Uniform values in [-1, 1) from a fixed seed (xorshift).
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

impl Inputs {
    /// Uploads random inputs for `shape`; `keep_values`: also reads back
    /// their stored values, for the CPU reference.
    fn upload(
        gpu: &Gpu,
        shape: &ClassShape,
        dtype: DType,
        seed: u64,
        keep_values: bool,
    ) -> Result<Inputs> {
        let shapes: Vec<Vec<usize>> = match *shape {
            ClassShape::Matmul {
                m,
                k,
                n,
                transpose_b,
            } => vec![
                vec![m, k],
                if transpose_b { vec![n, k] } else { vec![k, n] },
            ],
            ClassShape::Conv2d { x, w } => vec![x.to_vec(), w.to_vec()],
            ClassShape::Attention {
                batch,
                tokens,
                heads,
                head_dim,
            } => vec![vec![batch, tokens, heads * head_dim]; 3],
        };
        let mut tensors = Vec::new();
        let mut values = Vec::new();
        for (i, s) in shapes.iter().enumerate() {
            let t = Tensor::from_f32(gpu, &random(s.iter().product(), seed + i as u64), s, dtype)?;
            if keep_values {
                values.push(t.to_f32(gpu)?);
            }
            tensors.push(t);
        }
        Ok(Inputs {
            shape: shape.clone(),
            tensors,
            values,
        })
    }

    /// The CPU reference of these inputs (from the stored values).
    fn reference(&self) -> Vec<f32> {
        let v = &self.values;
        match self.shape {
            ClassShape::Matmul {
                m,
                k,
                n,
                transpose_b,
            } => {
                let b_shape = if transpose_b { [n, k] } else { [k, n] };
                let opts = MatmulOptions {
                    transpose_b,
                    ..Default::default()
                };
                matmul_reference(&v[0], &[m, k], &v[1], &b_shape, None, None, &opts)
            }
            ClassShape::Conv2d { x, w } => {
                conv2d_reference(&v[0], x, &v[1], w, None, &Conv2dOptions::same(w[2], 1))
            }
            ClassShape::Attention {
                batch,
                tokens,
                heads,
                ..
            } => attention_reference(
                &v[0],
                &v[1],
                &v[2],
                batch,
                tokens,
                tokens,
                heads,
                &Default::default(),
            ),
        }
    }
}

/// The op of `shape` on `inputs` with one named kernel, through routing.
fn run_kernel(gpu: &Gpu, inputs: &Inputs, kernel: KernelName) -> Result<Tensor> {
    let t = &inputs.tensors;
    match inputs.shape {
        ClassShape::Matmul { transpose_b, .. } => {
            let kernel = match kernel {
                KernelName::Coop => MatmulKernel::Coop,
                KernelName::Packed => MatmulKernel::Packed,
                _ => MatmulKernel::Tiled,
            };
            let opts = MatmulOptions {
                transpose_b,
                ..Default::default()
            };
            matmul_with_kernel(gpu, &t[0], &t[1], &opts, kernel)
        }
        ClassShape::Conv2d { w, .. } => {
            let kernel = match kernel {
                KernelName::Coop => Conv2dKernel::Coop,
                KernelName::Packed => Conv2dKernel::Packed,
                _ => Conv2dKernel::Tiled,
            };
            conv2d_with_kernel(
                gpu,
                &t[0],
                &t[1],
                None,
                &Conv2dOptions::same(w[2], 1),
                kernel,
            )
        }
        ClassShape::Attention { heads, .. } => {
            let kernel = match kernel {
                KernelName::Coop => AttentionKernel::Coop,
                KernelName::Subgroup => AttentionKernel::Subgroup,
                _ => AttentionKernel::Tiled,
            };
            let opts = crate::ops::attention::AttentionOptions {
                kernel: Some(kernel),
                ..Default::default()
            };
            attention(gpu, &t[0], &t[1], &t[2], heads, &opts)
        }
    }
}

/// The variants that may run on `gpu` for `shape`: the portable kernels of
/// the op, and the tensor-core kernel with each staging where the adapter
/// has cooperative matrices. The tuner checks each; one that cannot run is
/// reported, not chosen.
pub fn candidates(gpu: &Gpu, shape: &ClassShape, dtype: DType) -> Vec<Candidate<'static>> {
    let named = |variant: Variant| {
        let kernel = variant.kernel;
        Candidate {
            variant,
            run: Box::new(move |gpu: &Gpu, inputs: &Inputs| run_kernel(gpu, inputs, kernel)),
        }
    };
    let mut out = vec![named(Variant::plain(KernelName::Tiled))];
    let cpu = gpu.adapter().is_cpu;
    match shape {
        ClassShape::Matmul { .. } | ClassShape::Conv2d { .. } => {
            if cpu {
                out.push(named(Variant::plain(KernelName::Packed)));
            }
            if gpu.coop_matrix().is_some() && dtype == DType::F16 {
                out.extend(coop_tilings(gpu, shape).into_iter().map(|t| {
                    named(Variant {
                        kernel: KernelName::Coop,
                        constants: t.to_constants(),
                    })
                }));
            }
        }
        ClassShape::Attention { head_dim, .. } => {
            if cpu {
                out.push(named(Variant::plain(KernelName::Subgroup)));
            }
            // Each tensor-core variant of the template that fits here.
            for v in crate::ops::attention_coop::tuner_variants(gpu, dtype, *head_dim) {
                out.push(named(Variant {
                    kernel: KernelName::Coop,
                    constants: v.constants(),
                }));
            }
        }
    }
    out
}

/// The tensor-core tilings to try for `shape` on `gpu`: those of the
/// variant space whose fragment shape the adapter offers and that can
/// compute the product. One whose workgroup exceeds the adapter's limits
/// (48 KiB of workgroup memory on NVIDIA's Vulkan driver) stays in the
/// list: routing refuses it, and the report shows why.
pub fn coop_tilings(gpu: &Gpu, shape: &ClassShape) -> Vec<CoopTiling> {
    let product = match *shape {
        ClassShape::Matmul { transpose_b, .. } => CoopProduct::Matmul { transpose_b },
        ClassShape::Conv2d { .. } => CoopProduct::Conv,
        ClassShape::Attention { .. } => return Vec::new(),
    };
    let Some(config) = gpu.coop_matrix() else {
        return Vec::new();
    };
    matmul_coop::variant_space()
        .into_iter()
        .filter(|t| {
            config.fragments.contains(&t.frag) && t.check(product, config.subgroup_size).is_ok()
        })
        .collect()
}

/// Times `run` on the GPU: one warm-up, then `iters` runs (GPU timestamps
/// where the adapter has them, else the wall clock around a synchronize).
fn time(gpu: &Gpu, iters: usize, run: &dyn Fn() -> Result<Tensor>) -> Result<f64> {
    drop(run()?);
    gpu.synchronize()?;
    let timer = gpu.start_timer();
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        drop(run()?);
    }
    gpu.synchronize()?;
    let wall = start.elapsed().as_secs_f64() / iters.max(1) as f64;
    if timer {
        if let Some((seconds, n)) = gpu.stop_timer()? {
            if n > 0 {
                return Ok(seconds / iters.max(1) as f64);
            }
        }
    }
    Ok(wall)
}

/// Checks and times each candidate on `shape`, and picks the fastest
/// correct one. The first candidate is the portable reference kernel for
/// the full-size comparison.
pub fn tune_class(
    gpu: &Gpu,
    shape: &ClassShape,
    dtype: DType,
    candidates: &[Candidate],
    iters: usize,
) -> Result<ClassReport> {
    let op = shape.op();
    let class = shape.class(dtype);
    let small = Inputs::upload(gpu, &shape.small(), dtype, 11, true)?;
    let want_small = small.reference();
    let small_tol = tolerance(
        dtype,
        small.shape.reduction(),
        want_small.iter().fold(0f32, |m, v| m.max(v.abs())),
    );
    let large = Inputs::upload(gpu, shape, dtype, 23, false)?;
    let saved = gpu.tuning();
    let mut portable: Option<Vec<f32>> = None;
    let mut trials = Vec::new();
    // The small shape is of another routing class than the full-size one;
    // both are routed to the candidate, so that the small check against
    // the CPU reference judges the candidate itself, not the default.
    let small_class = small.shape.class(dtype);
    for c in candidates {
        // Route these classes to the candidate, as a tuning file would.
        let mut trial_tuning = saved.clone();
        trial_tuning
            .choices
            .retain(|ch| !(ch.op == op && (ch.class == class || ch.class == small_class)));
        for cl in [&class, &small_class] {
            trial_tuning.choices.push(Choice {
                op: op.to_string(),
                class: cl.clone(),
                variant: c.variant.clone(),
                ms: 0.0,
            });
        }
        gpu.set_tuning(trial_tuning);
        let trial = (|| -> Result<Trial> {
            let got_small = (c.run)(gpu, &small)?.to_f32(gpu)?;
            let small_error = max_abs_diff(&got_small, &want_small);
            let got_large = (c.run)(gpu, &large)?.to_f32(gpu)?;
            let base = portable.get_or_insert_with(|| got_large.clone());
            let large_error = max_abs_diff(&got_large, base);
            let large_tolerance = 2.0
                * tolerance(
                    dtype,
                    shape.reduction(),
                    base.iter().fold(0f32, |m, v| m.max(v.abs())),
                );
            let seconds = time(gpu, iters, &|| (c.run)(gpu, &large))?;
            Ok(Trial {
                variant: c.variant.clone(),
                small_error,
                small_tolerance: small_tol,
                large_error,
                large_tolerance,
                ms: seconds * 1e3,
                tflops: shape.flops() / seconds / 1e12,
                correct: small_error <= small_tol && large_error <= large_tolerance,
                error: None,
            })
        })();
        trials.push(trial.unwrap_or_else(|e| Trial {
            variant: c.variant.clone(),
            small_error: f32::NAN,
            small_tolerance: small_tol,
            large_error: f32::NAN,
            large_tolerance: f32::NAN,
            ms: f64::NAN,
            tflops: f64::NAN,
            correct: false,
            error: Some(e.to_string()),
        }));
    }
    gpu.set_tuning(saved);
    let chosen = choose(&trials).map(|t| t.variant.clone());
    Ok(ClassReport {
        op,
        class,
        shape: shape.describe(),
        trials,
        chosen,
    })
}

/// The fastest trial that computed right; None if none did.
pub fn choose(trials: &[Trial]) -> Option<&Trial> {
    trials
        .iter()
        .filter(|t| t.correct && t.error.is_none() && t.ms.is_finite())
        .min_by(|a, b| a.ms.total_cmp(&b.ms))
}

/// Tunes every class of `shapes` in `dtype` and returns the reports and the
/// tuning (this adapter's, every chosen variant) to save. With a `budget`,
/// no class starts after it has passed (the classes come most important
/// first; the rest keep the defaults): a GPU benchmark window is short.
pub fn tune(
    gpu: &Gpu,
    shapes: &[ClassShape],
    dtype: DType,
    iters: usize,
    budget: Option<std::time::Duration>,
    progress: &mut dyn FnMut(&ClassReport),
) -> Result<(Vec<ClassReport>, Tuning)> {
    let mut tuning = Tuning::new(&gpu.adapter_info());
    let mut reports = Vec::new();
    let start = Instant::now();
    for shape in shapes {
        if budget.is_some_and(|b| start.elapsed() >= b) {
            break;
        }
        let report = tune_class(gpu, shape, dtype, &candidates(gpu, shape, dtype), iters)?;
        if let Some(v) = &report.chosen {
            let ms = report
                .trials
                .iter()
                .find(|t| &t.variant == v)
                .map_or(f64::NAN, |t| t.ms);
            tuning
                .choices
                .retain(|c| !(c.op == report.op && c.class == report.class));
            tuning.choices.push(Choice {
                op: report.op.to_string(),
                class: report.class.clone(),
                variant: v.clone(),
                ms,
            });
        }
        progress(&report);
        reports.push(report);
    }
    Ok((reports, tuning))
}
