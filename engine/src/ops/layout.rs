//! Data movement (`shaders/layout.wgsl`): permute, concat, nearest upsample,
//! and the named permutes between the layouts a video UNet moves through:
//! (B, C, F, H, W), (B·F, C, H, W) and (B·H·W, F, C).

use bytemuck::{Pod, Zeroable};

use super::{check_dtypes, params_bytes, windows};
use crate::error::{EngineError, Result};
use crate::gpu::{grid_1d, Binding, Gpu, Kernel};
use crate::tensor::{fmt_shape, Tensor};

const SOURCE: &str = include_str!("../../../shaders/layout.wgsl");
const WG: u64 = 256;
const MAX_RANK: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    n: u32,
    src_off: u32,
    dst_off: u32,
    rank: u32,
    a: [u32; MAX_RANK],
    b: [u32; MAX_RANK],
}

fn kernel(entry: &'static str, x: &Tensor) -> Kernel {
    Kernel {
        op: "layout",
        source: SOURCE,
        entry,
        dtype: x.dtype(),
        constants: vec![],
    }
}

/// One dispatch of a layout kernel: `src` at slot 1, `dst` at slot 2, one
/// invocation per output element.
fn run(
    gpu: &Gpu,
    k: &Kernel,
    p: &Params,
    src: Binding<'_>,
    dst: Binding<'_>,
    count: usize,
) -> Result<()> {
    gpu.dispatch(
        k,
        params_bytes(p),
        &[(1, src), (2, dst)],
        grid_1d((count as u64).div_ceil(WG)),
    )
}

fn params(n: usize, src_off: u32, dst_off: u32) -> Params {
    Params {
        n: n as u32,
        src_off,
        dst_off,
        rank: 0,
        a: [1; MAX_RANK],
        b: [0; MAX_RANK],
    }
}

/// Reorders dims: output dim `d` is input dim `perm[d]` (as `torch.permute`),
/// materialised contiguously.
pub fn permute(gpu: &Gpu, x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let rank = x.rank();
    let mut seen = vec![false; rank];
    let valid = perm.len() == rank
        && perm
            .iter()
            .all(|&p| p < rank && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(EngineError::Argument {
            op: "permute",
            message: format!(
                "{perm:?} is not a permutation of the {rank} dims of {}",
                fmt_shape(x.shape())
            ),
        });
    }
    let in_strides: Vec<usize> = (0..rank)
        .map(|d| x.shape()[d + 1..].iter().product())
        .collect();
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let out = Tensor::empty(gpu, &out_shape, x.dtype())?;
    // Drop size-1 dims, then merge runs of output dims that stay contiguous
    // in the input, so that every permute fits the kernel's 8 dims.
    let mut dims: Vec<(usize, usize)> = Vec::new(); // (size, input stride)
    for d in 0..rank {
        let (size, stride) = (out_shape[d], in_strides[perm[d]]);
        if size == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == stride * size => *last = (last.0 * size, stride),
            _ => dims.push((size, stride)),
        }
    }
    if dims.is_empty() {
        dims.push((1, 0));
    }
    if dims.len() > MAX_RANK {
        return Err(EngineError::Argument {
            op: "permute",
            message: format!(
                "permutation {perm:?} of {} needs more than {MAX_RANK} dims",
                fmt_shape(x.shape())
            ),
        });
    }
    // A permute that keeps dim 0 in place (and dim 0 is the outermost merged
    // dim) is independent per item of dim 0: split there when too large.
    let item = x.numel() / x.shape().first().copied().unwrap_or(1).max(1);
    let splittable = rank > 0 && perm[0] == 0 && dims[0].1 == item && dims[0].0 == x.shape()[0];
    // Four outputs per invocation where the innermost output dim comes in
    // fours (see permute4 in shaders/layout.wgsl).
    let by4 = dims.last().is_some_and(|&(size, _)| size.is_multiple_of(4));
    let k = kernel(if by4 { "permute4" } else { "permute" }, x);
    let ranges = if splittable {
        let max = Tensor::max_window_elems(gpu, x.dtype());
        windows("permute", x.numel(), item, max, gpu.max_binding_bytes())?
    } else {
        vec![(0, x.numel())]
    };
    for (start, n) in ranges {
        let (sb, src_off) = x.window(gpu, start, n);
        let (db, dst_off) = out.window(gpu, start, n);
        let mut p = params(n, src_off, dst_off);
        let mut local = dims.clone();
        if splittable {
            local[0].0 = n / item;
        }
        p.rank = local.len() as u32;
        for (d, &(size, stride)) in local.iter().enumerate() {
            p.a[d] = size as u32;
            p.b[d] = stride as u32;
        }
        if by4 && dst_off.is_multiple_of(4) {
            gpu.dispatch(
                &k,
                params_bytes(&p),
                &[(1, sb), (3, db), (4, sb)],
                grid_1d((n as u64 / 4).div_ceil(WG)),
            )?;
        } else {
            run(gpu, &kernel("permute", x), &p, sb, db, n)?;
        }
    }
    Ok(out)
}

/// Concatenates along `dim`; all other dims must match.
pub fn concat(gpu: &Gpu, tensors: &[&Tensor], dim: usize) -> Result<Tensor> {
    let first = tensors.first().ok_or_else(|| EngineError::Argument {
        op: "concat",
        message: "no tensors to concatenate".into(),
    })?;
    check_dtypes("concat", tensors)?;
    if dim >= first.rank() {
        return Err(EngineError::Argument {
            op: "concat",
            message: format!("dim {dim} is out of range for {}", fmt_shape(first.shape())),
        });
    }
    for t in tensors {
        let same = t.rank() == first.rank()
            && t.shape()
                .iter()
                .zip(first.shape())
                .enumerate()
                .all(|(d, (a, b))| d == dim || a == b);
        if !same {
            let mut expected = first.shape().to_vec();
            expected[dim] = t.shape().get(dim).copied().unwrap_or(0);
            return Err(EngineError::Shape {
                op: "concat",
                expected: format!(
                    "{} (all dims but {dim} equal to the first tensor's)",
                    fmt_shape(&expected)
                ),
                found: fmt_shape(t.shape()),
            });
        }
    }
    let outer: usize = first.shape()[..dim].iter().product();
    let inner: usize = first.shape()[dim + 1..].iter().product();
    let ct: usize = tensors.iter().map(|t| t.shape()[dim]).sum();
    let mut out_shape = first.shape().to_vec();
    out_shape[dim] = ct;
    let out = Tensor::empty(gpu, &out_shape, first.dtype())?;
    let k = kernel("copy_into", first);
    let max = Tensor::max_window_elems(gpu, first.dtype());
    // Windows of whole outer rows of the output (each row holds every input's slice).
    let row_windows = windows(
        "concat",
        outer * ct * inner,
        ct * inner,
        max,
        gpu.max_binding_bytes(),
    )?;
    let mut c0 = 0;
    for t in tensors {
        let cs = t.shape()[dim];
        for &(start, n) in &row_windows {
            let (o0, rows) = (start / (ct * inner), n / (ct * inner));
            let count = rows * cs * inner;
            if count == 0 {
                continue;
            }
            let (sb, src_off) = t.window(gpu, o0 * cs * inner, count);
            let (db, dst_off) = out.window(gpu, start, n);
            let mut p = params(count, src_off, dst_off);
            p.a[..4].copy_from_slice(&[cs as u32, inner as u32, ct as u32, c0 as u32]);
            run(gpu, &k, &p, sb, db, count)?;
        }
        c0 += cs;
    }
    Ok(out)
}

/// `x.narrow(dim, start, len)`, materialised: the slice `start..start+len`
/// of dim `dim` (e.g. the mean half of a VAE posterior's channels).
pub fn narrow(gpu: &Gpu, x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    if dim >= x.rank() || start + len > x.shape()[dim] || len == 0 {
        return Err(EngineError::Argument {
            op: "narrow",
            message: format!(
                "slice {start}..{} of dim {dim} is out of range for {}",
                start + len,
                fmt_shape(x.shape())
            ),
        });
    }
    let cs = x.shape()[dim];
    let outer: usize = x.shape()[..dim].iter().product();
    let inner: usize = x.shape()[dim + 1..].iter().product();
    let mut out_shape = x.shape().to_vec();
    out_shape[dim] = len;
    let out = Tensor::empty(gpu, &out_shape, x.dtype())?;
    let k = kernel("copy_from", x);
    let max = Tensor::max_window_elems(gpu, x.dtype());
    // Windows of whole outer rows of the input.
    for (start_in, n_in) in windows(
        "narrow",
        outer * cs * inner,
        cs * inner,
        max,
        gpu.max_binding_bytes(),
    )? {
        let (o0, rows) = (start_in / (cs * inner), n_in / (cs * inner));
        let count = rows * len * inner;
        let (sb, src_off) = x.window(gpu, start_in, n_in);
        let (db, dst_off) = out.window(gpu, o0 * len * inner, count);
        let mut p = params(count, src_off, dst_off);
        p.a[..4].copy_from_slice(&[cs as u32, inner as u32, len as u32, start as u32]);
        run(gpu, &k, &p, sb, db, count)?;
    }
    Ok(out)
}

/// Nearest upsampling of x [N, C, H, W] to [N, C, out_h, out_w] with
/// src = floor(dst · in / out): diffusers' `interpolate(..., size=skip.shape)`
/// when a latent size is not a multiple of the UNet's downsampling.
pub fn upsample_nearest(gpu: &Gpu, x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    if x.rank() != 4 || out_h == 0 || out_w == 0 {
        return Err(EngineError::Shape {
            op: "upsample_nearest",
            expected: format!("x [N, C, H, W] and a non-empty target size (got {out_h}x{out_w})"),
            found: fmt_shape(x.shape()),
        });
    }
    let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let out = Tensor::empty(gpu, &[n, c, out_h, out_w], x.dtype())?;
    let k = kernel("upsample_nearest", x);
    let planes = n * c;
    let plane_out = out_h * out_w;
    let max_planes = Tensor::max_window_elems(gpu, x.dtype()) / plane_out.max(h * w).max(1);
    for (p0, np) in windows(
        "upsample_nearest",
        planes,
        1,
        max_planes,
        gpu.max_binding_bytes(),
    )? {
        let (sb, src_off) = x.window(gpu, p0 * h * w, np * h * w);
        let (db, dst_off) = out.window(gpu, p0 * plane_out, np * plane_out);
        let count = np * plane_out;
        let mut p = params(count, src_off, dst_off);
        p.a[..4].copy_from_slice(&[h as u32, w as u32, out_h as u32, out_w as u32]);
        run(gpu, &k, &p, sb, db, count)?;
    }
    Ok(out)
}

fn check_frames(op: &'static str, x: &Tensor, frames: usize) -> Result<usize> {
    if x.rank() != 4 || frames == 0 || !x.shape()[0].is_multiple_of(frames) {
        return Err(EngineError::Shape {
            op,
            expected: format!("[B·F, C, H, W] with B·F a multiple of {frames} frames"),
            found: fmt_shape(x.shape()),
        });
    }
    Ok(x.shape()[0] / frames)
}

/// (B·F, C, H, W) → (B·H·W, F, C): the token layout of a motion module,
/// attention running over frames at each pixel.
pub fn frames_to_tokens(gpu: &Gpu, x: &Tensor, frames: usize) -> Result<Tensor> {
    let b = check_frames("frames_to_tokens", x, frames)?;
    let (c, h, w) = (x.shape()[1], x.shape()[2], x.shape()[3]);
    let y = permute(gpu, &x.reshape(&[b, frames, c, h, w])?, &[0, 3, 4, 1, 2])?;
    y.reshape(&[b * h * w, frames, c])
}

/// (B·H·W, F, C) → (B·F, C, H, W), the inverse of [`frames_to_tokens`].
pub fn tokens_to_frames(
    gpu: &Gpu,
    x: &Tensor,
    batch: usize,
    height: usize,
    width: usize,
) -> Result<Tensor> {
    if x.rank() != 3 || x.shape()[0] != batch * height * width {
        return Err(EngineError::Shape {
            op: "tokens_to_frames",
            expected: format!("[B·H·W = {}, F, C]", batch * height * width),
            found: fmt_shape(x.shape()),
        });
    }
    let (f, c) = (x.shape()[1], x.shape()[2]);
    let y = permute(
        gpu,
        &x.reshape(&[batch, height, width, f, c])?,
        &[0, 3, 4, 1, 2],
    )?;
    y.reshape(&[batch * f, c, height, width])
}

/// (B, C, F, H, W) → (B·F, C, H, W): a diffusers `UNetMotionModel` sample
/// into the per-frame layout its 2-D layers run on (row = b·F + f).
pub fn video_to_frames(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    if x.rank() != 5 {
        return Err(EngineError::Shape {
            op: "video_to_frames",
            expected: "[B, C, F, H, W]".into(),
            found: fmt_shape(x.shape()),
        });
    }
    let s = x.shape();
    let (b, c, f, h, w) = (s[0], s[1], s[2], s[3], s[4]);
    permute(gpu, x, &[0, 2, 1, 3, 4])?.reshape(&[b * f, c, h, w])
}

/// (B·F, C, H, W) → (B, C, F, H, W), the inverse of [`video_to_frames`].
pub fn frames_to_video(gpu: &Gpu, x: &Tensor, frames: usize) -> Result<Tensor> {
    let b = check_frames("frames_to_video", x, frames)?;
    let (c, h, w) = (x.shape()[1], x.shape()[2], x.shape()[3]);
    permute(gpu, &x.reshape(&[b, frames, c, h, w])?, &[0, 2, 1, 3, 4])
}

/// CPU reference of [`permute`].
pub fn permute_reference(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let rank = shape.len();
    let in_strides: Vec<usize> = (0..rank).map(|d| shape[d + 1..].iter().product()).collect();
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let n: usize = shape.iter().product();
    (0..n)
        .map(|i| {
            let mut rem = i;
            let mut s = 0;
            for d in (0..rank).rev() {
                s += (rem % out_shape[d]) * in_strides[perm[d]];
                rem /= out_shape[d];
            }
            x[s]
        })
        .collect()
}

/// CPU reference of [`upsample_nearest`] on [planes, h, w].
pub fn upsample_nearest_reference(
    x: &[f32],
    planes: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(planes * out_h * out_w);
    for p in 0..planes {
        for y in 0..out_h {
            for xx in 0..out_w {
                out.push(x[p * h * w + (y * h / out_h) * w + xx * w / out_w]);
            }
        }
    }
    out
}

/// Rows `start..start + len` of dim 0 (frames of a [T, C, H, W] clip):
/// [`narrow`] for a contiguous range, done by the device's buffer copy,
/// which no storage-binding limit applies to (one full-size video chunk
/// exceeds a 128 MiB binding). Ranges whose bytes are not 4-aligned (odd
/// f16 element counts, small tensors) take [`narrow`].
pub fn narrow_rows(gpu: &Gpu, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    if x.rank() == 0 || start + len > x.shape()[0] || len == 0 {
        return narrow(gpu, x, 0, start, len);
    }
    let row = x.numel() / x.shape()[0];
    let bytes = |rows: usize| (rows * row) as u64 * x.dtype().size_bytes();
    if bytes(1) % wgpu::COPY_BUFFER_ALIGNMENT != 0 {
        return narrow(gpu, x, 0, start, len);
    }
    let mut shape = x.shape().to_vec();
    shape[0] = len;
    let out = Tensor::empty(gpu, &shape, x.dtype())?;
    if !gpu.is_plan() {
        gpu.record(|enc| {
            enc.copy_buffer_to_buffer(x.buffer(), bytes(start), out.buffer(), 0, bytes(len))
        });
    }
    Ok(out)
}

/// [`concat`] along dim 0 by buffer copies (see [`narrow_rows`]).
pub fn concat_rows(gpu: &Gpu, tensors: &[&Tensor]) -> Result<Tensor> {
    let aligned = tensors.iter().all(|t| {
        t.rank() > 0 && t.shape()[0] > 0 && t.size_bytes() % wgpu::COPY_BUFFER_ALIGNMENT == 0
    });
    let first = match tensors.first() {
        Some(first) if aligned => first,
        _ => return concat(gpu, tensors, 0),
    };
    check_dtypes("concat", tensors)?;
    if let Some(t) = tensors
        .iter()
        .find(|t| t.shape()[1..] != first.shape()[1..])
    {
        return Err(EngineError::Shape {
            op: "concat",
            expected: format!("[*, {:?}] like the first tensor", &first.shape()[1..]),
            found: fmt_shape(t.shape()),
        });
    }
    let mut shape = first.shape().to_vec();
    shape[0] = tensors.iter().map(|t| t.shape()[0]).sum();
    let out = Tensor::empty(gpu, &shape, first.dtype())?;
    if !gpu.is_plan() {
        let mut offset = 0;
        for t in tensors {
            gpu.record(|enc| {
                enc.copy_buffer_to_buffer(t.buffer(), 0, out.buffer(), offset, t.size_bytes())
            });
            offset += t.size_bytes();
        }
    }
    Ok(out)
}
