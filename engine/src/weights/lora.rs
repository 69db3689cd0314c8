//! LoRA files as creators publish them, fused into the weights a model loads:
//! W' = W + weight · scale · (up @ down), in f32 on the CPU as each weight is
//! read, which is what diffusers' `load_lora_weights` followed by
//! `fuse_lora(lora_scale=weight)` leaves in the model.
//!
//! One file may hold UNet and text-encoder modules. Formats:
//! - diffusers/PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` and
//!   `text_encoder.<module>…`; diffusers' older names `<module>.lora.down.weight`,
//!   `<attn>.processor.to_q_lora.down.weight` (the AnimateDiff motion LoRAs
//!   diffusers converted) and the text encoder's `lora_linear_layer.down.weight`.
//!   Keys without a `unet.`/`text_encoder.` prefix are taken as UNet modules
//!   (`text_model.…` as text-encoder ones), AnimateDiff's original motion
//!   module names (`temporal_transformer`, `attention_blocks.N`) included.
//! - kohya/sd-scripts LoRA and LoCon: `lora_unet_<module>.lora_down.weight` /
//!   `.lora_up.weight` / `.alpha` and `lora_te_<module>…`, where `<module>` is
//!   the module path with `_` for `.`. `_` also occurs inside names, so the
//!   path is found by comparing with the model's own weight names; names in
//!   the original LDM UNet layout (`input_blocks_1_1_…`) go through the
//!   single-file LDM mapping.
//!
//! - Wan transformer LoRAs (the layouts diffusers converts in
//!   `_convert_non_diffusers_wan_lora_to_diffusers` and
//!   `_convert_musubi_wan_lora_to_diffusers`): diffusers/PEFT
//!   `transformer.blocks.N.attn1.to_q.lora_A.weight` (the prefix optional);
//!   ComfyUI / original Wan names `diffusion_model.blocks.N.self_attn.q.lora_down.weight`
//!   (or `.lora_A.weight`) with `.alpha`; musubi-tuner / kohya names
//!   `lora_unet_blocks_N_self_attn_q.lora_down.weight`; and full deltas,
//!   `.diff` (W += weight · diff) and `.diff_b` (bias += weight · diff_b),
//!   as ComfyUI applies them. diffusers 0.42 ignores `.diff` keys of block
//!   layers and drops those of norms; Motif applies every one (the format's
//!   meaning), and refuses none silently.
//!
//! Scale: alpha / rank where the file stores an `alpha` (kohya); for PEFT
//! files, the `LoraConfig` diffusers saves in the `lora_adapter_metadata`
//! header entry (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`,
//! `use_rslora`); otherwise 1, PEFT's convention without an alpha.
//!
//! Where diffusers 0.42 and kohya disagree, Motif follows the format's own
//! meaning: kohya motion-module factors (diffusers renames `motion_modules`
//! to `motion.modules` and drops them), and per-module alphas in a kohya text
//! encoder (diffusers applies the most common one to every module).
//!
//! Refused, with the reason: DoRA, LyCORIS LoHa/LoKr, Tucker-decomposed convs
//! (`lora_mid`), full-weight diffs outside Wan LoRAs, LoRA biases, SDXL's
//! second text encoder, a LoRA of another family than the model's — and
//! any module that matches no weight of the model: a LoRA is never applied
//! in part.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::single_file::{self, KeyShapes};
use super::wan_files;
use super::{refuse_pickle, FileDType, SafetensorsFile};
use crate::error::LoadError;

/// The model a LoRA module belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraTarget {
    Unet,
    TextEncoder,
    /// The Wan diffusion transformer (`WanTransformer3DModel`).
    Transformer,
}

impl LoraTarget {
    /// The key prefix diffusers uses for this model in LoRA files and metadata.
    fn prefix(self) -> &'static str {
        match self {
            LoraTarget::Unet => "unet",
            LoraTarget::TextEncoder => "text_encoder",
            LoraTarget::Transformer => "transformer",
        }
    }

    /// The model family whose LoRAs update this model, for messages.
    fn family(self) -> &'static str {
        match self {
            LoraTarget::Unet | LoraTarget::TextEncoder => "Stable Diffusion / AnimateDiff",
            LoraTarget::Transformer => "Wan",
        }
    }

    /// The model's name in messages.
    fn describe(self) -> &'static str {
        match self {
            LoraTarget::Unet => "UNet",
            LoraTarget::TextEncoder => "text encoder",
            LoraTarget::Transformer => "Wan transformer",
        }
    }
}

/// How the file names a module.
#[derive(Debug, Clone)]
enum ModuleName {
    /// A diffusers/transformers module path (`down_blocks.0.….attn1.to_q`).
    Path(String),
    /// kohya's module path with `_` for `.` (`down_blocks_0_…_attn1_to_q`;
    /// for Wan, musubi's original names: `blocks_0_self_attn_q`).
    Kohya(String),
    /// A module path in the original Wan repository's names
    /// (`blocks.0.self_attn.q`, `head.head`), as ComfyUI files give them.
    WanOriginal(String),
}

/// What a module's tensors change.
#[derive(Debug, Clone)]
enum Delta {
    /// Low-rank factors: down [r, in, (kh, kw)], up [out, r, (1, 1)].
    LowRank { down: String, up: String },
    /// A full difference to add to the weight (`.diff`) or to the bias
    /// (`.diff_b`), of the parameter's own shape.
    Full { key: String, bias: bool },
}

impl Delta {
    /// The file key that names it in messages.
    fn key(&self) -> &str {
        match self {
            Delta::LowRank { down, .. } => down,
            Delta::Full { key, .. } => key,
        }
    }
}

/// One update in a file.
#[derive(Debug, Clone)]
struct Module {
    target: LoraTarget,
    name: ModuleName,
    delta: Delta,
    /// alpha / rank (alpha / √rank with rsLoRA), or 1.
    scale: f64,
}

/// A parsed LoRA file; the factors stay in the mapped file until a weight
/// they update is read.
pub struct LoraFile {
    file: SafetensorsFile,
    modules: Vec<Module>,
}

impl std::fmt::Debug for LoraFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraFile")
            .field("path", &self.file.path())
            .field("modules", &self.modules.len())
            .finish()
    }
}

/// A factor's role, from its key's ending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Role {
    Down,
    Up,
    Alpha,
    /// A full weight difference (`.diff`).
    Diff,
    /// A full bias difference (`.diff_b`).
    DiffBias,
}

/// Key endings of LoRA tensors, each with its role. `_lora.…` is diffusers'
/// attention-processor form (`to_q_lora.down.weight`): the `to_q` before it
/// belongs to the module name.
const SUFFIXES: [(&str, Role); 13] = [
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
    ("_lora.down.weight", Role::Down),
    ("_lora.up.weight", Role::Up),
    (".alpha", Role::Alpha),
    (".diff", Role::Diff),
    (".diff_b", Role::DiffBias),
];

/// What a key of an adapter kind other than plain LoRA belongs to.
fn unsupported(key: &str) -> Option<&'static str> {
    const FRAGMENTS: [(&str, &str); 7] = [
        ("dora_scale", "DoRA"),
        ("lora_magnitude_vector", "DoRA"),
        ("hada_", "LyCORIS LoHa"),
        ("lokr_", "LyCORIS LoKr"),
        (".lora_mid.", "a Tucker-decomposed (CP) LoCon conv"),
        ("lora_B.bias", "a LoRA bias"),
        ("lora_up.bias", "a LoRA bias"),
    ];
    FRAGMENTS
        .iter()
        .find(|(fragment, _)| key.contains(fragment))
        .map(|(_, what)| *what)
}

/// The `_`-joined words of the original (LDM) UNet's names; kohya's names
/// for that layout are split at every `_` and these pairs rejoined.
const LDM_COMPOUNDS: [&str; 15] = [
    "input_blocks",
    "middle_block",
    "output_blocks",
    "time_embed",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "proj_in",
    "proj_out",
    "transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
];

fn layout(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Layout {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// Up to five names, for messages.
fn few(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(5)
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 5 {
        s += &format!(" and {} more", names.len() - 5);
    }
    s
}

/// Which model and module a factor's stem (its key without the role ending)
/// names.
fn module_name(stem: &str, processor_form: bool) -> Result<(LoraTarget, ModuleName), String> {
    if stem.starts_with("lora_te2_") || stem.starts_with("text_encoder_2.") {
        return Err("it belongs to a second text encoder (SDXL); Motif's models have one".into());
    }
    if let Some(rest) = stem.strip_prefix("lora_unet_") {
        // musubi-tuner's Wan names start at the transformer's `blocks`, a
        // name no Stable Diffusion UNet has at its top.
        let target = match rest.starts_with("blocks_") {
            true => LoraTarget::Transformer,
            false => LoraTarget::Unet,
        };
        return Ok((target, ModuleName::Kohya(rest.into())));
    }
    if let Some(rest) = stem.strip_prefix("diffusion_model.") {
        return Ok((
            LoraTarget::Transformer,
            ModuleName::WanOriginal(rest.into()),
        ));
    }
    if let Some(rest) = stem.strip_prefix("transformer.") {
        return Ok((LoraTarget::Transformer, ModuleName::Path(rest.into())));
    }
    // Without a prefix: the Wan transformer's top-level modules, in either
    // naming (a UNet's modules all sit below `down_blocks`, `mid_block`, …).
    let top = stem.split('.').next().unwrap_or(stem);
    if matches!(
        top,
        "blocks" | "condition_embedder" | "proj_out" | "patch_embedding"
    ) {
        return Ok((LoraTarget::Transformer, ModuleName::Path(stem.into())));
    }
    if matches!(
        top,
        "text_embedding" | "time_embedding" | "time_projection" | "head"
    ) {
        return Ok((
            LoraTarget::Transformer,
            ModuleName::WanOriginal(stem.into()),
        ));
    }
    if let Some(rest) = stem
        .strip_prefix("lora_te_")
        .or_else(|| stem.strip_prefix("lora_te1_"))
    {
        return Ok((LoraTarget::TextEncoder, ModuleName::Kohya(rest.into())));
    }
    let (target, path) = if let Some(rest) = stem.strip_prefix("unet.") {
        (LoraTarget::Unet, rest)
    } else if let Some(rest) = stem.strip_prefix("text_encoder.") {
        (LoraTarget::TextEncoder, rest)
    } else if stem.starts_with("text_model.") {
        (LoraTarget::TextEncoder, stem)
    } else {
        (LoraTarget::Unet, stem)
    };
    // diffusers' attention-processor names: `attn1.processor.to_q_lora`.
    let mut path = path.replace(".processor.", ".");
    if processor_form {
        let renamed = match (target, path.rsplit_once('.')) {
            (LoraTarget::Unet, Some((attn, "to_out"))) => Some(format!("{attn}.to_out.0")),
            (LoraTarget::TextEncoder, Some((attn, p @ ("to_q" | "to_k" | "to_v" | "to_out")))) => {
                Some(format!("{attn}.{}_proj", &p[3..]))
            }
            _ => None,
        };
        if let Some(r) = renamed {
            path = r;
        }
    }
    if target == LoraTarget::Unet && path.contains("motion_modules.") {
        // AnimateDiff's own motion-module names (`temporal_transformer`,
        // `attention_blocks.0`), as the single-file loader maps them.
        path = single_file::motion_key(&path);
    }
    Ok((target, ModuleName::Path(path)))
}

/// PEFT's pattern test (`re.match(rf"(.*\.)?({pattern})$", module)`) for the
/// patterns diffusers and peft write: module paths, optionally anchored with
/// `^`. `.` is taken literally, which agrees wherever the literal path matches.
fn pattern_matches(pattern: &str, module: &str) -> Option<bool> {
    let (anchored, body) = match pattern.strip_prefix('^') {
        Some(b) => (true, b),
        None => (false, pattern),
    };
    if body.chars().any(|c| "\\[](){}|*+?$^".contains(c)) {
        return None;
    }
    Some(module == body || (!anchored && module.ends_with(&format!(".{body}"))))
}

/// The adapter config diffusers stores for one model in a PEFT file's header.
struct PeftConfig {
    r: Option<f64>,
    lora_alpha: Option<f64>,
    rank_pattern: serde_json::Map<String, serde_json::Value>,
    alpha_pattern: serde_json::Map<String, serde_json::Value>,
    use_rslora: bool,
}

impl PeftConfig {
    /// `unet.r`, `unet.lora_alpha`, … of `lora_adapter_metadata`; `None`
    /// when the file carries no config for `target`.
    fn from_metadata(
        meta: &serde_json::Value,
        target: LoraTarget,
        path: &Path,
    ) -> Result<Option<Self>, LoadError> {
        let get = |k: &str| meta.get(format!("{}.{k}", target.prefix()));
        if get("r").is_none() && get("lora_alpha").is_none() {
            return Ok(None);
        }
        if get("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(layout(
                path,
                "a DoRA adapter (`use_dora` in its metadata), which Motif does not fuse",
            ));
        }
        let map = |k: &str| {
            get(k)
                .and_then(|v| v.as_object())
                .cloned()
                .unwrap_or_default()
        };
        Ok(Some(PeftConfig {
            r: get("r").and_then(|v| v.as_f64()),
            lora_alpha: get("lora_alpha").and_then(|v| v.as_f64()),
            rank_pattern: map("rank_pattern"),
            alpha_pattern: map("alpha_pattern"),
            use_rslora: get("use_rslora").and_then(|v| v.as_bool()) == Some(true),
        }))
    }

    /// The first pattern that matches `module`, as peft picks it.
    fn pattern(
        patterns: &serde_json::Map<String, serde_json::Value>,
        module: &str,
        path: &Path,
    ) -> Result<Option<f64>, LoadError> {
        for (pattern, value) in patterns {
            match pattern_matches(pattern, module) {
                Some(true) => return Ok(value.as_f64()),
                Some(false) => {}
                None => {
                    return Err(layout(
                        path,
                        format!("metadata pattern `{pattern}` is a regular expression Motif does not evaluate"),
                    ))
                }
            }
        }
        Ok(None)
    }

    /// (rank the config declares, alpha / r or alpha / √r) for `module`.
    fn scale(&self, module: &str, rank: usize, path: &Path) -> Result<(usize, f64), LoadError> {
        let r = Self::pattern(&self.rank_pattern, module, path)?
            .or(self.r)
            .unwrap_or(rank as f64);
        let alpha = Self::pattern(&self.alpha_pattern, module, path)?
            .or(self.lora_alpha)
            .unwrap_or(r);
        let scale = if self.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        Ok((r as usize, scale))
    }
}

impl LoraFile {
    /// Reads the header and groups the factors by module; fails on anything
    /// that is not a plain LoRA (naming the key and what it is).
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        refuse_pickle(path)?;
        let file = SafetensorsFile::open(path)?;
        // stem → (named in the attention-processor form, role → key)
        let mut stems: BTreeMap<String, (bool, HashMap<Role, String>)> = BTreeMap::new();
        for key in file.names() {
            if let Some(what) = unsupported(key) {
                return Err(layout(
                    path,
                    format!("tensor `{key}` is {what}, which Motif does not fuse (plain LoRA and LoCon only)"),
                ));
            }
            let Some((suffix, role)) = SUFFIXES.iter().find(|(s, _)| key.ends_with(s)) else {
                return Err(layout(
                    path,
                    format!(
                        "tensor `{key}` is not a LoRA factor (expected keys ending in `.lora_down.weight`/`.lora_up.weight`/`.alpha` \
                         or `.lora_A.weight`/`.lora_B.weight`)"
                    ),
                ));
            };
            let stem = &key[..key.len() - suffix.len()];
            let entry = stems.entry(stem.to_string()).or_default();
            entry.0 |= suffix.starts_with('_');
            entry.1.insert(*role, key.to_string());
        }
        if stems.is_empty() {
            return Err(layout(path, "no LoRA tensors in this file"));
        }
        let meta = file
            .metadata()
            .get("lora_adapter_metadata")
            .map(|m| serde_json::from_str::<serde_json::Value>(m))
            .transpose()
            .map_err(|e| layout(path, format!("`lora_adapter_metadata` is not JSON: {e}")))?
            .unwrap_or(serde_json::Value::Null);
        let configs = [
            PeftConfig::from_metadata(&meta, LoraTarget::Unet, path)?,
            PeftConfig::from_metadata(&meta, LoraTarget::TextEncoder, path)?,
            PeftConfig::from_metadata(&meta, LoraTarget::Transformer, path)?,
        ];

        let mut modules = Vec::new();
        for (stem, (processor_form, roles)) in &stems {
            let (target, name) = module_name(stem, *processor_form)
                .map_err(|why| layout(path, format!("module `{stem}`: {why}")))?;
            let info = |key: &str| {
                let info = file.info(key).expect("key comes from this file's names");
                if info.dtype == FileDType::I64 {
                    return Err(LoadError::UnsupportedDType {
                        path: path.to_path_buf(),
                        key: key.to_string(),
                        dtype: "I64".into(),
                    });
                }
                Ok(info.shape.clone())
            };
            for (role, bias) in [(Role::Diff, false), (Role::DiffBias, true)] {
                let Some(key) = roles.get(&role) else {
                    continue;
                };
                if target != LoraTarget::Transformer {
                    return Err(layout(
                        path,
                        format!(
                            "tensor `{key}` is a full-weight difference, which Motif fuses in Wan LoRAs only \
                             (plain LoRA and LoCon for this model)"
                        ),
                    ));
                }
                info(key)?;
                modules.push(Module {
                    target,
                    name: name.clone(),
                    delta: Delta::Full {
                        key: key.clone(),
                        bias,
                    },
                    scale: 1.0,
                });
            }
            let factors = [Role::Down, Role::Up, Role::Alpha];
            if !factors.iter().any(|r| roles.contains_key(r)) {
                continue;
            }
            let (Some(down), Some(up)) = (roles.get(&Role::Down), roles.get(&Role::Up)) else {
                let have = roles.values().cloned().collect::<Vec<_>>();
                return Err(layout(
                    path,
                    format!(
                        "module `{stem}` lacks its down or up factor (has {})",
                        few(&have)
                    ),
                ));
            };
            let (down_shape, up_shape) = (info(down)?, info(up)?);
            let rank = match (down_shape.first(), up_shape.get(1)) {
                (Some(&r), Some(&u)) if r == u && r > 0 && down_shape.len() >= 2 => r,
                _ => {
                    return Err(layout(
                        path,
                        format!(
                            "module `{stem}`: factors {down_shape:?} (down) and {up_shape:?} (up) do not share a rank"
                        ),
                    ))
                }
            };
            let config = match target {
                LoraTarget::Unet => &configs[0],
                LoraTarget::TextEncoder => &configs[1],
                LoraTarget::Transformer => &configs[2],
            };
            let scale = if let Some(alpha_key) = roles.get(&Role::Alpha) {
                let alpha = file.to_f32(alpha_key)?;
                match alpha.as_slice() {
                    [a] => *a as f64 / rank as f64,
                    _ => {
                        return Err(layout(
                            path,
                            format!("`{alpha_key}` holds {} values, expected one", alpha.len()),
                        ))
                    }
                }
            } else if let (Some(config), ModuleName::Path(p)) = (config, &name) {
                // peft matches patterns against the module path in the model,
                // which for transformers 5's CLIP has no `text_model.` level.
                let module = p.strip_prefix("text_model.").unwrap_or(p);
                let (r, scale) = config.scale(module, rank, path)?;
                if r != rank {
                    return Err(LoadError::TensorShape {
                        path: path.to_path_buf(),
                        key: down.clone(),
                        expected: [r]
                            .into_iter()
                            .chain(down_shape[1..].iter().copied())
                            .collect(),
                        found: down_shape,
                    });
                }
                scale
            } else {
                1.0
            };
            modules.push(Module {
                target,
                name,
                delta: Delta::LowRank {
                    down: down.clone(),
                    up: up.clone(),
                },
                scale,
            });
        }
        Ok(LoraFile { file, modules })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Fails unless every module of this LoRA belongs to the family of
    /// `target`'s model: an SD LoRA's modules would match none of a Wan
    /// model's parts and be skipped as "not this part's" (and the reverse).
    pub fn check_family(&self, target: LoraTarget) -> Result<(), LoadError> {
        match self
            .modules
            .iter()
            .find(|m| m.target.family() != target.family())
        {
            None => Ok(()),
            Some(other) => Err(LoadError::LoraFamily {
                path: self.path().to_path_buf(),
                key: other.delta.key().to_string(),
                lora: other.target.family(),
                model: match target {
                    LoraTarget::Transformer => "a Wan model",
                    LoraTarget::Unet | LoraTarget::TextEncoder => {
                        "an AnimateDiff (Stable Diffusion) model"
                    }
                },
            }),
        }
    }
}

/// One LoRA's update of one weight or bias, fused when it is read.
#[derive(Debug, Clone)]
pub(crate) struct Update {
    file: Arc<LoraFile>,
    delta: Delta,
    /// The factors' rank (0 for a full difference).
    rank: usize,
    /// The user's weight times the module's scale.
    coefficient: f32,
}

impl Update {
    /// `values += coefficient · (up @ down)` for the weight [out, in · kh · kw],
    /// the product in f32 before it is scaled, as peft's merge computes it;
    /// `values += coefficient · diff` for a full difference.
    pub(crate) fn add_to(&self, values: &mut [f32], key: &str) -> Result<(), LoadError> {
        // resolve() checked the shapes; only a changed file fails these.
        let changed = |what: String| layout(self.file.path(), format!("{what} `{key}`"));
        let (down_key, up_key) = match &self.delta {
            Delta::Full { key: diff_key, .. } => {
                let diff = self.file.file.to_f32(diff_key)?;
                if diff.len() != values.len() {
                    return Err(changed(format!("`{diff_key}` no longer fits")));
                }
                for (w, d) in values.iter_mut().zip(diff) {
                    *w += self.coefficient * d;
                }
                return Ok(());
            }
            Delta::LowRank { down, up } => (down, up),
        };
        let down = self.file.file.to_f32(down_key)?;
        let up = self.file.file.to_f32(up_key)?;
        let rank = self.rank.max(1);
        let cols = down.len() / rank;
        if up.len() / rank * cols != values.len() {
            return Err(changed(format!(
                "factors `{down_key}` and `{up_key}` no longer fit"
            )));
        }
        let mut row = vec![0f32; cols];
        for (out, up_row) in values.chunks_mut(cols).zip(up.chunks(rank)) {
            row.fill(0.0);
            for (&u, down_row) in up_row.iter().zip(down.chunks(cols)) {
                for (acc, &d) in row.iter_mut().zip(down_row) {
                    *acc += u * d;
                }
            }
            for (w, &d) in out.iter_mut().zip(&row) {
                *w += self.coefficient * d;
            }
        }
        Ok(())
    }
}

/// A shape without its trailing 1s: a [C, C, 1, 1] 1x1 conv and the [C, C]
/// linear factor trained on it are the same matrix.
fn squeezed(shape: &[usize]) -> &[usize] {
    let mut end = shape.len();
    while end > 1 && shape[end - 1] == 1 {
        end -= 1;
    }
    &shape[..end]
}

/// The model's modules (weight key without `.weight`) under the names a
/// LoRA may use, with `text_model.` dropped for the text encoder (its
/// checkpoints have it or not depending on the transformers version).
struct ModelModules {
    by_path: HashMap<String, (String, Vec<usize>)>,
    /// Module path → its bias (key, shape), for `.diff_b` deltas.
    biases: HashMap<String, (String, Vec<usize>)>,
    /// kohya name → module path; `None` where two paths give the same name.
    /// For the Wan transformer, the kohya names of its original names
    /// (musubi's `blocks_0_self_attn_q`).
    by_kohya: HashMap<String, Option<String>>,
    /// Resnets per down level, for the LDM layout.
    layers_per_block: Option<usize>,
}

impl ModelModules {
    fn new(keys: &KeyShapes, target: LoraTarget) -> Self {
        let mut by_path = HashMap::new();
        let mut biases = HashMap::new();
        let mut by_kohya: HashMap<String, Option<String>> = HashMap::new();
        for (key, shape) in keys {
            let (module, bias) = match (key.strip_suffix(".weight"), key.strip_suffix(".bias")) {
                (Some(m), _) => (m, false),
                (None, Some(m)) => (m, true),
                (None, None) => continue,
            };
            let module = match target {
                LoraTarget::TextEncoder => module.strip_prefix("text_model.").unwrap_or(module),
                LoraTarget::Unet | LoraTarget::Transformer => module,
            };
            if bias {
                biases.insert(module.to_string(), (key.clone(), shape.clone()));
                continue;
            }
            let kohya = match target {
                LoraTarget::Transformer => wan_files::transformer_key_original(key)
                    .and_then(|k| k.strip_suffix(".weight").map(str::to_string))
                    .unwrap_or_else(|| module.to_string()),
                LoraTarget::Unet | LoraTarget::TextEncoder => module.to_string(),
            };
            by_kohya
                .entry(kohya.replace('.', "_"))
                .and_modify(|m| *m = None)
                .or_insert_with(|| Some(module.to_string()));
            by_path.insert(module.to_string(), (key.clone(), shape.clone()));
        }
        let layers_per_block = keys
            .keys()
            .filter_map(|k| {
                k.strip_prefix("down_blocks.0.resnets.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map(|n| n + 1);
        ModelModules {
            by_path,
            biases,
            by_kohya,
            layers_per_block,
        }
    }

    /// Whether the model has a module at `path` (a weight or a bias).
    fn has(&self, path: &str) -> bool {
        self.by_path.contains_key(path) || self.biases.contains_key(path)
    }

    /// The model's module path a LoRA module names.
    fn module(&self, name: &ModuleName, target: LoraTarget) -> Option<String> {
        match name {
            ModuleName::Path(p) => {
                let p = match target {
                    LoraTarget::TextEncoder => p.strip_prefix("text_model.").unwrap_or(p),
                    LoraTarget::Unet | LoraTarget::Transformer => p,
                };
                if self.has(p) {
                    return Some(p.to_string());
                }
                // A Wan LoRA without a prefix may use the original names.
                match target {
                    LoraTarget::Transformer => wan_module(p).filter(|m| self.has(m)),
                    LoraTarget::Unet | LoraTarget::TextEncoder => None,
                }
            }
            ModuleName::WanOriginal(p) => wan_module(p).filter(|m| self.has(m)),
            ModuleName::Kohya(k) => {
                let k = match target {
                    LoraTarget::TextEncoder => k.strip_prefix("text_model_").unwrap_or(k),
                    LoraTarget::Unet | LoraTarget::Transformer => k,
                };
                match self.by_kohya.get(k) {
                    Some(Some(path)) => Some(path.clone()),
                    Some(None) => None,
                    None if target == LoraTarget::Unet => {
                        let path = ldm_module(k, self.layers_per_block?)?;
                        self.has(&path).then_some(path)
                    }
                    None => None,
                }
            }
        }
    }

    /// The model's weight (asked key, stored shape) a module updates.
    #[cfg(test)]
    fn find(&self, name: &ModuleName, target: LoraTarget) -> Option<&(String, Vec<usize>)> {
        self.by_path.get(&self.module(name, target)?)
    }
}

/// The diffusers module path of an original Wan module path
/// (`blocks.0.self_attn.q` → `blocks.0.attn1.to_q`), by the single-file
/// key mapping.
fn wan_module(original: &str) -> Option<String> {
    wan_files::transformer_key(&format!("{original}.weight"))?
        .strip_suffix(".weight")
        .map(str::to_string)
}

/// The diffusers path of a kohya name in the original (LDM) UNet layout
/// (`input_blocks_1_1_transformer_blocks_0_attn1_to_q`).
fn ldm_module(kohya: &str, layers_per_block: usize) -> Option<String> {
    let words: Vec<&str> = kohya.split('_').collect();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let pair = words.get(i + 1).map(|next| format!("{}_{next}", words[i]));
        match pair {
            Some(p) if LDM_COMPOUNDS.contains(&p.as_str()) => {
                parts.push(p);
                i += 2;
            }
            _ => {
                parts.push(words[i].to_string());
                i += 1;
            }
        }
    }
    let key = single_file::ldm_unet_key(&format!("{}.weight", parts.join(".")), layers_per_block)?;
    key.strip_suffix(".weight").map(str::to_string)
}

/// Every weight the `target` modules of `loras` update (asked key → the
/// updates, in order), checked against the model's `keys` (asked key →
/// stored shape). Fails, naming the LoRA file, for a LoRA of another model
/// family, a module that matches no weight, or factors or differences whose
/// shapes do not fit the weight.
pub(crate) fn resolve(
    loras: &[(Arc<LoraFile>, f32)],
    target: LoraTarget,
    keys: &KeyShapes,
) -> Result<HashMap<String, Vec<Update>>, LoadError> {
    let model = ModelModules::new(keys, target);
    let mut updates: HashMap<String, Vec<Update>> = HashMap::new();
    for (lora, weight) in loras {
        let path = lora.path();
        lora.check_family(target)?;
        let mine: Vec<&Module> = lora.modules.iter().filter(|m| m.target == target).collect();
        let mut unmatched = Vec::new();
        let info = |k: &str| {
            lora.file
                .info(k)
                .expect("key comes from this file")
                .shape
                .clone()
        };
        let coefficient = |module: &Module| (*weight as f64 * module.scale) as f32;
        for module in &mine {
            let found = model
                .module(&module.name, target)
                .and_then(|m| match &module.delta {
                    Delta::Full { bias: true, .. } => model.biases.get(&m),
                    _ => model.by_path.get(&m),
                });
            let Some((key, shape)) = found else {
                unmatched.push(module.delta.key().to_string());
                continue;
            };
            let (down_key, up_key) = match &module.delta {
                Delta::LowRank { down, up } => (down, up),
                Delta::Full { key: diff_key, .. } => {
                    let diff = info(diff_key);
                    if &diff != shape {
                        return Err(LoadError::TensorShape {
                            path: path.to_path_buf(),
                            key: diff_key.clone(),
                            expected: shape.clone(),
                            found: diff,
                        });
                    }
                    updates.entry(key.clone()).or_default().push(Update {
                        file: lora.clone(),
                        delta: module.delta.clone(),
                        rank: 0,
                        coefficient: coefficient(module),
                    });
                    continue;
                }
            };
            let (down, up) = (info(down_key), info(up_key));
            let rank = down[0];
            let expected_up = vec![shape.first().copied().unwrap_or(0), rank];
            if squeezed(&up) != expected_up.as_slice() {
                return Err(LoadError::TensorShape {
                    path: path.to_path_buf(),
                    key: up_key.clone(),
                    expected: expected_up,
                    found: up,
                });
            }
            if shape.len() < 2 || squeezed(&down[1..]) != squeezed(&shape[1..]) {
                return Err(LoadError::TensorShape {
                    path: path.to_path_buf(),
                    key: down_key.clone(),
                    expected: [rank]
                        .into_iter()
                        .chain(shape.iter().skip(1).copied())
                        .collect(),
                    found: down,
                });
            }
            updates.entry(key.clone()).or_default().push(Update {
                file: lora.clone(),
                delta: module.delta.clone(),
                rank,
                coefficient: coefficient(module),
            });
        }
        if !unmatched.is_empty() {
            let what = target.describe();
            let message = if unmatched.len() == mine.len() {
                format!(
                    "none of this LoRA's {} {what} modules matches a weight of the model (is it for another base model?): {}",
                    mine.len(),
                    few(&unmatched)
                )
            } else {
                format!(
                    "{} of this LoRA's {} {what} modules match no weight of the model, so it cannot be applied whole: {}",
                    unmatched.len(),
                    mine.len(),
                    few(&unmatched)
                )
            };
            return Err(layout(path, message));
        }
    }
    Ok(updates)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn processor_names_become_module_paths() {
        let unet = module_name(
            "unet.down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.processor.to_out",
            true,
        )
        .unwrap();
        assert!(matches!(unet, (LoraTarget::Unet, ModuleName::Path(p))
            if p == "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_out.0"));
        let te = module_name(
            "text_encoder.text_model.encoder.layers.0.self_attn.to_k",
            true,
        )
        .unwrap();
        assert!(matches!(te, (LoraTarget::TextEncoder, ModuleName::Path(p))
            if p == "text_model.encoder.layers.0.self_attn.k_proj"));
        // AnimateDiff's original names, without a prefix.
        let original = module_name(
            "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor.to_q",
            true,
        )
        .unwrap();
        assert!(matches!(original, (LoraTarget::Unet, ModuleName::Path(p))
            if p == "up_blocks.1.motion_modules.2.transformer_blocks.0.attn2.to_q"));
        assert!(module_name("lora_te2_text_model_encoder_layers_0_mlp_fc1", false).is_err());
    }

    #[test]
    fn wan_names_in_every_layout_reach_the_same_module() {
        let keys: KeyShapes = [
            "blocks.0.attn1.to_q.weight",
            "blocks.0.attn1.to_out.0.weight",
            "blocks.0.attn1.to_out.0.bias",
            "blocks.0.ffn.net.0.proj.weight",
            "blocks.0.norm2.weight",
            "condition_embedder.time_proj.weight",
            "proj_out.weight",
        ]
        .iter()
        .map(|k| (k.to_string(), vec![4, 4]))
        .collect();
        let m = ModelModules::new(&keys, LoraTarget::Transformer);
        let module = |stem: &str| {
            let (target, name) = module_name(stem, false).unwrap();
            assert_eq!(target, LoraTarget::Transformer, "{stem}");
            m.module(&name, target)
        };
        for (stems, want) in [
            (
                [
                    "transformer.blocks.0.attn1.to_out.0",
                    "blocks.0.attn1.to_out.0",
                    "diffusion_model.blocks.0.self_attn.o",
                    "lora_unet_blocks_0_self_attn_o",
                ],
                "blocks.0.attn1.to_out.0",
            ),
            (
                [
                    "transformer.blocks.0.ffn.net.0.proj",
                    "blocks.0.ffn.0",
                    "diffusion_model.blocks.0.ffn.0",
                    "lora_unet_blocks_0_ffn_0",
                ],
                "blocks.0.ffn.net.0.proj",
            ),
            (
                [
                    "transformer.condition_embedder.time_proj",
                    "time_projection.1",
                    "diffusion_model.time_projection.1",
                    "condition_embedder.time_proj",
                ],
                "condition_embedder.time_proj",
            ),
        ] {
            for stem in stems {
                assert_eq!(module(stem).as_deref(), Some(want), "{stem}");
            }
        }
        // The original norm3 is diffusers' norm2 (the cross-attention norm).
        assert_eq!(
            module("diffusion_model.blocks.0.norm3").as_deref(),
            Some("blocks.0.norm2")
        );
        assert_eq!(
            module("diffusion_model.head.head").as_deref(),
            Some("proj_out")
        );
        // Image-to-video modules have no place in a text-to-video model.
        assert_eq!(module("diffusion_model.blocks.0.cross_attn.k_img"), None);
        // SD kohya names stay the UNet's.
        assert_eq!(
            module_name("lora_unet_down_blocks_0_attentions_0_proj_in", false)
                .unwrap()
                .0,
            LoraTarget::Unet
        );
    }

    #[test]
    fn ldm_kohya_names_follow_the_single_file_mapping() {
        assert_eq!(
            ldm_module("input_blocks_1_1_transformer_blocks_0_attn1_to_q", 2).as_deref(),
            Some("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
        );
        assert_eq!(
            ldm_module("output_blocks_5_0_skip_connection", 2).as_deref(),
            Some("up_blocks.1.resnets.2.conv_shortcut")
        );
        assert_eq!(
            ldm_module("middle_block_0_emb_layers_1", 2).as_deref(),
            Some("mid_block.resnets.0.time_emb_proj")
        );
        assert_eq!(
            ldm_module("input_blocks_4_1_proj_in", 2).as_deref(),
            Some("down_blocks.1.attentions.0.proj_in")
        );
        assert_eq!(ldm_module("mystery_block_0", 2), None);
    }

    #[test]
    fn kohya_names_resolve_against_the_models_names() {
        let keys: KeyShapes = [
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
            "down_blocks.0.resnets.0.conv1.weight",
            // Two paths with one kohya name: ambiguous, so neither resolves.
            "a.b_c.weight",
            "a_b.c.weight",
        ]
        .iter()
        .map(|k| (k.to_string(), vec![4, 4]))
        .collect();
        let m = ModelModules::new(&keys, LoraTarget::Unet);
        let find = |k: &str| {
            m.find(&ModuleName::Kohya(k.into()), LoraTarget::Unet)
                .map(|f| f.0.clone())
        };
        assert_eq!(
            find("down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0").as_deref(),
            Some("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight")
        );
        assert_eq!(
            find("down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj").as_deref(),
            Some("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight")
        );
        assert_eq!(find("a_b_c"), None);
        assert_eq!(m.layers_per_block, Some(1));
    }

    #[test]
    fn peft_patterns_match_at_module_boundaries() {
        assert_eq!(
            pattern_matches("proj_out", "down_blocks.0.attentions.0.proj_out"),
            Some(true)
        );
        assert_eq!(
            pattern_matches("proj_out", "down_blocks.0.attentions.0.xproj_out"),
            Some(false)
        );
        assert_eq!(
            pattern_matches("^down_blocks.0.x", "down_blocks.0.x"),
            Some(true)
        );
        assert_eq!(
            pattern_matches("^blocks.0.x", "down_blocks.0.x"),
            Some(false)
        );
        assert_eq!(pattern_matches("down.*to_q", "down_blocks.0.to_q"), None);
    }

    #[test]
    fn squeezing_keeps_at_least_one_dimension() {
        assert_eq!(squeezed(&[8, 8, 1, 1]), &[8, 8]);
        assert_eq!(squeezed(&[1, 1]), &[1]);
        assert_eq!(squeezed(&[8, 8, 3, 3]), &[8, 8, 3, 3]);
    }
}
