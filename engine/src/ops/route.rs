//! The one place that decides which kernel computes an operator: the
//! kernel asked for by name, else the per-adapter tuning file's choice for
//! the shape class (gpu/tuning.rs, written by `motif bench --tune`), else
//! the built-in default. Tensor cores (ops/coop.rs) need f16 operands, an
//! adapter with cooperative matrices and the kernel's workgroup; a kernel
//! asked for by name that cannot run is refused with one error
//! ([`EngineError::KernelUnavailable`]), never swapped for another.
//!
//! Shape classes group the products the models run by what changes the
//! best kernel: dtype, layout, and each size rounded to a power-of-four
//! band, so that a tuned choice carries over to the neighbouring shapes.

use super::coop::{self, CoopKernel};
use crate::error::{EngineError, Result};
use crate::gpu::tuning::{KernelName, Variant};
use crate::gpu::Gpu;
use crate::tensor::DType;

/// What an operator asks routing about one dispatch.
pub(crate) struct Request {
    pub op: &'static str,
    /// The shape class (the `*_class` functions below).
    pub class: String,
    pub dtype: DType,
    /// The kernel the caller named; None: routing picks.
    pub asked: Option<KernelName>,
    /// The operator's tensor-core kernel for this dispatch; None where it
    /// has none for these inputs.
    pub coop: Option<CoopKernel>,
    /// Why there is no tensor-core kernel, for the error when one is asked
    /// for (e.g. a head dim it does not hold).
    pub coop_missing: Option<String>,
    /// Untuned, whether the tensor cores are the default where they run.
    pub coop_by_default: bool,
}

/// Where a dispatch goes.
#[derive(Debug)]
pub(crate) enum Route {
    /// The tensor-core kernel, with the tuned constants applied.
    Coop(CoopKernel),
    /// A portable kernel: the one named (asked for or tuned), or None: the
    /// operator's own default for the adapter.
    Portable(Option<KernelName>),
}

/// Routes one dispatch (see the module comment).
pub(crate) fn route(gpu: &Gpu, req: Request) -> Result<Route> {
    let usable = |k: &CoopKernel| coop::supported(gpu, req.dtype, &k.needs);
    match req.asked {
        Some(KernelName::Coop) => match req.coop {
            // Asked for by name: a compile error is reported at dispatch,
            // not hidden.
            Some(k) if usable(&k) => {
                let tuned = gpu.tuned(req.op, &req.class);
                Ok(Route::Coop(match tuned {
                    Some(v) if v.kernel == KernelName::Coop => k.with_tuned(&v.constants),
                    _ => k,
                }))
            }
            other => Err(EngineError::KernelUnavailable {
                op: req.op,
                kernel: "cooperative-matrix",
                needs: match (other, req.coop_missing) {
                    (Some(k), _) => k.needs.describe(),
                    (None, Some(why)) => why,
                    (None, None) => "a tensor-core variant for these inputs".to_string(),
                },
                adapter: gpu.adapter().name.clone(),
                found: format!(
                    "{} operands{}",
                    req.dtype,
                    if gpu.coop_matrix().is_some() {
                        ""
                    } else {
                        " and no usable cooperative matrices"
                    }
                ),
            }),
        },
        Some(other) => Ok(Route::Portable(Some(other))),
        None => {
            let coop = req.coop.filter(|k| usable(k));
            match (gpu.tuned(req.op, &req.class), coop) {
                (Some(v), Some(k)) if v.kernel == KernelName::Coop => {
                    let k = k.with_tuned(&v.constants);
                    if coop::compiles(gpu, &k) {
                        return Ok(Route::Coop(k));
                    }
                    Ok(Route::Portable(None))
                }
                // The tuner measured a portable kernel fastest here.
                (Some(Variant { kernel, .. }), _) if kernel != KernelName::Coop => {
                    Ok(Route::Portable(Some(kernel)))
                }
                (_, Some(k)) if req.coop_by_default && coop::compiles(gpu, &k) => {
                    Ok(Route::Coop(k))
                }
                _ => Ok(Route::Portable(None)),
            }
        }
    }
}

/// The tuned tensor-core variant of `op` for `class`, as its constants,
/// for an operator whose variants are separate shaders generated from one
/// template (ops/attention_coop.rs): it builds the kernel they name and
/// hands it to [`route`], which then decides whether it runs.
pub(crate) fn tuned_coop_constants(
    gpu: &Gpu,
    op: &str,
    class: &str,
) -> Option<std::collections::BTreeMap<String, f64>> {
    gpu.tuned(op, class)
        .filter(|v| v.kernel == KernelName::Coop)
        .map(|v| v.constants)
}

/// The power-of-four band of a size: `n ≤ 16` is band 16, then 64, 256, ...
fn band(n: usize) -> usize {
    let mut b = 16;
    while b < n {
        b *= 4;
    }
    b
}

/// The class of a product `[M, K] x [K, N]` (`N, K` with `transpose_b`).
pub fn matmul_class(dtype: DType, m: usize, k: usize, n: usize, transpose_b: bool) -> String {
    format!(
        "{dtype} m{} k{} n{}{}",
        band(m),
        band(k),
        band(n),
        if transpose_b { " bT" } else { "" }
    )
}

/// The class of a convolution: kernel size, and the implicit product's
/// sizes (output channels, input channels x taps, output pixels per item).
pub fn conv2d_class(
    dtype: DType,
    cout: usize,
    cin: usize,
    kernel: [usize; 2],
    pixels: usize,
) -> String {
    format!(
        "{dtype} {}x{} cout{} cin{} px{}",
        kernel[0],
        kernel[1],
        band(cout),
        band(cin),
        band(pixels)
    )
}

/// The class of an attention: the head dim exactly (each has its own
/// variant), and the query and key counts in bands.
pub fn attention_class(
    dtype: DType,
    head_dim: usize,
    lq: usize,
    lk: usize,
    causal: bool,
) -> String {
    format!(
        "{dtype} d{head_dim} q{} k{}{}",
        band(lq),
        band(lk),
        if causal { " causal" } else { "" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_group_neighbouring_sizes() {
        assert_eq!(band(1), 16);
        assert_eq!(band(16), 16);
        assert_eq!(band(17), 64);
        assert_eq!(band(4096), 4096);
        assert_eq!(band(4097), 16384);
        assert_eq!(
            matmul_class(DType::F16, 4096, 320, 320, true),
            "f16 m4096 k1024 n1024 bT"
        );
    }
}
