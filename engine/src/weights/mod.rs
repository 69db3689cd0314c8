//! Model weights on disk: safetensors files (single or sharded), and
//! [`Weights`], a path walker over their keys in the style of candle's
//! VarBuilder: `w.pp("down_blocks").pp(0).tensor(gpu, "conv.weight", &[..])`
//! walks the same key path as the checkpoint, so a missing or misshapen
//! weight is reported with its full key and file.

pub mod config;
pub mod dtype;
pub mod folder;
pub mod identify;
pub mod lora;
pub mod safetensors;
pub mod single_file;
pub mod wan_files;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use half::f16;

use crate::error::{LoadError, Result};
use crate::gpu::{DType, Gpu};
use crate::tensor::Tensor;
pub use lora::{LoraFile, LoraTarget};
pub use safetensors::{FileDType, SafetensorsFile, TensorInfo};

/// Extensions of PyTorch pickle checkpoints, which are refused.
const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Fails with [`LoadError::Pickle`] for pickle checkpoints.
pub fn refuse_pickle(path: &Path) -> Result<(), LoadError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
        return Err(LoadError::Pickle {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// The weight files of a component folder: `*.safetensors` files, or the
/// shards named by a `*.safetensors.index.json`. diffusers folders may hold
/// both `x.safetensors` and an `x.fp16.safetensors` variant: the
/// full-precision file is taken. Pickle-only folders are refused.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let io = |source| LoadError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    let name = |p: &PathBuf| {
        p.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    if let Some(index) = entries
        .iter()
        .find(|p| name(p).ends_with(".safetensors.index.json"))
    {
        let json = config::read_json(index)?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LoadError::Config {
                path: index.clone(),
                message: "no `weight_map` object".into(),
            })?;
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        return Ok(shards.iter().map(|s| dir.join(s)).collect());
    }
    let safetensors: Vec<PathBuf> = entries
        .iter()
        .filter(|p| name(p).ends_with(".safetensors"))
        .cloned()
        .collect();
    let plain: Vec<PathBuf> = safetensors
        .iter()
        .filter(|p| !name(p).contains(".fp16."))
        .cloned()
        .collect();
    let chosen = if plain.is_empty() { safetensors } else { plain };
    if chosen.is_empty() {
        if let Some(pickle) = entries.iter().find(|p| refuse_pickle(p).is_err()) {
            return Err(LoadError::Pickle {
                path: pickle.clone(),
            });
        }
        return Err(LoadError::Layout {
            path: dir.to_path_buf(),
            message: "no .safetensors weights in this folder".into(),
        });
    }
    Ok(chosen)
}

/// Several safetensors files seen as one key space (a sharded checkpoint, or
/// a model plus a separately downloaded VAE).
pub struct WeightSet {
    files: Vec<SafetensorsFile>,
    index: HashMap<String, usize>,
    /// Keys that have a shape but no file (see [`WeightSet::from_shapes`]).
    shapes: HashMap<String, Vec<usize>>,
    /// Every key exists with the shape asked for (see [`WeightSet::synthetic`]).
    synthetic: bool,
    /// Key a loader asks for → key stored in the files, for checkpoints in
    /// another naming scheme (original LDM and AnimateDiff files).
    aliases: HashMap<String, String>,
    /// LoRA updates fused into a weight when it is read (asked key → the
    /// updates, see [`WeightSet::with_loras`]).
    lora: HashMap<String, Vec<lora::Update>>,
    /// Keys read so far, to report what a loader left unused.
    used: Mutex<BTreeSet<String>>,
}

impl WeightSet {
    /// Opens the files; a key present in two files is an error naming both.
    pub fn open(paths: &[PathBuf]) -> Result<Self, LoadError> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in paths {
            refuse_pickle(path)?;
            let file = SafetensorsFile::open(path)?;
            dtype::check_scales(&file)?;
            for name in file.names() {
                if let Some(&other) = index.get(name) {
                    let other: &SafetensorsFile = &files[other];
                    return Err(LoadError::Layout {
                        path: path.clone(),
                        message: format!("tensor `{name}` is also in {}", other.path().display()),
                    });
                }
                index.insert(name.to_string(), files.len());
            }
            files.push(file);
        }
        Ok(WeightSet {
            files,
            index,
            shapes: HashMap::new(),
            synthetic: false,
            aliases: HashMap::new(),
            lora: HashMap::new(),
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// Serves each stored key under the name a loader asks for
    /// (`aliases`: asked → stored). A stored `[C, C, 1, 1]` 1x1 conv is
    /// served as the `[C, C]` linear weight it equals.
    pub fn with_aliases(mut self, aliases: HashMap<String, String>) -> Self {
        self.aliases = aliases;
        self
    }

    /// Fuses LoRAs (file, user weight) into the weights of `target`: each
    /// weight a LoRA names is served as W + Σ weight · scale · (up @ down),
    /// computed in f32 when the weight is read, so that no second copy of the
    /// fused weights is held (a LoCon touches nearly all of a UNet). Fails,
    /// naming the LoRA file, if any of its `target` modules matches no weight
    /// here or its factors do not fit the weight.
    pub fn with_loras(
        mut self,
        loras: &[(Arc<LoraFile>, f32)],
        target: LoraTarget,
    ) -> Result<Self, LoadError> {
        if loras.is_empty() {
            return Ok(self);
        }
        let updates = lora::resolve(loras, target, &self.asked_shapes())?;
        for (key, list) in updates {
            self.lora.entry(key).or_default().extend(list);
        }
        Ok(self)
    }

    /// Every key a loader may ask for, with its stored shape.
    fn asked_shapes(&self) -> single_file::KeyShapes {
        let stored = self.key_shapes();
        let aliased: HashSet<&String> = self.aliases.values().collect();
        let mut asked: single_file::KeyShapes = stored
            .iter()
            .filter(|(k, _)| !aliased.contains(k))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        for (key, target) in &self.aliases {
            if let Some(shape) = stored.get(target) {
                asked.insert(key.clone(), shape.clone());
            }
        }
        asked
    }

    /// `values` of the asked `key` with the LoRA updates that name it added.
    fn fused(&self, key: &str, mut values: Vec<f32>) -> Result<Vec<f32>, LoadError> {
        for update in self.lora.get(key).into_iter().flatten() {
            update.add_to(&mut values, key)?;
        }
        Ok(values)
    }

    /// The stored name of an asked key.
    fn stored<'a>(&'a self, key: &'a str) -> &'a str {
        self.aliases.get(key).map(String::as_str).unwrap_or(key)
    }

    /// A key space in which every key exists with the shape the loader asks
    /// for: random weights for any config (benchmarks of real-size models
    /// without their files).
    pub fn synthetic() -> Self {
        WeightSet {
            synthetic: true,
            ..Self::from_shapes([])
        }
    }

    /// A key space with shapes and no data: loading from it checks a model's
    /// key map and shapes, and gives random weights of the real shapes (for
    /// benchmarks) or, on a plan-mode GPU, no memory at all.
    pub fn from_shapes(keys: impl IntoIterator<Item = (String, Vec<usize>)>) -> Self {
        WeightSet {
            files: Vec::new(),
            index: HashMap::new(),
            shapes: keys.into_iter().collect(),
            synthetic: false,
            aliases: HashMap::new(),
            lora: HashMap::new(),
            used: Mutex::new(BTreeSet::new()),
        }
    }

    /// Deterministic stand-in values for a shapes-only key: small, so that
    /// activations stay finite through deep networks.
    fn stand_in_values(key: &str, numel: usize) -> Vec<f32> {
        let mut state = key
            .bytes()
            .fold(2166136261u32, |h, b| (h ^ b as u32).wrapping_mul(16777619));
        (0..numel)
            .map(|_| {
                state = state.wrapping_mul(747796405).wrapping_add(2891336453);
                ((state >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * 0.02
            })
            .collect()
    }

    /// Opens a component folder (see [`safetensors_files`]).
    pub fn open_dir(dir: &Path) -> Result<Self, LoadError> {
        Self::open(&safetensors_files(dir)?)
    }

    /// A stand-in set ([`WeightSet::synthetic`]) that answers every key.
    pub fn is_synthetic(&self) -> bool {
        self.synthetic
    }

    pub fn contains(&self, key: &str) -> bool {
        let key = self.stored(key);
        self.synthetic || self.index.contains_key(key) || self.shapes.contains_key(key)
    }

    /// The shape recorded for a shapes-only key, or the asked shape in a
    /// synthetic set.
    fn virtual_shape<'a>(&'a self, key: &str, asked: &'a [usize]) -> Option<&'a [usize]> {
        match self.shapes.get(self.stored(key)) {
            Some(s) => Some(s),
            None if self.synthetic => Some(asked),
            None => None,
        }
    }

    /// Every stored key with its shape, sorted.
    pub fn keys(&self) -> Vec<(String, Vec<usize>)> {
        self.key_shapes().into_iter().collect()
    }

    /// Every stored key with its shape (files and shapes-only keys).
    pub fn key_shapes(&self) -> single_file::KeyShapes {
        self.index
            .iter()
            .map(|(k, &f)| {
                (
                    k.clone(),
                    self.files[f].info(k).expect("indexed").shape.clone(),
                )
            })
            .chain(self.shapes.iter().map(|(k, s)| (k.clone(), s.clone())))
            .collect()
    }

    /// The file a key lives in (for messages), or the first file.
    pub fn path_of(&self, key: &str) -> PathBuf {
        let key = self.stored(key);
        if self.files.is_empty() {
            return PathBuf::from("(key list)");
        }
        let f = self.index.get(key).copied().unwrap_or(0);
        self.files
            .get(f)
            .map(|f| f.path().to_path_buf())
            .unwrap_or_default()
    }

    fn file(&self, key: &str) -> Result<&SafetensorsFile, LoadError> {
        match self.index.get(self.stored(key)) {
            Some(&f) => Ok(&self.files[f]),
            None => Err(LoadError::MissingTensor {
                path: self.path_of(key),
                key: key.to_string(),
            }),
        }
    }

    /// Keys no loader has read yet.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.lock().expect("used-key lock poisoned");
        let mut rest: Vec<String> = self
            .index
            .keys()
            .chain(self.shapes.keys())
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect();
        rest.sort();
        rest
    }

    /// A tensor's values as f32, checked against `shape`.
    pub fn read_f32(&self, key: &str, shape: &[usize]) -> Result<Vec<f32>, LoadError> {
        let asked = key;
        let key = self.stored(key);
        if let Some(found) = self.virtual_shape(key, shape) {
            self.check_virtual_shape(key, found, shape)?;
            self.used
                .lock()
                .expect("used-key lock poisoned")
                .insert(key.to_string());
            return self.fused(asked, Self::stand_in_values(key, shape.iter().product()));
        }
        let file = self.file(key)?;
        self.check_shape(file, key, shape)?;
        self.used
            .lock()
            .expect("used-key lock poisoned")
            .insert(key.to_string());
        self.fused(asked, file.to_f32(key)?)
    }

    /// Rows `rows` of a tensor of `shape` (`[rows, ...]`) as f32, read from
    /// the file without reading the rest: an embedding table looked up on the
    /// host (UMT5-XXL's is 256k × 4096, never uploaded whole).
    pub fn read_rows_f32(
        &self,
        key: &str,
        shape: &[usize],
        rows: &[usize],
    ) -> Result<Vec<f32>, LoadError> {
        let row_len: usize = shape[1..].iter().product();
        let out_of_range = rows.iter().find(|&&r| r >= shape[0]);
        if let Some(&r) = out_of_range {
            return Err(LoadError::TensorShape {
                path: self.path_of(key),
                key: format!("{key} (row {r} asked)"),
                expected: vec![r + 1],
                found: shape.to_vec(),
            });
        }
        let stored = self.stored(key);
        if self.lora.contains_key(key) || self.virtual_shape(stored, shape).is_some() {
            // LoRA-fused and stand-in tables are computed whole.
            let all = self.read_f32(key, shape)?;
            return Ok(rows
                .iter()
                .flat_map(|&r| all[r * row_len..(r + 1) * row_len].iter().copied())
                .collect());
        }
        let file = self.file(stored)?;
        self.check_shape(file, stored, shape)?;
        self.used
            .lock()
            .expect("used-key lock poisoned")
            .insert(stored.to_string());
        let info = file.info(stored).expect("file() found the key");
        let bytes = file.bytes(stored)?;
        let size = info.dtype.size_bytes();
        let scale = dtype::scale_of(file, stored)?.unwrap_or(1.0);
        let mut out = Vec::with_capacity(rows.len() * row_len);
        for &r in rows {
            let row = &bytes[r * row_len * size..(r + 1) * row_len * size];
            if matches!(info.dtype, FileDType::I64 | FileDType::U8) {
                return Err(LoadError::UnsupportedDType {
                    path: file.path().to_path_buf(),
                    key: stored.to_string(),
                    dtype: format!("{:?}", info.dtype),
                });
            }
            out.extend(dtype::decode(info.dtype, row).iter().map(|v| v * scale));
        }
        Ok(out)
    }

    /// An aliased checkpoint's `[C, C, 1, 1]` 1x1 conv read as `[C, C]`.
    fn reinterpretable(&self, stored: &[usize], asked: &[usize]) -> bool {
        let squeezed = |s: &[usize]| {
            let mut s = s.to_vec();
            while s.len() > 2 && s.last() == Some(&1) {
                s.pop();
            }
            s
        };
        !self.aliases.is_empty() && squeezed(stored) == squeezed(asked)
    }

    fn check_virtual_shape(
        &self,
        key: &str,
        found: &[usize],
        shape: &[usize],
    ) -> Result<(), LoadError> {
        if found != shape && !self.reinterpretable(found, shape) {
            return Err(LoadError::TensorShape {
                path: PathBuf::from("(key list)"),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: found.to_vec(),
            });
        }
        Ok(())
    }

    fn check_shape(
        &self,
        file: &SafetensorsFile,
        key: &str,
        shape: &[usize],
    ) -> Result<(), LoadError> {
        let info = file.info(key).expect("file() found the key");
        if info.shape != shape && !self.reinterpretable(&info.shape, shape) {
            return Err(LoadError::TensorShape {
                path: file.path().to_path_buf(),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        Ok(())
    }

    /// Uploads a tensor in `dtype`, checked against `shape`. Stored f16 goes
    /// up as is; other conversions happen on the CPU, once. The tensor is
    /// marked constant, so ops may keep forms of it (packed operands).
    pub fn upload(&self, gpu: &Gpu, key: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        self.upload_values(gpu, key, shape, dtype)
            .map(Tensor::into_constant)
    }

    fn upload_values(&self, gpu: &Gpu, key: &str, shape: &[usize], dtype: DType) -> Result<Tensor> {
        if self.lora.contains_key(key) && !gpu.is_plan() {
            // Fused on the CPU in f32, then stored in the GPU's precision.
            return Tensor::from_f32(gpu, &self.read_f32(key, shape)?, shape, dtype);
        }
        let key = self.stored(key);
        if let Some(found) = self.virtual_shape(key, shape) {
            self.check_virtual_shape(key, found, shape)?;
            self.used
                .lock()
                .expect("used-key lock poisoned")
                .insert(key.to_string());
            if gpu.is_plan() {
                return Tensor::empty(gpu, shape, dtype);
            }
            return Tensor::from_f32(
                gpu,
                &Self::stand_in_values(key, shape.iter().product()),
                shape,
                dtype,
            );
        }
        let file = self.file(key)?;
        self.check_shape(file, key, shape)?;
        self.used
            .lock()
            .expect("used-key lock poisoned")
            .insert(key.to_string());
        let info = file.info(key).expect("file() found the key");
        if matches!(info.dtype, FileDType::I64 | FileDType::U8) {
            return Err(LoadError::UnsupportedDType {
                path: file.path().to_path_buf(),
                key: key.to_string(),
                dtype: format!("{:?}", info.dtype),
            }
            .into());
        }
        match (info.dtype, dtype) {
            (FileDType::F32, DType::F32) | (FileDType::F16, DType::F16) => {
                Tensor::from_bytes(gpu, file.bytes(key)?, shape, dtype)
            }
            (_, DType::F32) => Tensor::from_f32(gpu, &file.to_f32(key)?, shape, DType::F32),
            (_, DType::F16) => {
                let h: Vec<f16> = file
                    .to_f32(key)?
                    .iter()
                    .map(|&v| f16::from_f32(v))
                    .collect();
                Tensor::from_bytes(gpu, bytemuck::cast_slice(&h), shape, DType::F16)
            }
        }
    }
}

/// A position in a [`WeightSet`]'s key tree.
#[derive(Clone)]
pub struct Weights {
    set: Arc<WeightSet>,
    prefix: String,
    dtype: DType,
}

impl Weights {
    pub fn new(set: Arc<WeightSet>, dtype: DType) -> Self {
        Weights {
            set,
            prefix: String::new(),
            dtype,
        }
    }

    /// The child path `prefix.name` (numbers work too: `.pp(0)`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        Weights {
            set: self.set.clone(),
            prefix,
            dtype: self.dtype,
        }
    }

    pub fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.set.contains(&self.key(name))
    }

    pub fn set(&self) -> &Arc<WeightSet> {
        &self.set
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Uploads `prefix.name`, which must have `shape`.
    pub fn tensor(&self, gpu: &Gpu, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.set.upload(gpu, &self.key(name), shape, self.dtype)
    }
}
