//! Checkpoints as creators download them: one `.safetensors` with the
//! original (LDM) key names of Stable Diffusion — UNet under
//! `model.diffusion_model.`, VAE under `first_stage_model.`, CLIP under
//! `cond_stage_model.transformer.` — standalone VAE files, and AnimateDiff
//! motion modules in their original format (`mm_sd_v15_v2`, v3).
//!
//! Nothing is converted on disk: each component gets an alias map (diffusers
//! name → stored name) and a config inferred from the stored shapes. What
//! shapes cannot tell comes from the original architectures: LDM normalises
//! with 32 groups everywhere, SD1.x uses 8 heads and SD2.x (1024-wide
//! context) 64-wide heads, AnimateDiff motion modules use 8 heads, and a
//! CLIP text model has 64-wide heads.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::json;

use crate::error::LoadError;

/// Stored key → shape, as the loaders here read it.
pub type KeyShapes = BTreeMap<String, Vec<usize>>;

pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
pub const LDM_VAE_PREFIX: &str = "first_stage_model.";
pub const LDM_CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// What a single safetensors file holds, judged from its key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// An SD checkpoint with LDM names (UNet, maybe VAE and CLIP too).
    LdmStableDiffusion,
    /// AnimateDiff motion modules, original or diffusers names.
    MotionModule,
    /// A VAE alone, LDM names (`encoder.down.0.block.0…`).
    LdmVae,
    /// A VAE alone, diffusers names (`encoder.down_blocks.0.resnets.0…`).
    DiffusersVae,
    /// A diffusers `UNet2DConditionModel` or `UNetMotionModel` saved alone.
    DiffusersUNet,
    Unknown,
}

pub fn detect(keys: &KeyShapes) -> FileKind {
    let any = |pred: &dyn Fn(&str) -> bool| keys.keys().any(|k| pred(k));
    if any(&|k| k.starts_with(LDM_UNET_PREFIX)) {
        FileKind::LdmStableDiffusion
    } else if any(&|k| k.contains("conv_in.") && !k.contains("coder."))
        && any(&|k| k.starts_with("down_blocks."))
    {
        FileKind::DiffusersUNet
    } else if any(&|k| k.contains(".motion_modules.")) {
        FileKind::MotionModule
    } else if any(&|k| k.starts_with("encoder.down.")) {
        FileKind::LdmVae
    } else if any(&|k| k.starts_with("encoder.down_blocks.")) {
        FileKind::DiffusersVae
    } else {
        FileKind::Unknown
    }
}

/// A component found in a single file: its diffusers-style config (as the
/// JSON a `config.json` would hold) and the alias map for `WeightSet`.
#[derive(Debug, Clone)]
pub struct Inferred {
    pub config: serde_json::Value,
    pub aliases: HashMap<String, String>,
}

fn layout(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::Layout {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn dim(keys: &KeyShapes, path: &Path, key: &str, axis: usize) -> Result<usize, LoadError> {
    keys.get(key)
        .and_then(|s| s.get(axis).copied())
        .ok_or_else(|| LoadError::MissingTensor {
            path: path.to_path_buf(),
            key: key.to_string(),
        })
}

/// The distinct values of the numeric path segment right after `head`
/// (`head` = "input_blocks." gives the block indices present).
pub(super) fn indices(keys: &KeyShapes, head: &str) -> Vec<usize> {
    let mut found: Vec<usize> = keys
        .keys()
        .filter_map(|k| k.strip_prefix(head))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

fn ldm_resnet(rest: &str) -> String {
    const NAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    for (from, to) in NAMES {
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    rest.to_string()
}

/// The diffusers name of one LDM UNet key (without the prefix), for a UNet
/// with `layers` resnets per down level.
pub(crate) fn ldm_unet_key(rest: &str, layers: usize) -> Option<String> {
    let parts: Vec<&str> = rest.splitn(4, '.').collect();
    let num = |i: usize| parts.get(i).and_then(|p| p.parse::<usize>().ok());
    let tail = |i: usize| parts.get(i..).map(|p| p.join(".")).unwrap_or_default();
    let per = layers + 1;
    match parts.first().copied()? {
        "time_embed" => {
            let which = match num(1)? {
                0 => "linear_1",
                2 => "linear_2",
                _ => return None,
            };
            Some(format!("time_embedding.{which}.{}", tail(2)))
        }
        "out" => {
            let which = match num(1)? {
                0 => "conv_norm_out",
                2 => "conv_out",
                _ => return None,
            };
            Some(format!("{which}.{}", tail(2)))
        }
        "input_blocks" => {
            let (i, k, rest) = (num(1)?, num(2)?, parts.get(3)?);
            if i == 0 {
                return (k == 0).then(|| format!("conv_in.{rest}"));
            }
            let (level, j) = ((i - 1) / per, (i - 1) % per);
            if j == layers {
                let conv = rest.strip_prefix("op.")?;
                return Some(format!("down_blocks.{level}.downsamplers.0.conv.{conv}"));
            }
            match k {
                0 => Some(format!(
                    "down_blocks.{level}.resnets.{j}.{}",
                    ldm_resnet(rest)
                )),
                1 => Some(format!("down_blocks.{level}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        "middle_block" => {
            let (k, rest) = (num(1)?, tail(2));
            match k {
                0 => Some(format!("mid_block.resnets.0.{}", ldm_resnet(&rest))),
                1 => Some(format!("mid_block.attentions.0.{rest}")),
                2 => Some(format!("mid_block.resnets.1.{}", ldm_resnet(&rest))),
                _ => None,
            }
        }
        "output_blocks" => {
            let (i, k, rest) = (num(1)?, num(2)?, parts.get(3)?);
            let (level, j) = (i / per, i % per);
            if let Some(conv) = rest.strip_prefix("conv.") {
                if k >= 1 {
                    return Some(format!("up_blocks.{level}.upsamplers.0.conv.{conv}"));
                }
            }
            match k {
                0 => Some(format!(
                    "up_blocks.{level}.resnets.{j}.{}",
                    ldm_resnet(rest)
                )),
                1 => Some(format!("up_blocks.{level}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        _ => None,
    }
}

/// The UNet of an LDM checkpoint: a `UNet2DConditionModel` config and
/// aliases. `path` names the file in errors.
pub fn ldm_unet(keys: &KeyShapes, path: &Path) -> Result<Inferred, LoadError> {
    let p = LDM_UNET_PREFIX;
    let unet: KeyShapes = keys
        .iter()
        .filter_map(|(k, s)| Some((k.strip_prefix(p)?.to_string(), s.clone())))
        .collect();
    if unet.keys().any(|k| k.starts_with("label_emb.")) {
        return Err(layout(
            path,
            "an SDXL-style UNet (it has `label_emb`): Motif runs SD1.x/2.x UNets with AnimateDiff",
        ));
    }
    let downsamplers = unet
        .keys()
        .filter(|k| k.starts_with("input_blocks.") && k.contains(".0.op.weight"))
        .count();
    let levels = downsamplers + 1;
    let outputs = indices(&unet, "output_blocks.").len();
    if outputs == 0 || !outputs.is_multiple_of(levels) || outputs / levels < 2 {
        return Err(layout(
            path,
            format!(
                "cannot read the UNet layout: {outputs} output blocks for {levels} levels (expected levels × (layers + 1))"
            ),
        ));
    }
    let layers = outputs / levels - 1;
    let key = |k: &str| format!("{p}{k}");
    let conv_in = key("input_blocks.0.0.weight");
    let in_channels = dim(keys, path, &conv_in, 1)?;
    let out_channels = dim(keys, path, &key("out.2.weight"), 0)?;
    let mut channels = Vec::new();
    let mut down_types = Vec::new();
    let mut cross_dim = None;
    let mut depth = 1;
    let mut linear = false;
    for level in 0..levels {
        let first = 1 + level * (layers + 1);
        channels.push(dim(
            keys,
            path,
            &key(&format!("input_blocks.{first}.0.out_layers.3.weight")),
            0,
        )?);
        let attn = format!("input_blocks.{first}.1.");
        if let Some(shape) = unet.get(&format!("{attn}proj_in.weight")) {
            down_types.push("CrossAttnDownBlock2D");
            linear = shape.len() == 2;
            depth = indices(&unet, &format!("{attn}transformer_blocks."))
                .len()
                .max(1);
            cross_dim = Some(dim(
                keys,
                path,
                &key(&format!("{attn}transformer_blocks.0.attn2.to_k.weight")),
                1,
            )?);
        } else {
            down_types.push("DownBlock2D");
        }
    }
    let up_types: Vec<&str> = (0..levels)
        .map(|u| {
            let first = u * (layers + 1);
            if unet.contains_key(&format!("output_blocks.{first}.1.proj_in.weight")) {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    let cross_dim =
        cross_dim.ok_or_else(|| layout(path, "the UNet has no cross-attention blocks"))?;
    // SD2.x (OpenCLIP-H context, 1024 wide) uses 64-wide heads; SD1.x 8 heads.
    let heads: serde_json::Value = if cross_dim == 1024 {
        json!(channels.iter().map(|c| (c / 64).max(1)).collect::<Vec<_>>())
    } else {
        json!(8)
    };
    let config = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "cross_attention_dim": cross_dim,
        "transformer_layers_per_block": depth,
        "attention_head_dim": heads,
        "use_linear_projection": linear,
    });
    let aliases = unet
        .keys()
        .filter_map(|k| Some((ldm_unet_key(k, layers)?, format!("{p}{k}"))))
        .collect();
    Ok(Inferred { config, aliases })
}

fn ldm_vae_key(rest: &str, levels: usize) -> Option<String> {
    let (side, rest) = rest.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return match side {
            "quant_conv" | "post_quant_conv" => Some(format!("{side}.{rest}")),
            _ => None,
        };
    }
    let resnet = |r: &str| {
        r.strip_prefix("nin_shortcut.")
            .map(|t| format!("conv_shortcut.{t}"))
            .unwrap_or_else(|| r.to_string())
    };
    let parts: Vec<&str> = rest.splitn(4, '.').collect();
    let mapped = match parts.as_slice() {
        ["conv_in" | "conv_out", ..] => rest.to_string(),
        ["norm_out", ..] => format!("conv_norm_out.{}", rest.strip_prefix("norm_out.")?),
        ["mid", "block_1", tail @ ..] => format!("mid_block.resnets.0.{}", resnet(&tail.join("."))),
        ["mid", "block_2", tail @ ..] => format!("mid_block.resnets.1.{}", resnet(&tail.join("."))),
        ["mid", "attn_1", tail @ ..] => {
            let tail = tail.join(".");
            let (layer, param) = tail.split_once('.')?;
            let name = match layer {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("mid_block.attentions.0.{name}.{param}")
        }
        [dir @ ("down" | "up"), level, kind, tail] => {
            let level: usize = level.parse().ok()?;
            // LDM numbers decoder levels from the bottom; diffusers from the top.
            let (blocks, level) = if *dir == "down" {
                ("down_blocks", level)
            } else {
                ("up_blocks", levels.checked_sub(level + 1)?)
            };
            match *kind {
                "block" => {
                    let (j, r) = tail.split_once('.')?;
                    format!("{blocks}.{level}.resnets.{j}.{}", resnet(r))
                }
                "downsample" => format!("{blocks}.{level}.downsamplers.0.{tail}"),
                "upsample" => format!("{blocks}.{level}.upsamplers.0.{tail}"),
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{side}.{mapped}"))
}

/// The VAE of an LDM checkpoint (`prefix` = `first_stage_model.`) or of a
/// standalone LDM VAE file (`prefix` = ``).
pub fn ldm_vae(keys: &KeyShapes, prefix: &str, path: &Path) -> Result<Inferred, LoadError> {
    let vae: KeyShapes = keys
        .iter()
        .filter_map(|(k, s)| Some((k.strip_prefix(prefix)?.to_string(), s.clone())))
        .collect();
    let levels = indices(&vae, "encoder.down.").len();
    if levels == 0 {
        return Err(layout(
            path,
            format!("no VAE encoder (`{prefix}encoder.down.0…`) in this file"),
        ));
    }
    let key = |k: &str| format!("{prefix}{k}");
    let channels = (0..levels)
        .map(|i| {
            dim(
                keys,
                path,
                &key(&format!("encoder.down.{i}.block.0.conv1.weight")),
                0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let layers = indices(&vae, "encoder.down.0.block.").len();
    let config = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim(keys, path, &key("encoder.conv_in.weight"), 1)?,
        "out_channels": dim(keys, path, &key("decoder.conv_out.weight"), 0)?,
        "latent_channels": dim(keys, path, &key("decoder.conv_in.weight"), 1)?,
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": layers,
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": vae.contains_key("quant_conv.weight"),
        "use_post_quant_conv": vae.contains_key("post_quant_conv.weight"),
        "mid_block_add_attention": vae.keys().any(|k| k.starts_with("encoder.mid.attn_1.")),
    });
    let aliases = vae
        .keys()
        .filter_map(|k| Some((ldm_vae_key(k, levels)?, format!("{prefix}{k}"))))
        .collect();
    Ok(Inferred { config, aliases })
}

/// A VAE file already in diffusers names: its config from shapes.
pub fn diffusers_vae(keys: &KeyShapes, path: &Path) -> Result<Inferred, LoadError> {
    let levels = indices(keys, "encoder.down_blocks.").len();
    let channels = (0..levels)
        .map(|i| {
            dim(
                keys,
                path,
                &format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": dim(keys, path, "encoder.conv_in.weight", 1)?,
        "out_channels": dim(keys, path, "decoder.conv_out.weight", 0)?,
        "latent_channels": dim(keys, path, "decoder.conv_in.weight", 1)?,
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "layers_per_block": indices(keys, "encoder.down_blocks.0.resnets.").len(),
        "norm_num_groups": 32,
        "scaling_factor": 0.18215,
        "use_quant_conv": keys.contains_key("quant_conv.weight"),
        "use_post_quant_conv": keys.contains_key("post_quant_conv.weight"),
        "mid_block_add_attention": keys.keys().any(|k| k.starts_with("encoder.mid_block.attentions.")),
    });
    Ok(Inferred {
        config,
        aliases: HashMap::new(),
    })
}

/// The CLIP text model inside an SD1.x checkpoint (transformers names under
/// `cond_stage_model.transformer.`).
pub fn ldm_clip(keys: &KeyShapes, path: &Path) -> Result<Inferred, LoadError> {
    let full = format!("{LDM_CLIP_PREFIX}text_model.");
    if !keys.keys().any(|k| k.starts_with(&full)) {
        let hint = if keys
            .keys()
            .any(|k| k.starts_with("cond_stage_model.model."))
        {
            " (this is an SD2-style OpenCLIP text encoder, which Motif does not load from single files yet)"
        } else {
            ""
        };
        return Err(layout(
            path,
            format!("no CLIP text encoder (`{full}…`) in this file{hint}; use a diffusers folder that has `text_encoder/`"),
        ));
    }
    let key = |k: &str| format!("{full}{k}");
    let table = key("embeddings.token_embedding.weight");
    let hidden = dim(keys, path, &table, 1)?;
    let text: KeyShapes = keys
        .iter()
        .filter_map(|(k, s)| Some((k.strip_prefix(&full)?.to_string(), s.clone())))
        .collect();
    let config = json!({
        "vocab_size": dim(keys, path, &table, 0)?,
        "hidden_size": hidden,
        "intermediate_size": dim(keys, path, &key("encoder.layers.0.mlp.fc1.weight"), 0)?,
        "num_hidden_layers": indices(&text, "encoder.layers.").len(),
        "num_attention_heads": (hidden / 64).max(1),
        "max_position_embeddings": dim(keys, path, &key("embeddings.position_embedding.weight"), 0)?,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        // openai/clip-vit-large-patch14's config: the pooled token is the argmax id.
        "eos_token_id": 2,
    });
    let aliases = text
        .keys()
        .map(|k| (format!("text_model.{k}"), format!("{full}{k}")))
        .collect();
    Ok(Inferred { config, aliases })
}

pub(crate) fn motion_key(stored: &str) -> String {
    const NAMES: [(&str, &str); 8] = [
        (".temporal_transformer.", "."),
        // diffusers keeps one position table per transformer block; the
        // original stores the same table in each of the block's attentions:
        // the first serves, the second stays unread.
        (".attention_blocks.0.pos_encoder.", ".pos_embed."),
        (".attention_blocks.1.pos_encoder.", ".attn2.pos_encoder."),
        (".attention_blocks.0.", ".attn1."),
        (".attention_blocks.1.", ".attn2."),
        (".norms.0.", ".norm1."),
        (".norms.1.", ".norm2."),
        (".ff_norm.", ".norm3."),
    ];
    let mut k = stored.strip_prefix("module.").unwrap_or(stored).to_string();
    for (from, to) in NAMES {
        k = k.replace(from, to);
    }
    k
}

/// AnimateDiff motion modules in the original format (or diffusers names
/// saved in one file): a `MotionAdapter` config and aliases.
pub fn motion_module(keys: &KeyShapes, path: &Path) -> Result<Inferred, LoadError> {
    let renamed: KeyShapes = keys
        .iter()
        .map(|(k, s)| (motion_key(k), s.clone()))
        .collect();
    let levels = indices(&renamed, "down_blocks.").len();
    if levels == 0 {
        return Err(layout(
            path,
            "no `down_blocks.N.motion_modules.…` keys: not an AnimateDiff motion module",
        ));
    }
    let channels = (0..levels)
        .map(|i| {
            dim(
                &renamed,
                path,
                &format!("down_blocks.{i}.motion_modules.0.proj_in.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let layers = indices(&renamed, "down_blocks.0.motion_modules.").len();
    let depth = indices(
        &renamed,
        "down_blocks.0.motion_modules.0.transformer_blocks.",
    )
    .len();
    let mid = renamed
        .keys()
        .any(|k| k.starts_with("mid_block.motion_modules."));
    let seq = renamed
        .iter()
        .find(|(k, _)| k.ends_with(".pos_embed.pe"))
        .and_then(|(_, s)| s.get(1).copied())
        .unwrap_or(32);
    let config = json!({
        "_class_name": "MotionAdapter",
        "block_out_channels": channels,
        "motion_layers_per_block": layers,
        "motion_transformer_layers_per_block": depth.max(1),
        "motion_mid_block_layers_per_block": 1,
        "motion_num_attention_heads": 8,
        "motion_norm_num_groups": 32,
        "motion_max_seq_length": seq,
        "use_motion_mid_block": mid,
    });
    let aliases = keys
        .keys()
        .map(|k| (motion_key(k), k.clone()))
        .filter(|(a, k)| a != k)
        .collect();
    Ok(Inferred { config, aliases })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldm_unet_names_follow_the_block_arithmetic() {
        let k = |s| ldm_unet_key(s, 2);
        assert_eq!(
            k("input_blocks.0.0.weight").as_deref(),
            Some("conv_in.weight")
        );
        assert_eq!(
            k("input_blocks.4.0.skip_connection.weight").as_deref(),
            Some("down_blocks.1.resnets.0.conv_shortcut.weight")
        );
        assert_eq!(
            k("input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight").as_deref(),
            Some("down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k.weight")
        );
        assert_eq!(
            k("input_blocks.9.0.op.bias").as_deref(),
            Some("down_blocks.2.downsamplers.0.conv.bias")
        );
        assert_eq!(
            k("output_blocks.2.1.conv.weight").as_deref(),
            Some("up_blocks.0.upsamplers.0.conv.weight")
        );
        assert_eq!(
            k("output_blocks.5.2.conv.weight").as_deref(),
            Some("up_blocks.1.upsamplers.0.conv.weight")
        );
        assert_eq!(
            k("output_blocks.11.1.proj_out.bias").as_deref(),
            Some("up_blocks.3.attentions.2.proj_out.bias")
        );
        assert_eq!(
            k("middle_block.2.emb_layers.1.weight").as_deref(),
            Some("mid_block.resnets.1.time_emb_proj.weight")
        );
        assert_eq!(k("out.0.weight").as_deref(), Some("conv_norm_out.weight"));
        assert_eq!(k("mystery.0.weight"), None);
    }

    #[test]
    fn ldm_vae_decoder_levels_are_reversed() {
        assert_eq!(
            ldm_vae_key("decoder.up.0.block.2.nin_shortcut.weight", 4).as_deref(),
            Some("decoder.up_blocks.3.resnets.2.conv_shortcut.weight")
        );
        assert_eq!(
            ldm_vae_key("decoder.up.3.upsample.conv.bias", 4).as_deref(),
            Some("decoder.up_blocks.0.upsamplers.0.conv.bias")
        );
        assert_eq!(
            ldm_vae_key("encoder.mid.attn_1.proj_out.weight", 4).as_deref(),
            Some("encoder.mid_block.attentions.0.to_out.0.weight")
        );
        assert_eq!(
            ldm_vae_key("encoder.norm_out.bias", 4).as_deref(),
            Some("encoder.conv_norm_out.bias")
        );
    }

    #[test]
    fn motion_module_names_follow_diffusers_conversion() {
        assert_eq!(
            motion_key("up_blocks.3.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"),
            "up_blocks.3.motion_modules.2.transformer_blocks.0.attn2.pos_encoder.pe"
        );
        assert_eq!(
            motion_key("mid_block.motion_modules.0.temporal_transformer.transformer_blocks.1.attention_blocks.0.pos_encoder.pe"),
            "mid_block.motion_modules.0.transformer_blocks.1.pos_embed.pe"
        );
        assert_eq!(
            motion_key("down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.ff_norm.weight"),
            "down_blocks.0.motion_modules.0.transformer_blocks.0.norm3.weight"
        );
    }
}
