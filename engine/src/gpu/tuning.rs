//! The per-adapter tuning file: for each operator and shape class, the
//! kernel variant `motif bench --tune` found fastest among those that
//! computed right. It sits beside the pipeline cache (same folder, one file
//! per adapter and driver) and is read once when the GPU opens; ops/route.rs
//! reads the choices. No file, or no entry for a class: the built-in
//! defaults. A file that cannot be read is an error naming it, never a
//! silent default: a user who tuned expects the tuned kernels.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{EngineError, Result};

/// The format tag of a tuning file.
pub const FORMAT: &str = "motif-tuning-v1";

/// A kernel of an operator, as the tuning file and routing name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelName {
    /// Tensor cores through cooperative matrices (f16).
    Coop,
    /// Workgroup-memory tiles (the portable GPU kernel).
    Tiled,
    /// Operands packed into uniform blocks (CPU adapters).
    Packed,
    /// Subgroup broadcasts (attention on CPU adapters).
    Subgroup,
}

impl KernelName {
    pub fn name(self) -> &'static str {
        match self {
            KernelName::Coop => "coop",
            KernelName::Tiled => "tiled",
            KernelName::Packed => "packed",
            KernelName::Subgroup => "subgroup",
        }
    }
}

/// One variant: a kernel and the values of its tunable override constants
/// (tile sizes, staging; names as in the kernel's shader). Constants the
/// shader does not declare are not passed to it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub kernel: KernelName,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub constants: BTreeMap<String, f64>,
}

impl Variant {
    pub fn plain(kernel: KernelName) -> Variant {
        Variant {
            kernel,
            constants: BTreeMap::new(),
        }
    }

    /// `kernel` or `kernel NAME=VALUE ...`, for reports.
    pub fn describe(&self) -> String {
        let mut s = self.kernel.name().to_string();
        for (k, v) in &self.constants {
            s.push_str(&format!(" {k}={v}"));
        }
        s
    }
}

/// The choice for one operator's shape class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Choice {
    /// The operator (`matmul`, `conv2d`, `attention`).
    pub op: String,
    /// The shape class (ops/route.rs's `*_class` functions).
    pub class: String,
    pub variant: Variant,
    /// Time of the measured shape on this variant, for the report.
    pub ms: f64,
}

/// The content of a tuning file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    pub format: String,
    /// The adapter and driver it was measured on (also in the file name).
    pub adapter: String,
    pub driver: String,
    pub choices: Vec<Choice>,
    /// Where it was read from; not stored.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

/// The file name of `info`'s tuning file: vendor, device and driver, so that
/// a driver update (other compiler, other speeds) starts untuned.
pub fn file_name(info: &wgpu::AdapterInfo) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    };
    format!(
        "tuning-{:?}-{:04x}-{:04x}-{}.json",
        info.backend,
        info.vendor,
        info.device,
        clean(&info.driver_info)
    )
    .to_lowercase()
}

/// Where `info`'s tuning file lives: beside the pipeline cache (`dir`, else
/// the cache folder of gpu/kernel.rs). None where no cache folder is known.
pub fn path_for(info: &wgpu::AdapterInfo, dir: Option<PathBuf>) -> Option<PathBuf> {
    Some(dir.or_else(super::cache_dir)?.join(file_name(info)))
}

impl Tuning {
    /// An empty tuning for `info`, to fill and save.
    pub fn new(info: &wgpu::AdapterInfo) -> Tuning {
        Tuning {
            format: FORMAT.to_string(),
            adapter: info.name.clone(),
            driver: info.driver_info.clone(),
            choices: Vec::new(),
            path: None,
        }
    }

    /// Reads `info`'s tuning file; an empty tuning where there is none.
    pub fn load_for(info: &wgpu::AdapterInfo, dir: Option<PathBuf>) -> Result<Tuning> {
        match path_for(info, dir) {
            Some(path) if path.exists() => Tuning::load(&path, info),
            _ => Ok(Tuning::default()),
        }
    }

    /// Reads and checks one tuning file: its format tag, and that it was
    /// measured on `info`'s adapter and driver.
    pub fn load(path: &Path, info: &wgpu::AdapterInfo) -> Result<Tuning> {
        let bad = |reason: String| EngineError::BadTuningFile {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let mut t: Tuning = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if t.format != FORMAT {
            return Err(bad(format!("format `{}`, expected `{FORMAT}`", t.format)));
        }
        if t.adapter != info.name || t.driver != info.driver_info {
            return Err(bad(format!(
                "measured on `{}` (driver `{}`), this adapter is `{}` (driver `{}`)",
                t.adapter, t.driver, info.name, info.driver_info
            )));
        }
        t.path = Some(path.to_path_buf());
        Ok(t)
    }

    /// Writes the file atomically (a temporary file, then renamed), so that
    /// an interrupted tuner never leaves a torn file for routing to read.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |e: std::io::Error| EngineError::BadTuningFile {
            path: path.to_path_buf(),
            reason: format!("cannot write: {e}"),
        };
        let text = serde_json::to_string_pretty(self).map_err(|e| EngineError::BadTuningFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            io(e)
        })
    }

    /// The tuned variant of `op` for `class`, if the tuner measured it.
    pub fn choice(&self, op: &str, class: &str) -> Option<&Variant> {
        self.choices
            .iter()
            .find(|c| c.op == op && c.class == class)
            .map(|c| &c.variant)
    }
}
