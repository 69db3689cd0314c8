//! 2-D convolution (`shaders/conv2d.wgsl`), NCHW like PyTorch's nn.Conv2d,
//! with any kernel size, stride, asymmetric zero padding, bias, a fused
//! activation and optionally a fused residual (a resnet's shortcut). GPUs
//! run a tiled implicit matrix product; CPU adapters pack input taps and
//! weights for matmul's packed kernel (`shaders/matmul.wgsl` says why), or,
//! for 3x3 convolutions with few input channels, run a direct kernel
//! (ops/conv2d_direct.rs).
//! Tensors larger than one storage binding run in windows: of batch items,
//! output channels, output rows and input channels (tiled), of output rows
//! and channel blocks (packed).
//!
//! The weights may be f32 against f16 activations (every other operand f16):
//! for models whose weights rounded to f16 alone cost more accuracy than the
//! f16 budget allows (the Wan VAE). The tiled and packed kernels take them;
//! the tensor-core kernel does not, so such convolutions take the tiled one.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use super::conv2d_direct::{direct_fits, run_direct, DirectDims};
use super::coop;
use super::matmul::{
    check_residual, gemm_packed, packed_row_words, packed_supported, values_per_word, Epilogue,
    Packed, PackedProduct, BLOCK_WORDS,
};
use super::matmul_coop::{self as mc, CoopPlan, CoopProduct, CoopTiling, FragmentMath};
use super::route::{self, Route};
use super::{check_dtypes, params_bytes, Activation};
use crate::error::{EngineError, Result};
use crate::gpu::tuning::KernelName;
use crate::gpu::{Binding, DType, Gpu, Kernel};
use crate::tensor::{fmt_shape, Tensor};

/// The shader with weights stored as the activations are, and with f32
/// weights (`wst`, see the shader's header). WGSL declarations may come in
/// any order, so the alias can precede the prelude's `st`.
const SOURCE: &str = concat!(
    "alias wst = st;\n",
    include_str!("../../../shaders/conv2d.wgsl")
);
const SOURCE_F32_WEIGHTS: &str = concat!(
    "alias wst = f32;\n",
    include_str!("../../../shaders/conv2d.wgsl")
);

/// The shader source and its name in the kernel cache (which keeps one
/// module per name and activation dtype) for these operands.
fn source_for(x: &Tensor, weight: &Tensor) -> (&'static str, &'static str) {
    if mixed(x, weight) {
        ("conv2d_f32_weights", SOURCE_F32_WEIGHTS)
    } else {
        ("conv2d", SOURCE)
    }
}

/// Whether the weights are f32 against f16 activations (the one mix
/// check_conv allows).
fn mixed(x: &Tensor, weight: &Tensor) -> bool {
    x.dtype() == DType::F16 && weight.dtype() == DType::F32
}

/// The most elements one window of any operand may hold: the limit of the
/// wider dtype where the weights are f32 and the activations f16.
fn max_window(gpu: &Gpu, x: &Tensor, weight: &Tensor) -> usize {
    Tensor::max_window_elems(gpu, x.dtype()).min(Tensor::max_window_elems(gpu, weight.dtype()))
}
const MAX_GROUPS: usize = 65535;

/// The parameter block of a convolution's dispatch: the shader's Params,
/// which is matmul.wgsl's layout with the convolution's geometry in the
/// fields only gemm_packed reads (see shaders/matmul_coop.wgsl). The product is `a` = the weight window
/// `[channels, depth * kh * kw]` times the implicit `b` of the input window
/// (`n` = output pixels of `rows` whole rows starting at `oy0`).
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct ConvParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub batch: u32,
    pub a_off: u32,
    pub b_off: u32,
    pub bias_off: u32,
    pub out_off: u32,
    pub a_bstride: u32,
    pub b_bstride: u32,
    pub o_bstride: u32,
    pub lda: u32,
    pub ldb: u32,
    pub ldo: u32,
    pub alpha: f32,
    pub has_bias: u32,
    pub accumulate: u32,
    pub finish: u32,
    pub h: u32,
    pub w: u32,
    pub taps: u32,
    pub kw: u32,
    pub stride: u32,
    pub pad_l: u32,
    pub pad_t: u32,
    pub wo: u32,
    pub oy0: u32,
    pub res_off: u32,
    pub has_residual: u32,
    pub scale: f32,
    pub residual_scale: f32,
    pub _pad0: u32,
}

/// Options of [`conv2d`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dOptions {
    pub stride: usize,
    /// Zero padding: left, right, top, bottom.
    pub padding: [usize; 4],
    pub activation: Activation,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions {
            stride: 1,
            padding: [0; 4],
            activation: Activation::None,
        }
    }
}

impl Conv2dOptions {
    /// Symmetric `(kernel - 1) / 2` padding: the output keeps the input's size
    /// at stride 1 (diffusers' `padding=1` for 3x3 convolutions).
    pub fn same(kernel: usize, stride: usize) -> Self {
        let pad = kernel.saturating_sub(1) / 2;
        Conv2dOptions {
            stride,
            padding: [pad; 4],
            activation: Activation::None,
        }
    }
}

/// Which kernel computes the convolution. `Auto` picks by adapter; the others
/// exist so that tests and benchmarks run every kernel on any adapter.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conv2dKernel {
    Auto,
    /// Workgroup-memory tiles straight from the storage buffers (GPUs).
    Tiled,
    /// Input taps and weights packed into uniform-buffer blocks, multiplied
    /// by matmul's packed kernel (CPU adapters).
    Packed,
    /// Tensor cores: matmul's coop kernel as an implicit product, in the
    /// tiled kernel's windows (f16 on adapters with cooperative matrices).
    Coop,
    /// 3x3, stride 1, padding 1 read straight from the input, 4 pixels x 8
    /// channels per invocation (`shaders/conv2d_direct.wgsl`; CPU adapters,
    /// rows a multiple of 4 wide).
    Direct,
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    batch: u32,
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    ho: u32,
    wo: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad_l: u32,
    pad_t: u32,
    oy0: u32,
    rows: u32,
    x_off: u32,
    w_off: u32,
    bias_off: u32,
    out_off: u32,
    x_bstride: u32,
    o_bstride: u32,
    w_stride: u32,
    has_bias: u32,
    accumulate: u32,
    finish: u32,
    res_off: u32,
    has_residual: u32,
    scale: f32,
    residual_scale: f32,
}

/// The convolution's sizes after validation.
#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    cin: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
}

/// The output shape `[N, Cout, Ho, Wo]` of a convolution, or `None` if the
/// padded input is smaller than the kernel or the stride is 0.
pub fn conv2d_output_shape(
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    opts: &Conv2dOptions,
) -> Option<[usize; 4]> {
    let [n, _, h, w] = x_shape;
    let [cout, _, kh, kw] = w_shape;
    let [l, r, t, b] = opts.padding;
    if opts.stride == 0 || kh == 0 || kw == 0 || h + t + b < kh || w + l + r < kw {
        return None;
    }
    Some([
        n,
        cout,
        (h + t + b - kh) / opts.stride + 1,
        (w + l + r - kw) / opts.stride + 1,
    ])
}

fn check_conv(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
) -> Result<Dims> {
    let op = "conv2d";
    let mut tensors = vec![x];
    tensors.extend(bias);
    check_dtypes(op, &tensors)?;
    // The weights as the input, or f32 against f16 (see the module's header).
    if weight.dtype() != x.dtype() && !mixed(x, weight) {
        return Err(EngineError::DType {
            op,
            expected: format!("a weight in {} (or f32 against f16 input)", x.dtype()),
            found: weight.dtype().to_string(),
        });
    }
    let (xs, ws) = match (x.shape(), weight.shape()) {
        (&[n, c, h, w], &[co, ci, kh, kw]) if ci == c => ([n, c, h, w], [co, ci, kh, kw]),
        _ => {
            return Err(EngineError::Shape {
                op,
                expected: "x [N, Cin, H, W] and weight [Cout, Cin, kh, kw] with equal Cin".into(),
                found: format!(
                    "x {} and weight {}",
                    fmt_shape(x.shape()),
                    fmt_shape(weight.shape())
                ),
            })
        }
    };
    let [n, cout, ho, wo] =
        conv2d_output_shape(xs, ws, opts).ok_or_else(|| EngineError::Shape {
            op,
            expected: format!(
                "a stride >= 1 and a kernel no larger than the padded input (padding {:?})",
                opts.padding
            ),
            found: format!(
                "x {}, weight {}, stride {}",
                fmt_shape(x.shape()),
                fmt_shape(weight.shape()),
                opts.stride
            ),
        })?;
    if let Some(bias) = bias {
        if bias.shape() != [cout] {
            return Err(EngineError::Shape {
                op,
                expected: format!("bias of shape [{cout}]"),
                found: fmt_shape(bias.shape()),
            });
        }
    }
    Ok(Dims {
        n,
        cin: xs[1],
        h: xs[2],
        w: xs[3],
        cout,
        kh: ws[2],
        kw: ws[3],
        ho,
        wo,
    })
}

/// Output pixels and channels of one conv2d_tiled workgroup.
const TILE: usize = 64;

/// `act(conv(x, weight) + bias)`: `x [N, Cin, H, W]`, `weight [Cout, Cin, kh, kw]`,
/// `bias [Cout]` → `[N, Cout, Ho, Wo]`.
pub fn conv2d(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
) -> Result<Tensor> {
    conv2d_with_kernel(gpu, x, weight, bias, opts, Conv2dKernel::Auto)
}

/// A residual added in [`conv2d`]'s epilogue: `(act(conv + bias) + residual)
/// · scale`, diffusers' `(input_tensor + hidden_states) /
/// output_scale_factor` at the end of a `ResnetBlock2D` with `scale` =
/// 1 / output_scale_factor. `residual` has the output's shape.
#[derive(Debug, Clone, Copy)]
pub struct Conv2dResidual<'a> {
    pub residual: &'a Tensor,
    pub scale: f32,
}

/// [`conv2d`] with a residual fused into the store.
pub fn conv2d_residual(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
    residual: &Conv2dResidual,
) -> Result<Tensor> {
    conv2d_residual_with_kernel(
        gpu,
        x,
        weight,
        bias,
        opts,
        Some(residual),
        Conv2dKernel::Auto,
    )
}

/// How the convolution is cut into dispatches: `items` whole batch items at
/// a time, or per item windows of `channels` output channels x `rows` output
/// rows over `depth` input channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tiling {
    items: usize,
    channels: usize,
    rows: usize,
    depth: usize,
}

/// Input rows that `rows` output rows read.
fn input_rows(d: &Dims, stride: usize, rows: usize) -> usize {
    ((rows - 1) * stride + d.kh).min(d.h)
}

/// Picks windows of at most `max` elements of `elem_bytes` each.
fn tiling(d: &Dims, stride: usize, max: usize, elem_bytes: u64) -> Result<Tiling> {
    let plane = d.h * d.w;
    let taps = d.kh * d.kw;
    let (x_item, o_item, w_all) = (d.cin * plane, d.cout * d.ho * d.wo, d.cout * d.cin * taps);
    let max_rows = (MAX_GROUPS * TILE / d.wo).max(1);
    if x_item <= max && o_item <= max && w_all <= max && d.ho <= max_rows {
        let items = (max / x_item.max(1))
            .min(max / o_item)
            .min(d.n)
            .min(MAX_GROUPS);
        return Ok(Tiling {
            items,
            channels: d.cout,
            rows: d.ho,
            depth: d.cin,
        });
    }
    let too_large = |elems: usize| EngineError::BindingTooLarge {
        op: "conv2d",
        bytes: elems as u64 * elem_bytes,
        limit: max as u64 * elem_bytes,
    };
    // Output rows first (one row of one channel must fit), then input
    // channels, then output channels.
    let mut rows = (max / d.wo).min(d.ho).min(max_rows);
    while rows > 0 && input_rows(d, stride, rows) * d.w > max {
        rows -= 1;
    }
    if rows == 0 {
        return Err(too_large(d.wo.max(d.kh.min(d.h) * d.w)));
    }
    let in_span = input_rows(d, stride, rows) * d.w;
    if taps > max {
        return Err(too_large(taps));
    }
    let depth = ((max - in_span) / plane.max(1) + 1)
        .min(max / taps)
        .min(d.cin);
    let channels = ((max - depth * taps) / (d.cin * taps).max(1) + 1)
        .min((max - rows * d.wo) / (d.ho * d.wo) + 1)
        .min(d.cout)
        .min(MAX_GROUPS * TILE);
    Ok(Tiling {
        items: 1,
        channels,
        rows,
        depth,
    })
}

/// [`conv2d`] with a chosen kernel (for tests and benchmarks).
#[doc(hidden)]
pub fn conv2d_with_kernel(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
    kernel: Conv2dKernel,
) -> Result<Tensor> {
    conv2d_residual_with_kernel(gpu, x, weight, bias, opts, None, kernel)
}

/// [`conv2d_residual`] with a chosen kernel (for tests and benchmarks).
#[doc(hidden)]
pub fn conv2d_residual_with_kernel(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
    residual: Option<&Conv2dResidual>,
    kernel: Conv2dKernel,
) -> Result<Tensor> {
    let d = check_conv(x, weight, bias, opts)?;
    let out_shape = [d.n, d.cout, d.ho, d.wo];
    if let Some(r) = residual {
        check_dtypes("conv2d", &[x, r.residual])?;
        check_residual("conv2d", Some(r.residual), &out_shape)?;
    }
    let e = conv_epilogue(bias, opts, residual);
    let out = Tensor::empty(gpu, &out_shape, x.dtype())?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let direct = direct_shape(gpu, x, opts, &d);
    if kernel == Conv2dKernel::Direct {
        let Some(dd) = direct else {
            return Err(EngineError::Argument {
                op: "conv2d",
                message: format!(
                    "the direct kernel takes 3x3 convolutions with stride 1 and padding 1 \
                     whose rows are a multiple of 4 wide, an item and its output each in one \
                     binding, on an adapter with 64 KiB uniform bindings (this one: weight {}, \
                     input {}, stride {}, padding {:?}, adapter {})",
                    fmt_shape(weight.shape()),
                    fmt_shape(x.shape()),
                    opts.stride,
                    opts.padding,
                    gpu.adapter().name
                ),
            });
        };
        run_direct(gpu, x, weight, &e, &dd, &out)?;
        return Ok(out);
    }
    // Tensor cores where routing sends the convolution (ops/route.rs).
    let class = route::conv2d_class(x.dtype(), d.cout, d.cin, [d.kh, d.kw], d.ho * d.wo);
    let plan = CoopPlan {
        tiling: mc::tuned_tiling(gpu, "conv2d", &class)?,
        product: CoopProduct::Conv,
        activation: opts.activation,
        math: FragmentMath::Coop,
    };
    let asked = match kernel {
        Conv2dKernel::Auto | Conv2dKernel::Direct => None,
        Conv2dKernel::Tiled => Some(KernelName::Tiled),
        Conv2dKernel::Packed => Some(KernelName::Packed),
        Conv2dKernel::Coop => Some(KernelName::Coop),
    };
    let request = route::Request {
        op: "conv2d",
        class,
        dtype: x.dtype(),
        asked,
        // The tensor-core kernel multiplies f16 matrices only: f32 weights
        // (the Wan VAE's in f16 mode) take a portable kernel.
        coop: if mixed(x, weight) {
            None
        } else {
            Some(plan.kernel(gpu, true)?)
        },
        coop_missing: mixed(x, weight).then(|| {
            format!(
                "f16 weights (this convolution has input {}, weight {})",
                x.dtype(),
                weight.dtype()
            )
        }),
        coop_by_default: true,
    };
    let kernel = match route::route(gpu, request)? {
        Route::Coop(_) => {
            run_tiled(gpu, x, weight, &e, opts, &d, &out, Some(&plan))?;
            return Ok(out);
        }
        Route::Portable(Some(KernelName::Tiled)) => Conv2dKernel::Tiled,
        // A tuned choice only where the operands can be packed (below).
        Route::Portable(Some(KernelName::Packed)) => Conv2dKernel::Packed,
        Route::Portable(_) => Conv2dKernel::Auto,
    };
    // The one choice between the two kernels, for the reasons given in
    // shaders/matmul.wgsl: CPU adapters read storage buffers an order of
    // magnitude slower than uniform buffers, GPUs want workgroup-memory tiles.
    // An item larger than one binding takes the tiled kernel, which splits it.
    let max = max_window(gpu, x, weight);
    let packable =
        packed_supported(gpu) && d.cin * d.h * d.w <= max && weight.numel() <= max && x.numel() > 0;
    // CPU adapters: the direct kernel where it beats the packed product.
    if kernel == Conv2dKernel::Auto && packed_supported(gpu) {
        if let Some(dd) = direct.filter(direct_wins) {
            run_direct(gpu, x, weight, &e, &dd, &out)?;
            return Ok(out);
        }
    }
    let packed = match kernel {
        Conv2dKernel::Auto | Conv2dKernel::Direct => packable,
        Conv2dKernel::Tiled | Conv2dKernel::Coop => false,
        Conv2dKernel::Packed if asked.is_none() => packable,
        Conv2dKernel::Packed => {
            if !packable {
                return Err(EngineError::Argument {
                    op: "conv2d",
                    message: format!(
                        "the packed kernel needs a CPU adapter with 8-lane subgroups and \
                         64 KiB uniform bindings, and an input item and weight that each fit \
                         a binding (adapter {})",
                        gpu.adapter().name
                    ),
                });
            }
            true
        }
    };
    if packed {
        match run_packed(gpu, x, weight, &e, opts, &d, &out) {
            // The packed taps of one output row must fit 64 MiB; a wider
            // convolution takes the tiled kernel, which splits anything.
            // What was recorded before the error wrote only the packed
            // buffers or outputs that the tiled kernel writes again.
            Err(EngineError::BindingTooLarge { .. }) if asked.is_none() => {
                run_tiled(gpu, x, weight, &e, opts, &d, &out, None)?
            }
            other => other?,
        }
    } else {
        run_tiled(gpu, x, weight, &e, opts, &d, &out, None)?;
    }
    Ok(out)
}

/// The direct kernel's sizes where it takes the convolution at all.
fn direct_shape(gpu: &Gpu, x: &Tensor, opts: &Conv2dOptions, d: &Dims) -> Option<DirectDims> {
    let dd = DirectDims {
        n: d.n,
        cin: d.cin,
        h: d.h,
        w: d.w,
        cout: d.cout,
    };
    (d.kh == 3
        && d.kw == 3
        && opts.stride == 1
        && opts.padding == [1; 4]
        && direct_fits(gpu, x, &dd))
    .then_some(dd)
}

/// Where the direct kernel is faster than tap packing and the packed
/// product on lavapipe (docs/PERFORMANCE.md, issue 22; 16 frames, GPU time):
/// 0.18-0.64x the packed path's for conv_in (4 -> 64 at 16x16), 64 -> 64 at
/// 16x16 and the 32-channel ones at 128x128, 0.8-0.9x at 64 -> 64 32x32 and
/// 64 -> 32 128x128, about even for 64 -> 64 at 64x64 and 128x128, where it
/// still saves most of the dispatches. Past 64 input channels a weight block
/// holds fewer output channels, so the input is read more often.
fn direct_wins(d: &DirectDims) -> bool {
    d.cin <= 64 && d.w >= 16
}

/// The store of a convolution: bias per output channel, activation, and
/// the residual block's `(conv + residual) * scale`.
fn conv_epilogue<'a>(
    bias: Option<&'a Tensor>,
    opts: &Conv2dOptions,
    residual: Option<&Conv2dResidual<'a>>,
) -> Epilogue<'a> {
    Epilogue {
        alpha: 1.0,
        bias,
        bias_per_row: true,
        activation: opts.activation,
        scale: residual.map_or(1.0, |r| r.scale),
        residual: residual.map(|r| r.residual),
        residual_scale: residual.map_or(1.0, |r| r.scale),
        geglu: false,
    }
}

/// [`conv2d_residual`] on one tensor-core variant, or its portable twin,
/// exactly as given (no routing): for the variant tests and checks.
/// Refused with [`EngineError::KernelUnavailable`] where the variant cannot
/// run here (f16 operands and weights; its workgroup within the adapter's
/// limits; a tiling whose columns divide its invocations).
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn conv2d_coop_variant(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    opts: &Conv2dOptions,
    residual: Option<&Conv2dResidual>,
    tiling: &CoopTiling,
    math: FragmentMath,
) -> Result<Tensor> {
    let d = check_conv(x, weight, bias, opts)?;
    let out_shape = [d.n, d.cout, d.ho, d.wo];
    if let Some(r) = residual {
        check_dtypes("conv2d", &[x, r.residual])?;
        check_residual("conv2d", Some(r.residual), &out_shape)?;
    }
    check_dtypes("conv2d", &[x, weight])?;
    let plan = CoopPlan {
        tiling: *tiling,
        product: CoopProduct::Conv,
        activation: opts.activation,
        math,
    };
    plan.check_runs(gpu, x.dtype())?;
    let out = Tensor::empty(gpu, &out_shape, x.dtype())?;
    if out.numel() == 0 {
        return Ok(out);
    }
    let e = conv_epilogue(bias, opts, residual);
    run_tiled(gpu, x, weight, &e, opts, &d, &out, Some(&plan))?;
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
fn run_tiled(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    e: &Epilogue,
    opts: &Conv2dOptions,
    d: &Dims,
    out: &Tensor,
    coop: Option<&CoopPlan>,
) -> Result<()> {
    let max = max_window(gpu, x, weight);
    let elem_bytes = x.dtype().size_bytes().max(weight.dtype().size_bytes());
    let t = tiling(d, opts.stride, max, elem_bytes)?;
    let (op, source) = source_for(x, weight);
    let k = Kernel {
        op,
        source,
        entry: "conv2d_tiled",
        dtype: x.dtype(),
        constants: vec![("ACT", opts.activation.code())],
    };
    let plane = d.h * d.w;
    let taps = d.kh * d.kw;
    let out_plane = d.ho * d.wo;
    let (x_item, o_item) = (d.cin * plane, d.cout * out_plane);
    let empty_input = x.numel() == 0;
    let ci_chunks: Vec<usize> = (0..d.cin.max(1)).step_by(t.depth.max(1)).collect();
    for z0 in (0..d.n).step_by(t.items) {
        let items = t.items.min(d.n - z0);
        for co0 in (0..d.cout).step_by(t.channels) {
            let channels = t.channels.min(d.cout - co0);
            for oy0 in (0..d.ho).step_by(t.rows) {
                let rows = t.rows.min(d.ho - oy0);
                // Input rows this window reads, clamped to the input.
                let first = (oy0 * opts.stride)
                    .saturating_sub(opts.padding[2])
                    .min(d.h.saturating_sub(1));
                let last = ((oy0 + rows - 1) * opts.stride + d.kh)
                    .saturating_sub(opts.padding[2])
                    .min(d.h)
                    .max(first + 1);
                for (chunk, &ci0) in ci_chunks.iter().enumerate() {
                    let depth = t.depth.min(d.cin - ci0);
                    let extra = items - 1;
                    let x_start = z0 * x_item + ci0 * plane + first * d.w;
                    let x_count = (depth.max(1) - 1) * plane + (last - first) * d.w;
                    let w_start = co0 * d.cin * taps + ci0 * taps;
                    let w_count = (channels - 1) * d.cin * taps + depth.max(1) * taps;
                    // An empty input has nothing to window: the output is the bias.
                    let ((xb, x_off), (wb, w_off)) = if empty_input {
                        ((x.binding(), 0), (weight.binding(), 0))
                    } else {
                        (
                            x.window(gpu, x_start, x_count + extra * x_item),
                            weight.window(gpu, w_start, w_count),
                        )
                    };
                    let o_start = z0 * o_item + co0 * out_plane + oy0 * d.wo;
                    let o_count = (channels - 1) * out_plane + rows * d.wo;
                    let (ob, out_off) = out.window(gpu, o_start, o_count + extra * o_item);
                    let (bb, bias_off): (Binding, u32) = match e.bias {
                        Some(b) => b.window(gpu, co0, channels),
                        // Unused by the kernel, but every binding needs a buffer.
                        None => (wb, 0),
                    };
                    let (rb, res_off): (Binding, u32) = match e.residual {
                        Some(r) => r.window(gpu, o_start, o_count + extra * o_item),
                        None => (wb, 0),
                    };
                    let p = Params {
                        batch: items as u32,
                        cin: depth as u32,
                        h: d.h as u32,
                        w: d.w as u32,
                        cout: channels as u32,
                        ho: d.ho as u32,
                        wo: d.wo as u32,
                        kh: d.kh as u32,
                        kw: d.kw as u32,
                        stride: opts.stride as u32,
                        pad_l: opts.padding[0] as u32,
                        pad_t: opts.padding[2] as u32,
                        oy0: oy0 as u32,
                        rows: rows as u32,
                        // The shader indexes from row 0 and channel 0 of the
                        // window; wrapping arithmetic brings it back in range.
                        x_off: x_off.wrapping_sub((first * d.w) as u32),
                        w_off,
                        bias_off,
                        out_off: out_off.wrapping_sub((oy0 * d.wo) as u32),
                        x_bstride: x_item as u32,
                        o_bstride: o_item as u32,
                        w_stride: (d.cin * taps) as u32,
                        has_bias: e.bias.is_some() as u32,
                        accumulate: (chunk > 0) as u32,
                        finish: (chunk + 1 == ci_chunks.len()) as u32,
                        res_off: res_off.wrapping_sub((oy0 * d.wo) as u32),
                        has_residual: e.residual.is_some() as u32,
                        scale: e.scale,
                        residual_scale: e.residual_scale,
                    };
                    if let Some(plan) = coop {
                        // The same window as a product: a = the weights, b
                        // = the input taps; offsets from the window's start.
                        let c = ConvParams {
                            m: channels as u32,
                            n: (rows * d.wo) as u32,
                            k: (depth * taps) as u32,
                            batch: items as u32,
                            a_off: w_off,
                            b_off: p.x_off,
                            bias_off,
                            out_off,
                            a_bstride: 0,
                            b_bstride: x_item as u32,
                            o_bstride: o_item as u32,
                            lda: (d.cin * taps) as u32,
                            ldb: 0,
                            ldo: out_plane as u32,
                            alpha: 1.0,
                            has_bias: p.has_bias,
                            accumulate: p.accumulate,
                            finish: p.finish,
                            h: p.h,
                            w: p.w,
                            taps: taps as u32,
                            kw: p.kw,
                            stride: p.stride,
                            pad_l: p.pad_l,
                            pad_t: p.pad_t,
                            wo: p.wo,
                            oy0: p.oy0,
                            res_off,
                            has_residual: p.has_residual,
                            scale: p.scale,
                            residual_scale: p.residual_scale,
                            _pad0: 0,
                        };
                        let groups = [
                            (rows * d.wo).div_ceil(plan.tiling.tile_n() as usize) as u32,
                            channels.div_ceil(plan.tiling.tile_m() as usize) as u32,
                            items as u32,
                        ];
                        // matmul_coop's slots: the weight is `a` (1), the input `b` (2).
                        let bindings = [(1, wb), (2, xb), (3, bb), (4, ob), (19, rb)];
                        // Chunked weight loads where the window allows them
                        // (the input is gathered one value at a time).
                        let aligned = mc::aligned(plan.tiling.load, c.a_off, c.lda, 0, c.k);
                        let kernel = plan.kernel(gpu, aligned)?;
                        coop::dispatch(gpu, &kernel, params_bytes(&c), &bindings, groups)?;
                        continue;
                    }
                    gpu.dispatch(
                        &k,
                        params_bytes(&p),
                        &[(1, xb), (2, wb), (3, bb), (4, ob), (19, rb)],
                        [
                            (rows * d.wo).div_ceil(TILE) as u32,
                            channels.div_ceil(TILE) as u32,
                            items as u32,
                        ],
                    )?;
                }
            }
        }
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PackParams {
    cin: u32,
    h: u32,
    w: u32,
    wo: u32,
    rows: u32,
    oy0: u32,
    pad_l: u32,
    pad_t: u32,
    x_off: u32,
    cw: u32,
    row_words: u32,
    rb: u32,
    words_shift: u32,
    rb_shift: u32,
    n_kc: u32,
    row0: u32,
    dst_base: u32,
    /// pack_taps4: columns of the padded input the band reads.
    padded_w: u32,
    /// pack_taps4: elements of x between the items of its z.
    x_item: u32,
}

/// The largest packed operand (bytes), bound whole as one storage buffer
/// while it is written: 64 MiB.
const MAX_PACKED_BYTES: u64 = 1 << 26;
/// Invocations per pack_taps / pack_weights workgroup, along channels.
const PACK_GROUP: usize = 32;

/// The CPU-adapter path (see shaders/conv2d.wgsl): the weights are packed
/// (once per call, or once for good when they are a constant tensor), then
/// per group of batch items, or per band of output rows of one item, the
/// input taps are packed and multiplied with them by matmul's gemm_packed.
fn run_packed(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    epilogue: &Epilogue,
    opts: &Conv2dOptions,
    d: &Dims,
    out: &Tensor,
) -> Result<()> {
    let dtype = x.dtype();
    // The packing: f32 words for both operands where the weights are f32.
    let packing = weight.dtype();
    let cw = d.cin.div_ceil(values_per_word(packing));
    let k_words = d.kh * d.kw * cw;
    let limit = MAX_PACKED_BYTES.min(gpu.max_binding_bytes());
    let packed_bytes = |rows: usize, row_words: usize| {
        let rb = BLOCK_WORDS / row_words;
        (rows.div_ceil(rb) * k_words.div_ceil(row_words)) as u64 * BLOCK_WORDS as u64 * 4
    };
    // The columns of one product: the output pixels of `items` whole batch
    // items side by side while their taps fit, else of a band of output rows
    // of one item. Small images (a UNet's inner levels, many frames) would
    // otherwise read all the weights once per item for a few columns each.
    let mut band = d.ho.min(MAX_GROUPS / opts.stride);
    let mut items = if band == d.ho { d.n } else { 1 };
    let mut row_words = packed_row_words(1, d.cout, items * band * d.wo, k_words);
    while items > 1 && packed_bytes(items * band * d.wo, row_words) > limit {
        items = items.div_ceil(2);
        row_words = packed_row_words(1, d.cout, items * band * d.wo, k_words);
    }
    while band > 1 && packed_bytes(band * d.wo, row_words) > limit {
        band = band.div_ceil(2);
        row_words = packed_row_words(1, d.cout, band * d.wo, k_words);
    }
    let columns = items * band * d.wo;
    // The weights are packed one row block (of output channels) at a time.
    let weight_block_bytes = packed_bytes(BLOCK_WORDS / row_words, row_words);
    if packed_bytes(columns, row_words).max(weight_block_bytes) > limit {
        return Err(EngineError::BindingTooLarge {
            op: "conv2d",
            bytes: packed_bytes(columns, row_words).max(weight_block_bytes),
            limit,
        });
    }
    let (op, source) = source_for(x, weight);
    let kernel = |entry| Kernel {
        op,
        source,
        entry,
        dtype,
        constants: vec![
            ("KH", d.kh as f64),
            ("KW", d.kw as f64),
            ("STRIDE", opts.stride as f64),
            ("PACKED_F16", (values_per_word(packing) == 2) as u8 as f64),
        ],
    };
    let taps = Packed::alloc(gpu, 1, columns, k_words, row_words)?;
    let params = |packed: &Packed| PackParams {
        cin: d.cin as u32,
        h: d.h as u32,
        w: d.w as u32,
        wo: d.wo as u32,
        rows: 0,
        oy0: 0,
        pad_l: opts.padding[0] as u32,
        pad_t: opts.padding[2] as u32,
        x_off: 0,
        cw: cw as u32,
        row_words: row_words as u32,
        rb: packed.rows_per_block() as u32,
        words_shift: row_words.trailing_zeros(),
        rb_shift: packed.rows_per_block().trailing_zeros(),
        n_kc: packed.k_chunks() as u32,
        row0: 0,
        dst_base: 0,
        padded_w: 0,
        x_item: 0,
    };
    let pack_weights = || -> Result<Packed> {
        let weights = Packed::alloc(gpu, 1, d.cout, k_words, row_words)?;
        let channel_groups = cw.div_ceil(PACK_GROUP) as u32;
        let pack_weights = kernel("pack_weights");
        let rb = weights.rows_per_block();
        for co0 in (0..d.cout).step_by(rb) {
            let first = co0 / rb * weights.k_chunks();
            let p = PackParams {
                row0: co0 as u32,
                dst_base: (first * BLOCK_WORDS) as u32,
                ..params(&weights)
            };
            let dst = weights.blocks(first, weights.k_chunks());
            let groups = [
                channel_groups,
                (d.kh * d.kw) as u32,
                rb.min(d.cout - co0) as u32,
            ];
            gpu.dispatch(
                &pack_weights,
                params_bytes(&p),
                &[(2, weight.binding()), (5, dst)],
                groups,
            )?;
        }
        Ok(weights)
    };
    let weights = if weight.is_constant() {
        let layout = vec![d.cout, d.cin, d.kh, d.kw, row_words];
        weight.derived(("conv2d pack_weights", layout), pack_weights)?
    } else {
        Arc::new(pack_weights()?)
    };
    let x_item = d.cin * d.h * d.w;
    let out_plane = d.ho * d.wo;
    // Four words of channels per invocation where they divide evenly.
    let (pack_taps, taps_slot, words_per_invocation) = if cw.is_multiple_of(4) {
        (kernel("pack_taps4"), 6, 4)
    } else {
        (kernel("pack_taps"), 5, 1)
    };
    for z0 in (0..d.n).step_by(items) {
        let group = items.min(d.n - z0);
        for oy0 in (0..d.ho).step_by(band) {
            let rows = band.min(d.ho - oy0);
            // Item z0 + i's taps are the packed rows from i * rows * wo.
            // The padded input the band reads: its columns and rows.
            let (padded_w, padded_h) = (
                (d.wo - 1) * opts.stride + d.kw,
                (rows - 1) * opts.stride + d.kh,
            );
            let band_params = |x_off: u32, row0: usize| PackParams {
                rows: rows as u32,
                oy0: oy0 as u32,
                x_off,
                row0: row0 as u32,
                padded_w: padded_w as u32,
                x_item: x_item as u32,
                ..params(&taps)
            };
            let dst = taps.blocks(0, taps.item_blocks());
            if words_per_invocation == 4 {
                // pack_taps4's workgroups span columns as well as channels:
                // along channels alone, the VAE's 32 or 64 (8 or 16 vectors)
                // left most of a workgroup's 32 lanes idle. Its z is the item:
                // one dispatch packs the band of every item whose input fits
                // one binding (one dispatch per item made pack_taps4 a quarter
                // of the UNet step's dispatches).
                let per_dispatch = (Tensor::max_window_elems(gpu, x.dtype()) / x_item).max(1);
                for i0 in (0..group).step_by(per_dispatch) {
                    let count = per_dispatch.min(group - i0);
                    let (xb, x_off) = x.window(gpu, (z0 + i0) * x_item, count * x_item);
                    let p = band_params(x_off, i0 * rows * d.wo);
                    let groups = [
                        (cw / 4 * padded_w).div_ceil(PACK_GROUP) as u32,
                        padded_h as u32,
                        count as u32,
                    ];
                    let bindings = [(1, xb), (taps_slot, dst)];
                    gpu.dispatch(&pack_taps, params_bytes(&p), &bindings, groups)?;
                }
            } else {
                for i in 0..group {
                    let (xb, x_off) = x.window(gpu, (z0 + i) * x_item, x_item);
                    let p = band_params(x_off, i * rows * d.wo);
                    let groups = [
                        cw.div_ceil(PACK_GROUP) as u32,
                        padded_w as u32,
                        padded_h as u32,
                    ];
                    let bindings = [(1, xb), (taps_slot, dst)];
                    gpu.dispatch(&pack_taps, params_bytes(&p), &bindings, groups)?;
                }
            }
            let product = PackedProduct {
                a: &weights,
                b: &taps,
                a_shared: true,
                b_shared: true,
                items: 1,
                m: d.cout,
                n: group * rows * d.wo,
                out,
                out_base: z0 * d.cout * out_plane + oy0 * d.wo,
                out_item_stride: 0,
                ldo: out_plane,
                col_group: rows * d.wo,
                col_group_stride: d.cout * out_plane,
                packed_f16: values_per_word(packing) == 2,
            };
            gemm_packed(gpu, &product, epilogue)?;
        }
    }
    Ok(())
}

/// CPU reference of [`conv2d`] in f64 accumulation.
pub fn conv2d_reference(
    x: &[f32],
    x_shape: [usize; 4],
    weight: &[f32],
    w_shape: [usize; 4],
    bias: Option<&[f32]>,
    opts: &Conv2dOptions,
) -> Vec<f32> {
    let [n, cin, h, w] = x_shape;
    let [_, _, kh, kw] = w_shape;
    let [_, cout, ho, wo] =
        conv2d_output_shape(x_shape, w_shape, opts).expect("reference called with valid shapes");
    let (pad_l, pad_t) = (opts.padding[0] as isize, opts.padding[2] as isize);
    let mut out = Vec::with_capacity(n * cout * ho * wo);
    for z in 0..n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut sum = bias.map_or(0.0, |b| b[co] as f64);
                    for ci in 0..cin {
                        for ky in 0..kh {
                            let iy = (oy * opts.stride + ky) as isize - pad_t;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * opts.stride + kx) as isize - pad_l;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((z * cin + ci) * h + iy as usize) * w + ix as usize];
                                let wv = weight[((co * cin + ci) * kh + ky) * kw + kx];
                                sum += xv as f64 * wv as f64;
                            }
                        }
                    }
                    out.push(opts.activation.apply_reference(sum) as f32);
                }
            }
        }
    }
    out
}
