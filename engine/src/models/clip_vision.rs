//! transformers' `CLIPVisionModel` (`models/clip/modeling_clip.py`), the
//! image encoder of Wan 2.1 image-to-video (ViT-H/14): a patch embedding
//! (a Conv2d with kernel = stride = patch, no bias), the class token, learned
//! positions, `pre_layrnorm`, then the same encoder layers as the text tower
//! without the causal mask. Wan uses `hidden_states[-2]`, the output of all
//! but the last layer; `post_layernorm` and the last layer are never run.
//!
//! Checkpoints carry the keys with `vision_model.` in front (transformers 4
//! and the hub's Wan repositories) or without (transformers 5 saves the tower
//! at the top level): both load.

use std::path::Path;

use serde::Deserialize;

use super::clip::{activation_named, check_tower, ClipEncoderLayer, ClipLayerDims};
use super::nn::{LayerNorm, Linear};
use crate::error::{EngineError, LoadError, Result};
use crate::gpu::Gpu;
use crate::ops;
use crate::tensor::{fmt_shape, Tensor};
use crate::weights::{config::read_config, WeightSet, Weights};

// `CLIPVisionConfig`'s defaults, for keys a config leaves out.
fn default_hidden() -> usize {
    768
}
fn default_intermediate() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch() -> usize {
    32
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f32 {
    1e-5
}

/// `image_encoder/config.json` (`CLIPVisionConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
}

impl ClipVisionConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::checked(path, read_config(path)?)
    }

    /// A config inferred from a single file's shapes (`weights::wan_files::
    /// clip_vision`); `path` names the file in errors.
    pub fn from_value(path: &Path, value: serde_json::Value) -> Result<Self, LoadError> {
        Self::checked(
            path,
            crate::weights::config::config_from_value(path, value)?,
        )
    }

    fn checked(path: &Path, cfg: ClipVisionConfig) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        check_tower(cfg.hidden_size, cfg.num_attention_heads, &cfg.hidden_act).map_err(bad)?;
        if cfg.patch_size == 0
            || cfg.image_size == 0
            || !cfg.image_size.is_multiple_of(cfg.patch_size)
        {
            return Err(bad(format!(
                "image_size {} must be a positive multiple of patch_size {}",
                cfg.image_size, cfg.patch_size
            )));
        }
        if cfg.num_hidden_layers < 2 {
            return Err(bad(format!(
                "num_hidden_layers {}: Wan reads the penultimate layer's output, so at least 2",
                cfg.num_hidden_layers
            )));
        }
        Ok(cfg)
    }

    /// Patches per image plus the class token (257 for ViT-H/14 at 224).
    pub fn tokens(&self) -> usize {
        let side = self.image_size / self.patch_size;
        side * side + 1
    }
}

/// `CLIPVisionModel` up to its penultimate layer.
pub struct ClipVisionModel {
    pub config: ClipVisionConfig,
    /// `embeddings.patch_embedding` as the Linear it equals on patches:
    /// weight [D, C·p·p] (the Conv2d's [D, C, p, p] flattened), no bias.
    pub patch_embedding: Linear,
    /// `embeddings.class_embedding` [1, 1, D].
    pub class_embedding: Tensor,
    /// `embeddings.position_embedding.weight` [1, tokens, D].
    pub position_embedding: Tensor,
    pub pre_layrnorm: LayerNorm,
    /// All layers but the last, which `hidden_states[-2]` never reaches.
    pub layers: Vec<ClipEncoderLayer>,
}

impl ClipVisionModel {
    pub fn new(gpu: &Gpu, w: &Weights, config: ClipVisionConfig) -> Result<Self> {
        let prefixed = w.pp("vision_model");
        let tower = if prefixed.contains("embeddings.class_embedding") {
            prefixed
        } else {
            w.clone()
        };
        let emb = tower.pp("embeddings");
        let (d, p, c) = (config.hidden_size, config.patch_size, config.num_channels);
        let tokens = config.tokens();
        let act = activation_named(&config.hidden_act).expect("checked when the config was loaded");
        let layers = (0..config.num_hidden_layers - 1)
            .map(|i| {
                ClipEncoderLayer::with_dims(
                    gpu,
                    &tower.pp("encoder").pp("layers").pp(i),
                    ClipLayerDims {
                        hidden: d,
                        intermediate: config.intermediate_size,
                        heads: config.num_attention_heads,
                        act,
                        eps: config.layer_norm_eps,
                        causal: false,
                    },
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVisionModel {
            patch_embedding: Linear {
                weight: emb
                    .pp("patch_embedding")
                    .tensor(gpu, "weight", &[d, c, p, p])?
                    .reshape(&[d, c * p * p])?,
                bias: None,
            },
            class_embedding: emb
                .tensor(gpu, "class_embedding", &[d])?
                .reshape(&[1, 1, d])?,
            position_embedding: emb
                .pp("position_embedding")
                .tensor(gpu, "weight", &[tokens, d])?
                .reshape(&[1, tokens, d])?,
            pre_layrnorm: LayerNorm::new(gpu, &tower.pp("pre_layrnorm"), d, config.layer_norm_eps)?,
            layers,
            config,
        })
    }

    /// Loads an `image_encoder/` folder in the GPU's precision.
    pub fn from_dir(gpu: &Gpu, dir: &Path) -> Result<Self> {
        let config = ClipVisionConfig::load(&dir.join("config.json"))?;
        let set = std::sync::Arc::new(WeightSet::open_dir(dir)?);
        Self::new(gpu, &Weights::new(set, gpu.precision()), config)
    }

    /// `hidden_states[-2]` [N, tokens, D] of `pixel_values` [N, C, S, S]
    /// (S = image_size, as the image processor crops them).
    pub fn penultimate_hidden_state(&self, gpu: &Gpu, pixel_values: &Tensor) -> Result<Tensor> {
        let cfg = &self.config;
        let s = pixel_values.shape();
        let size = cfg.image_size;
        if s.len() != 4 || s[0] == 0 || s[1] != cfg.num_channels || s[2] != size || s[3] != size {
            return Err(EngineError::Shape {
                op: "clip_vision_model",
                expected: format!("pixel_values [N, {}, {size}, {size}]", cfg.num_channels),
                found: fmt_shape(s),
            });
        }
        let (n, c, p) = (s[0], s[1], cfg.patch_size);
        let side = size / p;
        let d = cfg.hidden_size;
        // Patchify [N, C, side, p, side, p] → [N, side·side, C·p·p] in the
        // Conv2d weight's (c, kh, kw) order, patches row-major as the
        // conv output flattens.
        let patches = ops::layout::permute(
            gpu,
            &pixel_values.reshape(&[n, c, side, p, side, p])?,
            &[0, 2, 4, 1, 3, 5],
        )?
        .reshape(&[n, side * side, c * p * p])?;
        let patch_embeds = self.patch_embedding.forward(gpu, &patches)?;
        let class = ops::layout::concat(
            gpu,
            &std::iter::repeat_n(&self.class_embedding, n).collect::<Vec<_>>(),
            0,
        )?;
        let embeddings = ops::layout::concat(gpu, &[&class, &patch_embeds], 1)?;
        let mut x = ops::add(gpu, &embeddings, &self.position_embedding)?;
        x = self.pre_layrnorm.forward(gpu, &x)?;
        debug_assert_eq!(x.shape(), &[n, side * side + 1, d]);
        for layer in &self.layers {
            x = layer.forward(gpu, &x)?;
        }
        Ok(x)
    }
}
