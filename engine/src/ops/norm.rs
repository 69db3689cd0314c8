//! Normalisation operators (`shaders/norm.wgsl`): GroupNorm with PyTorch's
//! semantics, its frames-pooling variant for AnimateDiff's motion modules, and
//! LayerNorm over the last dim. Statistics are accumulated in f32 with
//! per-invocation Welford moments combined pairwise (Chan et al.), so a large
//! mean never cancels the variance away. Tensors larger than one storage
//! binding are processed in windows of whole batch items (rows for LayerNorm).

use bytemuck::{Pod, Zeroable};

use super::{check_dtypes, params_bytes, windows};
use crate::error::{EngineError, Result};
use crate::gpu::{grid_1d, Binding, Gpu, Kernel};
use crate::tensor::{fmt_shape, DType, Tensor};

const SOURCE: &str = include_str!("../../../shaders/norm.wgsl");
/// Rows (invocations) per workgroup of `layer_norm_rows4`: 8 SIMD batches of
/// llvmpipe's 8 lanes, which need no barrier between them.
const ROWS_WG: usize = 64;
/// Mirrors `FINALIZE_WG` of the shader.
const FINALIZE_WG: usize = 64;

/// The two workgroup shapes of the row-reducing kernels (the norms here and
/// softmax); see `shape` for why each adapter gets its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReductionKernel {
    /// 8 invocations, each with many values (CPU adapters).
    Narrow,
    /// 256 invocations (GPUs).
    Wide,
}

/// Workgroup shape: invocations, values per invocation in group_stats and in
/// group_apply.
#[derive(Clone, Copy)]
struct Shape {
    wg: usize,
    stats_per: usize,
    apply_per: usize,
}

/// llvmpipe ends every loop of an invocation once it has run 65535 loop
/// iterations in all (gallivm's `LP_MAX_TGSI_LOOP_ITERATIONS`), silently;
/// kernels for CPU adapters stay below this many.
pub(crate) const CPU_LOOP_BUDGET: usize = 60_000;

/// The kernel for this adapter, given how many loop iterations one
/// invocation of the narrow kernel would run: narrow on CPU adapters unless
/// that is past llvmpipe's loop limit.
pub(crate) fn default_reduction_kernel(gpu: &Gpu, narrow_iterations: usize) -> ReductionKernel {
    if gpu.adapter().is_cpu && narrow_iterations <= CPU_LOOP_BUDGET {
        ReductionKernel::Narrow
    } else {
        ReductionKernel::Wide
    }
}

/// The shape for this adapter. llvmpipe runs a workgroup as batches of 8
/// SIMD lanes and switches between the batches at every barrier, so on CPU
/// adapters a workgroup is one batch; it also loads per lane even what all
/// lanes share, so each invocation normalises many values per load of its
/// row's statistics. GPUs want wide workgroups.
fn shape(kernel: ReductionKernel) -> Shape {
    match kernel {
        ReductionKernel::Narrow => Shape {
            wg: 8,
            stats_per: 32,
            apply_per: 64,
        },
        ReductionKernel::Wide => Shape {
            wg: 256,
            stats_per: 16,
            apply_per: 16,
        },
    }
}

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    rows: u32,
    x_off: u32,
    out_off: u32,
    eps: f32,
    flags: u32,
    len: u32,
    segs: u32,
    seg_stride: u32,
    chunks: u32,
    groups: u32,
    channels: u32,
    cg: u32,
    spatial: u32,
    apply_chunks: u32,
    channel_rows: u32,
    final_off: u32,
    chunk_len: u32,
    apply_len: u32,
    _pad: [u32; 2],
}

fn norm_kernel(entry: &'static str, dtype: DType, wg: usize, silu: bool) -> Kernel {
    let mut constants = Vec::new();
    if entry != "group_finalize" {
        constants.push(("WG", wg as f64));
    }
    if entry.starts_with("group_apply") {
        constants.push(("SILU", f64::from(u8::from(silu))));
    }
    Kernel {
        op: "norm",
        source: SOURCE,
        entry,
        dtype,
        constants,
    }
}

/// Checks that an optional affine parameter has shape `[len]` and x's dtype.
fn check_affine(
    op: &'static str,
    what: &str,
    x: &Tensor,
    t: Option<&Tensor>,
    len: usize,
) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    if t.shape() != [len] {
        return Err(EngineError::Shape {
            op,
            expected: format!("{what} of shape [{len}] for input {}", fmt_shape(x.shape())),
            found: fmt_shape(t.shape()),
        });
    }
    check_dtypes(op, &[x, t]).map(|_| ())
}

fn affine_flags(gamma: Option<&Tensor>, beta: Option<&Tensor>) -> u32 {
    u32::from(gamma.is_some()) | (u32::from(beta.is_some()) << 1)
}

/// How a group norm sees its input: `items` batch items, each `frames`
/// consecutive rows of `[channels, spatial]`, statistics over one item's
/// frames x (channels of a group) x spatial.
struct GroupLayout {
    items: usize,
    frames: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
}

/// Shape checks shared by both group norms; returns (channels, spatial).
fn check_group_norm(
    op: &'static str,
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
) -> Result<(usize, usize)> {
    if x.rank() < 2 {
        return Err(EngineError::Shape {
            op,
            expected: "input [N, C, *spatial] of rank >= 2".into(),
            found: fmt_shape(x.shape()),
        });
    }
    let channels = x.shape()[1];
    if groups == 0 || !channels.is_multiple_of(groups) {
        return Err(EngineError::Shape {
            op,
            expected: format!("a channel count divisible by {groups} groups"),
            found: fmt_shape(x.shape()),
        });
    }
    check_affine(op, "gamma", x, gamma, channels)?;
    check_affine(op, "beta", x, beta, channels)?;
    Ok((channels, x.shape()[2..].iter().product()))
}

/// Whether a group norm's statistics take one dispatch, a workgroup per
/// group row looping over the row's `per_row` chunks (`group_stats_rows`),
/// instead of a workgroup per chunk and a finalize pass: on the narrow
/// (CPU adapter) shape, with enough rows to share among the CPU's threads
/// and a loop within llvmpipe's budget (per chunk: `stats_per` values, the
/// reduction's steps, the chunk itself).
fn by_rows(wg: usize, stats_per: usize, rows: usize, per_row: usize) -> bool {
    const MIN_ROWS: usize = 32;
    let per_chunk = stats_per + wg.trailing_zeros() as usize + 1;
    wg == shape(ReductionKernel::Narrow).wg
        && rows >= MIN_ROWS
        && per_row * per_chunk <= CPU_LOOP_BUDGET
}

/// PyTorch GroupNorm: x [N, C, *spatial] (any number of trailing dims, e.g.
/// (B, C, F, H, W) pools over frames too), gamma/beta `[C]` optional (affine),
/// statistics over each (n, group) of C/groups channels x spatial; optional
/// fused SiLU after the affine.
pub fn group_norm(
    gpu: &Gpu,
    x: &Tensor,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let op = "group_norm";
    run_group_norm(gpu, op, x, 1, groups, gamma, beta, eps, silu, None)
}

/// The same normalisation for x laid out [B*F, C, H, W] (frames as batch
/// rows, row = b*F + f) with statistics pooled over all F frames of a group —
/// what diffusers' motion module computes on its 5-D (B, C, F, H, W) view —
/// without permuting. Output in x's layout.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_frames(
    gpu: &Gpu,
    x: &Tensor,
    frames: usize,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let op = "group_norm_frames";
    run_group_norm(gpu, op, x, frames, groups, gamma, beta, eps, silu, None)
}

/// [`group_norm_frames`] (`frames` = 1: [`group_norm`]) with a chosen kernel
/// shape; `None` picks the adapter's.
#[allow(clippy::too_many_arguments)]
pub fn group_norm_with(
    gpu: &Gpu,
    x: &Tensor,
    frames: usize,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    silu: bool,
    kernel: Option<ReductionKernel>,
) -> Result<Tensor> {
    let op = if frames == 1 {
        "group_norm"
    } else {
        "group_norm_frames"
    };
    run_group_norm(gpu, op, x, frames, groups, gamma, beta, eps, silu, kernel)
}

#[allow(clippy::too_many_arguments)]
fn run_group_norm(
    gpu: &Gpu,
    op: &'static str,
    x: &Tensor,
    frames: usize,
    groups: usize,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    silu: bool,
    kernel: Option<ReductionKernel>,
) -> Result<Tensor> {
    let (channels, spatial) = check_group_norm(op, x, groups, gamma, beta)?;
    if frames == 0 || !x.shape()[0].is_multiple_of(frames) {
        return Err(EngineError::Shape {
            op,
            expected: format!("a leading dim B*F divisible by {frames} frames"),
            found: fmt_shape(x.shape()),
        });
    }
    let l = GroupLayout {
        items: x.shape()[0] / frames,
        frames,
        channels,
        spatial,
        groups,
    };
    let out = Tensor::empty(gpu, x.shape(), x.dtype())?;
    if x.numel() == 0 {
        return Ok(out);
    }
    let cg = l.channels / l.groups;
    let seg_len = cg * l.spatial;
    let item_len = l.frames * l.channels * l.spatial;
    // The narrow kernel's longest loop is group_finalize's, over the chunks.
    let narrow = shape(ReductionKernel::Narrow);
    let narrow_loop = l.frames * seg_len.div_ceil(narrow.wg * narrow.stats_per);
    let Shape {
        wg,
        stats_per,
        apply_per,
    } = shape(kernel.unwrap_or_else(|| default_reduction_kernel(gpu, narrow_loop)));
    let (chunk_len, apply_len) = (wg * stats_per, wg * apply_per);
    let chunks = seg_len.div_ceil(chunk_len);
    let per_row = l.frames * chunks;
    let apply_chunks = l.spatial.div_ceil(apply_len);
    // Per item: chunk moments, then the rows' (mean, rstd).
    let stats_per_item = l.groups * (per_row + 1) * 2;

    let max_items = (Tensor::max_window_elems(gpu, x.dtype()) / item_len)
        .min(Tensor::max_window_elems(gpu, DType::F32) / stats_per_item);
    if max_items == 0 {
        return Err(EngineError::BindingTooLarge {
            op,
            bytes: (item_len as u64 * x.dtype().size_bytes())
                .max(stats_per_item as u64 * DType::F32.size_bytes()),
            limit: gpu.max_binding_bytes(),
        });
    }
    let windows = windows(op, l.items, 1, max_items, gpu.max_binding_bytes())?;
    let stats_items = windows.iter().map(|w| w.1).max().unwrap_or(1);
    let stats = Tensor::empty(gpu, &[stats_items * stats_per_item], DType::F32)?;

    let dtype = x.dtype();
    for (item0, items) in windows {
        let (xb, x_off) = x.window(gpu, item0 * item_len, items * item_len);
        let (ob, out_off) = out.window(gpu, item0 * item_len, items * item_len);
        let rows = items * l.groups;
        let p = Params {
            rows: rows as u32,
            x_off,
            out_off,
            eps,
            flags: affine_flags(gamma, beta),
            len: seg_len as u32,
            segs: l.frames as u32,
            seg_stride: (l.channels * l.spatial) as u32,
            chunks: chunks as u32,
            groups: l.groups as u32,
            channels: l.channels as u32,
            cg: cg as u32,
            spatial: l.spatial as u32,
            apply_chunks: apply_chunks as u32,
            channel_rows: (items * l.frames * l.channels) as u32,
            final_off: (rows * per_row * 2) as u32,
            chunk_len: chunk_len as u32,
            apply_len: apply_len as u32,
            _pad: [0; 2],
        };
        let sb = stats.binding();
        if by_rows(wg, stats_per, rows, per_row) {
            gpu.dispatch(
                &norm_kernel("group_stats_rows", dtype, wg, false),
                params_bytes(&p),
                &[(1, xb), (5, sb)],
                grid_1d(rows as u64),
            )?;
        } else {
            gpu.dispatch(
                &norm_kernel("group_stats", dtype, wg, false),
                params_bytes(&p),
                &[(1, xb), (5, sb)],
                grid_1d((rows * per_row) as u64),
            )?;
            gpu.dispatch(
                &norm_kernel("group_finalize", dtype, wg, false),
                params_bytes(&p),
                &[(5, sb)],
                grid_1d(rows.div_ceil(FINALIZE_WG) as u64),
            )?;
        }
        let gb = gamma.map_or(xb, Tensor::binding);
        let bb = beta.map_or(xb, Tensor::binding);
        // Whole vectors per channel row (S, the offsets, and the chunks of
        // apply_len, a multiple of 8): the vec4 form.
        let vector = [l.spatial as u32, x_off, out_off]
            .iter()
            .all(|v| v % 4 == 0);
        let apply = if vector {
            "group_apply4"
        } else {
            "group_apply"
        };
        gpu.dispatch(
            &norm_kernel(apply, dtype, wg, silu),
            params_bytes(&p),
            &[(1, xb), (2, gb), (3, bb), (4, ob), (5, sb)],
            grid_1d((items * l.frames * l.channels * apply_chunks) as u64),
        )?;
    }
    Ok(out)
}

/// LayerNorm over the last dim D: x `[..., D]`, gamma/beta `[D]` optional.
pub fn layer_norm(
    gpu: &Gpu,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
) -> Result<Tensor> {
    layer_norm_with(gpu, x, gamma, beta, eps, None)
}

/// [`layer_norm`] with a chosen kernel shape; `None` picks the adapter's.
pub fn layer_norm_with(
    gpu: &Gpu,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    kernel: Option<ReductionKernel>,
) -> Result<Tensor> {
    last_dim_norm(gpu, "layer_norm", x, gamma, Some(beta), eps, kernel)
}

/// The norms over the last dim D of x [..., D], one workgroup per row, rows
/// in windows of what one binding holds: `layer_norm` (with its optional
/// beta: `beta` is `Some`) and `rms_norm` (no beta binding: `None`), the
/// entry point named `op`.
fn last_dim_norm(
    gpu: &Gpu,
    op: &'static str,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<Option<&Tensor>>,
    eps: f32,
    kernel: Option<ReductionKernel>,
) -> Result<Tensor> {
    let d = match x.shape().last() {
        Some(&d) if d > 0 => d,
        _ => {
            return Err(EngineError::Shape {
                op,
                expected: "input [..., D] with D >= 1".into(),
                found: fmt_shape(x.shape()),
            })
        }
    };
    check_affine(op, "gamma", x, gamma, d)?;
    let beta_tensor = beta.flatten();
    check_affine(op, "beta", x, beta_tensor, d)?;
    let out = Tensor::empty(gpu, x.shape(), x.dtype())?;
    let rows = x.numel() / d;
    let max_rows = Tensor::max_window_elems(gpu, x.dtype()) / d;
    if max_rows == 0 {
        return Err(EngineError::BindingTooLarge {
            op,
            bytes: d as u64 * x.dtype().size_bytes(),
            limit: gpu.max_binding_bytes(),
        });
    }
    // The statistics and apply loops walk d / WG values each.
    let kernel = kernel.unwrap_or_else(|| default_reduction_kernel(gpu, d / 4));
    let wg = shape(kernel).wg;
    for (row0, n) in windows(op, rows, 1, max_rows, gpu.max_binding_bytes())? {
        let (xb, x_off) = x.window(gpu, row0 * d, n * d);
        let (ob, out_off) = out.window(gpu, row0 * d, n * d);
        // The narrow kernel's layer norm, a row per invocation and vec4
        // accesses, where the row and the offsets hold whole vectors; the
        // row kernel's loops run 3 · d / 4 iterations, far below llvmpipe's
        // limit wherever the narrow kernel was chosen (d / 4 below it).
        let rows4 = op == "layer_norm"
            && kernel == ReductionKernel::Narrow
            && d % 8 == 0
            && [x_off, out_off].iter().all(|v| v % 4 == 0)
            && 3 * (d / 4) <= CPU_LOOP_BUDGET;
        let (k, grid) = if rows4 {
            let k = norm_kernel("layer_norm_rows4", x.dtype(), ROWS_WG, false);
            (k, grid_1d(n.div_ceil(ROWS_WG) as u64))
        } else {
            (norm_kernel(op, x.dtype(), wg, false), grid_1d(n as u64))
        };
        let p = Params {
            rows: n as u32,
            x_off,
            out_off,
            eps,
            flags: affine_flags(gamma, beta_tensor),
            len: d as u32,
            ..Params::default()
        };
        let gb: Binding = gamma.map_or(xb, Tensor::binding);
        let mut bindings = vec![(1, xb), (2, gb), (4, ob)];
        if beta.is_some() {
            bindings.push((3, beta_tensor.map_or(xb, Tensor::binding)));
        }
        gpu.dispatch(&k, params_bytes(&p), &bindings, grid)?;
    }
    Ok(out)
}

/// Mean and 1/sqrt(var + eps) of one group's values in f64, with the biased
/// (population) variance that PyTorch normalises with.
fn normalize_reference(values: &[f64], eps: f32) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps as f64).sqrt())
}

fn affine_reference(
    v: f64,
    c: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    silu: bool,
) -> f32 {
    let mut v = v * gamma.map_or(1.0, |g| g[c] as f64) + beta.map_or(0.0, |b| b[c] as f64);
    if silu {
        v /= 1.0 + (-v).exp();
    }
    v as f32
}

/// CPU reference of [`group_norm`]: x row-major with shape [N, C, *spatial].
pub fn group_norm_reference(
    x: &[f32],
    shape: &[usize],
    groups: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let (n, c) = (shape[0], shape[1]);
    group_norm_frames_reference(
        x,
        &[n, c, shape[2..].iter().product()],
        1,
        groups,
        gamma,
        beta,
        eps,
        silu,
    )
}

/// CPU reference of [`group_norm_frames`]: x row-major [B*F, C, *spatial].
#[allow(clippy::too_many_arguments)]
pub fn group_norm_frames_reference(
    x: &[f32],
    shape: &[usize],
    frames: usize,
    groups: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let (rows, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let cg = c / groups;
    let mut out = vec![0f32; x.len()];
    for b in 0..rows / frames {
        for g in 0..groups {
            let index = |f: usize, ch: usize, i: usize| ((b * frames + f) * c + ch) * s + i;
            let mut values = Vec::with_capacity(frames * cg * s);
            for f in 0..frames {
                for ch in g * cg..(g + 1) * cg {
                    values.extend((0..s).map(|i| x[index(f, ch, i)] as f64));
                }
            }
            let (mean, rstd) = normalize_reference(&values, eps);
            for f in 0..frames {
                for ch in g * cg..(g + 1) * cg {
                    for i in 0..s {
                        let k = index(f, ch, i);
                        out[k] =
                            affine_reference((x[k] as f64 - mean) * rstd, ch, gamma, beta, silu);
                    }
                }
            }
        }
    }
    out
}

/// CPU reference of [`layer_norm`]: rows of `d` values.
pub fn layer_norm_reference(
    x: &[f32],
    d: usize,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|row| {
            let values: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            let (mean, rstd) = normalize_reference(&values, eps);
            values
                .into_iter()
                .enumerate()
                .map(move |(i, v)| affine_reference((v - mean) * rstd, i, gamma, beta, false))
        })
        .collect()
}

/// Invocations per channel_sumsq / channel_rms_apply workgroup; mirrors
/// `RMS_WG` of the shader.
const RMS_WG: usize = 64;

/// diffusers' `WanRMS_norm` (the Wan VAE's norm) with a channel-first input:
/// x [N, C, *spatial] → `F.normalize(x, dim=1) · √C · gamma + beta`, i.e.
/// every position's channel vector divided by max(its L2 norm, `eps`)
/// (PyTorch's `F.normalize` floor is 1e-12), gamma/beta `[C]` optional,
/// optional fused SiLU (the VAE always applies it after norm1/norm2/norm_out).
/// Sums of squares in f32. A window holds whole items, or a block of one
/// item's channels when an item is larger than one binding.
pub fn channel_rms_norm(
    gpu: &Gpu,
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let op = "channel_rms_norm";
    if x.rank() < 2 || x.shape()[1] == 0 {
        return Err(EngineError::Shape {
            op,
            expected: "input [N, C, *spatial] with C >= 1".into(),
            found: fmt_shape(x.shape()),
        });
    }
    let (items, channels) = (x.shape()[0], x.shape()[1]);
    let spatial: usize = x.shape()[2..].iter().product();
    check_affine(op, "gamma", x, gamma, channels)?;
    check_affine(op, "beta", x, beta, channels)?;
    let out = Tensor::empty(gpu, x.shape(), x.dtype())?;
    if x.numel() == 0 {
        return Ok(out);
    }
    let item_len = channels * spatial;
    let max = Tensor::max_window_elems(gpu, x.dtype());
    let max_stats = Tensor::max_window_elems(gpu, DType::F32);
    if spatial > max || spatial > max_stats {
        return Err(EngineError::BindingTooLarge {
            op,
            bytes: spatial as u64 * 4,
            limit: gpu.max_binding_bytes(),
        });
    }
    // (first item, items, first channel, channels) of every window.
    let mut windows = Vec::new();
    if item_len <= max {
        let per = (max / item_len).min(max_stats / spatial).max(1);
        for n0 in (0..items).step_by(per) {
            windows.push((n0, per.min(items - n0), 0, channels));
        }
    } else {
        let block = max / spatial;
        for n in 0..items {
            for c0 in (0..channels).step_by(block) {
                windows.push((n, 1, c0, block.min(channels - c0)));
            }
        }
    }
    let stats_len = windows.iter().map(|w| w.1).max().unwrap_or(1) * spatial;
    let stats = Tensor::empty(gpu, &[stats_len], DType::F32)?;
    let kernel = |entry, constants| Kernel {
        op: "norm",
        source: SOURCE,
        entry,
        dtype: x.dtype(),
        constants,
    };
    let sumsq = kernel("channel_sumsq", vec![]);
    let apply = kernel(
        "channel_rms_apply",
        vec![("SILU", f64::from(u8::from(silu)))],
    );
    let params = |&(n0, n, c0, cb): &(usize, usize, usize, usize), accumulate: bool| {
        let start = n0 * item_len + c0 * spatial;
        let count = (n - 1) * item_len + cb * spatial;
        (start, count, {
            Params {
                rows: n as u32,
                eps,
                flags: affine_flags(gamma, beta) | (u32::from(accumulate) << 2),
                len: channels as u32,
                channels: cb as u32,
                spatial: spatial as u32,
                seg_stride: item_len as u32,
                final_off: c0 as u32,
                ..Params::default()
            }
        })
    };
    // All sums of one item's channel blocks come before any of its blocks
    // is normalised: windows of one item are consecutive.
    let mut i = 0;
    while i < windows.len() {
        let item = windows[i].0;
        let end = windows[i..]
            .iter()
            .position(|w| w.0 != item)
            .map_or(windows.len(), |k| i + k);
        for (k, w) in windows[i..end].iter().enumerate() {
            let (start, count, p) = params(w, k > 0);
            let (xb, x_off) = x.window(gpu, start, count);
            let p = Params { x_off, ..p };
            gpu.dispatch(
                &sumsq,
                params_bytes(&p),
                &[(1, xb), (5, stats.binding())],
                grid_1d(((w.1 * spatial) as u64).div_ceil(RMS_WG as u64)),
            )?;
        }
        for w in &windows[i..end] {
            let (start, count, p) = params(w, false);
            let (xb, x_off) = x.window(gpu, start, count);
            let (ob, out_off) = out.window(gpu, start, count);
            let p = Params {
                x_off,
                out_off,
                ..p
            };
            let gb: Binding = gamma.map_or(xb, Tensor::binding);
            let bb: Binding = beta.map_or(xb, Tensor::binding);
            gpu.dispatch(
                &apply,
                params_bytes(&p),
                &[(1, xb), (2, gb), (3, bb), (4, ob), (5, stats.binding())],
                grid_1d(((w.1 * w.3 * spatial) as u64).div_ceil(RMS_WG as u64)),
            )?;
        }
        i = end;
    }
    Ok(out)
}

/// CPU reference of [`channel_rms_norm`]: x row-major [N, C, *spatial].
pub fn channel_rms_norm_reference(
    x: &[f32],
    shape: &[usize],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let (n, c) = (shape[0], shape[1]);
    let s: usize = shape[2..].iter().product();
    let scale = (c as f64).sqrt();
    let mut out = vec![0f32; x.len()];
    for item in 0..n {
        for pos in 0..s {
            let index = |ch: usize| (item * c + ch) * s + pos;
            let norm = (0..c)
                .map(|ch| (x[index(ch)] as f64).powi(2))
                .sum::<f64>()
                .sqrt()
                .max(eps as f64);
            for ch in 0..c {
                let v = x[index(ch)] as f64 / norm * scale;
                out[index(ch)] = affine_reference(v, ch, gamma, beta, silu);
            }
        }
    }
    out
}

/// RMSNorm over the last dim D (T5/UMT5's `T5LayerNorm`, `torch.nn.RMSNorm`):
/// `x / sqrt(mean(x²) + eps) · gamma`, no mean subtracted and no bias; the
/// mean of squares in f32. x `[..., D]`, gamma `[D]` optional.
pub fn rms_norm(gpu: &Gpu, x: &Tensor, gamma: Option<&Tensor>, eps: f32) -> Result<Tensor> {
    rms_norm_with(gpu, x, gamma, eps, None)
}

/// [`rms_norm`] with a chosen kernel shape; `None` picks the adapter's.
pub fn rms_norm_with(
    gpu: &Gpu,
    x: &Tensor,
    gamma: Option<&Tensor>,
    eps: f32,
    kernel: Option<ReductionKernel>,
) -> Result<Tensor> {
    last_dim_norm(gpu, "rms_norm", x, gamma, None, eps, kernel)
}

/// CPU reference of [`rms_norm`] in f64: rows of `d` values.
pub fn rms_norm_reference(x: &[f32], d: usize, gamma: Option<&[f32]>, eps: f32) -> Vec<f32> {
    x.chunks(d)
        .flat_map(|row| {
            let mean_sq = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            let rstd = 1.0 / (mean_sq + eps as f64).sqrt();
            row.iter()
                .enumerate()
                .map(move |(i, &v)| (v as f64 * rstd * gamma.map_or(1.0, |g| g[i] as f64)) as f32)
        })
        .collect()
}
