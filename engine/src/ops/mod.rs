//! The operator library. One file per operator family, paired with
//! `shaders/<family>.wgsl`: the Rust side validates shapes and dtypes, picks
//! the kernel variant, fills the parameter block and dispatches. Each family
//! also keeps a plain CPU reference (`*_reference`), which the tests compare
//! the GPU against and which the next faster kernel is checked with.
//! Tensor-core kernels share the leaf `coop` (no operator in it), and
//! `route` is the one place that picks an operator's kernel.

pub mod attention;
pub mod attention_coop;
pub mod conv2d;
mod conv2d_direct;
pub(crate) mod coop;
pub mod elementwise;
pub mod embedding;
pub mod latent;
pub mod layout;
pub mod matmul;
pub mod matmul_coop;
pub mod norm;
pub mod preview;
pub mod rope;
pub mod route;
pub mod softmax;

use crate::error::{EngineError, Result};
use crate::tensor::{fmt_shape, DType, Tensor};

pub use elementwise::{add, geglu, gelu_erf, gelu_tanh, mul, quick_gelu, scale, silu, Activation};

/// Fails unless every tensor has `dtype`.
pub(crate) fn check_dtypes(op: &'static str, tensors: &[&Tensor]) -> Result<DType> {
    let dtype = tensors[0].dtype();
    for t in tensors {
        if t.dtype() != dtype {
            return Err(EngineError::DType {
                op,
                expected: dtype.to_string(),
                found: t.dtype().to_string(),
            });
        }
    }
    Ok(dtype)
}

/// Fails unless `t` has rank `rank`; `what` names the operand and its layout.
pub(crate) fn check_rank(op: &'static str, what: &str, t: &Tensor, rank: usize) -> Result<()> {
    if t.rank() != rank {
        return Err(EngineError::Shape {
            op,
            expected: format!("{what} of rank {rank}"),
            found: fmt_shape(t.shape()),
        });
    }
    Ok(())
}

/// Element counts of the windows that split `total` elements, each at most
/// `max` long and a multiple of `quantum` (a row length, a batch item) unless
/// it is the last one. Fails if one quantum alone is over the limit.
pub(crate) fn windows(
    op: &'static str,
    total: usize,
    quantum: usize,
    max: usize,
    limit_bytes: u64,
) -> Result<Vec<(usize, usize)>> {
    let quantum = quantum.max(1);
    if total <= max {
        return Ok(vec![(0, total)]);
    }
    let per = max / quantum * quantum;
    if per == 0 {
        // `max` elements fill `limit_bytes`, which gives the element size.
        let elem_bytes = (limit_bytes / max.max(1) as u64).max(1);
        return Err(EngineError::BindingTooLarge {
            op,
            bytes: quantum as u64 * elem_bytes,
            limit: limit_bytes,
        });
    }
    let mut out = Vec::new();
    let mut start = 0;
    while start < total {
        let n = per.min(total - start);
        out.push((start, n));
        start += n;
    }
    Ok(out)
}

/// Packs a parameter struct for the uniform binding.
pub(crate) fn params_bytes<T: bytemuck::Pod>(p: &T) -> &[u8] {
    bytemuck::bytes_of(p)
}
