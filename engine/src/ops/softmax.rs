//! Softmax over the last dim (`shaders/softmax.wgsl`), max-subtracted so that
//! no logit overflows. Tensors larger than one storage binding are processed
//! in windows of whole rows.

use bytemuck::{Pod, Zeroable};

use super::norm::{default_reduction_kernel, ReductionKernel};
use super::{params_bytes, windows};
use crate::error::{EngineError, Result};
use crate::gpu::{grid_1d, Gpu, Kernel};
use crate::tensor::{fmt_shape, Tensor};

const SOURCE: &str = include_str!("../../../shaders/softmax.wgsl");

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct Params {
    rows: u32,
    len: u32,
    x_off: u32,
    out_off: u32,
}

/// Softmax over the last dim (numerically stable, max-subtracted).
pub fn softmax(gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
    softmax_with(gpu, x, None)
}

/// [`softmax`] with a chosen workgroup shape; `None` picks the adapter's.
pub fn softmax_with(gpu: &Gpu, x: &Tensor, kernel: Option<ReductionKernel>) -> Result<Tensor> {
    let op = "softmax";
    let len = match x.shape().last() {
        Some(&d) if d > 0 => d,
        _ => {
            return Err(EngineError::Shape {
                op,
                expected: "input [..., D] with D >= 1".into(),
                found: fmt_shape(x.shape()),
            })
        }
    };
    let out = Tensor::empty(gpu, x.shape(), x.dtype())?;
    let rows = x.numel() / len;
    let max_rows = Tensor::max_window_elems(gpu, x.dtype()) / len;
    if max_rows == 0 {
        return Err(EngineError::BindingTooLarge {
            op,
            bytes: len as u64 * x.dtype().size_bytes(),
            limit: gpu.max_binding_bytes(),
        });
    }
    // As for the norms: one 8-lane batch per row on llvmpipe.
    // Two loops over len / 8 values each on the narrow kernel.
    let wg = match kernel.unwrap_or_else(|| default_reduction_kernel(gpu, len / 4)) {
        ReductionKernel::Narrow => 8,
        ReductionKernel::Wide => 64,
    };
    let k = Kernel {
        op,
        source: SOURCE,
        entry: "softmax",
        dtype: x.dtype(),
        constants: vec![("WG", wg as f64)],
    };
    for (row0, n) in windows(op, rows, 1, max_rows, gpu.max_binding_bytes())? {
        let (xb, x_off) = x.window(gpu, row0 * len, n * len);
        let (ob, out_off) = out.window(gpu, row0 * len, n * len);
        let p = Params {
            rows: n as u32,
            len: len as u32,
            x_off,
            out_off,
        };
        gpu.dispatch(&k, params_bytes(&p), &[(1, xb), (2, ob)], grid_1d(n as u64))?;
    }
    Ok(out)
}

/// CPU reference of [`softmax`]: rows of `len` values, in f64.
pub fn softmax_reference(x: &[f32], len: usize) -> Vec<f32> {
    x.chunks(len)
        .flat_map(|row| {
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let exps: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
            let sum: f64 = exps.iter().sum();
            exps.into_iter().map(move |e| (e / sum) as f32)
        })
        .collect()
}
