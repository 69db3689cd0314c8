//! The engine's error type. Every message names the operator, tensor or setting
//! involved and what was expected, so the CLI can show it as is.

use std::path::PathBuf;

use thiserror::Error;

/// Why a weight file, config or model folder could not be loaded. Every
/// variant names the file; tensor variants name the key.
#[derive(Debug, Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{}: not a safetensors file: {reason}", path.display())]
    Corrupt { path: PathBuf, reason: String },

    #[error(
        "{}: tensor `{key}` has dtype {dtype}, which Motif does not load (weights: F32, F16, BF16, F8_E4M3 or F8_E5M2)",
        path.display()
    )]
    UnsupportedDType {
        path: PathBuf,
        key: String,
        dtype: String,
    },

    #[error("{}: missing tensor `{key}`", path.display())]
    MissingTensor { path: PathBuf, key: String },

    #[error("{}: tensor `{key}` has shape {found:?}, expected {expected:?}", path.display())]
    TensorShape {
        path: PathBuf,
        key: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },

    #[error(
        "{}: pickle checkpoints can run arbitrary code when loaded, so Motif refuses them; convert it to \
         .safetensors first (e.g. `python -c \"import torch; from safetensors.torch import save_file; \
         save_file(torch.load('IN', map_location='cpu', weights_only=True), 'OUT.safetensors')\"`, or \
         download the .safetensors version the publisher provides)",
        path.display()
    )]
    Pickle { path: PathBuf },

    #[error("{}: {message}", path.display())]
    Layout { path: PathBuf, message: String },

    /// A LoRA made for another model family (an SD/AnimateDiff LoRA given
    /// to a Wan model, or the reverse).
    #[error(
        "{}: this LoRA is for {lora} models (tensor `{key}`), but the model is {model}: pass a LoRA trained for it",
        path.display()
    )]
    LoraFamily {
        path: PathBuf,
        key: String,
        lora: &'static str,
        model: &'static str,
    },
}

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

    /// A kernel asked for by name that cannot run here (ops/route.rs).
    #[error(
        "{op}: the {kernel} kernel needs {needs}; adapter `{adapter}` with {found} does not have it"
    )]
    KernelUnavailable {
        op: &'static str,
        kernel: &'static str,
        needs: String,
        adapter: String,
        found: String,
    },

    /// The per-adapter tuning file (`motif bench --tune`) cannot be used.
    #[error(
        "tuning file {}: {reason} (run `motif bench --tune` again, delete the file, or set \
         MOTIF_TUNING=off)",
        path.display()
    )]
    BadTuningFile { path: PathBuf, reason: String },

    #[error("GPU out of memory: {0}")]
    OutOfMemory(String),

    #[error("GPU device lost: {0}")]
    DeviceLost(String),

    #[error("GPU error: {0}")]
    Device(String),

    #[error("interrupted")]
    Cancelled,

    /// A request setting (a `Request` field, or `loras`) that the model's
    /// family cannot honour: refused rather than ignored.
    #[error("`{control}` is not supported by the model {} ({family} family)", model.display())]
    UnsupportedControl {
        control: String,
        model: PathBuf,
        family: &'static str,
    },

    /// A model folder whose pipeline class (model_index.json's
    /// `_class_name`) no family in this build runs.
    #[error("{}: `{class}` models are not supported yet (Motif runs: {supported})", model.display())]
    UnsupportedFamily {
        model: PathBuf,
        class: String,
        supported: String,
    },

    #[error(transparent)]
    Load(#[from] LoadError),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
