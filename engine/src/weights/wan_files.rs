//! Wan 2.1 as users keep it: single `.safetensors` files with the original
//! key names of the Wan repository (`Wan-Video/Wan2.1`, `wan/modules/`) —
//! the transformer (`blocks.N.self_attn.q…`, optionally under
//! `model.diffusion_model.`), the VAE (`encoder.downsamples.N.residual…`) —
//! and UMT5 files in transformers' T5 naming (`encoder.block.N.layer.0…`,
//! ComfyUI's `umt5_xxl_*`) or in the Wan repository's own (`blocks.N.attn.q…`),
//! and the CLIP vision encoder of image-to-video in transformers' naming
//! (ComfyUI's `clip_vision_h.safetensors`: `vision_model.…` and
//! `visual_projection.weight`, what ComfyUI's `CLIPVisionModelProjection`
//! holds).
//!
//! As for the SD files in `single_file.rs`, nothing is converted on disk:
//! each component gets an alias map (diffusers name → stored name) and a
//! config inferred from the stored shapes. The key mapping is the one
//! diffusers documents (`convert_wan_transformer_to_diffusers`,
//! `convert_wan_vae_to_diffusers`); the decoder's flat `upsamples` list is
//! split into levels by where its resamples are, which diffusers hard-codes
//! for Wan 2.1's layout. What shapes cannot tell: the transformer's head
//! count (its q/k norms span all heads), for which Wan's 128-wide heads are
//! taken (every published Wan 2.1/2.2 transformer has them) unless a config
//! is given.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::json;

use super::single_file::{indices, Inferred, KeyShapes};
use crate::error::LoadError;

/// Width of one attention head in every published Wan transformer.
pub const WAN_HEAD_DIM: usize = 128;

/// The prefix some single files (ComfyUI checkpoints saved whole) put
/// before the transformer's keys.
pub const WAN_PREFIX: &str = "model.diffusion_model.";

/// Tensors that ComfyUI stores beside the weights and no loader reads: the
/// UMT5 tokenizer's SentencePiece model, the fp8 marker, and per-tensor
/// input scales (for fp8 matmuls; dequantising needs `scale_weight` only).
pub fn is_side_tensor(key: &str) -> bool {
    key == "spiece_model"
        || key == "scaled_fp8"
        || key.ends_with(".scaled_fp8")
        || key.ends_with(".scale_weight")
        || key.ends_with(".scale_input")
}

/// What a Wan-family single file holds, judged from its key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanFile {
    /// The diffusion transformer, original names (with or without
    /// [`WAN_PREFIX`]).
    Transformer,
    /// UMT5 encoder, transformers' naming (`encoder.block.0…`).
    Umt5Transformers,
    /// UMT5 encoder, the Wan repository's naming (`blocks.0.attn.q…`).
    Umt5Wan,
    /// The Wan 2.1 VAE, original names.
    Vae,
    /// CLIP's vision tower, transformers' names (ComfyUI's `clip_vision/`
    /// files, with or without `vision_model.`): Wan 2.1 image-to-video's
    /// image encoder.
    ClipVision,
}

impl WanFile {
    /// What this file is, in a user's words (for messages).
    pub fn describe(self) -> &'static str {
        match self {
            WanFile::Transformer => "a Wan transformer",
            WanFile::Umt5Transformers | WanFile::Umt5Wan => "a UMT5 text encoder",
            WanFile::Vae => "a Wan VAE",
            WanFile::ClipVision => "a CLIP vision image encoder",
        }
    }

    /// The flag that takes this kind of file.
    pub fn flag(self) -> &'static str {
        match self {
            WanFile::Transformer => "--model",
            WanFile::Umt5Transformers | WanFile::Umt5Wan => "--text-encoder",
            WanFile::Vae => "--vae",
            WanFile::ClipVision => "--image-encoder",
        }
    }
}

/// The Wan kind of a file's keys, if it is one.
pub fn detect(keys: &KeyShapes) -> Option<WanFile> {
    let has = |k: &str| keys.contains_key(k);
    if has("patch_embedding.weight") && has("head.modulation")
        || has(&format!("{WAN_PREFIX}patch_embedding.weight"))
            && has(&format!("{WAN_PREFIX}head.modulation"))
    {
        Some(WanFile::Transformer)
    } else if has("encoder.block.0.layer.0.SelfAttention.q.weight")
        && has("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    {
        // UMT5 (a bias per layer), not T5 (layer 0 only).
        Some(WanFile::Umt5Transformers)
    } else if has("token_embedding.weight") && has("blocks.0.attn.q.weight") {
        Some(WanFile::Umt5Wan)
    } else if has("decoder.middle.0.residual.0.gamma")
        && (has("encoder.downsamples.0.residual.0.gamma")
            || has("encoder.downsamples.0.downsamples.0.residual.0.gamma"))
    {
        // Wan 2.1's flat encoder list, or Wan 2.2's levels of it.
        Some(WanFile::Vae)
    } else if CLIP_VISION_PREFIXES.iter().any(|p| {
        has(&format!("{p}embeddings.patch_embedding.weight"))
            && has(&format!("{p}encoder.layers.0.layer_norm1.weight"))
            && has(&format!("{p}pre_layrnorm.weight"))
    }) {
        Some(WanFile::ClipVision)
    } else {
        None
    }
}

/// Where a CLIP vision file's tower sits: under `vision_model.`
/// (transformers 4, ComfyUI) or at the top (transformers 5's
/// `CLIPVisionModel`).
const CLIP_VISION_PREFIXES: [&str; 2] = ["vision_model.", ""];

fn layout(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Layout {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn shape<'a>(keys: &'a KeyShapes, path: &Path, key: &str) -> Result<&'a [usize], LoadError> {
    keys.get(key)
        .map(Vec::as_slice)
        .ok_or_else(|| LoadError::MissingTensor {
            path: path.to_path_buf(),
            key: key.to_string(),
        })
}

fn dim(keys: &KeyShapes, path: &Path, key: &str, axis: usize) -> Result<usize, LoadError> {
    let s = shape(keys, path, key)?;
    s.get(axis).copied().ok_or_else(|| LoadError::TensorShape {
        path: path.to_path_buf(),
        key: key.to_string(),
        expected: vec![0; axis + 1],
        found: s.to_vec(),
    })
}

/// `(block index, rest)` of `head` + "N." + rest.
fn numbered<'a>(key: &'a str, head: &str) -> Option<(usize, &'a str)> {
    let rest = key.strip_prefix(head)?;
    let (n, tail) = rest.split_once('.')?;
    Some((n.parse().ok()?, tail))
}

/// Every stored key must map: an unknown one means a variant this code
/// does not know (image-to-video, VACE, a Wan 2.2 part), refused by name
/// rather than loaded half.
fn map_all(
    keys: &KeyShapes,
    path: &Path,
    what: &str,
    map: impl Fn(&str) -> Option<String>,
) -> Result<HashMap<String, String>, LoadError> {
    let mut aliases = HashMap::new();
    for key in keys.keys().filter(|k| !is_side_tensor(k)) {
        let Some(asked) = map(key) else {
            return Err(layout(
                path,
                format!(
                    "tensor `{key}` is not part of {what} that Motif runs (Wan 2.1 text- and \
                     image-to-video)"
                ),
            ));
        };
        if let Some(other) = aliases.insert(asked.clone(), key.clone()) {
            return Err(layout(
                path,
                format!("tensors `{other}` and `{key}` both name `{asked}`"),
            ));
        }
    }
    Ok(aliases)
}

// ---------------------------------------------------------------- transformer

/// The image embedder of image-to-video transformers (`img_emb`, an
/// `MLPProj`: LayerNorm, Linear, GELU, Linear, LayerNorm; first-last frame
/// adds `emb_pos`), original → diffusers, as diffusers'
/// `convert_wan_to_diffusers.py` renames them.
const IMAGE_EMBEDDER: [(&str, &str); 5] = [
    (
        "img_emb.proj.0.",
        "condition_embedder.image_embedder.norm1.",
    ),
    (
        "img_emb.proj.1.",
        "condition_embedder.image_embedder.ff.net.0.proj.",
    ),
    (
        "img_emb.proj.3.",
        "condition_embedder.image_embedder.ff.net.2.",
    ),
    (
        "img_emb.proj.4.",
        "condition_embedder.image_embedder.norm2.",
    ),
    (
        "img_emb.emb_pos",
        "condition_embedder.image_embedder.pos_embed",
    ),
];

/// The cross-attention's projections of the image tokens, original →
/// diffusers (`WanI2VCrossAttention`'s `k_img`, `v_img`, `norm_k_img`).
const IMAGE_ATTENTION: [(&str, &str); 3] = [
    ("k_img", "add_k_proj"),
    ("v_img", "add_v_proj"),
    ("norm_k_img", "norm_added_k"),
];

/// The diffusers name of one original Wan transformer key (prefix removed).
pub fn transformer_key(key: &str) -> Option<String> {
    const TOP: [(&str, &str); 7] = [
        ("patch_embedding.", "patch_embedding."),
        (
            "text_embedding.0.",
            "condition_embedder.text_embedder.linear_1.",
        ),
        (
            "text_embedding.2.",
            "condition_embedder.text_embedder.linear_2.",
        ),
        (
            "time_embedding.0.",
            "condition_embedder.time_embedder.linear_1.",
        ),
        (
            "time_embedding.2.",
            "condition_embedder.time_embedder.linear_2.",
        ),
        ("time_projection.1.", "condition_embedder.time_proj."),
        ("head.head.", "proj_out."),
    ];
    if key == "head.modulation" {
        return Some("scale_shift_table".into());
    }
    for (from, to) in TOP.into_iter().chain(IMAGE_EMBEDDER) {
        if let Some(tail) = key.strip_prefix(from) {
            return Some(format!("{to}{tail}"));
        }
    }
    let (i, rest) = numbered(key, "blocks.")?;
    let block = |s: String| Some(format!("blocks.{i}.{s}"));
    if rest == "modulation" {
        return block("scale_shift_table".into());
    }
    for (from, to) in [("self_attn.", "attn1."), ("cross_attn.", "attn2.")] {
        if let Some(tail) = rest.strip_prefix(from) {
            let (layer, param) = tail.split_once('.')?;
            let layer = match layer {
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "o" => "to_out.0",
                "norm_q" | "norm_k" => layer,
                _ if from == "cross_attn." => IMAGE_ATTENTION.iter().find(|(o, _)| *o == layer)?.1,
                _ => return None,
            };
            return block(format!("{to}{layer}.{param}"));
        }
    }
    // The original applies norm1 (self-attention), norm3 (cross-attention)
    // and norm2 (feed-forward); diffusers numbers them in that order.
    const BLOCK: [(&str, &str); 4] = [
        ("norm3.", "norm2."),
        ("norm2.", "norm3."),
        ("ffn.0.", "ffn.net.0.proj."),
        ("ffn.2.", "ffn.net.2."),
    ];
    for (from, to) in BLOCK {
        if let Some(tail) = rest.strip_prefix(from) {
            return block(format!("{to}{tail}"));
        }
    }
    None
}

/// The original name of one diffusers Wan transformer key (the inverse of
/// [`transformer_key`]).
pub fn transformer_key_original(key: &str) -> Option<String> {
    const TOP: [(&str, &str); 7] = [
        ("patch_embedding.", "patch_embedding."),
        (
            "condition_embedder.text_embedder.linear_1.",
            "text_embedding.0.",
        ),
        (
            "condition_embedder.text_embedder.linear_2.",
            "text_embedding.2.",
        ),
        (
            "condition_embedder.time_embedder.linear_1.",
            "time_embedding.0.",
        ),
        (
            "condition_embedder.time_embedder.linear_2.",
            "time_embedding.2.",
        ),
        ("condition_embedder.time_proj.", "time_projection.1."),
        ("proj_out.", "head.head."),
    ];
    if key == "scale_shift_table" {
        return Some("head.modulation".into());
    }
    let image = IMAGE_EMBEDDER.map(|(original, diffusers)| (diffusers, original));
    for (from, to) in TOP.into_iter().chain(image) {
        if let Some(tail) = key.strip_prefix(from) {
            return Some(format!("{to}{tail}"));
        }
    }
    let (i, rest) = numbered(key, "blocks.")?;
    let block = |s: String| Some(format!("blocks.{i}.{s}"));
    if rest == "scale_shift_table" {
        return block("modulation".into());
    }
    for (from, to) in [("attn1.", "self_attn."), ("attn2.", "cross_attn.")] {
        if let Some(tail) = rest.strip_prefix(from) {
            let (layer, param) = match tail.strip_prefix("to_out.0.") {
                Some(param) => ("o", param),
                None => {
                    let (layer, param) = tail.split_once('.')?;
                    let layer = match layer {
                        "to_q" => "q",
                        "to_k" => "k",
                        "to_v" => "v",
                        "norm_q" | "norm_k" => layer,
                        _ if from == "attn2." => {
                            IMAGE_ATTENTION.iter().find(|(_, d)| *d == layer)?.0
                        }
                        _ => return None,
                    };
                    (layer, param)
                }
            };
            return block(format!("{to}{layer}.{param}"));
        }
    }
    const BLOCK: [(&str, &str); 4] = [
        ("norm2.", "norm3."),
        ("norm3.", "norm2."),
        ("ffn.net.0.proj.", "ffn.0."),
        ("ffn.net.2.", "ffn.2."),
    ];
    for (from, to) in BLOCK {
        if let Some(tail) = rest.strip_prefix(from) {
            return block(format!("{to}{tail}"));
        }
    }
    None
}

/// The image branch of a transformer file (Wan2.1-I2V, FLF2V), from its
/// keys alone: the image tokens' width (`img_emb.proj.0`, their LayerNorm)
/// and, for first-last frame, how many positions `img_emb.emb_pos` has.
pub fn image_branch(keys: &KeyShapes) -> Option<(usize, Option<usize>)> {
    let prefix = ["", WAN_PREFIX]
        .into_iter()
        .find(|p| keys.contains_key(&format!("{p}img_emb.proj.0.weight")))?;
    let width = *keys
        .get(&format!("{prefix}img_emb.proj.0.weight"))?
        .first()?;
    let positions = keys
        .get(&format!("{prefix}img_emb.emb_pos"))
        .and_then(|s| s.get(1).copied());
    Some((width, positions))
}

/// The transformer of an original-key file: a `WanTransformer3DModel`
/// config and aliases. `heads` overrides the head count (a config given
/// beside the file); otherwise it is width / [`WAN_HEAD_DIM`].
pub fn transformer(
    keys: &KeyShapes,
    path: &Path,
    heads: Option<usize>,
) -> Result<Inferred, LoadError> {
    let prefixed = keys.keys().any(|k| k.starts_with(WAN_PREFIX));
    let stripped: KeyShapes = keys
        .iter()
        .filter_map(|(k, s)| {
            let k = if prefixed {
                k.strip_prefix(WAN_PREFIX)?
            } else {
                k
            };
            Some((k.to_string(), s.clone()))
        })
        .collect();
    let k = &stripped;
    let pe = shape(k, path, "patch_embedding.weight")?;
    let [width, in_channels, pt, ph, pw] = *pe else {
        return Err(LoadError::TensorShape {
            path: path.to_path_buf(),
            key: "patch_embedding.weight".into(),
            expected: vec![0; 5],
            found: pe.to_vec(),
        });
    };
    let heads = match heads {
        Some(h) => h,
        None if width.is_multiple_of(WAN_HEAD_DIM) => width / WAN_HEAD_DIM,
        None => {
            return Err(layout(
                path,
                format!(
                    "width {width} is not a multiple of Wan's {WAN_HEAD_DIM}-wide heads: the head count \
                     cannot be told from the file; pass the model's diffusers folder instead"
                ),
            ))
        }
    };
    if heads == 0 || !width.is_multiple_of(heads) {
        return Err(layout(
            path,
            format!("width {width} does not split into {heads} heads"),
        ));
    }
    let patch = pt * ph * pw;
    let out = dim(k, path, "head.head.weight", 0)?;
    if patch == 0 || !out.is_multiple_of(patch) {
        return Err(layout(
            path,
            format!("head.head.weight has {out} outputs, not a multiple of the patch's {patch}"),
        ));
    }
    let mut config = json!({
        "_class_name": "WanTransformer3DModel",
        "patch_size": [pt, ph, pw],
        "num_attention_heads": heads,
        "attention_head_dim": width / heads,
        "in_channels": in_channels,
        "out_channels": out / patch,
        "text_dim": dim(k, path, "text_embedding.0.weight", 1)?,
        "freq_dim": dim(k, path, "time_embedding.0.weight", 1)?,
        "ffn_dim": dim(k, path, "blocks.0.ffn.0.weight", 0)?,
        "num_layers": indices(k, "blocks.").len(),
        "cross_attn_norm": k.contains_key("blocks.0.norm3.weight"),
        "qk_norm": k.contains_key("blocks.0.self_attn.norm_q.weight").then_some("rms_norm_across_heads"),
        "eps": 1e-6,
    });
    // Image-to-video (Wan2.1-I2V, FLF2V): the image embedder's input width,
    // the image key/value projections' input width (the embedder's output)
    // and, for first-last frame, the positions over both images' tokens.
    if k.contains_key("img_emb.proj.0.weight") {
        config["image_dim"] = json!(dim(k, path, "img_emb.proj.0.weight", 0)?);
        config["added_kv_proj_dim"] = json!(dim(k, path, "blocks.0.cross_attn.k_img.weight", 1)?);
        if k.contains_key("img_emb.emb_pos") {
            config["pos_embed_seq_len"] = json!(dim(k, path, "img_emb.emb_pos", 1)?);
        }
    }
    let aliases = map_all(k, path, "a Wan transformer", transformer_key)?
        .into_iter()
        .map(|(asked, stored)| {
            let stored = if prefixed {
                format!("{WAN_PREFIX}{stored}")
            } else {
                stored
            };
            (asked, stored)
        })
        .collect();
    Ok(Inferred { config, aliases })
}

// ----------------------------------------------------------------------- UMT5

/// The transformers name of one Wan-repository UMT5 key.
pub fn umt5_key(key: &str) -> Option<String> {
    match key {
        "token_embedding.weight" => return Some("shared.weight".into()),
        "norm.weight" => return Some("encoder.final_layer_norm.weight".into()),
        _ => {}
    }
    let (i, rest) = numbered(key, "blocks.")?;
    let to = match rest {
        "attn.q.weight" => "layer.0.SelfAttention.q.weight",
        "attn.k.weight" => "layer.0.SelfAttention.k.weight",
        "attn.v.weight" => "layer.0.SelfAttention.v.weight",
        "attn.o.weight" => "layer.0.SelfAttention.o.weight",
        "pos_embedding.embedding.weight" => "layer.0.SelfAttention.relative_attention_bias.weight",
        "norm1.weight" => "layer.0.layer_norm.weight",
        "norm2.weight" => "layer.1.layer_norm.weight",
        "ffn.gate.0.weight" => "layer.1.DenseReluDense.wi_0.weight",
        "ffn.fc1.weight" => "layer.1.DenseReluDense.wi_1.weight",
        "ffn.fc2.weight" => "layer.1.DenseReluDense.wo.weight",
        _ => return None,
    };
    Some(format!("encoder.block.{i}.{to}"))
}

/// The UMT5 encoder of a single file in either naming: a `UMT5Config`
/// (transformers) and aliases.
pub fn umt5(keys: &KeyShapes, path: &Path) -> Result<Inferred, LoadError> {
    let kind = detect(keys);
    let mut aliases = match kind {
        Some(WanFile::Umt5Wan) => map_all(keys, path, "a UMT5 encoder", umt5_key)?,
        Some(WanFile::Umt5Transformers) => map_all(keys, path, "a UMT5 encoder", |k| {
            let known = k == "shared.weight"
                || k == "encoder.embed_tokens.weight"
                || k == "encoder.final_layer_norm.weight"
                || k.starts_with("encoder.block.");
            known.then(|| k.to_string())
        })?,
        _ => {
            return Err(layout(
                path,
                "not a UMT5 text encoder: expected `encoder.block.0.layer.0.SelfAttention…` \
                 (transformers, ComfyUI) or `blocks.0.attn…` (Wan) keys",
            ))
        }
    };
    // transformers ties `encoder.embed_tokens` to `shared`; files keep one.
    if !aliases.contains_key("shared.weight") {
        if let Some(stored) = aliases.remove("encoder.embed_tokens.weight") {
            aliases.insert("shared.weight".into(), stored);
        }
    }
    aliases.remove("encoder.embed_tokens.weight");
    let asked: KeyShapes = aliases
        .iter()
        .filter_map(|(a, s)| Some((a.clone(), keys.get(s)?.clone())))
        .collect();
    let a = &asked;
    let bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let heads = dim(a, path, bias, 1)?;
    let inner = dim(a, path, "encoder.block.0.layer.0.SelfAttention.q.weight", 0)?;
    if heads == 0 || !inner.is_multiple_of(heads) {
        return Err(layout(
            path,
            format!("attention width {inner} does not split into {heads} heads"),
        ));
    }
    let config = json!({
        "vocab_size": dim(a, path, "shared.weight", 0)?,
        "d_model": dim(a, path, "shared.weight", 1)?,
        "d_kv": inner / heads,
        "d_ff": dim(a, path, "encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 0)?,
        "num_layers": indices(a, "encoder.block.").len(),
        "num_heads": heads,
        "relative_attention_num_buckets": dim(a, path, bias, 0)?,
        // Not in any shape: UMT5's published value.
        "relative_attention_max_distance": 128,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
    });
    Ok(Inferred { config, aliases })
}

// ------------------------------------------------------------------------ VAE

/// The diffusers name of a residual block's parameter (`residual.0.gamma`
/// → `norm1.gamma`, …), `rest` after the block index.
fn vae_residual(rest: &str) -> Option<String> {
    const NAMES: [(&str, &str); 5] = [
        ("residual.0.", "norm1."),
        ("residual.2.", "conv1."),
        ("residual.3.", "norm2."),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|t| format!("{to}{t}")))
}

/// The inverse of [`vae_residual`].
fn vae_residual_original(rest: &str) -> Option<String> {
    const NAMES: [(&str, &str); 5] = [
        ("norm1.", "residual.0."),
        ("conv1.", "residual.2."),
        ("norm2.", "residual.3."),
        ("conv2.", "residual.6."),
        ("conv_shortcut.", "shortcut."),
    ];
    NAMES
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|t| format!("{to}{t}")))
}

/// Where each entry of the decoder's flat `upsamples` list sits in
/// diffusers' up blocks: `index → (level, Some(resnet) | None = upsampler)`.
/// Each level is its residual blocks followed by one resample, the last
/// level without; the layout is read off the keys.
fn decoder_layout(keys: &KeyShapes) -> BTreeMap<usize, (usize, Option<usize>)> {
    let mut layout = BTreeMap::new();
    let (mut level, mut resnet) = (0, 0);
    for i in indices(keys, "decoder.upsamples.") {
        let resample = keys
            .keys()
            .any(|k| k.starts_with(&format!("decoder.upsamples.{i}.resample.")));
        if resample {
            layout.insert(i, (level, None));
            level += 1;
            resnet = 0;
        } else {
            layout.insert(i, (level, Some(resnet)));
            resnet += 1;
        }
    }
    layout
}

/// The diffusers name of one original Wan VAE key, given the decoder's
/// layout ([`decoder_layout`]).
fn vae_key(key: &str, decoder: &BTreeMap<usize, (usize, Option<usize>)>) -> Option<String> {
    const FIXED: [(&str, &str); 8] = [
        ("conv1.", "quant_conv."),
        ("conv2.", "post_quant_conv."),
        ("encoder.conv1.", "encoder.conv_in."),
        ("decoder.conv1.", "decoder.conv_in."),
        ("encoder.head.0.", "encoder.norm_out."),
        ("encoder.head.2.", "encoder.conv_out."),
        ("decoder.head.0.", "decoder.norm_out."),
        ("decoder.head.2.", "decoder.conv_out."),
    ];
    for (from, to) in FIXED {
        if let Some(tail) = key.strip_prefix(from) {
            return Some(format!("{to}{tail}"));
        }
    }
    for side in ["encoder", "decoder"] {
        if let Some((i, rest)) = numbered(key, &format!("{side}.middle.")) {
            return match i {
                0 | 2 => Some(format!(
                    "{side}.mid_block.resnets.{}.{}",
                    i / 2,
                    vae_residual(rest)?
                )),
                1 => Some(format!("{side}.mid_block.attentions.0.{rest}")),
                _ => None,
            };
        }
    }
    if let Some((i, rest)) = numbered(key, "encoder.downsamples.") {
        // diffusers keeps the encoder's flat list; only residual names change.
        let rest = vae_residual(rest).unwrap_or_else(|| rest.to_string());
        return Some(format!("encoder.down_blocks.{i}.{rest}"));
    }
    if let Some((i, rest)) = numbered(key, "decoder.upsamples.") {
        return match decoder.get(&i)? {
            (level, Some(j)) => Some(format!(
                "decoder.up_blocks.{level}.resnets.{j}.{}",
                vae_residual(rest)?
            )),
            (level, None) => Some(format!("decoder.up_blocks.{level}.upsamplers.0.{rest}")),
        };
    }
    None
}

/// The original name of one diffusers Wan VAE key, for a VAE with
/// `num_res_blocks` (the inverse of the mapping [`vae`] uses).
pub fn vae_key_original(key: &str, num_res_blocks: usize) -> Option<String> {
    const FIXED: [(&str, &str); 8] = [
        ("quant_conv.", "conv1."),
        ("post_quant_conv.", "conv2."),
        ("encoder.conv_in.", "encoder.conv1."),
        ("decoder.conv_in.", "decoder.conv1."),
        ("encoder.norm_out.", "encoder.head.0."),
        ("encoder.conv_out.", "encoder.head.2."),
        ("decoder.norm_out.", "decoder.head.0."),
        ("decoder.conv_out.", "decoder.head.2."),
    ];
    for (from, to) in FIXED {
        if let Some(tail) = key.strip_prefix(from) {
            return Some(format!("{to}{tail}"));
        }
    }
    for side in ["encoder", "decoder"] {
        if let Some((j, rest)) = numbered(key, &format!("{side}.mid_block.resnets.")) {
            return Some(format!(
                "{side}.middle.{}.{}",
                j * 2,
                vae_residual_original(rest)?
            ));
        }
        if let Some(rest) = key.strip_prefix(&format!("{side}.mid_block.attentions.0.")) {
            return Some(format!("{side}.middle.1.{rest}"));
        }
    }
    if let Some((i, rest)) = numbered(key, "encoder.down_blocks.") {
        let rest = vae_residual_original(rest).unwrap_or_else(|| rest.to_string());
        return Some(format!("encoder.downsamples.{i}.{rest}"));
    }
    let per_level = num_res_blocks + 2;
    if let Some((level, rest)) = numbered(key, "decoder.up_blocks.") {
        if let Some((j, rest)) = numbered(rest, "resnets.") {
            return Some(format!(
                "decoder.upsamples.{}.{}",
                level * per_level + j,
                vae_residual_original(rest)?
            ));
        }
        let rest = rest.strip_prefix("upsamplers.0.")?;
        return Some(format!(
            "decoder.upsamples.{}.{rest}",
            level * per_level + num_res_blocks + 1
        ));
    }
    None
}

/// Whether an original-key VAE is Wan 2.2's (`wan2.2_vae.safetensors`,
/// `Wan2.2_VAE.pth`): its encoder and decoder lists hold one
/// `Down_ResidualBlock` / `Up_ResidualBlock` per level, each with its own
/// inner list.
pub fn is_vae_22(keys: &KeyShapes) -> bool {
    keys.keys()
        .any(|k| k.starts_with("encoder.downsamples.0.downsamples."))
}

/// The Wan 2.2 VAE's per-channel latent statistics (Wan2.2_VAE's
/// `mean` / `std`, as Wan-AI/Wan2.2-TI2V-5B-Diffusers' vae/config.json
/// and ComfyUI's `latent_formats.Wan22` publish them): a single file
/// carries no config.
const WAN22_LATENTS_MEAN: [f64; 48] = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813,
    0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108,
    -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313,
    -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944,
    0.3573, -0.0548, -0.1681, -0.0667,
];
const WAN22_LATENTS_STD: [f64; 48] = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
];

/// The diffusers name of one original Wan 2.2 VAE key: the levels'
/// inner lists become `resnets.J` and, for the resample that closes a
/// level, `downsampler` / `upsampler`.
fn vae22_key(key: &str) -> Option<String> {
    for (side, list, blocks, resample) in [
        ("encoder", "downsamples", "down_blocks", "downsampler"),
        ("decoder", "upsamples", "up_blocks", "upsampler"),
    ] {
        if let Some((i, rest)) = numbered(key, &format!("{side}.{list}.")) {
            let (j, rest) = numbered(rest, &format!("{list}."))?;
            let blocks = format!("{side}.{blocks}.{i}");
            return match rest.starts_with("resample.") || rest.starts_with("time_conv.") {
                true => Some(format!("{blocks}.{resample}.{rest}")),
                false => Some(format!("{blocks}.resnets.{j}.{}", vae_residual(rest)?)),
            };
        }
    }
    // Everything else is named as in Wan 2.1 (convs, middle, heads).
    vae_key(key, &BTreeMap::new())
}

/// The original name of one diffusers Wan 2.2 VAE key, for a VAE with
/// `num_res_blocks` (the inverse of [`vae22_key`]): the encoder's levels
/// hold that many residual blocks, the decoder's one more, each then its
/// resample.
pub fn vae22_key_original(key: &str, num_res_blocks: usize) -> Option<String> {
    for (side, blocks, list, resample, count) in [
        (
            "encoder",
            "down_blocks",
            "downsamples",
            "downsampler.",
            num_res_blocks,
        ),
        (
            "decoder",
            "up_blocks",
            "upsamples",
            "upsampler.",
            num_res_blocks + 1,
        ),
    ] {
        if let Some((i, rest)) = numbered(key, &format!("{side}.{blocks}.")) {
            if let Some((j, rest)) = numbered(rest, "resnets.") {
                return Some(format!(
                    "{side}.{list}.{i}.{list}.{j}.{}",
                    vae_residual_original(rest)?
                ));
            }
            let rest = rest.strip_prefix(resample)?;
            return Some(format!("{side}.{list}.{i}.{list}.{count}.{rest}"));
        }
    }
    vae_key_original(key, num_res_blocks)
}

/// [`vae`] for a Wan 2.2 VAE: levels, residual blocks per level and
/// temporal downsampling from the encoder's levels (a `time_conv` in a
/// level's resample halves time), the patch size from the 12 = 3 · p²
/// input channels, the latent statistics Wan 2.2 publishes.
fn vae22(keys: &KeyShapes, path: &Path) -> Result<Inferred, LoadError> {
    let base_dim = dim(keys, path, "encoder.conv1.weight", 0)?;
    let levels = indices(keys, "encoder.downsamples.");
    let mut dim_mult = Vec::new();
    let mut temperal_downsample = Vec::new();
    let mut blocks_per_level = Vec::new();
    for &i in &levels {
        let head = format!("encoder.downsamples.{i}.downsamples.");
        let inner = indices(keys, &head);
        let residual: Vec<usize> = inner
            .iter()
            .copied()
            .filter(|j| keys.contains_key(&format!("{head}{j}.residual.2.weight")))
            .collect();
        let Some(&last) = residual.last() else {
            return Err(layout(
                path,
                format!("encoder level {i} has no residual block"),
            ));
        };
        let width = dim(keys, path, &format!("{head}{last}.residual.2.weight"), 0)?;
        dim_mult.push(width / base_dim.max(1));
        blocks_per_level.push(residual.len());
        let resample = residual.len();
        if keys.contains_key(&format!("{head}{resample}.resample.1.weight")) {
            temperal_downsample
                .push(keys.contains_key(&format!("{head}{resample}.time_conv.weight")));
        }
    }
    let num_res_blocks = blocks_per_level.first().copied().unwrap_or(0);
    if num_res_blocks == 0 || blocks_per_level.iter().any(|&b| b != num_res_blocks) {
        return Err(layout(
            path,
            format!(
                "the encoder's levels hold {blocks_per_level:?} residual blocks: expected the \
                 same count in each"
            ),
        ));
    }
    let top = *dim_mult.last().unwrap_or(&1);
    let decoder_width = dim(keys, path, "decoder.conv1.weight", 0)?;
    let z_dim = dim(keys, path, "conv2.weight", 0)?;
    if z_dim != WAN22_LATENTS_MEAN.len() {
        return Err(layout(
            path,
            format!(
                "a Wan 2.2 VAE of {z_dim} latent channels: the latent statistics published \
                 (and known here) are for 48; use a diffusers vae/ folder with its config.json"
            ),
        ));
    }
    let in_channels = dim(keys, path, "encoder.conv1.weight", 1)?;
    let patch = (1..=4).find(|p| 3 * p * p == in_channels).ok_or_else(|| {
        layout(
            path,
            format!("encoder.conv1 takes {in_channels} channels: expected 3 · p² (12 for Wan 2.2)"),
        )
    })?;
    let config = json!({
        "_class_name": "AutoencoderKLWan",
        "base_dim": base_dim,
        "decoder_base_dim": decoder_width / top.max(1),
        "z_dim": z_dim,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temperal_downsample,
        "is_residual": true,
        "patch_size": patch,
        "in_channels": in_channels,
        "out_channels": dim(keys, path, "decoder.head.2.weight", 0)?,
        "latents_mean": WAN22_LATENTS_MEAN.to_vec(),
        "latents_std": WAN22_LATENTS_STD.to_vec(),
        "scale_factor_spatial": 16,
        "scale_factor_temporal": 4,
    });
    let aliases = map_all(keys, path, "a Wan 2.2 VAE", vae22_key)?;
    Ok(Inferred { config, aliases })
}

/// The VAE of an original-key file: an `AutoencoderKLWan` config and
/// aliases. Levels, residual blocks per level and temporal downsampling
/// are read from the encoder's flat list (a resample closes a level; one
/// with a `time_conv` also halves time). Wan 2.2's layout: [`vae22`].
pub fn vae(keys: &KeyShapes, path: &Path) -> Result<Inferred, LoadError> {
    if is_vae_22(keys) {
        return vae22(keys, path);
    }
    let base_dim = dim(keys, path, "encoder.conv1.weight", 0)?;
    let mut dim_mult = Vec::new();
    let mut temperal_downsample = Vec::new();
    let mut blocks_per_level = Vec::new();
    let (mut blocks, mut width) = (0, 0);
    for i in indices(keys, "encoder.downsamples.") {
        let head = format!("encoder.downsamples.{i}.");
        let has = |s: &str| keys.contains_key(&format!("{head}{s}"));
        if has("resample.1.weight") {
            dim_mult.push(width / base_dim.max(1));
            blocks_per_level.push(blocks);
            temperal_downsample.push(has("time_conv.weight"));
            blocks = 0;
        } else if has("residual.2.weight") {
            width = dim(keys, path, &format!("{head}residual.2.weight"), 0)?;
            blocks += 1;
        } else {
            return Err(layout(
                path,
                format!(
                    "encoder block {i} is neither a residual block nor a resample (attention \
                     inside the levels is not part of the Wan 2.1 VAE)"
                ),
            ));
        }
    }
    dim_mult.push(width / base_dim.max(1));
    blocks_per_level.push(blocks);
    let num_res_blocks = blocks_per_level[0];
    if num_res_blocks == 0 || blocks_per_level.iter().any(|&b| b != num_res_blocks) {
        return Err(layout(
            path,
            format!("the encoder's levels hold {blocks_per_level:?} residual blocks: expected the same count in each"),
        ));
    }
    let config = json!({
        "_class_name": "AutoencoderKLWan",
        "base_dim": base_dim,
        "z_dim": dim(keys, path, "conv2.weight", 0)?,
        "dim_mult": dim_mult,
        "num_res_blocks": num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": temperal_downsample,
        "in_channels": dim(keys, path, "encoder.conv1.weight", 1)?,
        "out_channels": dim(keys, path, "decoder.head.2.weight", 0)?,
    });
    let decoder = decoder_layout(keys);
    let aliases = map_all(keys, path, "a Wan 2.1 VAE", |k| vae_key(k, &decoder))?;
    Ok(Inferred { config, aliases })
}

// ---------------------------------------------------------------- CLIP vision

/// Width of CLIP ViT-H/14, the image encoder of every Wan 2.1
/// image-to-video model (`clip_vision_h`).
pub const CLIP_VIT_H_WIDTH: usize = 1280;

/// A CLIP vision file's width and tokens per image (patches + the class
/// token), from its position embedding [tokens, width].
pub fn clip_vision_size(keys: &KeyShapes) -> Option<(usize, usize)> {
    CLIP_VISION_PREFIXES.into_iter().find_map(|p| {
        match keys.get(&format!("{p}embeddings.position_embedding.weight"))?[..] {
            [tokens, width] => Some((width, tokens)),
            _ => None,
        }
    })
}

/// The CLIP vision tower of a single file in transformers' naming: a
/// `CLIPVisionConfig` and aliases (the names are kept; the aliases list
/// what the file holds, every key checked). What the shapes cannot tell —
/// the head count and the activation — is ViT-H/14's (16 heads, GELU, as
/// ComfyUI's `clip_vision_config_h.json` and the Wan 2.1 I2V diffusers
/// repositories' `image_encoder/config.json` have) for a 1280-wide tower,
/// else `given`'s (a config beside the file).
pub fn clip_vision(
    keys: &KeyShapes,
    path: &Path,
    given: Option<&serde_json::Value>,
) -> Result<Inferred, LoadError> {
    let Some(p) = CLIP_VISION_PREFIXES
        .into_iter()
        .find(|p| keys.contains_key(&format!("{p}embeddings.patch_embedding.weight")))
    else {
        return Err(layout(
            path,
            "not a CLIP vision encoder: expected `vision_model.embeddings.patch_embedding.weight` \
             (transformers' CLIPVisionModel names, as ComfyUI's clip_vision_h.safetensors)",
        ));
    };
    let key = |k: &str| format!("{p}{k}");
    let pe = shape(keys, path, &key("embeddings.patch_embedding.weight"))?;
    let [width, channels, patch, patch_w] = *pe else {
        return Err(LoadError::TensorShape {
            path: path.to_path_buf(),
            key: key("embeddings.patch_embedding.weight"),
            expected: vec![0; 4],
            found: pe.to_vec(),
        });
    };
    let positions = dim(keys, path, &key("embeddings.position_embedding.weight"), 0)?;
    let side = (1..=positions)
        .find(|s| s * s + 1 >= positions)
        .unwrap_or(0);
    if patch == 0 || patch != patch_w || side * side + 1 != positions {
        return Err(layout(
            path,
            format!(
                "a {patch}x{patch_w} patch embedding and {positions} positions: expected square \
                 patches and a square grid of them plus the class token"
            ),
        ));
    }
    let stated = |field: &str| given.and_then(|g| g.get(field)).cloned();
    let (heads, act) = match (stated("num_attention_heads"), width) {
        (Some(h), _) => (h, stated("hidden_act").unwrap_or(json!("quick_gelu"))),
        (None, CLIP_VIT_H_WIDTH) => (json!(16), json!("gelu")),
        (None, w) => {
            return Err(layout(
                path,
                format!(
                    "a {w}-wide CLIP vision encoder: its head count cannot be told from the file \
                     (Motif knows ViT-H/14, {CLIP_VIT_H_WIDTH} wide, Wan's image encoder); pass \
                     ComfyUI's clip_vision_h.safetensors or the model's diffusers folder"
                ),
            ))
        }
    };
    let config = json!({
        "hidden_size": width,
        "intermediate_size": dim(keys, path, &key("encoder.layers.0.mlp.fc1.weight"), 0)?,
        "num_hidden_layers": indices(keys, &key("encoder.layers.")).len(),
        "num_attention_heads": heads,
        "num_channels": channels,
        "image_size": side * patch,
        "patch_size": patch,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    });
    if let Some(given) = given {
        for (field, inferred) in config.as_object().into_iter().flatten() {
            let stated = given.get(field).unwrap_or(&serde_json::Value::Null);
            let same = match (stated.as_f64(), inferred.as_f64()) {
                (Some(a), Some(b)) => (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                _ => stated == inferred,
            };
            if !same {
                return Err(layout(
                    path,
                    format!("its config says `{field}` {stated}, its tensor shapes {inferred}"),
                ));
            }
        }
    }
    let aliases = map_all(keys, path, "a CLIP vision encoder", |k| {
        let known = k == "visual_projection.weight"
            || k.strip_prefix(p).is_some_and(|rest| {
                rest.starts_with("embeddings.")
                    || rest.starts_with("pre_layrnorm.")
                    || rest.starts_with("post_layernorm.")
                    || rest.starts_with("encoder.layers.")
            });
        known.then(|| k.to_string())
    })?;
    Ok(Inferred { config, aliases })
}
