//! What every tensor-core (cooperative-matrix) kernel shares, and nothing
//! about any operator: what a kernel needs of the adapter, the check of
//! those needs, its pipeline (through the one pipeline cache, gpu/kernel.rs)
//! and its dispatch. Each operator owns its kernel's shader, override
//! constants and parameters (ops/matmul.rs, ops/conv2d.rs,
//! ops/attention.rs); ops/route.rs decides which kernel runs.
//!
//! The shaders spell `enable f16; enable wgpu_cooperative_matrix;` before any
//! declaration themselves, so they compile without the `st` prelude of the
//! portable kernels, and need the device feature
//! `EXPERIMENTAL_COOPERATIVE_MATRIX` (asked for by gpu/mod.rs only where the
//! adapter reports a usable configuration, see `CoopConfig`).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::Result;
use crate::gpu::{Binding, Gpu};
use crate::tensor::DType;

/// Rows, columns and depth of one cooperative-matrix fragment: the only
/// configuration gpu/mod.rs accepts (f16 x f16 -> f32, 16 x 16 x 16).
pub const FRAGMENT: usize = 16;

/// What one tensor-core kernel needs of the adapter beyond cooperative
/// matrices themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CoopNeeds {
    /// Invocations of one workgroup.
    pub invocations: u32,
    /// Workgroup memory of one workgroup, in bytes.
    pub workgroup_bytes: u32,
    /// The subgroup size the kernel is written for (its subgroups-per-
    /// workgroup split assumes it).
    pub subgroup: u32,
}

impl CoopNeeds {
    /// The needs in words, for errors.
    pub(crate) fn describe(&self) -> String {
        format!(
            "f16 operands and f16 x f16 -> f32 {FRAGMENT}x{FRAGMENT}x{FRAGMENT} cooperative \
             matrices with {}-invocation subgroups, {} invocations and {} bytes of workgroup \
             memory per workgroup",
            self.subgroup, self.invocations, self.workgroup_bytes
        )
    }
}

/// One tensor-core kernel variant, as an operator describes it.
#[derive(Debug, Clone)]
pub(crate) struct CoopKernel {
    /// The operator, in errors and in the dispatch check.
    pub op: &'static str,
    /// The shader family (its file stem): one shader module per family.
    pub family: &'static str,
    /// The kernel's name in GPU timings.
    pub label: &'static str,
    pub source: &'static str,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, f64)>,
    pub needs: CoopNeeds,
}

impl CoopKernel {
    /// Replaces the values of the constants that `tuned` names and this
    /// kernel declares (a tuning file's choice, gpu/tuning.rs); others are
    /// left out, since a shader refuses constants it does not declare.
    pub(crate) fn with_tuned(mut self, tuned: &BTreeMap<String, f64>) -> CoopKernel {
        for (name, value) in &mut self.constants {
            if let Some(v) = tuned.get(*name) {
                *value = *v;
            }
        }
        self
    }
}

/// Whether `gpu` can run a kernel with `needs` on `dtype` operands: f16, the
/// adapter's cooperative matrices (with their one subgroup size), and the
/// workgroup.
pub(crate) fn supported(gpu: &Gpu, dtype: DType, needs: &CoopNeeds) -> bool {
    let limits = gpu.limits();
    dtype == DType::F16
        && gpu
            .coop_matrix()
            .is_some_and(|c| c.subgroup_size == needs.subgroup)
        && limits.max_compute_invocations_per_workgroup >= needs.invocations
        && limits.max_compute_workgroup_storage_size >= needs.workgroup_bytes
}

/// The kernel's pipeline, compiled once through the pipeline cache. The
/// extension is experimental: an adapter may report it and still fail a
/// variant, which is then remembered as failed (`Gpu::compile`).
pub(crate) fn pipeline(gpu: &Gpu, k: &CoopKernel) -> Result<Arc<wgpu::ComputePipeline>> {
    gpu.compile(k.family, k.source, k.entry, None, &k.constants)
}

/// Whether the kernel compiled here (always true in a dry run, which
/// compiles nothing it does not dispatch).
pub(crate) fn compiles(gpu: &Gpu, k: &CoopKernel) -> bool {
    gpu.is_plan() || pipeline(gpu, k).is_ok()
}

/// Records one dispatch of `k`, as `Gpu::dispatch` does for the kernels of
/// the prelude: `params` at binding 0, `bindings` at their slots.
pub(crate) fn dispatch(
    gpu: &Gpu,
    k: &CoopKernel,
    params: &[u8],
    bindings: &[(u32, Binding<'_>)],
    workgroups: [u32; 3],
) -> Result<()> {
    if !gpu.check_dispatch(k.op, bindings, workgroups)? {
        return Ok(());
    }
    let pipeline = pipeline(gpu, k)?;
    gpu.record_dispatch(&pipeline, k.op, k.label, params, bindings, workgroups);
    Ok(())
}
