//! Motif's compute engine: a wgpu device, GPU-resident tensors and the WGSL
//! operator library that every model is built from.
//!
//! The data's path runs left to right through the modules: `gpu` → `tensor` →
//! `ops`. A module only uses what stands to its left.

pub mod bench;
pub mod conformance;
pub mod error;
pub mod gpu;
pub mod models;
pub mod ops;
pub mod pipelines;
pub mod prompt;
pub mod schedulers;
pub mod tensor;
pub mod text;
pub mod tune;
pub mod weights;

pub use error::{EngineError, Result};
pub use gpu::{
    list_adapters, AdapterSummary, Gpu, GpuKernelTime, GpuOptions, Precision, TransferStats,
};
pub use tensor::{DType, Tensor};
/// The wgpu version the engine is built on, for callers that show adapter details.
pub use wgpu;
