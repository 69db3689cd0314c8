//! The CLIP text encoder (transformers `CLIPTextModel`): token and position
//! embeddings, pre-LN transformer layers with causal self-attention and
//! quick-GELU MLPs, a final LayerNorm. Keys start with `text_model.`.
//! Widths, depth and heads come from `text_encoder/config.json`.

use std::path::Path;

use serde::Deserialize;

use super::nn::{Embedding, LayerNorm, Linear};
use crate::error::{EngineError, LoadError, Result};
use crate::gpu::Gpu;
use crate::ops::{self, attention::AttentionOptions, Activation};
use crate::tensor::{fmt_shape, Tensor};
use crate::weights::{config::read_config, Weights};

// transformers' `CLIPTextConfig` defaults, for keys a config leaves out.
fn default_eps() -> f32 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eos() -> u32 {
    49407
}
fn default_vocab() -> usize {
    49408
}
fn default_hidden() -> usize {
    512
}
fn default_intermediate() -> usize {
    2048
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    8
}
fn default_positions() -> usize {
    77
}

/// `text_encoder/config.json` (transformers `CLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_hidden")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f32,
    /// transformers' legacy rule: with eos_token_id 2 the pooled token is the
    /// argmax of the ids; otherwise the first id equal to eos_token_id.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
}

impl ClipTextConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::check(path, read_config(path)?)
    }

    /// A config already parsed as JSON (`path` names it in errors).
    pub fn load_value(path: &Path, value: serde_json::Value) -> Result<Self, LoadError> {
        let cfg = crate::weights::config::config_from_value(path, value)?;
        Self::check(path, cfg)
    }

    fn check(path: &Path, cfg: ClipTextConfig) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        check_tower(cfg.hidden_size, cfg.num_attention_heads, &cfg.hidden_act).map_err(bad)?;
        Ok(cfg)
    }

    fn activation(&self) -> Option<Activation> {
        activation_named(&self.hidden_act)
    }
}

/// What the text and the vision tower's configs must both satisfy: whole
/// heads, and an activation Motif has; the message for the config error.
pub(crate) fn check_tower(hidden: usize, heads: usize, act: &str) -> Result<(), String> {
    if heads == 0 || !hidden.is_multiple_of(heads) {
        return Err(format!(
            "hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
        ));
    }
    if activation_named(act).is_none() {
        return Err(format!(
            "hidden_act `{act}` is not supported (quick_gelu, gelu, gelu_new)"
        ));
    }
    Ok(())
}

/// transformers' `ACT2FN` names the CLIP towers use.
pub(crate) fn activation_named(name: &str) -> Option<Activation> {
    match name {
        "quick_gelu" => Some(Activation::QuickGelu),
        "gelu" => Some(Activation::GeluErf),
        "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
        _ => None,
    }
}

pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: usize,
    /// The text model's causal mask; the vision tower attends to all patches.
    causal: bool,
}

pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    act: Activation,
}

/// The sizes of one encoder layer.
pub(crate) struct ClipLayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub act: Activation,
    pub eps: f32,
    pub causal: bool,
}

pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(gpu: &Gpu, w: &Weights, cfg: &ClipTextConfig) -> Result<Self> {
        let act = cfg
            .activation()
            .expect("checked when the config was loaded");
        Self::with_dims(
            gpu,
            w,
            ClipLayerDims {
                hidden: cfg.hidden_size,
                intermediate: cfg.intermediate_size,
                heads: cfg.num_attention_heads,
                act,
                eps: cfg.layer_norm_eps,
                causal: true,
            },
        )
    }

    /// A layer of either tower (`CLIPEncoderLayer` is shared by both).
    pub(crate) fn with_dims(gpu: &Gpu, w: &Weights, dims: ClipLayerDims) -> Result<Self> {
        let d = dims.hidden;
        let a = w.pp("self_attn");
        let m = w.pp("mlp");
        Ok(ClipEncoderLayer {
            self_attn: ClipAttention {
                q_proj: Linear::new(gpu, &a.pp("q_proj"), d, d, true)?,
                k_proj: Linear::new(gpu, &a.pp("k_proj"), d, d, true)?,
                v_proj: Linear::new(gpu, &a.pp("v_proj"), d, d, true)?,
                out_proj: Linear::new(gpu, &a.pp("out_proj"), d, d, true)?,
                heads: dims.heads,
                causal: dims.causal,
            },
            layer_norm1: LayerNorm::new(gpu, &w.pp("layer_norm1"), d, dims.eps)?,
            mlp: ClipMlp {
                fc1: Linear::new(gpu, &m.pp("fc1"), d, dims.intermediate, true)?,
                fc2: Linear::new(gpu, &m.pp("fc2"), dims.intermediate, d, true)?,
                act: dims.act,
            },
            layer_norm2: LayerNorm::new(gpu, &w.pp("layer_norm2"), d, dims.eps)?,
        })
    }

    pub(crate) fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let h = self.layer_norm1.forward(gpu, x)?;
        let a = &self.self_attn;
        let q = a.q_proj.forward(gpu, &h)?;
        let k = a.k_proj.forward(gpu, &h)?;
        let v = a.v_proj.forward(gpu, &h)?;
        // CLIP uses a causal mask only: padding positions are attended to.
        let o = ops::attention::attention(
            gpu,
            &q,
            &k,
            &v,
            a.heads,
            &AttentionOptions {
                causal: a.causal,
                ..Default::default()
            },
        )?;
        let x = a.out_proj.forward_residual(gpu, &o, x, 1.0)?;
        let h = self.layer_norm2.forward(gpu, &x)?;
        let h = self.mlp.fc1.forward_act(gpu, &h, self.mlp.act)?;
        self.mlp.fc2.forward_residual(gpu, &h, &x, 1.0)
    }
}

/// The outputs a pipeline and the conformance runner need.
pub struct ClipTextOutput {
    /// [N, L, D] after the final LayerNorm.
    pub last_hidden_state: Tensor,
    /// [N, D]: the final state at each prompt's EOS token.
    pub pooler_output: Tensor,
    /// [N, L, D]: final_layer_norm(hidden_states[-2]), "clip skip 1".
    pub clip_skip1_hidden_state: Tensor,
}

pub struct ClipTextModel {
    pub config: ClipTextConfig,
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Loads from weights rooted at the checkpoint's top level. Keys are
    /// `text_model.*` in hub checkpoints (transformers 4) and unprefixed in
    /// files transformers 5 writes; both load. A `position_ids` buffer, if
    /// present, is ignored.
    pub fn new(gpu: &Gpu, w: &Weights, config: ClipTextConfig) -> Result<Self> {
        let prefixed = w.pp("text_model");
        let tm = if prefixed.contains("embeddings.token_embedding.weight")
            || !w.contains("embeddings.token_embedding.weight")
        {
            prefixed
        } else {
            w.clone()
        };
        let emb = tm.pp("embeddings");
        let d = config.hidden_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(gpu, &tm.pp("encoder").pp("layers").pp(i), &config))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextModel {
            token_embedding: Embedding::new(gpu, &emb.pp("token_embedding"), config.vocab_size, d)?,
            position_embedding: Embedding::new(
                gpu,
                &emb.pp("position_embedding"),
                config.max_position_embeddings,
                d,
            )?,
            layers,
            final_layer_norm: LayerNorm::new(
                gpu,
                &tm.pp("final_layer_norm"),
                d,
                config.layer_norm_eps,
            )?,
            config,
        })
    }

    /// Encodes `ids` ([N][L] token ids, L ≤ max_position_embeddings).
    pub fn forward(&self, gpu: &Gpu, ids: &[Vec<u32>]) -> Result<ClipTextOutput> {
        let n = ids.len();
        let len = ids.first().map(Vec::len).unwrap_or(0);
        if n == 0
            || len == 0
            || len > self.config.max_position_embeddings
            || ids.iter().any(|r| r.len() != len)
        {
            return Err(EngineError::Shape {
                op: "clip_text_model",
                expected: format!(
                    "N ≥ 1 rows of the same length ≤ {}",
                    self.config.max_position_embeddings
                ),
                found: fmt_shape(&ids.iter().map(Vec::len).collect::<Vec<_>>()),
            });
        }
        let d = self.config.hidden_size;
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let tokens = self
            .token_embedding
            .forward(gpu, &flat)?
            .reshape(&[n, len, d])?;
        let positions: Vec<u32> = (0..len as u32).collect();
        let pos = self.position_embedding.forward(gpu, &positions)?;
        let mut x = ops::add(gpu, &tokens, &pos)?;
        let mut penultimate = None;
        for (i, layer) in self.layers.iter().enumerate() {
            if i + 1 == self.layers.len() {
                penultimate = Some(x.clone());
            }
            x = layer.forward(gpu, &x)?;
        }
        let last = self.final_layer_norm.forward(gpu, &x)?;
        let skip = match penultimate {
            Some(p) => self.final_layer_norm.forward(gpu, &p)?,
            None => last.clone(),
        };
        // Pooled: the row of each prompt's EOS token, gathered from the flat [N·L, D] states.
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(b, r)| (b * len + self.pooled_index(r)) as u32)
            .collect();
        let pooled = ops::embedding::embedding(gpu, &last.reshape(&[n * len, d])?, &rows)?;
        Ok(ClipTextOutput {
            last_hidden_state: last,
            pooler_output: pooled,
            clip_skip1_hidden_state: skip,
        })
    }

    fn pooled_index(&self, ids: &[u32]) -> usize {
        let argmax = || {
            ids.iter()
                .enumerate()
                .max_by_key(|&(i, &v)| (v, std::cmp::Reverse(i)))
                .map(|(i, _)| i)
                .unwrap_or(0)
        };
        if self.config.eos_token_id == 2 {
            argmax()
        } else {
            ids.iter()
                .position(|&v| v == self.config.eos_token_id)
                .unwrap_or_else(argmax)
        }
    }
}
