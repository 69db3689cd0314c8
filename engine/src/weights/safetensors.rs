//! safetensors files: memory-mapped, with the whole header checked (length,
//! JSON, dtypes, offsets, sizes) before any tensor is read. The format is an
//! 8-byte little-endian header length, a JSON header mapping each tensor to
//! `{dtype, shape, data_offsets: [begin, end]}` relative to the data section
//! that follows, and the raw little-endian data.
//!
//! The parser is ours rather than the `safetensors` crate's because a user
//! must learn *which* tensor is broken and how (that crate reports
//! "invalid offset" or "invalid info" without the numbers).

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use crate::error::LoadError;

/// Element types Motif loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileDType {
    F32,
    F16,
    BF16,
    /// Integer ids and timesteps in reference case files; never a weight.
    I64,
    /// Raw bytes: the SentencePiece model inside ComfyUI's UMT5 files.
    U8,
    /// float8_e4m3fn and float8_e5m2 (fp8 checkpoints; see `dtype.rs`).
    F8E4M3,
    F8E5M2,
}

impl FileDType {
    pub fn size_bytes(self) -> usize {
        match self {
            FileDType::F32 => 4,
            FileDType::F16 | FileDType::BF16 => 2,
            FileDType::I64 => 8,
            FileDType::U8 | FileDType::F8E4M3 | FileDType::F8E5M2 => 1,
        }
    }
}

/// One tensor's entry in the header.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub dtype: FileDType,
    pub shape: Vec<usize>,
    /// Byte range inside the whole file.
    pub range: Range<usize>,
}

/// A validated, memory-mapped safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    map: memmap2::Mmap,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

/// The largest header we accept: real headers are well under 10 MB; anything
/// larger is a corrupt length field, refused before reading it.
const MAX_HEADER_BYTES: u64 = 100 << 20;

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; a file truncated by another process
        // while mapped is the one hazard, as with every mmap-based loader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        let (tensors, metadata) = parse_header(&map, &path)?;
        Ok(SafetensorsFile {
            path,
            map,
            tensors,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    pub fn info(&self, key: &str) -> Option<&TensorInfo> {
        self.tensors.get(key)
    }

    /// The `__metadata__` string map of the header.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn entry(&self, key: &str) -> Result<&TensorInfo, LoadError> {
        self.tensors
            .get(key)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }

    /// The raw little-endian bytes of a tensor.
    pub fn bytes(&self, key: &str) -> Result<&[u8], LoadError> {
        let info = self.entry(key)?;
        Ok(&self.map[info.range.clone()])
    }

    /// An I64 tensor's values (ids, integer timesteps).
    pub fn to_i64(&self, key: &str) -> Result<Vec<i64>, LoadError> {
        let info = self.entry(key)?;
        if info.dtype != FileDType::I64 {
            return Err(LoadError::UnsupportedDType {
                path: self.path.clone(),
                key: key.to_string(),
                dtype: format!("{:?} where I64 was expected", info.dtype),
            });
        }
        Ok(bytemuck::pod_collect_to_vec::<u8, i64>(
            &self.map[info.range.clone()],
        ))
    }

    /// A tensor's values as f32 (any stored dtype; scaled fp8 weights
    /// times their scale).
    pub fn to_f32(&self, key: &str) -> Result<Vec<f32>, LoadError> {
        super::dtype::tensor_f32(self, key)
    }
}

type Header = (BTreeMap<String, TensorInfo>, BTreeMap<String, String>);

fn parse_header(file: &[u8], path: &Path) -> Result<Header, LoadError> {
    parse_header_inner(file).map_err(|e| match e {
        HeaderError::Corrupt(reason) => LoadError::Corrupt {
            path: path.to_path_buf(),
            reason,
        },
        HeaderError::DType { key, dtype } => LoadError::UnsupportedDType {
            path: path.to_path_buf(),
            key,
            dtype,
        },
    })
}

enum HeaderError {
    Corrupt(String),
    DType { key: String, dtype: String },
}

impl From<String> for HeaderError {
    fn from(s: String) -> Self {
        HeaderError::Corrupt(s)
    }
}

impl From<&str> for HeaderError {
    fn from(s: &str) -> Self {
        HeaderError::Corrupt(s.to_string())
    }
}

fn parse_header_inner(file: &[u8]) -> Result<Header, HeaderError> {
    let len = file.len() as u64;
    if len < 8 {
        return Err(
            format!("the file has {len} bytes, fewer than the 8-byte header length").into(),
        );
    }
    let header_len = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
    if header_len > len - 8 {
        return Err(format!(
            "the header length {header_len} runs past the end of the file ({len} bytes)"
        )
        .into());
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(format!(
            "the header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit"
        )
        .into());
    }
    let header_end = 8 + header_len as usize;
    let text = std::str::from_utf8(&file[8..header_end])
        .map_err(|e| format!("the header is not UTF-8: {e}"))?;
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("the header is not valid JSON: {e}"))?;
    let obj = json.as_object().ok_or("the header is not a JSON object")?;
    let data_len = file.len() - header_end;

    let mut tensors = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, entry) in obj {
        if name == "__metadata__" {
            if let Some(m) = entry.as_object() {
                for (k, v) in m {
                    metadata.insert(
                        k.clone(),
                        v.as_str()
                            .map(str::to_string)
                            .unwrap_or_else(|| v.to_string()),
                    );
                }
            }
            continue;
        }
        let bad = |what: &str| format!("tensor `{name}`: {what}");
        let dtype_name = entry
            .get("dtype")
            .and_then(|d| d.as_str())
            .ok_or_else(|| bad("no `dtype` string"))?;
        let shape: Vec<usize> = entry
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no `shape` list"))?
            .iter()
            .map(|d| d.as_u64().map(|v| v as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`shape` holds something other than non-negative integers"))?;
        let offsets: Vec<u64> = entry
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .filter(|a| a.len() == 2)
            .and_then(|a| a.iter().map(|v| v.as_u64()).collect::<Option<_>>())
            .ok_or_else(|| bad("`data_offsets` is not a pair of byte offsets"))?;
        let (begin, end) = (offsets[0], offsets[1]);
        if begin > end {
            return Err(bad(&format!("data_offsets [{begin}, {end}] are reversed")).into());
        }
        if end > data_len as u64 {
            return Err(bad(&format!(
                "data_offsets [{begin}, {end}] run past the end of the data section ({data_len} bytes; the file may be truncated)"
            ))
            .into());
        }
        let dtype = match dtype_name {
            "F32" => FileDType::F32,
            "F16" => FileDType::F16,
            "BF16" => FileDType::BF16,
            "I64" => FileDType::I64,
            "U8" => FileDType::U8,
            "F8_E4M3" => FileDType::F8E4M3,
            "F8_E5M2" => FileDType::F8E5M2,
            other => {
                return Err(HeaderError::DType {
                    key: name.clone(),
                    dtype: other.to_string(),
                })
            }
        };
        let numel = shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad("shape overflows"))?;
        let want = numel * dtype.size_bytes() as u64;
        if want != end - begin {
            return Err(bad(&format!(
                "shape {shape:?} of {dtype_name} needs {want} bytes but data_offsets [{begin}, {end}] span {}",
                end - begin
            ))
            .into());
        }
        let range = header_end + begin as usize..header_end + end as usize;
        tensors.insert(
            name.clone(),
            TensorInfo {
                dtype,
                shape,
                range,
            },
        );
    }
    Ok((tensors, metadata))
}

/// Writes a safetensors file (tests and tools build small checkpoints with it).
pub fn write(
    path: impl AsRef<Path>,
    tensors: &[(&str, FileDType, &[usize], &[u8])],
) -> Result<(), LoadError> {
    let path = path.as_ref();
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, dtype, shape, bytes) in tensors {
        let dtype = match dtype {
            FileDType::F32 => "F32",
            FileDType::F16 => "F16",
            FileDType::BF16 => "BF16",
            FileDType::I64 => "I64",
            FileDType::U8 => "U8",
            FileDType::F8E4M3 => "F8_E4M3",
            FileDType::F8E5M2 => "F8_E5M2",
        };
        header.insert(
            name.to_string(),
            serde_json::json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes.len()] }),
        );
        offset += bytes.len();
    }
    let mut text = serde_json::Value::Object(header).to_string();
    // Pad so that the data section starts 8-byte aligned, as the reference writer does.
    while !(8 + text.len()).is_multiple_of(8) {
        text.push(' ');
    }
    let mut out = Vec::with_capacity(8 + text.len() + offset);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
    for (_, _, _, bytes) in tensors {
        out.extend_from_slice(bytes);
    }
    std::fs::write(path, out).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })
}
