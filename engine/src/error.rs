//! The engine's error type. Every message names the operator, tensor or setting
//! involved and what was expected, so the CLI can show it as is.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(
        "no GPU adapter found (tried Vulkan, Metal, DX12). On Linux without a GPU install the \
         software Vulkan driver: `sudo apt-get install mesa-vulkan-drivers` (Debian/Ubuntu) or \
         `sudo dnf install mesa-vulkan-drivers` (Fedora); on a machine with a GPU, install its \
         vendor's Vulkan driver"
    )]
    NoAdapter,

    #[error("adapter `{requested}` not found; available adapters:\n{available}")]
    AdapterNotFound {
        requested: String,
        available: String,
    },

    #[error("could not open a device on adapter `{adapter}`: {reason}")]
    DeviceRequest { adapter: String, reason: String },

    #[error("{op}: shape mismatch: expected {expected}, found {found}")]
    Shape {
        op: &'static str,
        expected: String,
        found: String,
    },

    #[error("{op}: dtype mismatch: expected {expected}, found {found}")]
    DType {
        op: &'static str,
        expected: String,
        found: String,
    },

    #[error("{op}: invalid argument: {message}")]
    Argument { op: &'static str, message: String },

    #[error(
        "{op}: a binding of {bytes} bytes exceeds the adapter's largest storage binding of \
         {limit} bytes, and this operator cannot split it"
    )]
    BindingTooLarge {
        op: &'static str,
        bytes: u64,
        limit: u64,
    },

    #[error("tensor of {bytes} bytes exceeds the adapter's largest buffer of {limit} bytes")]
    BufferTooLarge { bytes: u64, limit: u64 },

    #[error("precision f16 needs the SHADER_F16 feature, which adapter `{adapter}` lacks; use --precision f32")]
    F16Unsupported { adapter: String },

    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),

    #[error("GPU device lost: {0}")]
    DeviceLost(String),

    #[error("GPU error: {0}")]
    Device(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
