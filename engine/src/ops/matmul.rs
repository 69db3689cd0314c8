//! Matrix multiply and nn.Linear (`shaders/matmul.wgsl`): batched `a @ b` or
//! `a @ bᵀ`, with alpha, a per-column bias, an activation, an output scale and
//! a residual (the layer's skip connection) fused into the store. Operands
//! larger than one storage binding are computed in windows of rows, columns
//! and, when one row alone is too long, chunks of K.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use super::coop;
use super::matmul_coop::{self as mc, CoopPlan, CoopProduct, CoopTiling, FragmentMath};
use super::route::{self, Route};
use super::{check_dtypes, params_bytes, Activation};
use crate::error::{EngineError, Result};
use crate::gpu::tuning::KernelName;
use crate::gpu::{Binding, BlockPool, Gpu, Kernel};
use crate::tensor::{fmt_shape, DType, Tensor};

const SOURCE: &str = include_str!("../../../shaders/matmul.wgsl");
const MAX_GROUPS: usize = 65535;

/// Whether `gpu` runs the default tensor-core variant on `dtype` operands
/// (for `motif bench --coop`).
#[doc(hidden)]
pub fn coop_supported(gpu: &Gpu, dtype: DType) -> bool {
    CoopPlan {
        tiling: CoopTiling::DEFAULT,
        product: CoopProduct::Matmul { transpose_b: true },
        activation: Activation::None,
        math: FragmentMath::Coop,
    }
    .check_runs(gpu, dtype)
    .is_ok()
}

/// Options of [`matmul`]; the default is a plain `a @ b`.
#[derive(Debug, Clone, Copy)]
pub struct MatmulOptions<'a> {
    /// `b` is stored `[batch..., N, K]` (nn.Linear's weight layout).
    pub transpose_b: bool,
    /// Added to every row: shape `[N]`.
    pub bias: Option<&'a Tensor>,
    pub activation: Activation,
    /// Scales the product before the bias (attention's 1/√d).
    pub alpha: f32,
    /// Scales the result after the activation, before the residual.
    pub scale: f32,
    /// Added to the result, times `residual_scale`: shape of the output.
    pub residual: Option<&'a Tensor>,
    pub residual_scale: f32,
}

impl Default for MatmulOptions<'_> {
    fn default() -> Self {
        MatmulOptions {
            transpose_b: false,
            bias: None,
            activation: Activation::None,
            alpha: 1.0,
            scale: 1.0,
            residual: None,
            residual_scale: 1.0,
        }
    }
}

/// Which kernel computes the product. `Auto` picks by adapter; the others
/// exist so that tests and benchmarks run every kernel on any adapter.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulKernel {
    Auto,
    /// Workgroup-memory tiles straight from the storage buffers (GPUs).
    Tiled,
    /// Operands packed into uniform-buffer blocks first (CPU adapters).
    Packed,
    /// Tensor cores through cooperative matrices (f16 on adapters that have
    /// them, ops/matmul_coop.rs); matmul_tiled's windows.
    Coop,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    batch: u32,
    a_off: u32,
    b_off: u32,
    bias_off: u32,
    out_off: u32,
    a_bstride: u32,
    b_bstride: u32,
    o_bstride: u32,
    lda: u32,
    ldb: u32,
    ldo: u32,
    alpha: f32,
    has_bias: u32,
    accumulate: u32,
    finish: u32,
    bias_per_row: u32,
    kw4: u32,
    nch: u32,
    klast4: u32,
    row0: u32,
    partial_ld: u32,
    col0: u32,
    col_group: u32,
    col_group_stride: u32,
    res_off: u32,
    has_residual: u32,
    scale: f32,
    residual_scale: f32,
    _pad0: u32,
}

/// The product's sizes after validation. A `b` without batch dims is shared
/// by every item, so the items are folded into the rows of one product.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    b_batched: bool,
    transpose_b: bool,
}

/// `act(alpha · a @ b + bias) · scale + residual_scale · residual`.
///
/// `a` is `[batch..., M, K]`; `b` is `[batch..., K, N]`, or `[batch..., N, K]`
/// with `transpose_b`. `b`'s batch dims may be absent (one weight shared by
/// every item) or equal to `a`'s. The result is `[batch..., M, N]`.
pub fn matmul(gpu: &Gpu, a: &Tensor, b: &Tensor, opts: &MatmulOptions) -> Result<Tensor> {
    matmul_with_kernel(gpu, a, b, opts, MatmulKernel::Auto)
}

/// [`matmul`] with a chosen kernel (for tests and benchmarks).
#[doc(hidden)]
pub fn matmul_with_kernel(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    opts: &MatmulOptions,
    kernel: MatmulKernel,
) -> Result<Tensor> {
    let (dims, out_shape) = check_matmul("matmul", a, b, opts)?;
    check_residual("matmul", opts.residual, &out_shape)?;
    run(gpu, a, b, opts, dims, &out_shape, kernel)
}

/// [`matmul`] on one tensor-core variant, or its portable twin, exactly
/// as given (no routing): for the variant tests and checks. Refused with
/// [`EngineError::KernelUnavailable`] where the variant cannot run here
/// (f16 operands only; its workgroup memory within the adapter's limit).
#[doc(hidden)]
pub fn matmul_coop_variant(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    opts: &MatmulOptions,
    tiling: &CoopTiling,
    math: FragmentMath,
) -> Result<Tensor> {
    let (d, out_shape) = check_matmul("matmul", a, b, opts)?;
    check_residual("matmul", opts.residual, &out_shape)?;
    let plan = CoopPlan {
        tiling: *tiling,
        product: CoopProduct::Matmul {
            transpose_b: opts.transpose_b,
        },
        activation: opts.activation,
        math,
    };
    plan.check_runs(gpu, a.dtype())?;
    let out = Tensor::empty(gpu, &out_shape, a.dtype())?;
    if d.batch == 0 || d.m == 0 || d.n == 0 {
        return Ok(out);
    }
    run_tiled(gpu, a, b, &out, &d, &Epilogue::of(opts), Some(&plan))?;
    Ok(out)
}

/// PyTorch's `nn.Linear`: `x [..., K]`, `weight [N, K]`, `bias [N]` →
/// `act(x @ weightᵀ + bias)` of shape `[..., N]`.
pub fn linear(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
) -> Result<Tensor> {
    linear_residual(gpu, x, weight, bias, activation, None, 1.0)
}

/// [`linear`] ending a residual block: `act(x @ weightᵀ + bias) · scale +
/// residual`, `residual` of the output's shape `[..., N]` (diffusers'
/// `hidden_states = attn(...) + hidden_states` in one pass).
pub fn linear_residual(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    activation: Activation,
    residual: Option<&Tensor>,
    scale: f32,
) -> Result<Tensor> {
    let k = match x.shape().last() {
        Some(&k) => k,
        None => {
            return Err(EngineError::Shape {
                op: "linear",
                expected: "x of shape [..., K]".into(),
                found: fmt_shape(x.shape()),
            })
        }
    };
    if weight.rank() != 2 || weight.shape()[1] != k {
        return Err(EngineError::Shape {
            op: "linear",
            expected: format!(
                "weight of shape [N, {k}] for x of shape {}",
                fmt_shape(x.shape())
            ),
            found: fmt_shape(weight.shape()),
        });
    }
    let rows = x.numel() / k.max(1);
    let x2 = x.reshape(&[rows, k])?;
    let opts = MatmulOptions {
        transpose_b: true,
        bias,
        activation,
        scale,
        residual,
        ..MatmulOptions::default()
    };
    let (dims, _) = check_matmul("linear", &x2, weight, &opts)?;
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("x has rank >= 1") = weight.shape()[0];
    check_residual("linear", residual, &out_shape)?;
    run(
        gpu,
        &x2,
        weight,
        &opts,
        dims,
        &out_shape,
        MatmulKernel::Auto,
    )
}

/// [`linear`] of one input by several layers (attention's to_q, to_k and
/// to_v): `x [..., K]`, each `(weight [N, K], bias [N])`. Where every
/// product runs on the packed kernel with the same block shape (layers of
/// one shape always do), the input is packed once for all of them instead
/// of once per layer; each result is that of its own [`linear`] call bit
/// for bit (the same packing, block shape and sums).
pub fn linear_each(
    gpu: &Gpu,
    x: &Tensor,
    layers: &[(&Tensor, Option<&Tensor>)],
) -> Result<Vec<Tensor>> {
    let separately = || {
        layers
            .iter()
            .map(|&(w, b)| linear(gpu, x, w, b, Activation::None))
            .collect()
    };
    let k = *x.shape().last().unwrap_or(&0);
    if layers.len() < 2 || x.rank() == 0 || k == 0 {
        return separately();
    }
    let rows = x.numel() / k;
    let x2 = x.reshape(&[rows, k])?;
    let mut plans = Vec::with_capacity(layers.len());
    for &(weight, bias) in layers {
        if weight.rank() != 2 || weight.shape()[1] != k {
            // linear names the mismatch.
            return separately();
        }
        let opts = MatmulOptions {
            transpose_b: true,
            bias,
            ..MatmulOptions::default()
        };
        let (dims, _) = check_matmul("linear", &x2, weight, &opts)?;
        match choose(gpu, x.dtype(), &dims, &opts, MatmulKernel::Auto)? {
            Choice::Packed(row_words) if dims.m > 0 && dims.n > 0 => plans.push((dims, row_words)),
            _ => return separately(),
        }
    }
    let row_words = plans[0].1;
    if plans.iter().any(|&(_, rw)| rw != row_words) {
        return separately();
    }
    let pa = packed_operand(gpu, &Strided::rows(&x2), row_words)?;
    layers
        .iter()
        .zip(&plans)
        .map(|(&(weight, bias), (dims, _))| {
            let mut out_shape = x.shape().to_vec();
            *out_shape.last_mut().expect("x has rank >= 1") = dims.n;
            let out = Tensor::empty(gpu, &out_shape, x.dtype())?;
            let opts = MatmulOptions {
                transpose_b: true,
                bias,
                ..MatmulOptions::default()
            };
            run_packed_with(
                gpu,
                &pa,
                weight,
                &out,
                dims,
                &Epilogue::of(&opts),
                row_words,
            )?;
            Ok(out)
        })
        .collect()
}

/// diffusers' `GEGLU`, `value * gelu(gate)` of `linear(x, weight, bias)`
/// split in halves: `x [..., K]`, `weight [2·D, K]`, `bias [2·D]` → `[..., D]`.
///
/// On the CPU adapter's packed kernel (and D a multiple of 4) the GEGLU runs
/// in the product's store: the weight's rows (and the bias) are interleaved
/// once, 4 of the value half then the same 4 of the gate half, so that each
/// gemm_packed lane holding 4 value columns has their gates in the lane next
/// to it. The product is never written, and the elementwise pass that would
/// read it back is gone. Every column sums K in the order the plain product
/// does, with the same block shape, and is rounded to the storage type
/// before the GEGLU as a stored product would be: the results are those of
/// [`linear`] then [`super::geglu`] bit for bit, which is what other
/// adapters run.
pub fn linear_geglu(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let op = "linear_geglu";
    let k = *x.shape().last().unwrap_or(&0);
    if x.rank() == 0
        || weight.rank() != 2
        || weight.shape()[1] != k
        || !weight.shape()[0].is_multiple_of(2)
    {
        return Err(EngineError::Shape {
            op,
            expected: format!(
                "weight of shape [2·D, {k}] for x of shape {}",
                fmt_shape(x.shape())
            ),
            found: fmt_shape(weight.shape()),
        });
    }
    let n = weight.shape()[0];
    let half = n / 2;
    let rows = x.numel() / k.max(1);
    let x2 = x.reshape(&[rows, k])?;
    let opts = MatmulOptions {
        transpose_b: true,
        bias,
        ..MatmulOptions::default()
    };
    let (dims, _) = check_matmul(op, &x2, weight, &opts)?;
    let row_words = match choose(gpu, x.dtype(), &dims, &opts, MatmulKernel::Auto)? {
        Choice::Packed(row_words) if half.is_multiple_of(4) && rows > 0 && k > 0 => row_words,
        _ => return super::geglu(gpu, &linear(gpu, x, weight, bias, Activation::None)?),
    };
    let mut out_shape = x.shape().to_vec();
    *out_shape.last_mut().expect("x has rank >= 1") = half;
    let out = Tensor::empty(gpu, &out_shape, x.dtype())?;
    let pa = packed_operand(gpu, &Strided::rows(&x2), row_words)?;
    let pack_weight = || {
        let w = interleave_halves(gpu, weight)?;
        pack_rows(gpu, &Strided::rows(&w), row_words)
    };
    let pb = if weight.is_constant() {
        weight.derived(
            ("matmul pack_rows geglu", vec![n, k, row_words]),
            pack_weight,
        )?
    } else {
        Arc::new(pack_weight()?)
    };
    let bias = match bias {
        Some(b) if b.is_constant() => {
            Some(b.derived(("geglu interleave", vec![n]), || interleave_halves(gpu, b))?)
        }
        Some(b) => Some(Arc::new(interleave_halves(gpu, b)?)),
        None => None,
    };
    let epilogue = Epilogue {
        bias: bias.as_deref(),
        geglu: true,
        ..Epilogue::of(&MatmulOptions::default())
    };
    let product = PackedProduct {
        a: &pa,
        b: &pb,
        a_shared: false,
        b_shared: true,
        items: 1,
        m: rows,
        n,
        out: &out,
        out_base: 0,
        out_item_stride: rows * half,
        ldo: half,
        col_group: n,
        col_group_stride: 0,
        packed_f16: out.dtype() == DType::F16,
    };
    gemm_packed(gpu, &product, &epilogue)?;
    Ok(out)
}

/// `t` of shape `[2·D, ...]` with its rows reordered as linear_geglu's
/// epilogue reads them: for each 4 rows of the first half, those rows, then
/// the same 4 of the second half.
fn interleave_halves(gpu: &Gpu, t: &Tensor) -> Result<Tensor> {
    let shape = t.shape();
    let rest: usize = shape[1..].iter().product();
    let quads = shape[0] / 8;
    let split = t.reshape(&[2, quads, 4, rest])?;
    super::layout::permute(gpu, &split, &[1, 0, 2, 3])?.reshape(shape)
}

fn check_matmul(
    op: &'static str,
    a: &Tensor,
    b: &Tensor,
    opts: &MatmulOptions,
) -> Result<(Dims, Vec<usize>)> {
    let mut tensors = vec![a, b];
    tensors.extend(opts.bias);
    tensors.extend(opts.residual);
    check_dtypes(op, &tensors)?;
    if a.rank() < 2 {
        return Err(EngineError::Shape {
            op,
            expected: "a of shape [batch..., M, K]".into(),
            found: fmt_shape(a.shape()),
        });
    }
    let (a_batch, mk) = a.shape().split_at(a.rank() - 2);
    let (m, k) = (mk[0], mk[1]);
    let layout = if opts.transpose_b { "N, K" } else { "K, N" };
    let b_error = || EngineError::Shape {
        op,
        expected: format!(
            "b of shape [{layout}] with K = {k}, batch dims absent or equal to a's (a is {})",
            fmt_shape(a.shape())
        ),
        found: fmt_shape(b.shape()),
    };
    if b.rank() < 2 {
        return Err(b_error());
    }
    let (b_batch, b_mat) = b.shape().split_at(b.rank() - 2);
    let (b_k, n) = if opts.transpose_b {
        (b_mat[1], b_mat[0])
    } else {
        (b_mat[0], b_mat[1])
    };
    let b_batched = !b_batch.is_empty();
    if b_k != k || (b_batched && b_batch != a_batch) {
        return Err(b_error());
    }
    if let Some(bias) = opts.bias {
        if bias.shape() != [n] {
            return Err(EngineError::Shape {
                op,
                expected: format!("bias of shape [{n}]"),
                found: fmt_shape(bias.shape()),
            });
        }
    }
    let batch: usize = a_batch.iter().product();
    let mut out_shape = a_batch.to_vec();
    out_shape.extend([m, n]);
    let dims = if b_batched {
        Dims {
            batch,
            m,
            k,
            n,
            b_batched,
            transpose_b: opts.transpose_b,
        }
    } else {
        Dims {
            batch: 1,
            m: batch * m,
            k,
            n,
            b_batched,
            transpose_b: opts.transpose_b,
        }
    };
    Ok((dims, out_shape))
}

/// The residual must have the output's shape (its dtype is checked with the
/// operands').
pub(crate) fn check_residual(
    op: &'static str,
    residual: Option<&Tensor>,
    out_shape: &[usize],
) -> Result<()> {
    match residual {
        Some(r) if r.shape() != out_shape => Err(EngineError::Shape {
            op,
            expected: format!("residual of the output's shape {}", fmt_shape(out_shape)),
            found: fmt_shape(r.shape()),
        }),
        _ => Ok(()),
    }
}

fn run(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    opts: &MatmulOptions,
    d: Dims,
    out_shape: &[usize],
    kernel: MatmulKernel,
) -> Result<Tensor> {
    let out = Tensor::empty(gpu, out_shape, a.dtype())?;
    if d.batch == 0 || d.m == 0 || d.n == 0 {
        return Ok(out);
    }
    let epilogue = Epilogue::of(opts);
    match choose(gpu, a.dtype(), &d, opts, kernel)? {
        Choice::Coop(plan) => run_tiled(gpu, a, b, &out, &d, &epilogue, Some(&plan))?,
        Choice::Tiled => run_tiled(gpu, a, b, &out, &d, &epilogue, None)?,
        Choice::Packed(row_words) => run_packed(gpu, a, b, &out, &d, &epilogue, row_words)?,
    }
    Ok(out)
}

/// The kernel a product runs on, from [`choose`].
enum Choice {
    /// Tensor cores, with matmul_tiled's windows.
    Coop(CoopPlan),
    Tiled,
    /// gemm_packed with this many words per block row.
    Packed(usize),
}

/// Picks the kernel of a product of dims `d`: routing (ops/route.rs) first,
/// then the adapter's portable kernel.
fn choose(
    gpu: &Gpu,
    dtype: DType,
    d: &Dims,
    opts: &MatmulOptions,
    kernel: MatmulKernel,
) -> Result<Choice> {
    // Tensor cores where routing sends the product (ops/route.rs); they
    // take matmul_tiled's windows.
    let asked = match kernel {
        MatmulKernel::Auto => None,
        MatmulKernel::Tiled => Some(KernelName::Tiled),
        MatmulKernel::Packed => Some(KernelName::Packed),
        MatmulKernel::Coop => Some(KernelName::Coop),
    };
    let class = route::matmul_class(dtype, d.batch * d.m, d.k, d.n, d.transpose_b);
    let plan = CoopPlan {
        tiling: mc::tuned_tiling(gpu, "matmul", &class)?,
        product: CoopProduct::Matmul {
            transpose_b: opts.transpose_b,
        },
        activation: opts.activation,
        math: FragmentMath::Coop,
    };
    // A tiling whose fragments the adapter lacks has no tensor-core kernel.
    let coop_missing = (!mc::fragment_offered(gpu, &plan.tiling) && gpu.coop_matrix().is_some())
        .then(|| {
            format!(
                "{0}x{0} fragments (variant {1})",
                plan.tiling.frag,
                plan.tiling.name()
            )
        });
    let request = route::Request {
        op: "matmul",
        class,
        dtype,
        asked,
        coop: match coop_missing {
            None => Some(plan.kernel(gpu, true)?),
            Some(_) => None,
        },
        coop_missing,
        coop_by_default: true,
    };
    let kernel = match route::route(gpu, request)? {
        Route::Coop(_) => return Ok(Choice::Coop(plan)),
        Route::Portable(Some(KernelName::Tiled)) => MatmulKernel::Tiled,
        Route::Portable(Some(KernelName::Packed)) => MatmulKernel::Packed,
        Route::Portable(_) => MatmulKernel::Auto,
    };
    // The one choice between the two portable kernels (see
    // shaders/matmul.wgsl): CPU adapters read storage buffers an order of
    // magnitude slower than uniform buffers, GPUs want workgroup-memory
    // tiles. Operands that cannot be packed in windows (a plain `b` larger
    // than a binding) take the tiled kernel, which can split anything.
    let plan = packed_plan(gpu, dtype, d);
    // A tuned choice of the packed kernel for operands it cannot pack (the
    // class spans sizes) leaves the choice to the default.
    let kernel = match (kernel, asked, plan) {
        (MatmulKernel::Packed, None, None) => MatmulKernel::Auto,
        (k, _, _) => k,
    };
    match (kernel, plan) {
        (MatmulKernel::Tiled, _) | (MatmulKernel::Auto | MatmulKernel::Coop, None) => {
            Ok(Choice::Tiled)
        }
        (_, Some(row_words)) => Ok(Choice::Packed(row_words)),
        (MatmulKernel::Packed, None) => Err(EngineError::Argument {
            op: "matmul",
            message: format!(
                "the packed kernel needs a CPU adapter with 8-lane subgroups and 64 KiB \
                 uniform bindings, and operands whose row blocks fit a binding (adapter {})",
                gpu.adapter().name
            ),
        }),
    }
}

/// What the product's store adds: `act(alpha · dot + bias) · scale +
/// residual_scale · residual`.
pub(crate) struct Epilogue<'a> {
    pub alpha: f32,
    pub bias: Option<&'a Tensor>,
    /// The bias is indexed by row (conv2d's output channels), not column.
    pub bias_per_row: bool,
    pub activation: Activation,
    pub scale: f32,
    /// Laid out as the output: each window of the output reads the same
    /// window of it.
    pub residual: Option<&'a Tensor>,
    pub residual_scale: f32,
    /// GEGLU of the product's column pairs (gemm_packed only; see
    /// [`linear_geglu`]): the columns come as groups of 8, 4 of the value
    /// half then the same 4 of the gate half, and the output holds half as
    /// many columns. No activation, scale or residual goes with it.
    pub geglu: bool,
}

impl<'a> Epilogue<'a> {
    /// A product's epilogue as its options give it.
    fn of(opts: &MatmulOptions<'a>) -> Self {
        Epilogue {
            alpha: opts.alpha,
            bias: opts.bias,
            bias_per_row: false,
            activation: opts.activation,
            scale: opts.scale,
            residual: opts.residual,
            residual_scale: opts.residual_scale,
            geglu: false,
        }
    }

    /// The residual binding for the output window of `count` values from
    /// `start`, or `unused` (as [`bias_window`]).
    pub(crate) fn residual_window(
        &self,
        gpu: &Gpu,
        start: usize,
        count: usize,
        unused: Binding<'a>,
    ) -> (Binding<'a>, u32) {
        match self.residual {
            Some(r) => r.window(gpu, start, count),
            None => (unused, 0),
        }
    }

    /// The epilogue's fields of the parameter block.
    fn params(&self, res_off: u32) -> Params {
        Params {
            alpha: self.alpha,
            has_bias: self.bias.is_some() as u32,
            bias_per_row: self.bias_per_row as u32,
            res_off,
            has_residual: self.residual.is_some() as u32,
            scale: self.scale,
            residual_scale: self.residual_scale,
            ..Params::default()
        }
    }
}

// ---------------------------------------------------------------------------
// The tiled kernel (GPUs, and any adapter as the fallback).

/// Output rows and columns of one matmul_tiled workgroup.
const TILE: usize = 64;

/// How the product is cut into dispatches: `items` batch items at a time
/// (only when whole items fit), else windows of `rows` x `cols` outputs over
/// `depth` values of K.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    items: usize,
    rows: usize,
    cols: usize,
    depth: usize,
}

/// Picks the largest windows that fit one binding of `max` elements and a
/// dispatch of at most 65535 workgroups per dimension.
fn tiling(d: &Dims, max: usize) -> Tiling {
    let max_rows = MAX_GROUPS * TILE;
    let max_cols = MAX_GROUPS * TILE;
    let (a_item, b_item, o_item) = (d.m * d.k, d.k * d.n, d.m * d.n);
    if a_item <= max && b_item <= max && o_item <= max && d.m <= max_rows && d.n <= max_cols {
        let mut items = d.batch.min(MAX_GROUPS);
        for size in [a_item, o_item, if d.b_batched { b_item } else { 0 }] {
            items = items.min(max / size.max(1));
        }
        return Tiling {
            items: items.max(1),
            rows: d.m,
            cols: d.n,
            depth: d.k,
        };
    }
    // Rows of K first: a window of `a` and of a transposed `b` needs a whole
    // row of each; a plain `b` needs `depth` of its rows. (An empty K is
    // windowed as if it were 1.)
    let k = d.k.max(1);
    let depth = if d.transpose_b {
        k.min(max)
    } else {
        k.min((max - 1) / d.n + 1)
    };
    let cols = if d.transpose_b {
        (max - depth) / k + 1
    } else {
        max - (depth - 1) * d.n
    };
    let cols = cols.min(d.n).min(max_cols);
    let rows = ((max - depth) / k + 1)
        .min((max - cols) / d.n + 1)
        .min(d.m)
        .min(max_rows);
    Tiling {
        items: 1,
        rows,
        cols,
        depth,
    }
}

/// Element start and count of the window holding a block of `rows` x `cols`
/// values at (`row0`, `col0`) of a matrix at `base` whose rows are `stride` apart.
fn span(
    base: usize,
    stride: usize,
    row0: usize,
    col0: usize,
    rows: usize,
    cols: usize,
) -> (usize, usize) {
    (base + row0 * stride + col0, (rows - 1) * stride + cols)
}

/// The bias binding of a window: its `count` values from `start`, or, with
/// no bias, any buffer (the kernel does not read it, but every binding of the
/// pipeline needs one).
fn bias_window<'a>(
    gpu: &Gpu,
    e: &Epilogue<'a>,
    start: usize,
    count: usize,
    unused: Binding<'a>,
) -> (Binding<'a>, u32) {
    match e.bias {
        Some(bias) => bias.window(gpu, start, count),
        None => (unused, 0),
    }
}

fn run_tiled(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    d: &Dims,
    e: &Epilogue,
    coop: Option<&CoopPlan>,
) -> Result<()> {
    let transpose_b = d.transpose_b;
    // The windows suit both kernels (tiling() bounds a window's workgroups
    // with the smallest tile); only the grid differs.
    let (tile_m, tile_n) = match coop {
        Some(plan) => (plan.tiling.tile_m() as usize, plan.tiling.tile_n() as usize),
        None => (TILE, TILE),
    };
    let max = Tensor::max_window_elems(gpu, a.dtype());
    let t = tiling(d, max);
    let k = Kernel {
        op: "matmul",
        source: SOURCE,
        entry: "matmul_tiled",
        dtype: a.dtype(),
        constants: vec![
            ("TRANS_B", if transpose_b { 1.0 } else { 0.0 }),
            ("ACT", e.activation.code()),
        ],
    };
    let ldb = if d.transpose_b { d.k } else { d.n };
    let (a_item, b_item, o_item) = (d.m * d.k, d.k * d.n, d.m * d.n);
    let b_stride = if d.b_batched { b_item } else { 0 };
    let k_chunks: Vec<usize> = (0..d.k.max(1)).step_by(t.depth.max(1)).collect();
    for z0 in (0..d.batch).step_by(t.items) {
        let items = t.items.min(d.batch - z0);
        for j0 in (0..d.n).step_by(t.cols) {
            let cols = t.cols.min(d.n - j0);
            for i0 in (0..d.m).step_by(t.rows) {
                let rows = t.rows.min(d.m - i0);
                for (chunk, &k0) in k_chunks.iter().enumerate() {
                    let depth = t.depth.min(d.k - k0);
                    // Several items are only windowed together when whole.
                    let (a_start, a_count) = span(z0 * a_item, d.k, i0, k0, rows, depth);
                    let (o_start, o_count) = span(z0 * o_item, d.n, i0, j0, rows, cols);
                    let (b_start, b_count) = if d.transpose_b {
                        span(z0 * b_stride, d.k, j0, k0, cols, depth)
                    } else {
                        span(z0 * b_stride, d.n, k0, j0, depth.max(1), cols)
                    };
                    let extra = items - 1;
                    // With K = 0 there is nothing to window (the sum is empty).
                    let ((ab, a_off), (bb, b_off)) = if d.k == 0 {
                        ((a.binding(), 0), (b.binding(), 0))
                    } else {
                        (
                            a.window(gpu, a_start, a_count + extra * a_item),
                            b.window(gpu, b_start, b_count + extra * b_stride),
                        )
                    };
                    let o_window = o_count + extra * o_item;
                    let (ob, out_off) = out.window(gpu, o_start, o_window);
                    let (biasb, bias_off) = bias_window(gpu, e, j0, cols, ab);
                    let (resb, res_off) = e.residual_window(gpu, o_start, o_window, ab);
                    let p = Params {
                        m: rows as u32,
                        n: cols as u32,
                        k: depth as u32,
                        batch: items as u32,
                        a_off,
                        b_off,
                        bias_off,
                        out_off,
                        a_bstride: a_item as u32,
                        b_bstride: b_stride as u32,
                        o_bstride: o_item as u32,
                        lda: d.k as u32,
                        ldb: ldb as u32,
                        ldo: d.n as u32,
                        accumulate: (chunk > 0) as u32,
                        finish: (chunk + 1 == k_chunks.len()) as u32,
                        ..e.params(res_off)
                    };
                    let bindings = [(1, ab), (2, bb), (3, biasb), (4, ob), (19, resb)];
                    let groups = [
                        cols.div_ceil(tile_n) as u32,
                        rows.div_ceil(tile_m) as u32,
                        items as u32,
                    ];
                    if let Some(plan) = coop {
                        // Chunked loads where this window's offsets, strides
                        // and lengths allow them.
                        let load = plan.tiling.load;
                        let b_len = if transpose_b { p.k } else { p.n };
                        let aligned = mc::aligned(load, p.a_off, p.lda, p.a_bstride, p.k)
                            && mc::aligned(load, p.b_off, p.ldb, p.b_bstride, b_len);
                        let kernel = plan.kernel(gpu, aligned)?;
                        coop::dispatch(gpu, &kernel, params_bytes(&p), &bindings, groups)?;
                    } else {
                        gpu.dispatch(&k, params_bytes(&p), &bindings, groups)?;
                    }
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The packed kernel (CPU adapters): see the comment in shaders/matmul.wgsl.

/// 32-bit words in one packed block: 64 KiB, the largest uniform binding
/// Vulkan guarantees.
pub(crate) const BLOCK_WORDS: usize = 16384;
const BLOCK_BYTES: u64 = BLOCK_WORDS as u64 * 4;
/// K chunks (pairs of bound blocks) one gemm_packed dispatch sums: with the
/// parameters and the partial sums, 14 uniform buffers of the 15 lavapipe allows.
const CHUNKS_PER_PASS: usize = 6;
const PACKED_UNIFORMS: usize = 2 * CHUNKS_PER_PASS + 2;
/// Output rows (the most: see packed_rows) and columns of one gemm_packed
/// workgroup (one subgroup).
const PACKED_ROWS: usize = 32;
const PACKED_COLS: usize = 32;
/// Words per block row to choose from: blocks of 1024 rows x 16 words to 32 x 512
/// (16: products with K of at most 96 words, the small models' linear layers,
/// take half the dispatches of 32 words in one pass of four or six chunks).
const BLOCK_ROW_WORDS: [usize; 6] = [16, 32, 64, 128, 256, 512];

/// Whether this adapter runs gemm_packed: a CPU adapter whose subgroups are
/// its 8 SIMD lanes (the kernel broadcasts from lanes 0..7 of a subgroup it
/// assumes to be exactly the 8 invocations of a workgroup), with room for
/// 14 uniform buffers of 64 KiB.
pub(crate) fn packed_supported(gpu: &Gpu) -> bool {
    let info = gpu.adapter_info();
    let limits = gpu.limits();
    gpu.adapter().is_cpu
        && gpu.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == 8
        && info.subgroup_max_size == 8
        && limits.max_uniform_buffers_per_shader_stage as usize >= PACKED_UNIFORMS
        && limits.max_uniform_buffer_binding_size >= BLOCK_BYTES
        && gpu.max_binding_bytes() >= BLOCK_BYTES
}

/// Output rows of one gemm_packed workgroup for a product of `k_words`
/// words of K: 32 where K is long, 16 where it is short (ROW_GROUPS in
/// shaders/matmul.wgsl; on lavapipe 2026-12-07, f32, 32 rows took 0.68-0.73x
/// the time at K of 128 to 1440 and 1.2-1.5x at K of 64 and 96).
fn packed_rows(k_words: usize) -> usize {
    if k_words >= 128 {
        PACKED_ROWS
    } else {
        PACKED_ROWS / 2
    }
}

/// Values per packed word.
pub(crate) fn values_per_word(dtype: DType) -> usize {
    match dtype {
        DType::F32 => 1,
        DType::F16 => 2,
    }
}

/// Whether the packing windows of this product's operands fit one binding:
/// only a plain `b` ([K, N], whose columns are packed) can be too wide.
/// The words per block row of the packed kernel for this product, or `None`
/// if the adapter cannot run it or the packing windows would not fit one
/// binding: a row block of `a` or of a transposed `b` (its rows times K),
/// the columns of a plain `b` (nearly all of it), or a row block's chunks.
fn packed_plan(gpu: &Gpu, dtype: DType, d: &Dims) -> Option<usize> {
    if !packed_supported(gpu) {
        return None;
    }
    let k_words = d.k.div_ceil(values_per_word(dtype));
    let row_words = packed_row_words(d.batch, d.m, d.n, k_words);
    let rows = BLOCK_WORDS / row_words;
    let max = Tensor::max_window_elems(gpu, dtype);
    let b_window = if d.transpose_b {
        rows * d.k
    } else {
        d.k.saturating_sub(1) * d.n + rows
    };
    let chunks = k_words.div_ceil(row_words) as u64 * BLOCK_BYTES;
    (rows * d.k <= max && b_window <= max && chunks <= gpu.max_binding_bytes()).then_some(row_words)
}

/// An operand packed into blocks (layout in shaders/matmul.wgsl), in a buffer
/// of the GPU's block pool: pooled tensors cannot be bound as uniform buffers.
///
/// A reused buffer keeps what its last user wrote. That is safe because the
/// pool hands a buffer back only for the same byte count, words per block
/// row and words of K (see [`Packed::tag`]), so the K padding (words of the
/// last chunk past K, which gemm_packed reads) lies at the same places, and
/// every packing kernel writes there zeros or nothing: it stays as zero as
/// the new buffer was. Rows past the matrix may hold old rows, but the
/// outputs they feed are never stored.
pub(crate) struct Packed {
    /// Taken from `pool` at allocation, returned on drop.
    buffer: Option<wgpu::Buffer>,
    pool: Arc<BlockPool>,
    /// Words per block row.
    kw: usize,
    /// Row blocks per item.
    n_rb: usize,
    /// K chunks.
    n_kc: usize,
    /// Words of K (the last chunk may be shorter).
    k_words: usize,
}

impl Packed {
    /// An uninitialised packed operand of `items` x `rows` x `k_words`.
    pub(crate) fn alloc(
        gpu: &Gpu,
        items: usize,
        rows: usize,
        k_words: usize,
        kw: usize,
    ) -> Result<Packed> {
        let n_rb = rows.div_ceil(BLOCK_WORDS / kw).max(1);
        let n_kc = k_words.div_ceil(kw).max(1);
        let bytes = (items * n_rb * n_kc) as u64 * BLOCK_BYTES;
        if bytes > gpu.max_buffer_bytes() {
            return Err(EngineError::BufferTooLarge {
                bytes,
                limit: gpu.max_buffer_bytes(),
            });
        }
        let tag = Packed::tag(kw, k_words);
        // A dry run dispatches nothing: one block stands in for the operand.
        let size = if gpu.is_plan() {
            BLOCK_BYTES
        } else {
            bytes.max(BLOCK_BYTES)
        };
        Ok(Packed {
            buffer: Some(gpu.blocks.take(&gpu.device, size, tag)),
            pool: gpu.blocks.clone(),
            kw,
            n_rb,
            n_kc,
            k_words,
        })
    }

    /// The layout a reused buffer must share (see [`Packed`]).
    fn tag(kw: usize, k_words: usize) -> u64 {
        ((kw as u64) << 32) | k_words as u64
    }

    fn buffer(&self) -> &wgpu::Buffer {
        self.buffer
            .as_ref()
            .expect("a packed operand holds its buffer until dropped")
    }

    pub(crate) fn rows_per_block(&self) -> usize {
        BLOCK_WORDS / self.kw
    }

    pub(crate) fn k_chunks(&self) -> usize {
        self.n_kc
    }

    /// Blocks per item.
    pub(crate) fn item_blocks(&self) -> usize {
        self.n_rb * self.n_kc
    }

    /// `count` whole blocks from block index `first` (item-major, then row
    /// block, then K chunk), for a packing kernel to write.
    pub(crate) fn blocks(&self, first: usize, count: usize) -> Binding<'_> {
        Binding {
            buffer: self.buffer(),
            offset: first as u64 * BLOCK_BYTES,
            size: count as u64 * BLOCK_BYTES,
        }
    }

    fn block(&self, z: usize, rb: usize, kc: usize) -> Binding<'_> {
        self.blocks((z * self.n_rb + rb) * self.n_kc + kc, 1)
    }
}

impl Drop for Packed {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.pool
                .give_back(buffer, Packed::tag(self.kw, self.k_words));
        }
    }
}

/// Picks the words per block row: wider blocks mean fewer passes over K,
/// taller ones fewer dispatches; both want enough workgroups per dispatch
/// for every CPU thread. Partial sums between passes must fit one uniform
/// block, so several passes need tiles of at most 128 x 128.
pub(crate) fn packed_row_words(items: usize, m: usize, n: usize, k_words: usize) -> usize {
    // Nanoseconds on lavapipe (2 threads), measured: a word of K of one
    // output (CPU time), a dispatch (wall time: its CPU time and the wait for
    // the slowest workgroup), an extra pass over one output (CPU time).
    const WORD: f64 = 0.18;
    const DISPATCH: f64 = 150e3;
    const PASS: f64 = 15.0;
    const THREADS: usize = 2;
    let cost = |kw: usize| {
        let rb = BLOCK_WORDS / kw;
        let passes = k_words.div_ceil(kw).max(1).div_ceil(CHUNKS_PER_PASS);
        if passes > 1 && rb * rb > BLOCK_WORDS {
            return f64::INFINITY;
        }
        let dispatches = items * m.div_ceil(rb) * n.div_ceil(rb) * passes;
        // Workgroups counted at 16 rows whatever packed_rows picks: the
        // block shape decides the passes over K, and with them where the
        // partial sums are rounded, so it must stay as recorded clips were
        // made with (tests/recipes.rs replays them byte for byte; counting
        // 32-row workgroups moved some small products to other shapes).
        let groups = m.min(rb).div_ceil(PACKED_ROWS / 2) * n.min(rb).div_ceil(PACKED_COLS);
        let balance = groups as f64 / (groups.div_ceil(THREADS) * THREADS) as f64;
        (items * m * n * k_words.max(1)) as f64 * WORD / balance
            + dispatches as f64 * DISPATCH
            + ((passes - 1) * items * m * n) as f64 * PASS
    };
    BLOCK_ROW_WORDS
        .into_iter()
        .min_by(|&x, &y| cost(x).total_cmp(&cost(y)))
        .expect("the candidate list is not empty")
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PackParams {
    rows: u32,
    k: u32,
    src_off: u32,
    src_bstride: u32,
    row_stride: u32,
    k_stride: u32,
    kw: u32,
    rb: u32,
    kw_shift: u32,
    rb_shift: u32,
    n_rb: u32,
    n_kc: u32,
    row0: u32,
    dst_base: u32,
    /// pack_rows4: rows of the matrix this dispatch packs, from row0.
    grid_rows: u32,
    _pad: u32,
}

/// A strided matrix (per item) in a tensor, to be packed with its rows as
/// block rows: `a` row-major, a transposed `b` as is, a plain `b` by columns.
struct Strided<'a> {
    t: &'a Tensor,
    items: usize,
    rows: usize,
    k: usize,
    item_stride: usize,
    row_stride: usize,
    k_stride: usize,
}

impl<'a> Strided<'a> {
    /// A row-major matrix `[rows, K]`, packed by rows.
    fn rows(t: &'a Tensor) -> Self {
        let (rows, k) = (t.shape()[0], t.shape()[1]);
        Strided {
            t,
            items: 1,
            rows,
            k,
            item_stride: rows * k,
            row_stride: k,
            k_stride: 1,
        }
    }
}

/// Invocations per pack_rows workgroup, along K.
const PACK_GROUP: usize = 32;
/// pack_rows4's workgroup: invocations along K, rows.
const PACK_ROWS4_GROUP: (usize, usize) = (8, 4);

/// Packs `s` with `kw` words per block row.
fn pack_rows(gpu: &Gpu, s: &Strided, kw: usize) -> Result<Packed> {
    let epw = values_per_word(s.t.dtype());
    let packed = Packed::alloc(gpu, s.items, s.rows, s.k.div_ceil(epw), kw)?;
    // Sources aligned to multiples of 4 values are read as vec4: along K
    // (pack_rows4) or across 4 rows (pack_cols4).
    let aligned = s.item_stride.is_multiple_of(4);
    let (entry, src_slot, dst_slot, words_per_invocation, rows_per_invocation) =
        if aligned && s.k_stride == 1 && s.row_stride.is_multiple_of(4) {
            ("pack_rows4", 3, 4, 4, 1)
        } else if aligned && s.row_stride == 1 && s.k_stride.is_multiple_of(4) {
            ("pack_cols4", 3, 2, 1, 4)
        } else {
            ("pack_rows", 1, 2, 1, 1)
        };
    let k = Kernel {
        op: "matmul",
        source: SOURCE,
        entry,
        dtype: s.t.dtype(),
        constants: vec![("PACKED_F16", (epw == 2) as u8 as f64)],
    };
    let rb = packed.rows_per_block();
    let base = PackParams {
        rows: s.rows as u32,
        k: s.k as u32,
        src_off: 0,
        src_bstride: s.item_stride as u32,
        row_stride: s.row_stride as u32,
        k_stride: s.k_stride as u32,
        kw: kw as u32,
        rb: rb as u32,
        kw_shift: kw.trailing_zeros(),
        rb_shift: rb.trailing_zeros(),
        n_rb: packed.n_rb as u32,
        n_kc: packed.n_kc as u32,
        row0: 0,
        dst_base: 0,
        grid_rows: 0,
        _pad: 0,
    };
    // Only the words that hold values are written: the rest of a new buffer
    // is zero, as padding must be.
    // pack_rows4's workgroups are 8 invocations along K by 4 rows; the
    // others' 32 invocations along K by 1 row.
    let (group_x, group_rows) = if entry == "pack_rows4" {
        (PACK_ROWS4_GROUP.0, PACK_ROWS4_GROUP.1)
    } else {
        (PACK_GROUP, 1)
    };
    let groups_x = packed.k_words.div_ceil(group_x * words_per_invocation) as u32;
    let item_words = packed.n_rb * packed.n_kc * BLOCK_WORDS;
    let all_blocks = s.items * packed.n_rb * packed.n_kc;
    let rows_per_dispatch = MAX_GROUPS / rb * rb;
    if s.t.fits_binding(gpu)
        && all_blocks as u64 * BLOCK_BYTES <= gpu.max_binding_bytes()
        && s.items <= MAX_GROUPS
    {
        let dst = packed.blocks(0, all_blocks);
        for row0 in (0..s.rows).step_by(rows_per_dispatch) {
            let rows = rows_per_dispatch.min(s.rows - row0);
            let p = PackParams {
                row0: row0 as u32,
                src_off: (row0 * s.row_stride) as u32,
                grid_rows: rows as u32,
                ..base
            };
            let groups = [
                groups_x,
                rows.div_ceil(rows_per_invocation * group_rows) as u32,
                s.items as u32,
            ];
            let bindings = [(src_slot, s.t.binding()), (dst_slot, dst)];
            gpu.dispatch(&k, params_bytes(&p), &bindings, groups)?;
        }
        return Ok(packed);
    }
    // One dispatch per row block of each item, over a window of the source.
    let max = Tensor::max_window_elems(gpu, s.t.dtype());
    for z in 0..s.items {
        for r in 0..packed.n_rb {
            let valid = rb.min(s.rows.saturating_sub(r * rb));
            let start = z * s.item_stride + r * rb * s.row_stride;
            let count =
                valid.saturating_sub(1) * s.row_stride + s.k.saturating_sub(1) * s.k_stride + 1;
            if count > max {
                return Err(EngineError::BindingTooLarge {
                    op: "matmul",
                    bytes: count as u64 * s.t.dtype().size_bytes(),
                    limit: gpu.max_binding_bytes(),
                });
            }
            let (src, src_off) = s.t.window(gpu, start, count.min(s.t.numel() - start));
            let first = (z * packed.n_rb + r) * packed.n_kc;
            // The kernel places item 0's rows; wrapping arithmetic moves them to item z.
            let p = PackParams {
                row0: (r * rb) as u32,
                src_off,
                dst_base: ((first * BLOCK_WORDS) as u32).wrapping_sub((z * item_words) as u32),
                grid_rows: valid as u32,
                ..base
            };
            let dst = packed.blocks(first, packed.n_kc);
            let groups = [
                groups_x,
                valid.div_ceil(rows_per_invocation * group_rows) as u32,
                1,
            ];
            let bindings = [(src_slot, src), (dst_slot, dst)];
            gpu.dispatch(&k, params_bytes(&p), &bindings, groups)?;
        }
    }
    Ok(packed)
}

/// `s` packed with `kw` words per block row: on every call, or, for a
/// constant tensor (a weight), on the first and kept with the tensor.
fn packed_operand(gpu: &Gpu, s: &Strided, kw: usize) -> Result<Arc<Packed>> {
    if !s.t.is_constant() {
        return pack_rows(gpu, s, kw).map(Arc::new);
    }
    let layout = vec![
        s.items,
        s.rows,
        s.k,
        s.item_stride,
        s.row_stride,
        s.k_stride,
        kw,
    ];
    s.t.derived(("matmul pack_rows", layout), || pack_rows(gpu, s, kw))
}

/// A product of packed operands: `a` holds the rows, `b` the columns, both
/// packed along K with the same block shape. Item z uses a's item z (or 0
/// when shared) and b's likewise; out[z, i, j] is at
/// `out_base + z * out_item_stride + i * ldo + (j / col_group) *
/// col_group_stride + j % col_group` (one group of columns, `col_group` = n,
/// but for conv2d's batch items side by side).
pub(crate) struct PackedProduct<'a> {
    pub a: &'a Packed,
    pub b: &'a Packed,
    pub a_shared: bool,
    pub b_shared: bool,
    pub items: usize,
    pub m: usize,
    pub n: usize,
    pub out: &'a Tensor,
    pub out_base: usize,
    pub out_item_stride: usize,
    pub ldo: usize,
    pub col_group: usize,
    pub col_group_stride: usize,
    /// Whether both operands hold two f16 values per word (else one f32):
    /// the output's dtype but for conv2d's f32 weights against f16 input.
    pub packed_f16: bool,
}

impl PackedProduct<'_> {
    /// Where column `j` lies in `out`, relative to column 0.
    fn out_column(&self, j: usize) -> usize {
        (j / self.col_group) * self.col_group_stride + j % self.col_group
    }
}

/// Records gemm_packed over every tile and pass of K.
pub(crate) fn gemm_packed(gpu: &Gpu, g: &PackedProduct, e: &Epilogue) -> Result<()> {
    let (a, b) = (g.a, g.b);
    debug_assert_eq!((a.kw, a.n_kc, a.k_words), (b.kw, b.n_kc, b.k_words));
    let dtype = g.out.dtype();
    let packed_rows = packed_rows(a.k_words);
    let k = Kernel {
        op: "matmul",
        source: SOURCE,
        entry: "gemm_packed",
        dtype,
        constants: vec![
            ("ACT", e.activation.code()),
            ("PACKED_F16", g.packed_f16 as u8 as f64),
            ("ROW_GROUPS", (packed_rows / 8) as f64),
            ("GEGLU", e.geglu as u8 as f64),
        ],
    };
    let rb = a.rows_per_block();
    let kw4 = a.kw / 4;
    let passes = a.n_kc.div_ceil(CHUNKS_PER_PASS);
    let max = Tensor::max_window_elems(gpu, dtype);
    // Two buffers for the partial sums of a tile between passes, taking turns.
    // (Each pass writes what the next reads: old contents do not matter.)
    let partials: Vec<Packed> = if passes > 1 {
        debug_assert!(
            rb * rb <= BLOCK_WORDS,
            "packed_row_words keeps such tiles small"
        );
        (0..2)
            .map(|_| Packed::alloc(gpu, 1, 1, 1, BLOCK_WORDS))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    for z in 0..g.items {
        let za = if g.a_shared { 0 } else { z };
        let zb = if g.b_shared { 0 } else { z };
        for i in 0..g.m.div_ceil(rb) {
            for j in 0..g.n.div_ceil(rb) {
                let cols = rb.min(g.n - j * rb);
                let partial_ld = cols.next_multiple_of(PACKED_COLS);
                let tile_rows = rb.min(g.m - i * rb);
                // Rows of the tile per dispatch: all of them unless their
                // window of `out` (rows far apart, as conv2d's channels) is
                // over the binding limit.
                // GEGLU writes column x / 2 of the value columns x (those of
                // every other group of 4), and no column of the gates.
                let (first_col, col_span) = if e.geglu {
                    (j * rb / 2, cols / 2)
                } else {
                    let first = g.out_column(j * rb);
                    (first, g.out_column(j * rb + cols - 1) - first + 1)
                };
                let group_rows =
                    (max.saturating_sub(col_span) / g.ldo.max(1) + 1) / packed_rows * packed_rows;
                if col_span > max || group_rows == 0 {
                    return Err(EngineError::BindingTooLarge {
                        op: "matmul",
                        bytes: ((packed_rows - 1) * g.ldo + col_span) as u64 * dtype.size_bytes(),
                        limit: gpu.max_binding_bytes(),
                    });
                }
                for row0 in (0..tile_rows).step_by(group_rows) {
                    let rows = group_rows.min(tile_rows - row0);
                    let (o_start, o_count) = span(
                        g.out_base + z * g.out_item_stride,
                        g.ldo,
                        i * rb + row0,
                        first_col,
                        rows,
                        col_span,
                    );
                    let (ob, out_off) = g.out.window(gpu, o_start, o_count);
                    let (bias0, bias_count) = if e.bias_per_row {
                        (i * rb + row0, rows)
                    } else {
                        (j * rb, cols)
                    };
                    let unused = a.block(za, i, 0);
                    let (biasb, bias_off) = bias_window(gpu, e, bias0, bias_count, unused);
                    let (resb, res_off) = e.residual_window(gpu, o_start, o_count, unused);
                    for pass in 0..passes {
                        let first = pass * CHUNKS_PER_PASS;
                        let nch = CHUNKS_PER_PASS.min(a.n_kc - first);
                        let last_words =
                            a.k_words.saturating_sub((first + nch - 1) * a.kw).min(a.kw);
                        // Unused partial slots get buffers the pass does not otherwise bind.
                        let partial_in = if pass > 0 {
                            partials[(pass - 1) % 2].blocks(0, 1)
                        } else {
                            unused
                        };
                        let partial_out = if pass + 1 < passes {
                            partials[pass % 2].blocks(0, 1)
                        } else {
                            ob
                        };
                        let mut bindings = vec![
                            (3, biasb),
                            (4, ob),
                            (17, partial_in),
                            (18, partial_out),
                            (19, resb),
                            // The same windows, read and written as vec4s.
                            (20, ob),
                            (21, resb),
                        ];
                        for c in 0..CHUNKS_PER_PASS {
                            // Unused slots repeat the first chunk; the kernel skips them.
                            let kc = first + if c < nch { c } else { 0 };
                            bindings.push((5 + c as u32, a.block(za, i, kc)));
                            bindings.push((11 + c as u32, b.block(zb, j, kc)));
                        }
                        let p = Params {
                            m: rows as u32,
                            n: cols as u32,
                            bias_off,
                            out_off,
                            ldo: g.ldo as u32,
                            accumulate: (pass > 0) as u32,
                            finish: (pass + 1 == passes) as u32,
                            kw4: kw4 as u32,
                            nch: nch as u32,
                            klast4: last_words.div_ceil(4) as u32,
                            row0: row0 as u32,
                            partial_ld: partial_ld as u32,
                            col0: (j * rb) as u32,
                            col_group: g.col_group as u32,
                            col_group_stride: g.col_group_stride as u32,
                            ..e.params(res_off)
                        };
                        gpu.dispatch(
                            &k,
                            params_bytes(&p),
                            &bindings,
                            [
                                cols.div_ceil(PACKED_COLS) as u32,
                                rows.div_ceil(packed_rows) as u32,
                                1,
                            ],
                        )?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn run_packed(
    gpu: &Gpu,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
    d: &Dims,
    e: &Epilogue,
    kw: usize,
) -> Result<()> {
    let pa = packed_operand(
        gpu,
        &Strided {
            t: a,
            items: d.batch,
            rows: d.m,
            k: d.k,
            item_stride: d.m * d.k,
            row_stride: d.k,
            k_stride: 1,
        },
        kw,
    )?;
    run_packed_with(gpu, &pa, b, out, d, e, kw)
}

/// [`run_packed`] with `a` already packed.
fn run_packed_with(
    gpu: &Gpu,
    pa: &Packed,
    b: &Tensor,
    out: &Tensor,
    d: &Dims,
    e: &Epilogue,
    kw: usize,
) -> Result<()> {
    let b_items = if d.b_batched { d.batch } else { 1 };
    let (row_stride, k_stride) = if d.transpose_b { (d.k, 1) } else { (1, d.n) };
    let pb = packed_operand(
        gpu,
        &Strided {
            t: b,
            items: b_items,
            rows: d.n,
            k: d.k,
            item_stride: d.k * d.n,
            row_stride,
            k_stride,
        },
        kw,
    )?;
    let product = PackedProduct {
        a: pa,
        b: &pb,
        a_shared: false,
        b_shared: !d.b_batched,
        items: d.batch,
        m: d.m,
        n: d.n,
        out,
        out_base: 0,
        out_item_stride: d.m * d.n,
        ldo: d.n,
        col_group: d.n,
        col_group_stride: 0,
        packed_f16: out.dtype() == DType::F16,
    };
    gemm_packed(gpu, &product, e)
}

/// CPU reference of [`matmul`] in f64 accumulation. Shapes as in
/// [`matmul`]; `bias` and `residual` hold the values of the bias and the
/// residual (`opts.bias` and `opts.residual` are not read).
pub fn matmul_reference(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
    opts: &MatmulOptions,
) -> Vec<f32> {
    let r = a_shape.len();
    let (m, k) = (a_shape[r - 2], a_shape[r - 1]);
    let rb = b_shape.len();
    let n = if opts.transpose_b {
        b_shape[rb - 2]
    } else {
        b_shape[rb - 1]
    };
    let batch: usize = a_shape[..r - 2].iter().product();
    let b_stride = if rb > 2 { k * n } else { 0 };
    let mut out = Vec::with_capacity(batch * m * n);
    for z in 0..batch {
        for i in 0..m {
            for j in 0..n {
                let mut dot = 0f64;
                for kk in 0..k {
                    let bv = if opts.transpose_b {
                        b[z * b_stride + j * k + kk]
                    } else {
                        b[z * b_stride + kk * n + j]
                    };
                    dot += a[(z * m + i) * k + kk] as f64 * bv as f64;
                }
                let mut v = dot * opts.alpha as f64;
                if let Some(bias) = bias {
                    v += bias[j] as f64;
                }
                let mut v = opts.activation.apply_reference(v) * opts.scale as f64;
                if let Some(residual) = residual {
                    v += opts.residual_scale as f64 * residual[out.len()] as f64;
                }
                out.push(v as f32);
            }
        }
    }
    out
}
