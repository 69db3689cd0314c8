//! safetensors files, memory-mapped and read through the `safetensors` crate,
//! the format's reference implementation (what Python's `safetensors` runs).
//! The crate decides what a valid file is: an 8-byte little-endian header
//! length within the format's 100 MB limit, a UTF-8 JSON header mapping each
//! tensor to a known `dtype`, a `shape` and `data_offsets`, offsets that lay
//! the tensors back to back from the start of the data section, byte spans
//! that match shape × dtype, and a data section covered exactly (no missing
//! or trailing bytes).
//!
//! On top, Motif keeps its own rules: only the dtypes it computes with are
//! loaded, every error names the file, and a refusal says which tensor broke
//! which rule with the numbers (the crate's own messages carry neither).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{TensorInfo as FormatEntry, TensorView};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

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

    /// The format's dtype, if Motif loads it.
    fn from_format(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(FileDType::F32),
            Dtype::F16 => Some(FileDType::F16),
            Dtype::BF16 => Some(FileDType::BF16),
            Dtype::I64 => Some(FileDType::I64),
            Dtype::U8 => Some(FileDType::U8),
            Dtype::F8_E4M3 => Some(FileDType::F8E4M3),
            Dtype::F8_E5M2 => Some(FileDType::F8E5M2),
            _ => None,
        }
    }

    fn to_format(self) -> Dtype {
        match self {
            FileDType::F32 => Dtype::F32,
            FileDType::F16 => Dtype::F16,
            FileDType::BF16 => Dtype::BF16,
            FileDType::I64 => Dtype::I64,
            FileDType::U8 => Dtype::U8,
            FileDType::F8E4M3 => Dtype::F8_E4M3,
            FileDType::F8E5M2 => Dtype::F8_E5M2,
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

/// The header length field's size, in front of the header.
const LENGTH_FIELD_BYTES: usize = 8;

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
        let (header_len, header) =
            SafeTensors::read_metadata(&map).map_err(|error| LoadError::Corrupt {
                path: path.clone(),
                reason: refusal_reason(&map, error),
            })?;
        // The crate has checked that every range lies inside the data section.
        let data_start = LENGTH_FIELD_BYTES + header_len;
        let mut tensors = BTreeMap::new();
        // In file order, so that of several unloadable tensors the first is named.
        for name in header.offset_keys() {
            let entry = header
                .info(&name)
                .expect("offset_keys lists the header's tensors");
            let Some(dtype) = FileDType::from_format(entry.dtype) else {
                return Err(LoadError::UnsupportedDType {
                    path,
                    key: name,
                    dtype: entry.dtype.to_string(),
                });
            };
            let (begin, end) = entry.data_offsets;
            tensors.insert(
                name,
                TensorInfo {
                    dtype,
                    shape: entry.shape.clone(),
                    range: data_start + begin..data_start + end,
                },
            );
        }
        let metadata = header
            .metadata()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
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

/// Why the crate refused `file`, in plain words with the numbers: the file's
/// size and header length, and the tensor entry at fault with its dtype,
/// shape and offsets. The crate has already decided; this only explains.
fn refusal_reason(file: &[u8], error: SafeTensorError) -> String {
    let file_len = file.len();
    let header_len = file
        .get(..LENGTH_FIELD_BYTES)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .unwrap_or(0);
    // Past the length checks, the crate has read exactly these bytes.
    let header = usize::try_from(header_len)
        .ok()
        .and_then(|len| file.get(LENGTH_FIELD_BYTES..LENGTH_FIELD_BYTES.checked_add(len)?))
        .unwrap_or_default();
    match error {
        SafeTensorError::HeaderTooSmall => format!(
            "the file has {file_len} bytes, fewer than the {LENGTH_FIELD_BYTES}-byte header length"
        ),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => {
            if header_len > file_len.saturating_sub(LENGTH_FIELD_BYTES) as u64 {
                format!(
                    "the header length {header_len} runs past the end of the file ({file_len} bytes)"
                )
            } else {
                format!("the header length {header_len} exceeds the format's 100 MB limit")
            }
        }
        SafeTensorError::InvalidHeader(e) => format!("the header is not UTF-8: {e}"),
        SafeTensorError::InvalidHeaderDeserialization(e) | SafeTensorError::JsonError(e) => {
            match serde_json::from_slice::<serde_json::Value>(header) {
                Err(json) => format!("the header is not valid JSON: {json}"),
                Ok(serde_json::Value::Object(map)) => malformed_entry(map)
                    .unwrap_or_else(|| format!("the header does not follow the format: {e}")),
                Ok(_) => "the header is not a JSON object".into(),
            }
        }
        layout => entries(header)
            .and_then(|entries| layout_reason(&entries, file_len, header_len, &layout))
            .unwrap_or_else(|| layout.to_string()),
    }
}

/// The first header entry that does not deserialize into the format's types.
fn malformed_entry(header: serde_json::Map<String, serde_json::Value>) -> Option<String> {
    header.into_iter().find_map(|(name, value)| {
        if name == "__metadata__" {
            serde_json::from_value::<HashMap<String, String>>(value)
                .err()
                .map(|e| format!("`__metadata__` must map strings to strings: {e}"))
        } else {
            serde_json::from_value::<FormatEntry>(value).err().map(|e| {
                format!(
                    "tensor `{name}`: {e} (each tensor needs a `dtype` the format defines, \
                     a `shape` of non-negative integers and two `data_offsets`)"
                )
            })
        }
    })
}

/// The header's tensor entries in offset order, as the crate reads them.
fn entries(header: &[u8]) -> Option<Vec<(String, FormatEntry)>> {
    #[derive(serde::Deserialize)]
    struct Header {
        #[serde(rename = "__metadata__")]
        _metadata: Option<HashMap<String, String>>,
        #[serde(flatten)]
        tensors: HashMap<String, FormatEntry>,
    }
    let header: Header = serde_json::from_slice(header).ok()?;
    let mut entries: Vec<_> = header.tensors.into_iter().collect();
    // Ties broken by name, so that the message does not vary between runs.
    entries.sort_by(|(a, x), (b, y)| x.data_offsets.cmp(&y.data_offsets).then(a.cmp(b)));
    Some(entries)
}

/// An entry's byte size from its shape and dtype, or why it has none.
fn entry_bytes(entry: &FormatEntry) -> Result<usize, &'static str> {
    let bits = entry
        .shape
        .iter()
        .try_fold(entry.dtype.bitsize(), |n, &d| n.checked_mul(d))
        .ok_or("its byte size overflows")?;
    if !bits.is_multiple_of(8) {
        return Err("its elements do not end on a byte boundary");
    }
    Ok(bits / 8)
}

/// The entry behind an offset, size or coverage refusal, with its numbers.
fn layout_reason(
    entries: &[(String, FormatEntry)],
    file_len: usize,
    header_len: u64,
    error: &SafeTensorError,
) -> Option<String> {
    let back_to_back = "tensors lie back to back from byte 0 of the data section";
    match error {
        SafeTensorError::InvalidOffset(_) => {
            // The first entry that does not begin where the one before it
            // ends (the crate's name for it is ambiguous when two entries
            // share offsets).
            let mut previous_end = 0;
            entries.iter().find_map(|(name, entry)| {
                let (begin, end) = entry.data_offsets;
                let what = if end < begin {
                    "are reversed".to_string()
                } else if begin > previous_end {
                    format!("leave a gap after byte {previous_end}, where the data before ends")
                } else if begin < previous_end {
                    format!("overlap the data before, which ends at byte {previous_end}")
                } else {
                    previous_end = end;
                    return None;
                };
                Some(format!(
                    "tensor `{name}`: data_offsets [{begin}, {end}] {what} ({back_to_back})"
                ))
            })
        }
        SafeTensorError::TensorInvalidInfo
        | SafeTensorError::ValidationOverflow
        | SafeTensorError::MisalignedSlice => entries.iter().find_map(|(name, entry)| {
            let (begin, end) = entry.data_offsets;
            let span = end.saturating_sub(begin);
            let what = format!(
                "tensor `{name}`: shape {:?} of {}",
                entry.shape, entry.dtype
            );
            match entry_bytes(entry) {
                Err(why) => Some(format!("{what}: {why}")),
                Ok(bytes) if bytes != span => Some(format!(
                    "{what} needs {bytes} bytes but data_offsets [{begin}, {end}] span {span}"
                )),
                Ok(_) => None,
            }
        }),
        SafeTensorError::MetadataIncompleteBuffer => {
            let data_len = (file_len as u64).saturating_sub(LENGTH_FIELD_BYTES as u64 + header_len);
            let covered = entries.last().map_or(0, |(_, e)| e.data_offsets.1 as u64);
            Some(match entries.last() {
                Some((name, entry)) if covered > data_len => {
                    let (begin, end) = entry.data_offsets;
                    format!(
                        "tensor `{name}`: data_offsets [{begin}, {end}] run past the end of the \
                         data section ({data_len} bytes): the file is truncated (a download cut \
                         short?); download it again"
                    )
                }
                _ => format!(
                    "{data_len} bytes of data follow the header but its tensors cover {covered}: \
                     the format allows no bytes after the last tensor"
                ),
            })
        }
        _ => None,
    }
}

/// Writes a safetensors file with the format's own writer, atomically (a
/// sibling temporary file renamed into place). Tests and tools build small
/// checkpoints with it.
pub fn write(
    path: impl AsRef<Path>,
    tensors: &[(&str, FileDType, &[usize], &[u8])],
) -> Result<(), LoadError> {
    let path = path.as_ref();
    let views = tensors
        .iter()
        .map(|&(name, dtype, shape, bytes)| {
            TensorView::new(dtype.to_format(), shape.to_vec(), bytes)
                .map(|view| (name, view))
                .map_err(|_| LoadError::Layout {
                    path: path.to_path_buf(),
                    message: format!(
                        "tensor `{name}`: {dtype:?} of shape {shape:?} needs {} bytes, {} given",
                        shape.iter().product::<usize>() * dtype.size_bytes(),
                        bytes.len()
                    ),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|error| match error {
        SafeTensorError::IoError(source) => LoadError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => LoadError::Layout {
            path: path.to_path_buf(),
            message: format!("cannot be written as safetensors: {other}"),
        },
    })
}
