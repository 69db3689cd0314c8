//! Rotary position embedding (`shaders/rope.wgsl`) on interleaved channel
//! pairs, as diffusers' Wan attention applies it to q and k after their
//! RMS norms. The angle tables are built by the model (Wan's 3D split of the
//! head dim into frame, height and width parts) and passed in f32, whatever
//! the storage precision, as diffusers keeps its `rope` module in f32.

use bytemuck::{Pod, Zeroable};

use super::{check_rank, params_bytes, windows};
use crate::error::{EngineError, Result};
use crate::gpu::{grid_1d, Gpu, Kernel};
use crate::tensor::{fmt_shape, DType, Tensor};

const SOURCE: &str = include_str!("../../../shaders/rope.wgsl");
const WG: u64 = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    pairs: u32,
    x_off: u32,
    out_off: u32,
    row0: u32,
    seq: u32,
    heads: u32,
    half: u32,
    _pad: u32,
}

/// Rotates x [B, S, H·D] (the layout linear projections produce: head h uses
/// channels h·D..(h+1)·D) pair by pair: channels (2i, 2i+1) of each head of
/// the token at position s by the angle whose cosine and sine are
/// `cos[s, i]`, `sin[s, i]` (tables [S, D/2], f32).
pub fn rotary_embedding(
    gpu: &Gpu,
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    let op = "rotary_embedding";
    check_rank(op, "x [B, S, H*D]", x, 3)?;
    let (seq, channels) = (x.shape()[1], x.shape()[2]);
    if heads == 0 || !channels.is_multiple_of(heads) || !(channels / heads).is_multiple_of(2) {
        return Err(EngineError::Shape {
            op,
            expected: format!("channels divisible by {heads} heads of an even head dim"),
            found: fmt_shape(x.shape()),
        });
    }
    let half = channels / heads / 2;
    for (what, t) in [("cos", cos), ("sin", sin)] {
        if t.shape() != [seq, half] || t.dtype() != DType::F32 {
            return Err(EngineError::Shape {
                op,
                expected: format!(
                    "{what} table [{seq}, {half}] in f32 for x {}",
                    fmt_shape(x.shape())
                ),
                found: format!("{} in {}", fmt_shape(t.shape()), t.dtype()),
            });
        }
    }
    let out = Tensor::empty(gpu, x.shape(), x.dtype())?;
    let rows = x.numel() / channels.max(1);
    if rows == 0 || channels == 0 {
        return Ok(out);
    }
    let k = Kernel {
        op: "rope",
        source: SOURCE,
        entry: "rope",
        dtype: x.dtype(),
        constants: vec![],
    };
    let max_rows = Tensor::max_window_elems(gpu, x.dtype()) / channels;
    for (row0, n) in windows(op, rows, 1, max_rows, gpu.max_binding_bytes())? {
        let (xb, x_off) = x.window(gpu, row0 * channels, n * channels);
        let (ob, out_off) = out.window(gpu, row0 * channels, n * channels);
        let pairs = n * channels / 2;
        let p = Params {
            pairs: pairs as u32,
            x_off,
            out_off,
            row0: row0 as u32,
            seq: seq as u32,
            heads: heads as u32,
            half: half as u32,
            _pad: 0,
        };
        gpu.dispatch(
            &k,
            params_bytes(&p),
            &[(1, xb), (2, cos.binding()), (3, sin.binding()), (4, ob)],
            grid_1d((pairs as u64).div_ceil(WG)),
        )?;
    }
    Ok(out)
}

/// CPU reference of [`rotary_embedding`] in f64: x [batch, seq, heads·2·half]
/// row-major, tables [seq, half].
pub fn rotary_embedding_reference(
    x: &[f32],
    seq: usize,
    heads: usize,
    cos: &[f32],
    sin: &[f32],
) -> Vec<f32> {
    let half = cos.len() / seq.max(1);
    let channels = heads * half * 2;
    let mut out = vec![0f32; x.len()];
    for (row, (xr, or)) in x.chunks(channels).zip(out.chunks_mut(channels)).enumerate() {
        let s = row % seq;
        for (pair, (xp, op)) in xr.chunks(2).zip(or.chunks_mut(2)).enumerate() {
            let f = pair % half;
            let (c, sn) = (cos[s * half + f] as f64, sin[s * half + f] as f64);
            let (x1, x2) = (xp[0] as f64, xp[1] as f64);
            op[0] = (x1 * c - x2 * sn) as f32;
            op[1] = (x1 * sn + x2 * c) as f32;
        }
    }
    out
}
