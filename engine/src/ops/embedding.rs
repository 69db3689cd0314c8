//! Embedding gather (token and position tables) and the sinusoidal timestep
//! embedding (`shaders/embedding.wgsl`).

use bytemuck::{Pod, Zeroable};

use super::{params_bytes, windows};
use crate::error::{EngineError, Result};
use crate::gpu::{grid_1d, DType, Gpu, Kernel};
use crate::tensor::{fmt_shape, Tensor};

const SOURCE: &str = include_str!("../../../shaders/embedding.wgsl");
const WG: u64 = 256;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    n: u32,
    d: u32,
    row0: u32,
    rows: u32,
    table_off: u32,
    flip: u32,
    scale: f32,
    _pad: [u32; 5],
}

/// Rows `ids` of `table` [V, D] → [ids.len(), D]. Ids come from the CPU (the
/// tokenizer); one out of range is an error naming it. A table larger than
/// one storage binding (SD's f32 token table is 152 MB) is read in windows.
pub fn embedding(gpu: &Gpu, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    if table.rank() != 2 {
        return Err(EngineError::Shape {
            op: "embedding",
            expected: "table [V, D]".into(),
            found: fmt_shape(table.shape()),
        });
    }
    let (v, d) = (table.shape()[0], table.shape()[1]);
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= v) {
        return Err(EngineError::Argument {
            op: "embedding",
            message: format!("id {bad} is out of range for a table of {v} rows"),
        });
    }
    let out = Tensor::empty(gpu, &[ids.len(), d], table.dtype())?;
    if ids.is_empty() || d == 0 {
        return Ok(out);
    }
    // The ids travel as raw u32 bits in a 4-byte-element tensor.
    let id_buf = Tensor::from_bytes(gpu, bytemuck::cast_slice(ids), &[ids.len()], DType::F32)?;
    let k = Kernel {
        op: "embedding",
        source: SOURCE,
        entry: "gather",
        dtype: table.dtype(),
        constants: vec![],
    };
    let max_rows = Tensor::max_window_elems(gpu, table.dtype()) / d;
    for (row0, rows) in windows("embedding", v, 1, max_rows, gpu.max_binding_bytes())? {
        let (tb, table_off) = table.window(gpu, row0 * d, rows * d);
        let p = Params {
            n: ids.len() as u32,
            d: d as u32,
            row0: row0 as u32,
            rows: rows as u32,
            table_off,
            ..Default::default()
        };
        let count = (ids.len() * d) as u64;
        gpu.dispatch(
            &k,
            params_bytes(&p),
            &[(1, tb), (2, id_buf.binding()), (3, out.binding())],
            grid_1d(count.div_ceil(WG)),
        )?;
    }
    Ok(out)
}

/// How diffusers' `Timesteps` module builds its embedding.
#[derive(Debug, Clone, Copy)]
pub struct TimestepEmbedding {
    pub dim: usize,
    /// [cos, sin] instead of [sin, cos] (true in SD's UNet).
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` (0 in SD's UNet, 1 in the default).
    pub freq_shift: f32,
    pub max_period: f32,
    pub scale: f32,
}

impl TimestepEmbedding {
    pub fn new(dim: usize, flip_sin_to_cos: bool, freq_shift: f32) -> Self {
        TimestepEmbedding {
            dim,
            flip_sin_to_cos,
            freq_shift,
            max_period: 10000.0,
            scale: 1.0,
        }
    }
}

/// Sinusoidal embedding of `timesteps` → [n, dim], computed in f32 (as
/// diffusers does) and stored in `dtype`.
pub fn timestep_embedding(
    gpu: &Gpu,
    timesteps: &[f32],
    cfg: &TimestepEmbedding,
    dtype: DType,
) -> Result<Tensor> {
    let half = cfg.dim / 2;
    if half == 0 || (half as f32 - cfg.freq_shift) == 0.0 {
        return Err(EngineError::Argument {
            op: "timestep_embedding",
            message: format!(
                "dim {} with freq_shift {} leaves no frequencies",
                cfg.dim, cfg.freq_shift
            ),
        });
    }
    let out = Tensor::empty(gpu, &[timesteps.len(), cfg.dim], dtype)?;
    if timesteps.is_empty() {
        return Ok(out);
    }
    let t = Tensor::from_f32(gpu, timesteps, &[timesteps.len()], DType::F32)?;
    let freqs = timestep_frequencies(cfg);
    let f = Tensor::from_f32(gpu, &freqs, &[freqs.len()], DType::F32)?;
    let k = Kernel {
        op: "embedding",
        source: SOURCE,
        entry: "timestep",
        dtype,
        constants: vec![],
    };
    let p = Params {
        n: timesteps.len() as u32,
        d: cfg.dim as u32,
        flip: cfg.flip_sin_to_cos as u32,
        scale: cfg.scale,
        ..Default::default()
    };
    let count = (timesteps.len() * cfg.dim) as u64;
    gpu.dispatch(
        &k,
        params_bytes(&p),
        &[(3, out.binding()), (4, t.binding()), (5, f.binding())],
        grid_1d(count.div_ceil(WG)),
    )?;
    Ok(out)
}

/// The frequencies f_j = exp(-ln(max_period) · j / (half − shift)) as
/// diffusers computes them: exponent in f32 arithmetic, then exp rounded to f32.
pub fn timestep_frequencies(cfg: &TimestepEmbedding) -> Vec<f32> {
    let half = cfg.dim / 2;
    let log_max = -(cfg.max_period.ln());
    (0..half)
        .map(|j| {
            let exponent = (log_max * j as f32) / (half as f32 - cfg.freq_shift);
            (exponent as f64).exp() as f32
        })
        .collect()
}

/// CPU reference of [`timestep_embedding`]: the f32 argument t·f_j exactly as
/// diffusers forms it, then sine and cosine in f64.
pub fn timestep_embedding_reference(timesteps: &[f32], cfg: &TimestepEmbedding) -> Vec<f32> {
    let freqs = timestep_frequencies(cfg);
    let mut out = Vec::with_capacity(timesteps.len() * cfg.dim);
    for &t in timesteps {
        let args: Vec<f64> = freqs
            .iter()
            .map(|&f| ((t * f) * cfg.scale) as f64)
            .collect();
        let sin = args.iter().map(|a| a.sin() as f32);
        let cos = args.iter().map(|a| a.cos() as f32);
        if cfg.flip_sin_to_cos {
            out.extend(cos.chain(sin));
        } else {
            out.extend(sin.chain(cos));
        }
        if cfg.dim % 2 == 1 {
            out.push(0.0);
        }
    }
    out
}
