//! The UMT5 text encoder (transformers `UMT5EncoderModel`), Wan's text
//! encoder: token embeddings (`shared`), pre-norm blocks of self-attention
//! with a relative position bias and a gated-GELU feed-forward, a final
//! RMSNorm. Unlike T5, every block has its own `relative_attention_bias`.
//! Attention logits are not scaled (Mesh TensorFlow's initialisation folds
//! the 1/√d into q). Keys: `shared.weight`, `encoder.block.{i}.layer.0.*`
//! (attention), `encoder.block.{i}.layer.1.*` (feed-forward),
//! `encoder.final_layer_norm.weight`.
//!
//! UMT5-XXL is 5.7 B parameters (11.4 GB in f16): it is never resident whole.
//! The embedding table stays on the host (only the prompt's rows are read),
//! and with [`BlockResidency::Streamed`] each block's weights are uploaded,
//! used and dropped in turn, so the device holds one block at a time.

use std::path::Path;

use serde::Deserialize;

use super::nn::{Linear, RmsNorm};
use crate::error::{EngineError, LoadError, Result};
use crate::gpu::{DType, Gpu};
use crate::ops::{self, matmul::MatmulOptions, Activation};
use crate::tensor::{fmt_shape, Tensor};
use crate::weights::{config::read_config, WeightSet, Weights};

/// Whether a model keeps all its blocks' weights on the device or uploads
/// each block's weights when it runs and drops them after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BlockResidency {
    /// Every block uploaded once, at load (small models, repeated calls).
    #[default]
    Resident,
    /// One block on the device at a time, read from the (memory-mapped)
    /// files on every forward: peak device memory is one block's weights
    /// plus activations, at the cost of the uploads.
    Streamed,
}

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f32 {
    1e-6
}
fn default_ff() -> String {
    "gated-gelu".into()
}

fn default_vocab() -> usize {
    250112
}
fn default_d_model() -> usize {
    512
}
fn default_d_kv() -> usize {
    64
}
fn default_d_ff() -> usize {
    1024
}
fn default_layers() -> usize {
    8
}
fn default_heads() -> usize {
    6
}

/// `text_encoder/config.json` (transformers `UMT5Config`), the fields the
/// encoder uses; a key left out takes `UMT5Config`'s default.
#[derive(Debug, Clone, Deserialize)]
pub struct UMT5Config {
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    #[serde(default = "default_d_model")]
    pub d_model: usize,
    /// Width of one attention head.
    #[serde(default = "default_d_kv")]
    pub d_kv: usize,
    #[serde(default = "default_d_ff")]
    pub d_ff: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_heads")]
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f32,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

impl UMT5Config {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::check(path, read_config(path)?)
    }

    /// A config already parsed as JSON (inferred from a single file's
    /// shapes); `path` names it in errors.
    pub fn from_value(path: &Path, value: serde_json::Value) -> Result<Self, LoadError> {
        let cfg = crate::weights::config::config_from_value(path, value)?;
        Self::check(path, cfg)
    }

    fn check(path: &Path, cfg: UMT5Config) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        if cfg.num_heads == 0 || cfg.d_kv == 0 || cfg.d_model == 0 || cfg.num_layers == 0 {
            return Err(bad(format!(
                "d_model {}, d_kv {}, num_heads {} and num_layers {} must all be at least 1",
                cfg.d_model, cfg.d_kv, cfg.num_heads, cfg.num_layers
            )));
        }
        let half = cfg.relative_attention_num_buckets / 2;
        if half / 2 == 0 || cfg.relative_attention_max_distance <= half / 2 {
            return Err(bad(format!(
                "relative_attention_num_buckets {} and relative_attention_max_distance {} \
                 leave no logarithmic buckets (need buckets >= 4, max_distance > buckets / 4)",
                cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
            )));
        }
        if cfg.activation().is_none() {
            return Err(bad(format!(
                "feed_forward_proj `{}` is not supported (gated-gelu, gated-gelu_new, \
                 gated-gelu_pytorch_tanh)",
                cfg.feed_forward_proj
            )));
        }
        Ok(cfg)
    }

    /// The gated feed-forward's activation, as transformers' T5 config
    /// derives it from `feed_forward_proj`: "gated-ACT", where "gated-gelu"
    /// means the tanh approximation (`gelu_new`) for backward compatibility.
    fn activation(&self) -> Option<Activation> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" | "gated-gelu_new" | "gated-gelu_pytorch_tanh" => {
                Some(Activation::GeluTanh)
            }
            _ => None,
        }
    }
}

/// transformers' `_relative_position_bucket` for the encoder (bidirectional):
/// half the buckets for keys after the query, half for keys before; in each
/// half, exact buckets for distances below `num_buckets / 4`, then
/// logarithmic bins up to `max_distance`. Computed in f32 as transformers
/// does (`torch.log` of an f32 tensor, truncation toward zero), since a
/// bucket index off by one changes the bias.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = num_buckets / 2;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.unsigned_abs() as usize;
    let max_exact = half / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let ratio = (distance as f32 / max_exact as f32).ln()
            / ((max_distance as f64 / max_exact as f64).ln() as f32);
        let large = max_exact + (ratio * (half - max_exact) as f32) as usize;
        bucket += large.min(half - 1);
    }
    bucket
}

/// The bucket of every (query, key) pair of a sequence of `len` tokens,
/// row-major [len, len].
pub fn relative_position_buckets(len: usize, num_buckets: usize, max_distance: usize) -> Vec<u32> {
    (0..len as i64)
        .flat_map(|q| {
            (0..len as i64)
                .map(move |k| relative_position_bucket(k - q, num_buckets, max_distance) as u32)
        })
        .collect()
}

/// `UMT5Attention` (encoder self-attention): q, k, v, o without bias and a
/// per-block `relative_attention_bias` table [num_buckets, heads].
pub struct UMT5Attention {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub relative_attention_bias: Tensor,
    heads: usize,
    d_kv: usize,
}

/// `UMT5DenseGatedActDense`: `wo(act(wi_0(x)) · wi_1(x))`.
pub struct UMT5DenseGatedActDense {
    pub wi_0: Linear,
    pub wi_1: Linear,
    pub wo: Linear,
    act: Activation,
}

/// `UMT5Block` (encoder): `layer.0` = RMSNorm + self-attention,
/// `layer.1` = RMSNorm + gated feed-forward, each with a residual.
pub struct UMT5Block {
    pub self_attention: UMT5Attention,
    pub attention_layer_norm: RmsNorm,
    pub dense_relu_dense: UMT5DenseGatedActDense,
    pub ff_layer_norm: RmsNorm,
}

impl UMT5Block {
    /// Loads `encoder.block.{i}` (`w` points there).
    pub fn new(gpu: &Gpu, w: &Weights, cfg: &UMT5Config) -> Result<Self> {
        let (d, inner) = (cfg.d_model, cfg.num_heads * cfg.d_kv);
        let attn = w.pp("layer").pp(0);
        let a = attn.pp("SelfAttention");
        let ff = w.pp("layer").pp(1);
        let f = ff.pp("DenseReluDense");
        let eps = cfg.layer_norm_epsilon;
        Ok(UMT5Block {
            self_attention: UMT5Attention {
                q: Linear::new(gpu, &a.pp("q"), d, inner, false)?,
                k: Linear::new(gpu, &a.pp("k"), d, inner, false)?,
                v: Linear::new(gpu, &a.pp("v"), d, inner, false)?,
                o: Linear::new(gpu, &a.pp("o"), inner, d, false)?,
                relative_attention_bias: a.pp("relative_attention_bias").tensor(
                    gpu,
                    "weight",
                    &[cfg.relative_attention_num_buckets, cfg.num_heads],
                )?,
                heads: cfg.num_heads,
                d_kv: cfg.d_kv,
            },
            attention_layer_norm: RmsNorm::new(gpu, &attn.pp("layer_norm"), d, eps)?,
            dense_relu_dense: UMT5DenseGatedActDense {
                wi_0: Linear::new(gpu, &f.pp("wi_0"), d, cfg.d_ff, false)?,
                wi_1: Linear::new(gpu, &f.pp("wi_1"), d, cfg.d_ff, false)?,
                wo: Linear::new(gpu, &f.pp("wo"), cfg.d_ff, d, false)?,
                act: cfg
                    .activation()
                    .expect("checked when the config was loaded"),
            },
            ff_layer_norm: RmsNorm::new(gpu, &ff.pp("layer_norm"), d, eps)?,
        })
    }

    /// x [N, L, D]; `buckets` [L·L] the relative-position buckets; `mask`
    /// [N, 1, 1, L] the additive padding mask.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, buckets: &[u32], mask: &Tensor) -> Result<Tensor> {
        let h = self.attention_layer_norm.forward(gpu, x)?;
        let o = self.self_attention.attend(gpu, &h, buckets, mask)?;
        let x = self.self_attention.o.forward_residual(gpu, &o, x, 1.0)?;
        let h = self.ff_layer_norm.forward(gpu, &x)?;
        let ff = &self.dense_relu_dense;
        let gate = ff.wi_0.forward_act(gpu, &h, ff.act)?;
        let linear = ff.wi_1.forward(gpu, &h)?;
        let h = ops::mul(gpu, &gate, &linear)?;
        ff.wo.forward_residual(gpu, &h, &x, 1.0)
    }
}

impl UMT5Attention {
    /// The heads' outputs [N, L, H·d_kv], before `o`. The scores are
    /// materialised ([N, H, L, L]): the fused attention kernel has no
    /// additive bias, and at the encoder's L ≤ 512 they are small (UMT5-XXL,
    /// 64 heads, two prompts: 67 MB in f16), so matmul, bias and mask adds,
    /// softmax and matmul keep the maths plain.
    fn attend(&self, gpu: &Gpu, x: &Tensor, buckets: &[u32], mask: &Tensor) -> Result<Tensor> {
        let (n, len) = (x.shape()[0], x.shape()[1]);
        let (heads, d) = (self.heads, self.d_kv);
        let split = |t: Tensor| -> Result<Tensor> {
            ops::layout::permute(gpu, &t.reshape(&[n, len, heads, d])?, &[0, 2, 1, 3])
        };
        let q = split(self.q.forward(gpu, x)?)?;
        let k = split(self.k.forward(gpu, x)?)?;
        let v = split(self.v.forward(gpu, x)?)?;
        // Unscaled logits (alpha 1), as transformers' T5 family computes them.
        let scores = ops::matmul::matmul(
            gpu,
            &q,
            &k,
            &MatmulOptions {
                transpose_b: true,
                ..Default::default()
            },
        )?;
        // position_bias[h, i, j] = relative_attention_bias[bucket(j - i), h].
        let bias = ops::embedding::embedding(gpu, &self.relative_attention_bias, buckets)?;
        let bias = ops::layout::permute(gpu, &bias, &[1, 0])?.reshape(&[heads, len, len])?;
        let scores = ops::add(gpu, &scores, &bias)?;
        let scores = ops::add(gpu, &scores, mask)?;
        let probs = ops::softmax::softmax(gpu, &scores)?;
        let o = ops::matmul::matmul(gpu, &probs, &v, &MatmulOptions::default())?;
        ops::layout::permute(gpu, &o, &[0, 2, 1, 3])?.reshape(&[n, len, heads * d])
    }
}

/// The additive mask value for padding keys: transformers adds the dtype's
/// most negative finite value; any value that drives exp() to 0 after the
/// softmax's max subtraction gives the same weights. In f16 storage the f16
/// minimum (f32's would round to −inf).
fn mask_value(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => -1.0e30,
        DType::F16 => -65504.0,
    }
}

/// `UMT5EncoderModel`: the embedding table (read on the host), the blocks,
/// the final RMSNorm.
pub struct UMT5EncoderModel {
    pub config: UMT5Config,
    weights: Weights,
    /// The blocks' weights on the device ([`BlockResidency::Resident`]), or
    /// empty: each block is loaded when it runs.
    pub blocks: Vec<UMT5Block>,
    pub final_layer_norm: RmsNorm,
    residency: BlockResidency,
}

impl UMT5EncoderModel {
    /// Loads from weights rooted at the checkpoint's top level. All keys and
    /// shapes are checked now, also when blocks are streamed, so a bad file
    /// fails at load rather than halfway through a generation.
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        config: UMT5Config,
        residency: BlockResidency,
    ) -> Result<Self> {
        let shared = vec![config.vocab_size, config.d_model];
        check_shapes(w, &[("shared.weight".into(), shared)])?;
        let enc = w.pp("encoder");
        let blocks = match residency {
            BlockResidency::Resident => (0..config.num_layers)
                .map(|i| UMT5Block::new(gpu, &enc.pp("block").pp(i), &config))
                .collect::<Result<Vec<_>>>()?,
            BlockResidency::Streamed => {
                check_block_shapes(&enc, &config)?;
                Vec::new()
            }
        };
        Ok(UMT5EncoderModel {
            final_layer_norm: RmsNorm::new(
                gpu,
                &enc.pp("final_layer_norm"),
                config.d_model,
                config.layer_norm_epsilon,
            )?,
            blocks,
            config,
            weights: w.clone(),
            residency,
        })
    }

    /// Loads `dir` (a `text_encoder/` folder: `config.json` and safetensors
    /// weights) in the GPU's precision.
    pub fn from_dir(gpu: &Gpu, dir: &Path, residency: BlockResidency) -> Result<Self> {
        let config = UMT5Config::load(&dir.join("config.json"))?;
        let set = std::sync::Arc::new(WeightSet::open_dir(dir)?);
        Self::new(gpu, &Weights::new(set, gpu.precision()), config, residency)
    }

    pub fn residency(&self) -> BlockResidency {
        self.residency
    }

    /// `last_hidden_state` [N, L, D] for `input_ids` [N][L] and
    /// `attention_mask` [N][L] (nonzero: a token to attend to; zero: padding,
    /// which no query attends to — its own state is still computed, as in
    /// transformers; the Wan pipelines zero it afterwards).
    pub fn forward(
        &self,
        gpu: &Gpu,
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u32>],
    ) -> Result<Tensor> {
        self.forward_observed(gpu, input_ids, attention_mask, &mut |_, _| Ok(()))
    }

    /// [`Self::forward`], showing `observe` each block's output as
    /// `block_{i}` [N, L, D] (what reference cases name in their debug
    /// outputs, to locate where an error starts).
    pub fn forward_observed(
        &self,
        gpu: &Gpu,
        input_ids: &[Vec<u32>],
        attention_mask: &[Vec<u32>],
        observe: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let n = input_ids.len();
        let len = input_ids.first().map(Vec::len).unwrap_or(0);
        let rows_ok = |rows: &[Vec<u32>]| rows.len() == n && rows.iter().all(|r| r.len() == len);
        if n == 0 || len == 0 || !rows_ok(input_ids) || !rows_ok(attention_mask) {
            return Err(EngineError::Shape {
                op: "umt5_encoder",
                expected: "input_ids and attention_mask: N >= 1 rows of one length L >= 1".into(),
                found: format!(
                    "input_ids {}, attention_mask {}",
                    fmt_shape(&input_ids.iter().map(Vec::len).collect::<Vec<_>>()),
                    fmt_shape(&attention_mask.iter().map(Vec::len).collect::<Vec<_>>())
                ),
            });
        }
        let cfg = &self.config;
        let d = cfg.d_model;
        let dtype = gpu.precision();
        let ids: Vec<usize> = input_ids.iter().flatten().map(|&i| i as usize).collect();
        if let Some(bad) = ids.iter().find(|&&i| i >= cfg.vocab_size) {
            return Err(EngineError::Argument {
                op: "umt5_encoder",
                message: format!(
                    "token id {bad} is out of range for a vocabulary of {}",
                    cfg.vocab_size
                ),
            });
        }
        // Only the prompt's rows of the embedding table leave the file.
        let rows = if gpu.is_plan() {
            Vec::new()
        } else {
            self.weights.set().read_rows_f32(
                &self.weights.key("shared.weight"),
                &[cfg.vocab_size, d],
                &ids,
            )?
        };
        let mut x = if gpu.is_plan() {
            Tensor::empty(gpu, &[n, len, d], dtype)?
        } else {
            Tensor::from_f32(gpu, &rows, &[n, len, d], dtype)?
        };
        let neg = mask_value(dtype);
        let mask: Vec<f32> = attention_mask
            .iter()
            .flatten()
            .map(|&m| if m != 0 { 0.0 } else { neg })
            .collect();
        let mask = Tensor::from_f32(gpu, &mask, &[n, 1, 1, len], dtype)?;
        let buckets = relative_position_buckets(
            len,
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        );
        let enc = self.weights.pp("encoder").pp("block");
        for i in 0..cfg.num_layers {
            x = match self.blocks.get(i) {
                Some(block) => block.forward(gpu, &x, &buckets, &mask)?,
                // Streamed: this block's weights live until the end of this arm.
                None => UMT5Block::new(gpu, &enc.pp(i), cfg)?.forward(gpu, &x, &buckets, &mask)?,
            };
            observe(&format!("block_{i}"), &x)?;
        }
        self.final_layer_norm.forward(gpu, &x)
    }
}

/// Fails unless every `(name, shape)` under `w` exists with that shape,
/// without reading any data.
pub(crate) fn check_shapes(w: &Weights, expected: &[(String, Vec<usize>)]) -> Result<()> {
    let set = w.set();
    let stored = set.key_shapes();
    for (name, shape) in expected {
        let key = w.key(name);
        match stored.get(&key) {
            Some(s) if s == shape => {}
            Some(s) => {
                return Err(LoadError::TensorShape {
                    path: set.path_of(&key),
                    key,
                    expected: shape.clone(),
                    found: s.clone(),
                }
                .into())
            }
            // Shapes-only and synthetic sets check when the block loads.
            None if set.contains(&key) => {}
            None => {
                return Err(LoadError::MissingTensor {
                    path: set.path_of(&key),
                    key,
                }
                .into())
            }
        }
    }
    Ok(())
}

/// Every key a block loads, with its shape, checked without reading data.
fn check_block_shapes(enc: &Weights, cfg: &UMT5Config) -> Result<()> {
    let (d, inner, ff) = (cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff);
    let buckets = vec![cfg.relative_attention_num_buckets, cfg.num_heads];
    let mut expected = Vec::new();
    for i in 0..cfg.num_layers {
        let block: [(&str, Vec<usize>); 10] = [
            ("layer.0.SelfAttention.q.weight", vec![inner, d]),
            ("layer.0.SelfAttention.k.weight", vec![inner, d]),
            ("layer.0.SelfAttention.v.weight", vec![inner, d]),
            ("layer.0.SelfAttention.o.weight", vec![d, inner]),
            (
                "layer.0.SelfAttention.relative_attention_bias.weight",
                buckets.clone(),
            ),
            ("layer.0.layer_norm.weight", vec![d]),
            ("layer.1.DenseReluDense.wi_0.weight", vec![ff, d]),
            ("layer.1.DenseReluDense.wi_1.weight", vec![ff, d]),
            ("layer.1.DenseReluDense.wo.weight", vec![d, ff]),
            ("layer.1.layer_norm.weight", vec![d]),
        ];
        expected.extend(
            block
                .into_iter()
                .map(|(name, shape)| (format!("block.{i}.{name}"), shape)),
        );
    }
    check_shapes(enc, &expected)
}
