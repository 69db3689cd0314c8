//! What a single `.safetensors` file is, from its header alone: the family
//! that runs it (Wan, AnimateDiff-SD), its role (transformer, text encoder,
//! VAE, LoRA, …), the variant its shapes say (Wan 1.3B / 14B, UMT5-XXL) and
//! its storage dtype — for `motif models` over a ComfyUI `models/` folder and
//! for picking files by name. Only the 8-byte length and the JSON header
//! are read, never the tensor data: a folder of 30 GB checkpoints lists in
//! milliseconds, and a file too broken to load still shows up, with what is
//! wrong (a truncated download says how many bytes it lacks).
//!
//! A ComfyUI `models/` folder keeps one kind of file per subfolder
//! ([`COMFY_FOLDERS`]); the subfolder is never trusted for the role (users
//! drop files in the wrong one), the keys are.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::single_file::{self, FileKind, KeyShapes};
use super::wan_files::{self, WanFile};
use crate::error::LoadError;

/// The subfolders of ComfyUI's `models/` that hold what Motif runs:
/// transformers (`diffusion_models/`, its older name `unet/`), SD
/// checkpoints, text encoders (`text_encoders/`, older `clip/`), VAEs,
/// LoRAs, AnimateDiff motion modules and image encoders (`clip_vision/`).
pub const COMFY_FOLDERS: [&str; 9] = [
    "diffusion_models",
    "unet",
    "checkpoints",
    "text_encoders",
    "clip",
    "vae",
    "loras",
    "animatediff_models",
    "clip_vision",
];

/// The safetensors format's bound on the header (the reference
/// implementation refuses larger ones).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// How deep a ComfyUI subfolder is searched (users group LoRAs in folders).
const MAX_DEPTH: usize = 4;

/// The model family a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Wan,
    /// Stable Diffusion 1.5 checkpoints, VAEs, CLIP, LoRAs and AnimateDiff
    /// motion modules: what the AnimateDiff family runs.
    AnimateDiffSd,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Wan => "Wan",
            Family::AnimateDiffSd => "AnimateDiff-SD",
        }
    }
}

/// What the file is for, with the numbers that say which files fit together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A Wan diffusion transformer: the width of the text it takes, its
    /// input channels (for image-to-video more than the latents: the frame
    /// mask and the encoded still), the latent channels it predicts (the
    /// VAE's) and the width of the image tokens it reads (image-to-video
    /// with an image encoder).
    Transformer {
        text_dim: usize,
        in_channels: usize,
        latent_channels: usize,
        image_dim: Option<usize>,
    },
    /// A whole SD checkpoint (UNet, CLIP, VAE in one file).
    Checkpoint,
    /// A UMT5 (Wan) text encoder and its width.
    Umt5 {
        d_model: usize,
    },
    /// A CLIP text encoder alone (ComfyUI's `clip/clip_l.safetensors`).
    Clip,
    /// A VAE; `latent_channels` for Wan's (what the transformer's must equal).
    Vae {
        latent_channels: Option<usize>,
    },
    Lora,
    MotionModule,
    /// A CLIP vision image encoder (Wan 2.1 image-to-video) and its width.
    ImageEncoder {
        width: usize,
    },
}

impl Role {
    /// The role in a user's words.
    pub fn describe(self) -> &'static str {
        match self {
            Role::Transformer { .. } => "transformer",
            Role::Checkpoint => "checkpoint",
            Role::Umt5 { .. } => "text encoder (UMT5)",
            Role::Clip => "text encoder (CLIP)",
            Role::Vae { .. } => "VAE",
            Role::Lora => "LoRA",
            Role::MotionModule => "motion module",
            Role::ImageEncoder { .. } => "image encoder (CLIP vision)",
        }
    }

    /// The flag that takes it; `None` for what Motif takes only inside a
    /// checkpoint or folder (a CLIP text encoder alone).
    pub fn flag(self) -> Option<&'static str> {
        match self {
            Role::Transformer { .. } | Role::Checkpoint => Some("--model"),
            Role::Umt5 { .. } => Some("--text-encoder"),
            Role::Clip => None,
            Role::Vae { .. } => Some("--vae"),
            Role::Lora => Some("--lora"),
            Role::MotionModule => Some("--motion-adapter"),
            Role::ImageEncoder { .. } => Some("--image-encoder"),
        }
    }
}

/// What a file's header says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    pub family: Family,
    pub role: Role,
    /// What its shapes say beyond the role: `1.3B T2V`, `UMT5-XXL`, `rank 32`.
    pub variant: String,
    /// The dtype most of its bytes are stored in: `bf16`, `f16`, `f32`,
    /// `fp8 e4m3fn`, `fp8 e5m2`, with ` scaled` for ComfyUI's scaled fp8.
    pub dtype: String,
    /// Bytes the header lays out past the end of the file: a download cut
    /// short. 0 for a whole file.
    pub missing_bytes: u64,
}

/// One tensor's header entry: dtype as the file spells it (`BF16`,
/// `F8_E4M3`) and shape.
#[derive(Debug, Clone)]
pub struct HeaderEntry {
    pub dtype: String,
    pub shape: Vec<usize>,
}

/// A safetensors header read without touching the data: the tensors and
/// how long the file says it is.
#[derive(Debug, Clone)]
pub struct Header {
    pub tensors: BTreeMap<String, HeaderEntry>,
    /// 8 + header length + the data section the offsets lay out.
    pub expected_len: u64,
    pub file_len: u64,
}

fn corrupt(path: &Path, reason: impl Into<String>) -> LoadError {
    LoadError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads the length field and the JSON header of `path`, nothing more.
pub fn read_header(path: &Path) -> Result<Header, LoadError> {
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    let mut length = [0u8; 8];
    file.read_exact(&mut length).map_err(|_| {
        corrupt(
            path,
            format!("{file_len} bytes, shorter than the 8-byte header length"),
        )
    })?;
    let header_len = u64::from_le_bytes(length);
    if header_len > MAX_HEADER_BYTES || header_len > file_len.saturating_sub(8) {
        return Err(corrupt(
            path,
            format!(
                "its header length field says {header_len} bytes, but the file has {} after it \
                 (the format allows at most {MAX_HEADER_BYTES})",
                file_len.saturating_sub(8)
            ),
        ));
    }
    let mut json = vec![0u8; header_len as usize];
    file.read_exact(&mut json).map_err(io)?;
    let value: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&json)
        .map_err(|e| corrupt(path, format!("its header is not a JSON object: {e}")))?;
    let mut tensors = BTreeMap::new();
    let mut data_len = 0u64;
    for (name, entry) in value {
        if name == "__metadata__" {
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Raw {
            dtype: String,
            shape: Vec<usize>,
            data_offsets: (u64, u64),
        }
        let raw: Raw = serde_json::from_value(entry)
            .map_err(|e| corrupt(path, format!("header entry `{name}`: {e}")))?;
        data_len = data_len.max(raw.data_offsets.1);
        tensors.insert(
            name,
            HeaderEntry {
                dtype: raw.dtype,
                shape: raw.shape,
            },
        );
    }
    Ok(Header {
        tensors,
        expected_len: 8 + header_len + data_len,
        file_len,
    })
}

/// `F8_E4M3` → `fp8 e4m3fn` and so on: the names ComfyUI's file names use.
fn dtype_name(stored: &str) -> String {
    match stored {
        "F32" => "f32".into(),
        "F16" => "f16".into(),
        "BF16" => "bf16".into(),
        "F8_E4M3" => "fp8 e4m3fn".into(),
        "F8_E5M2" => "fp8 e5m2".into(),
        other => other.to_lowercase(),
    }
}

/// The file's storage dtype: fp8 if any weight is (fp8 files keep norms,
/// biases and sometimes embeddings in 16 bits, and a tiny model's may
/// outweigh its fp8 matrices), else the dtype of most of its bytes (side
/// tensors left out).
fn main_dtype(header: &Header) -> String {
    let mut bytes: BTreeMap<&str, u64> = BTreeMap::new();
    for (name, entry) in &header.tensors {
        if wan_files::is_side_tensor(name) {
            continue;
        }
        let count: u64 = entry.shape.iter().map(|&d| d as u64).product();
        let size = match entry.dtype.as_str() {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        };
        *bytes.entry(entry.dtype.as_str()).or_default() += count * size;
    }
    let fp8 = bytes
        .iter()
        .filter(|(d, _)| d.starts_with("F8"))
        .max_by_key(|&(_, b)| b);
    let most = fp8.or_else(|| bytes.iter().max_by_key(|&(_, b)| b));
    let Some((&stored, _)) = most else {
        return "no tensors".into();
    };
    let name = dtype_name(stored);
    let scaled = header.tensors.contains_key("scaled_fp8")
        || header.tensors.keys().any(|k| k.ends_with(".scale_weight"));
    if scaled && stored.starts_with("F8") {
        format!("{name} scaled")
    } else {
        name
    }
}

/// A LoRA factor's key (any of the layouts Motif or diffusers read).
fn is_lora_key(key: &str) -> bool {
    [
        ".lora_down.weight",
        ".lora_up.weight",
        ".lora_A.weight",
        ".lora_B.weight",
        ".lora.down.weight",
        ".lora.up.weight",
        "_lora.down.weight",
        "_lora.up.weight",
    ]
    .iter()
    .any(|s| key.ends_with(s))
}

/// A LoRA key's module path with the layout's prefix taken off.
fn lora_module(key: &str) -> &str {
    const PREFIXES: [&str; 8] = [
        "base_model.model.",
        "model.diffusion_model.",
        "diffusion_model.",
        "transformer.",
        "lora_unet_",
        "unet.",
        "lora_te_",
        "text_encoder.",
    ];
    let mut k = key;
    while let Some(rest) = PREFIXES.iter().find_map(|p| k.strip_prefix(p)) {
        k = rest;
    }
    k
}

/// Wan names its transformer blocks `blocks.N` (`blocks_N` in kohya's
/// spelling); SD's are `down_blocks`, `input_blocks`, … and its text
/// encoder's `text_model`.
fn lora_family(header: &Header) -> Option<Family> {
    let modules: Vec<&str> = header
        .tensors
        .keys()
        .filter(|k| is_lora_key(k))
        .map(|k| lora_module(k))
        .collect();
    let wan = |m: &&str| m.starts_with("blocks.") || m.starts_with("blocks_");
    if modules.iter().any(wan) {
        return Some(Family::Wan);
    }
    let sd = [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "input_blocks",
        "output_blocks",
        "middle_block",
        "text_model",
        "encoder_layers",
    ];
    modules
        .iter()
        .any(|m| sd.iter().any(|s| m.starts_with(s)))
        .then_some(Family::AnimateDiffSd)
}

/// A Wan LoRA's model width and rank, from a self-attention query's down
/// factor (`[rank, dim]`).
fn wan_lora_variant(header: &Header) -> String {
    let down = header.tensors.iter().find(|(k, _)| {
        let m = lora_module(k);
        (m.contains("self_attn.q.") || m.contains("self_attn_q.") || m.contains("attn1.to_q."))
            && (k.ends_with("lora_down.weight") || k.ends_with("lora_A.weight"))
    });
    match down.map(|(_, e)| e.shape.as_slice()) {
        Some([rank, dim, ..]) => format!("{}, rank {rank}", wan_size(*dim)),
        _ => "size unknown".into(),
    }
}

/// Wan's published sizes by transformer width.
fn wan_size(dim: usize) -> String {
    match dim {
        1536 => "1.3B".into(),
        3072 => "5B".into(),
        5120 => "14B".into(),
        d => format!("width {d}"),
    }
}

fn shape_of<'a>(keys: &'a KeyShapes, key: &str) -> &'a [usize] {
    keys.get(key).map_or(&[], Vec::as_slice)
}

/// What `path` is, from its header; `None` for a safetensors file that is
/// nothing Motif knows.
pub fn identify(path: &Path) -> Result<Option<Identified>, LoadError> {
    let header = read_header(path)?;
    let keys: KeyShapes = header
        .tensors
        .iter()
        .map(|(k, e)| (k.clone(), e.shape.clone()))
        .collect();
    let found = |family, role, variant: String| {
        Some(Identified {
            family,
            role,
            variant,
            dtype: main_dtype(&header),
            missing_bytes: header.expected_len.saturating_sub(header.file_len),
        })
    };
    let dim = |key: &str, axis: usize| shape_of(&keys, key).get(axis).copied().unwrap_or(0);
    if let Some(kind) = wan_files::detect(&keys) {
        return Ok(match kind {
            WanFile::Transformer => {
                let p = if keys.contains_key("patch_embedding.weight") {
                    ""
                } else {
                    wan_files::WAN_PREFIX
                };
                let width = dim(&format!("{p}patch_embedding.weight"), 0);
                let in_channels = dim(&format!("{p}patch_embedding.weight"), 1);
                let patch: usize = shape_of(&keys, &format!("{p}patch_embedding.weight"))
                    .iter()
                    .skip(2)
                    .product();
                let latent_channels = dim(&format!("{p}head.head.weight"), 0) / patch.max(1);
                let branch = wan_files::image_branch(&keys);
                let image_dim = branch.map(|(d, _)| d);
                let first_last = branch.is_some_and(|(_, positions)| positions.is_some());
                // The task from the shapes: Wan2.1-I2V-14B-480P and -720P
                // are the same network (only their training resolution
                // differs), so a file cannot say which of the two it is.
                let task = match (image_dim, first_last, in_channels, latent_channels) {
                    (Some(_), true, ..) => "FLF2V",
                    (Some(_), false, ..) => "I2V",
                    (None, _, i, l) if i == l && l == 48 => "TI2V",
                    (None, _, i, l) if i == l => "T2V",
                    (None, _, i, l) if i == 2 * l + 4 => "I2V, A14B expert (no image encoder)",
                    _ => "",
                };
                let variant = format!("{} {task}", wan_size(width)).trim().to_string();
                found(
                    Family::Wan,
                    Role::Transformer {
                        text_dim: dim(&format!("{p}text_embedding.0.weight"), 1),
                        in_channels,
                        latent_channels,
                        image_dim,
                    },
                    variant,
                )
            }
            WanFile::Umt5Transformers | WanFile::Umt5Wan => {
                let d_model = dim("shared.weight", 1).max(dim("token_embedding.weight", 1));
                let variant = match d_model {
                    4096 => "UMT5-XXL".to_string(),
                    d => format!("UMT5, width {d}"),
                };
                found(Family::Wan, Role::Umt5 { d_model }, variant)
            }
            WanFile::Vae => {
                let z = dim("conv2.weight", 0);
                let version = match wan_files::is_vae_22(&keys) {
                    true => "Wan 2.2",
                    false => "Wan",
                };
                found(
                    Family::Wan,
                    Role::Vae {
                        latent_channels: Some(z),
                    },
                    format!("{version}, {z} latent channels"),
                )
            }
            WanFile::ClipVision => {
                let p = ["vision_model.", ""]
                    .into_iter()
                    .find(|p| keys.contains_key(&format!("{p}pre_layrnorm.weight")))
                    .unwrap_or("");
                let width = dim(&format!("{p}embeddings.patch_embedding.weight"), 0);
                let layers = keys
                    .keys()
                    .filter(|k| {
                        k.strip_prefix(p)
                            .and_then(|r| r.strip_prefix("encoder.layers."))
                            .is_some_and(|r| r.ends_with(".layer_norm1.weight"))
                    })
                    .count();
                let variant = match (width, layers) {
                    (wan_files::CLIP_VIT_H_WIDTH, 32) => "CLIP ViT-H/14".to_string(),
                    (w, l) => format!("CLIP vision, width {w}, {l} layers"),
                };
                found(Family::Wan, Role::ImageEncoder { width }, variant)
            }
        });
    }
    if keys.keys().any(|k| is_lora_key(k)) {
        return Ok(match lora_family(&header) {
            Some(Family::Wan) => found(Family::Wan, Role::Lora, wan_lora_variant(&header)),
            Some(f) => found(f, Role::Lora, "SD1.5".into()),
            None => None,
        });
    }
    if keys.contains_key("text_model.encoder.layers.0.self_attn.q_proj.weight") {
        let width = dim("text_model.embeddings.token_embedding.weight", 1);
        let variant = match width {
            768 => "CLIP-L".to_string(),
            w => format!("CLIP, width {w}"),
        };
        return Ok(found(Family::AnimateDiffSd, Role::Clip, variant));
    }
    Ok(match single_file::detect(&keys) {
        FileKind::LdmStableDiffusion => {
            let motion = keys.keys().any(|k| k.contains("motion_modules"));
            let variant = if motion {
                "SD1.5 + motion modules"
            } else {
                "SD1.5"
            };
            found(Family::AnimateDiffSd, Role::Checkpoint, variant.into())
        }
        FileKind::MotionModule => found(
            Family::AnimateDiffSd,
            Role::MotionModule,
            "AnimateDiff".into(),
        ),
        FileKind::LdmVae | FileKind::DiffusersVae => found(
            Family::AnimateDiffSd,
            Role::Vae {
                latent_channels: None,
            },
            "SD".into(),
        ),
        FileKind::DiffusersUNet | FileKind::Unknown => None,
    })
}

/// One `.safetensors` file under a ComfyUI subfolder.
#[derive(Debug, Clone)]
pub struct FolderFile {
    pub path: PathBuf,
    /// The path under the models folder without `.safetensors`
    /// (`diffusion_models/wan2.1_t2v_1.3B_fp16`), `/`-separated.
    pub name: String,
    /// The file name without `.safetensors`.
    pub stem: String,
    pub bytes: u64,
    /// What the header says, or why it could not be read.
    pub identified: Result<Option<Identified>, String>,
}

/// Every `.safetensors` file in the ComfyUI subfolders of `models`
/// ([`COMFY_FOLDERS`]), sorted by name; empty if it has none.
pub fn comfy_files(models: &Path) -> Vec<FolderFile> {
    let mut out = Vec::new();
    for sub in COMFY_FOLDERS {
        let dir = models.join(sub);
        if dir.is_dir() {
            walk(&dir, sub, 0, &mut out);
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn walk(dir: &Path, rel: &str, depth: usize, out: &mut Vec<FolderFile>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let Some(file_name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.is_dir() {
            if depth < MAX_DEPTH {
                walk(&path, &format!("{rel}/{file_name}"), depth + 1, out);
            }
            continue;
        }
        let Some(stem) = file_name.strip_suffix(".safetensors") else {
            continue;
        };
        out.push(FolderFile {
            bytes: std::fs::metadata(&path).map_or(0, |m| m.len()),
            identified: identify(&path).map_err(|e| e.to_string()),
            name: format!("{rel}/{stem}"),
            stem: stem.to_string(),
            path,
        });
    }
}
