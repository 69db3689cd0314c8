//! The Wan 2.1 transformer (diffusers `WanTransformer3DModel`,
//! `models/transformers/transformer_wan.py`): a 3D patch embedding, the
//! condition embedder (sinusoidal time embedding → MLP → six modulation
//! vectors per block; text projection), blocks of modulated self-attention
//! with RMS-normed q/k and 3D rotary embedding, cross-attention on the text
//! tokens and a GELU (tanh) feed-forward with gated residuals, then the
//! modulated output norm, the head and the unpatchify. Image-to-video
//! models (Wan 2.1 I2V/FLF2V) add the image embedder on the CLIP tokens and,
//! in every cross-attention, a second attention of the same queries on
//! those tokens (`add_k_proj`/`add_v_proj`), summed. Field names mirror
//! diffusers' module tree (`blocks.{i}.attn1.to_q`, `condition_embedder.
//! time_embedder.linear_1`, ...).
//!
//! diffusers runs the modulation and the norms in f32 (`FP32LayerNorm`,
//! `.float()` before every gated residual); in f32 storage that is what
//! happens here too, and in f16 storage every op still accumulates in f32.

use std::path::Path;

use serde::Deserialize;

use super::nn::{LayerNorm, Linear, RmsNorm};
use super::umt5::{check_shapes, BlockResidency};
use crate::error::{EngineError, LoadError, Result};
use crate::gpu::{DType, Gpu};
use crate::ops::{self, attention::AttentionOptions, embedding::TimestepEmbedding, Activation};
use crate::tensor::{fmt_shape, Tensor};
use crate::weights::{config::read_config, WeightSet, Weights};

// `WanTransformer3DModel.__init__`'s defaults (the Wan 2.1 14B model), for
// keys a config leaves out.
fn default_patch() -> [usize; 3] {
    [1, 2, 2]
}
fn default_true() -> bool {
    true
}
fn default_eps() -> f32 {
    1e-6
}
fn default_rope_len() -> usize {
    1024
}
fn default_freq_dim() -> usize {
    256
}
fn default_heads() -> usize {
    40
}
fn default_head_dim() -> usize {
    128
}
fn default_channels() -> usize {
    16
}
fn default_out_channels() -> Option<usize> {
    Some(16)
}
fn default_text_dim() -> usize {
    4096
}
fn default_ffn_dim() -> usize {
    13824
}
fn default_layers() -> usize {
    40
}
fn default_qk_norm() -> Option<String> {
    Some("rms_norm_across_heads".into())
}

/// `transformer/config.json` (diffusers `WanTransformer3DModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct WanTransformerConfig {
    #[serde(default = "default_patch")]
    pub patch_size: [usize; 3],
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "default_channels")]
    pub in_channels: usize,
    /// Absent: 16, diffusers' default; `null`: in_channels (diffusers'
    /// `out_channels or in_channels`).
    #[serde(default = "default_out_channels")]
    pub out_channels: Option<usize>,
    #[serde(default = "default_text_dim")]
    pub text_dim: usize,
    #[serde(default = "default_freq_dim")]
    pub freq_dim: usize,
    #[serde(default = "default_ffn_dim")]
    pub ffn_dim: usize,
    #[serde(default = "default_layers")]
    pub num_layers: usize,
    #[serde(default = "default_true")]
    pub cross_attn_norm: bool,
    /// diffusers builds norm_q/norm_k whatever this says; kept to report it.
    #[serde(default = "default_qk_norm")]
    pub qk_norm: Option<String>,
    #[serde(default = "default_eps")]
    pub eps: f32,
    /// Image-to-video (Wan 2.1 I2V/FLF2V): the image encoder's width, fed
    /// to `condition_embedder.image_embedder`.
    #[serde(default)]
    pub image_dim: Option<usize>,
    /// The width of the image tokens the cross-attention's
    /// `add_k_proj`/`add_v_proj` read (the image embedder's output: the
    /// model width).
    #[serde(default)]
    pub added_kv_proj_dim: Option<usize>,
    #[serde(default = "default_rope_len")]
    pub rope_max_seq_len: usize,
    /// First-last frame (FLF2V): the image embedder's learned positions
    /// over both images' tokens (2 · 257).
    #[serde(default)]
    pub pos_embed_seq_len: Option<usize>,
}

impl WanTransformerConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::check(path, read_config(path)?)
    }

    /// A config already parsed as JSON (inferred from a single file's
    /// shapes); `path` names it in errors.
    pub fn from_value(path: &Path, value: serde_json::Value) -> Result<Self, LoadError> {
        let cfg = crate::weights::config::config_from_value(path, value)?;
        Self::check(path, cfg)
    }

    fn check(path: &Path, cfg: WanTransformerConfig) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        match (cfg.image_dim, cfg.added_kv_proj_dim) {
            (None, None) => {
                if cfg.pos_embed_seq_len.is_some() {
                    return Err(bad(
                        "pos_embed_seq_len is set without image_dim: first-last-frame positions \
                         need an image embedder"
                            .into(),
                    ));
                }
            }
            (Some(image_dim), Some(kv)) => {
                // diffusers builds add_k_proj as Linear(added_kv_proj_dim,
                // inner_dim) over the image embedder's inner_dim-wide output:
                // any other value cannot run.
                if kv != cfg.inner_dim() || image_dim == 0 {
                    return Err(bad(format!(
                        "added_kv_proj_dim {kv} must equal heads · head_dim = {} (the image \
                         embedder's output width), and image_dim {image_dim} be positive",
                        cfg.inner_dim()
                    )));
                }
                if cfg
                    .pos_embed_seq_len
                    .is_some_and(|p| p == 0 || !p.is_multiple_of(2))
                {
                    return Err(bad(format!(
                        "pos_embed_seq_len {:?} must be even: it spans the first and the last \
                         image's tokens",
                        cfg.pos_embed_seq_len
                    )));
                }
            }
            (image_dim, kv) => {
                return Err(bad(format!(
                    "image_dim {image_dim:?} and added_kv_proj_dim {kv:?}: an image-to-video \
                     transformer sets both, a text-to-video one neither"
                )));
            }
        }
        let d = cfg.attention_head_dim;
        if cfg.num_attention_heads == 0 || d < 6 || !d.is_multiple_of(2) || cfg.num_layers == 0 {
            return Err(bad(format!(
                "num_attention_heads {} and attention_head_dim {} (even, >= 6: the rotary \
                 embedding splits it in three) and num_layers {} must be positive",
                cfg.num_attention_heads, d, cfg.num_layers
            )));
        }
        if cfg.patch_size.contains(&0) || cfg.freq_dim < 2 {
            return Err(bad(format!(
                "patch_size {:?} and freq_dim {} must be positive",
                cfg.patch_size, cfg.freq_dim
            )));
        }
        Ok(cfg)
    }

    /// heads · head_dim, the model width.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    pub fn out_channels(&self) -> usize {
        // diffusers: `out_channels or in_channels` (0 counts as unset too).
        self.out_channels
            .filter(|&c| c != 0)
            .unwrap_or(self.in_channels)
    }

    /// The head dim's split for the rotary embedding (diffusers'
    /// `WanRotaryPosEmbed`): (frames, height, width) = (rest, 2·(d/6), 2·(d/6)).
    pub fn rope_split(&self) -> [usize; 3] {
        let hw = 2 * (self.attention_head_dim / 6);
        [self.attention_head_dim - 2 * hw, hw, hw]
    }
}

/// The rotary tables [S, D/2] (cos, sin) for a latent grid of `grid` =
/// (frames, height, width) patches, token order frame-major as the patch
/// embedding flattens it. Each of the three parts of the head dim has its
/// own frequencies 1 / θ^(2k/part) over its own axis' position; computed in
/// f64 and rounded to f32, as diffusers builds its `freqs_cos/sin` buffers
/// (`get_1d_rotary_pos_embed(..., freqs_dtype=float64).float()`).
pub fn rope_tables(split: [usize; 3], grid: [usize; 3], theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half: usize = split.iter().sum::<usize>() / 2;
    let freqs: Vec<Vec<f64>> = split
        .iter()
        .map(|&part| {
            (0..part / 2)
                .map(|k| 1.0 / theta.powf((2 * k) as f64 / part as f64))
                .collect()
        })
        .collect();
    let tokens: usize = grid.iter().product();
    let (mut cos, mut sin) = (
        Vec::with_capacity(tokens * half),
        Vec::with_capacity(tokens * half),
    );
    for f in 0..grid[0] {
        for h in 0..grid[1] {
            for w in 0..grid[2] {
                for (axis, pos) in [f, h, w].into_iter().enumerate() {
                    for &freq in &freqs[axis] {
                        let angle = pos as f64 * freq;
                        cos.push(angle.cos() as f32);
                        sin.push(angle.sin() as f32);
                    }
                }
            }
        }
    }
    (cos, sin)
}

/// `WanAttention`: q/k/v/out projections with bias, RMSNorm over all heads
/// of q and k (`norm_q`, `norm_k`: torch RMSNorm over heads · head_dim).
pub struct WanAttention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out.0`.
    pub to_out: Linear,
    pub norm_q: RmsNorm,
    pub norm_k: RmsNorm,
    /// Image-to-video cross-attention only: keys and values of the image
    /// tokens (`add_k_proj`, `add_v_proj`, `norm_added_k`).
    pub added_kv: Option<AddedKv>,
    heads: usize,
}

/// The image branch of an image-to-video cross-attention.
pub struct AddedKv {
    pub add_k_proj: Linear,
    pub add_v_proj: Linear,
    pub norm_added_k: RmsNorm,
}

/// The rotary tables of one forward, on the device (f32).
pub struct Rope {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl WanAttention {
    fn new(gpu: &Gpu, w: &Weights, cfg: &WanTransformerConfig, cross: bool) -> Result<Self> {
        let dim = cfg.inner_dim();
        let added_kv = match (cross, cfg.added_kv_proj_dim) {
            (true, Some(kv)) => Some(AddedKv {
                add_k_proj: Linear::new(gpu, &w.pp("add_k_proj"), kv, dim, true)?,
                add_v_proj: Linear::new(gpu, &w.pp("add_v_proj"), kv, dim, true)?,
                norm_added_k: RmsNorm::new(gpu, &w.pp("norm_added_k"), dim, cfg.eps)?,
            }),
            _ => None,
        };
        Ok(WanAttention {
            added_kv,
            to_q: Linear::new(gpu, &w.pp("to_q"), dim, dim, true)?,
            to_k: Linear::new(gpu, &w.pp("to_k"), dim, dim, true)?,
            to_v: Linear::new(gpu, &w.pp("to_v"), dim, dim, true)?,
            to_out: Linear::new(gpu, &w.pp("to_out").pp(0), dim, dim, true)?,
            norm_q: RmsNorm::new(gpu, &w.pp("norm_q"), dim, cfg.eps)?,
            norm_k: RmsNorm::new(gpu, &w.pp("norm_k"), dim, cfg.eps)?,
            heads: cfg.num_attention_heads,
        })
    }

    /// The heads' outputs before `to_out`: self-attention with the rotary
    /// embedding on q and k (`context` None), or cross-attention on
    /// `context` without it. With `image` tokens (image-to-video), the same
    /// queries also attend to them through `add_k_proj`/`add_v_proj`
    /// (keys RMS-normed by `norm_added_k`, no norm on the values) and the
    /// two attentions' outputs are summed, as diffusers' `WanAttnProcessor`.
    fn attend(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        context: Option<&Tensor>,
        image: Option<&Tensor>,
        rope: Option<&Rope>,
    ) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let mut q = self.norm_q.forward(gpu, &self.to_q.forward(gpu, x)?)?;
        let mut k = self.norm_k.forward(gpu, &self.to_k.forward(gpu, ctx)?)?;
        let v = self.to_v.forward(gpu, ctx)?;
        if let Some(r) = rope {
            q = ops::rope::rotary_embedding(gpu, &q, &r.cos, &r.sin, self.heads)?;
            k = ops::rope::rotary_embedding(gpu, &k, &r.cos, &r.sin, self.heads)?;
        }
        let options = AttentionOptions::default();
        let text = ops::attention::attention(gpu, &q, &k, &v, self.heads, &options)?;
        match (image, &self.added_kv) {
            (Some(img), Some(added)) => {
                let k_img = added
                    .norm_added_k
                    .forward(gpu, &added.add_k_proj.forward(gpu, img)?)?;
                let v_img = added.add_v_proj.forward(gpu, img)?;
                let from_image =
                    ops::attention::attention(gpu, &q, &k_img, &v_img, self.heads, &options)?;
                ops::add(gpu, &text, &from_image)
            }
            _ => Ok(text),
        }
    }
}

/// `FeedForward(dim, inner_dim=ffn_dim, activation_fn="gelu-approximate")`:
/// `net.0.proj` with GELU (tanh), `net.2` back to dim.
pub struct WanFeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
}

/// `WanTransformerBlock`.
pub struct WanTransformerBlock {
    pub attn1: WanAttention,
    pub attn2: WanAttention,
    /// `norm2`: a LayerNorm with affine when `cross_attn_norm`, else identity.
    pub norm2: Option<LayerNorm>,
    pub ffn: WanFeedForward,
    /// [1, 6, dim]: shift, scale, gate of the self-attention, then of the
    /// feed-forward, added to the timestep projection.
    pub scale_shift_table: Tensor,
    /// eps of norm1 and norm3 (LayerNorms without affine).
    eps: f32,
}

impl WanTransformerBlock {
    pub fn new(gpu: &Gpu, w: &Weights, cfg: &WanTransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let ff = w.pp("ffn").pp("net");
        Ok(WanTransformerBlock {
            attn1: WanAttention::new(gpu, &w.pp("attn1"), cfg, false)?,
            attn2: WanAttention::new(gpu, &w.pp("attn2"), cfg, true)?,
            norm2: if cfg.cross_attn_norm {
                Some(LayerNorm::new(gpu, &w.pp("norm2"), dim, cfg.eps)?)
            } else {
                None
            },
            ffn: WanFeedForward {
                proj_in: Linear::new(gpu, &ff.pp(0).pp("proj"), dim, cfg.ffn_dim, true)?,
                proj_out: Linear::new(gpu, &ff.pp(2), cfg.ffn_dim, dim, true)?,
            },
            scale_shift_table: w.tensor(gpu, "scale_shift_table", &[1, 6, dim])?,
            eps: cfg.eps,
        })
    }

    /// x [B, S, dim]; `context` [B, L, dim] (projected text); `image`
    /// [B, T, dim] (embedded image tokens, image-to-video); `timestep_proj`
    /// [B, 6, dim], or [B, G, 6, dim] with a timestep per group of S / G
    /// consecutive tokens (see `WanTransformer3DModel::forward_observed`).
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        context: &Tensor,
        image: Option<&Tensor>,
        timestep_proj: &Tensor,
        rope: &Rope,
    ) -> Result<Tensor> {
        let modulation = ops::add(gpu, timestep_proj, &self.scale_shift_table)?;
        // The tokens fall into G groups of one timestep each (G = 1: one
        // per item; the latent frames, or every token, with per-token
        // timesteps): each of the six is [B, G, 1, dim] against the
        // tokens viewed as [B, G, S / G, dim].
        let ms = modulation.shape().to_vec();
        let (six, groups) = match ms.len() {
            4 => (2, ms[1]),
            _ => (1, 1),
        };
        let (b, s, d) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        let grouped = |t: &Tensor| t.reshape(&[b, groups, s / groups, d]);
        let chunk = |i: usize| {
            ops::layout::narrow(gpu, &modulation, six, i, 1)?.reshape(&[b, groups, 1, d])
        };
        let modulate = |h: &Tensor, scale: &Tensor, shift: &Tensor| {
            ops::elementwise::modulate(gpu, &grouped(h)?, scale, shift)?.reshape(&[b, s, d])
        };
        let gated_add = |x: &Tensor, y: &Tensor, gate: &Tensor| {
            ops::elementwise::gated_add(gpu, &grouped(x)?, &grouped(y)?, gate)?.reshape(&[b, s, d])
        };
        let (shift_msa, scale_msa, gate_msa) = (chunk(0)?, chunk(1)?, chunk(2)?);
        let (c_shift_msa, c_scale_msa, c_gate_msa) = (chunk(3)?, chunk(4)?, chunk(5)?);

        // 1. Self-attention.
        let h = ops::norm::layer_norm(gpu, x, None, None, self.eps)?;
        let h = modulate(&h, &scale_msa, &shift_msa)?;
        let a = self.attn1.attend(gpu, &h, None, None, Some(rope))?;
        let a = self.attn1.to_out.forward(gpu, &a)?;
        let x = gated_add(x, &a, &gate_msa)?;

        // 2. Cross-attention, its residual added in to_out's epilogue.
        let h = match &self.norm2 {
            Some(n) => n.forward(gpu, &x)?,
            None => x.clone(),
        };
        let a = self.attn2.attend(gpu, &h, Some(context), image, None)?;
        let x = self.attn2.to_out.forward_residual(gpu, &a, &x, 1.0)?;

        // 3. Feed-forward.
        let h = ops::norm::layer_norm(gpu, &x, None, None, self.eps)?;
        let h = modulate(&h, &c_scale_msa, &c_shift_msa)?;
        let h = self
            .ffn
            .proj_in
            .forward_act(gpu, &h, Activation::GeluTanh)?;
        let f = self.ffn.proj_out.forward(gpu, &h)?;
        gated_add(&x, &f, &c_gate_msa)
    }
}

/// diffusers' `TimestepEmbedding`: linear_1 → SiLU → linear_2.
pub struct TimeEmbedder {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// `PixArtAlphaTextProjection(act_fn="gelu_tanh")`: linear_1 → GELU (tanh) → linear_2.
pub struct TextEmbedder {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// `WanImageEmbedding`: the image encoder's tokens → model width, through
/// `norm1` (LayerNorm, eps 1e-5, in f32 as diffusers' `FP32LayerNorm`), a
/// GELU (erf) feed-forward of width image_dim and `norm2`. For first-last
/// frame, `pos_embed` [1, 2T, image_dim] is added first to both images'
/// tokens laid end to end ([2B, T, D] viewed as [B, 2T, D]).
pub struct WanImageEmbedding {
    pub norm1: LayerNorm,
    /// `ff.net.0.proj` (GELU, erf) and `ff.net.2`.
    pub ff: WanFeedForward,
    pub norm2: LayerNorm,
    pub pos_embed: Option<Tensor>,
}

/// `FP32LayerNorm`'s eps (nn.LayerNorm's default).
const IMAGE_NORM_EPS: f32 = 1e-5;

impl WanImageEmbedding {
    fn new(gpu: &Gpu, w: &Weights, cfg: &WanTransformerConfig, image_dim: usize) -> Result<Self> {
        let dim = cfg.inner_dim();
        let ff = w.pp("ff").pp("net");
        Ok(WanImageEmbedding {
            norm1: LayerNorm::new(gpu, &w.pp("norm1"), image_dim, IMAGE_NORM_EPS)?,
            ff: WanFeedForward {
                proj_in: Linear::new(gpu, &ff.pp(0).pp("proj"), image_dim, image_dim, true)?,
                proj_out: Linear::new(gpu, &ff.pp(2), image_dim, dim, true)?,
            },
            norm2: LayerNorm::new(gpu, &w.pp("norm2"), dim, IMAGE_NORM_EPS)?,
            pos_embed: cfg
                .pos_embed_seq_len
                .map(|p| w.tensor(gpu, "pos_embed", &[1, p, image_dim]))
                .transpose()?,
        })
    }

    /// `image` [N, T, image_dim] → [N, T, dim], or with `pos_embed`
    /// [N / 2, 2T, dim] (N = 2B: each item's first then last image).
    pub fn forward(&self, gpu: &Gpu, image: &Tensor) -> Result<Tensor> {
        let x = match &self.pos_embed {
            Some(pos) => {
                let s = image.shape();
                let want = pos.shape()[1];
                if s.len() != 3 || !s[0].is_multiple_of(2) || 2 * s[1] != want {
                    return Err(EngineError::Shape {
                        op: "wan_image_embedding",
                        expected: format!(
                            "first-last image tokens [2B, {}, D] (each item's first and last \
                             image; pos_embed spans {want} tokens)",
                            want / 2
                        ),
                        found: fmt_shape(s),
                    });
                }
                let joined = image.reshape(&[s[0] / 2, want, s[2]])?;
                ops::add(gpu, &joined, pos)?
            }
            None => image.clone(),
        };
        let h = self.norm1.forward(gpu, &x)?;
        let h = self.ff.proj_in.forward_act(gpu, &h, Activation::GeluErf)?;
        let h = self.ff.proj_out.forward(gpu, &h)?;
        self.norm2.forward(gpu, &h)
    }
}

/// `WanTimeTextImageEmbedding`.
pub struct WanTimeTextEmbedding {
    pub time_embedder: TimeEmbedder,
    pub time_proj: Linear,
    pub text_embedder: TextEmbedder,
    /// Image-to-video models only.
    pub image_embedder: Option<WanImageEmbedding>,
    freq_dim: usize,
}

/// What the condition embedder gives the blocks.
pub struct WanConditions {
    /// [B, dim], or [B, S, dim] per token: the time embedding (the output
    /// norm's modulation).
    pub temb: Tensor,
    /// [B, 6, dim], or [B, S, 6, dim] per token: the blocks' modulation
    /// before their own tables.
    pub timestep_proj: Tensor,
    /// [B, L, dim]: the projected text tokens.
    pub context: Tensor,
}

impl WanTimeTextEmbedding {
    fn new(gpu: &Gpu, w: &Weights, cfg: &WanTransformerConfig) -> Result<Self> {
        let dim = cfg.inner_dim();
        let te = w.pp("time_embedder");
        let tx = w.pp("text_embedder");
        Ok(WanTimeTextEmbedding {
            time_embedder: TimeEmbedder {
                linear_1: Linear::new(gpu, &te.pp("linear_1"), cfg.freq_dim, dim, true)?,
                linear_2: Linear::new(gpu, &te.pp("linear_2"), dim, dim, true)?,
            },
            time_proj: Linear::new(gpu, &w.pp("time_proj"), dim, 6 * dim, true)?,
            text_embedder: TextEmbedder {
                linear_1: Linear::new(gpu, &tx.pp("linear_1"), cfg.text_dim, dim, true)?,
                linear_2: Linear::new(gpu, &tx.pp("linear_2"), dim, dim, true)?,
            },
            image_embedder: cfg
                .image_dim
                .map(|d| WanImageEmbedding::new(gpu, &w.pp("image_embedder"), cfg, d))
                .transpose()?,
            freq_dim: cfg.freq_dim,
        })
    }

    /// `timesteps` (integer or fractional): B of them, one per item, or
    /// B · `per_item` (Wan 2.2 TI2V's `expand_timesteps`: one per token);
    /// `text` [B, L, text_dim]. With one per token, `temb` is [B, S, dim]
    /// and `timestep_proj` [B, S, 6, dim], as diffusers unflattens them.
    pub fn forward(
        &self,
        gpu: &Gpu,
        timesteps: &[f32],
        per_item: usize,
        text: &Tensor,
    ) -> Result<WanConditions> {
        // Tokens share a handful of values (0 on the conditioning frame,
        // t elsewhere): each distinct one is embedded once and its rows
        // gathered per token, the same arithmetic per row as diffusers'
        // embedding of every token.
        let mut distinct: Vec<f32> = Vec::new();
        let mut ids: Vec<u32> = Vec::with_capacity(timesteps.len());
        for &t in timesteps {
            let at = match distinct.iter().position(|d| d.to_bits() == t.to_bits()) {
                Some(i) => i,
                None => {
                    distinct.push(t);
                    distinct.len() - 1
                }
            };
            ids.push(at as u32);
        }
        // Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0): [cos, sin].
        let sinusoid = ops::embedding::timestep_embedding(
            gpu,
            &distinct,
            &TimestepEmbedding::new(self.freq_dim, true, 0.0),
            text.dtype(),
        )?;
        let te = &self.time_embedder;
        let temb = te.linear_2.forward(
            gpu,
            &te.linear_1.forward_act(gpu, &sinusoid, Activation::Silu)?,
        )?;
        let dim = temb.shape()[1];
        let timestep_proj = self.time_proj.forward(gpu, &ops::silu(gpu, &temb)?)?;
        let per_token = |t: Tensor| -> Result<Tensor> {
            match distinct.len() == timesteps.len() {
                true => Ok(t),
                false => ops::embedding::embedding(gpu, &t, &ids),
            }
        };
        let items = timesteps.len() / per_item.max(1);
        let (temb, timestep_proj) = match per_item {
            1 => (
                per_token(temb)?,
                per_token(timestep_proj)?.reshape(&[items, 6, dim])?,
            ),
            s => (
                per_token(temb)?.reshape(&[items, s, dim])?,
                per_token(timestep_proj)?.reshape(&[items, s, 6, dim])?,
            ),
        };
        let tx = &self.text_embedder;
        let context = tx.linear_2.forward(
            gpu,
            &tx.linear_1.forward_act(gpu, text, Activation::GeluTanh)?,
        )?;
        Ok(WanConditions {
            temb,
            timestep_proj,
            context,
        })
    }
}

/// `WanTransformer3DModel` (text-to-video, and Wan 2.1 image-to-video
/// with its image embedder and image cross-attention).
pub struct WanTransformer3DModel {
    pub config: WanTransformerConfig,
    /// The Conv3d with kernel = stride = patch_size, as the Linear it equals
    /// on patchified tokens: weight [dim, C·pt·ph·pw] (the Conv3d's
    /// [dim, C, pt, ph, pw] flattened), bias [dim].
    pub patch_embedding: Linear,
    pub condition_embedder: WanTimeTextEmbedding,
    /// Resident blocks, or empty when streamed (see [`BlockResidency`]).
    pub blocks: Vec<WanTransformerBlock>,
    pub proj_out: Linear,
    /// Rows of the output `scale_shift_table` [1, 2, dim]: shift, scale,
    /// each [1, 1, dim].
    shift_table: Tensor,
    scale_table: Tensor,
    weights: Weights,
    residency: BlockResidency,
}

impl WanTransformer3DModel {
    /// Loads from weights rooted at the checkpoint's top level (diffusers
    /// keys). Refuses image-to-video checkpoints by their keys too, in case
    /// a config was edited.
    ///
    /// An image-to-video checkpoint under a text-to-video config (no
    /// `image_dim`) is refused: its image branch would be left out silently.
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        config: WanTransformerConfig,
        residency: BlockResidency,
    ) -> Result<Self> {
        // A stand-in set (benchmarks, plans) holds every key: no checkpoint to check.
        let image_keys = w.contains("condition_embedder.image_embedder.norm1.weight")
            || w.contains("blocks.0.attn2.add_k_proj.weight");
        if image_keys && config.image_dim.is_none() && !w.set().is_synthetic() {
            return Err(LoadError::Config {
                path: w
                    .set()
                    .path_of("condition_embedder.image_embedder.norm1.weight"),
                message: "this checkpoint has an image embedder (image-to-video) but its config \
                          sets no image_dim / added_kv_proj_dim: use the checkpoint's own \
                          transformer config"
                    .into(),
            }
            .into());
        }
        let dim = config.inner_dim();
        let [pt, ph, pw] = config.patch_size;
        let patch = config.in_channels * pt * ph * pw;
        let pe = w.pp("patch_embedding");
        let patch_embedding = Linear {
            weight: pe
                .tensor(gpu, "weight", &[dim, config.in_channels, pt, ph, pw])?
                .reshape(&[dim, patch])?,
            bias: Some(pe.tensor(gpu, "bias", &[dim])?),
        };
        let blocks = match residency {
            BlockResidency::Resident => (0..config.num_layers)
                .map(|i| WanTransformerBlock::new(gpu, &w.pp("blocks").pp(i), &config))
                .collect::<Result<Vec<_>>>()?,
            BlockResidency::Streamed => {
                check_shapes(&w.pp("blocks"), &block_shapes(&config))?;
                Vec::new()
            }
        };
        let table = w.tensor(gpu, "scale_shift_table", &[1, 2, dim])?;
        Ok(WanTransformer3DModel {
            patch_embedding,
            condition_embedder: WanTimeTextEmbedding::new(
                gpu,
                &w.pp("condition_embedder"),
                &config,
            )?,
            blocks,
            proj_out: Linear::new(
                gpu,
                &w.pp("proj_out"),
                dim,
                config.out_channels() * pt * ph * pw,
                true,
            )?,
            shift_table: ops::layout::narrow(gpu, &table, 1, 0, 1)?.into_constant(),
            scale_table: ops::layout::narrow(gpu, &table, 1, 1, 1)?.into_constant(),
            config,
            weights: w.clone(),
            residency,
        })
    }

    /// Loads `dir` (a `transformer/` folder: `config.json` and safetensors
    /// weights, sharded or not) in the GPU's precision.
    pub fn from_dir(gpu: &Gpu, dir: &Path, residency: BlockResidency) -> Result<Self> {
        let config = WanTransformerConfig::load(&dir.join("config.json"))?;
        let set = std::sync::Arc::new(WeightSet::open_dir(dir)?);
        Self::new(gpu, &Weights::new(set, gpu.precision()), config, residency)
    }

    /// Fails unless `w` holds every weight a model of `config` loads (the
    /// image embedder's aside), with its shape, reading no data: an expert
    /// loaded mid-generation (Wan 2.2 A14B) is checked before any GPU work.
    pub fn check_weights(w: &Weights, config: &WanTransformerConfig) -> Result<()> {
        let (dim, [pt, ph, pw]) = (config.inner_dim(), config.patch_size);
        let out = config.out_channels() * pt * ph * pw;
        let linear = |name: &str, o: usize, i: usize| {
            [
                (format!("{name}.weight"), vec![o, i]),
                (format!("{name}.bias"), vec![o]),
            ]
        };
        let mut expected = vec![
            (
                "patch_embedding.weight".to_string(),
                vec![dim, config.in_channels, pt, ph, pw],
            ),
            ("patch_embedding.bias".to_string(), vec![dim]),
            ("scale_shift_table".to_string(), vec![1, 2, dim]),
        ];
        for (name, o, i) in [
            ("proj_out", out, dim),
            (
                "condition_embedder.time_embedder.linear_1",
                dim,
                config.freq_dim,
            ),
            ("condition_embedder.time_embedder.linear_2", dim, dim),
            ("condition_embedder.time_proj", 6 * dim, dim),
            (
                "condition_embedder.text_embedder.linear_1",
                dim,
                config.text_dim,
            ),
            ("condition_embedder.text_embedder.linear_2", dim, dim),
        ] {
            expected.extend(linear(name, o, i));
        }
        check_shapes(w, &expected)?;
        check_shapes(&w.pp("blocks"), &block_shapes(config))
    }

    pub fn residency(&self) -> BlockResidency {
        self.residency
    }

    /// The noise (flow) prediction [B, Cout, F, H, W] for `hidden_states`
    /// [B, C, F, H, W], one timestep per batch item (integer or fractional,
    /// as the scheduler gives them) or one per token, B · S of them in
    /// token order (f, h, w) (Wan 2.2 TI2V's `expand_timesteps`), and
    /// `encoder_hidden_states` [B, L,
    /// text_dim]. F, H, W must be multiples of the patch size (the pipeline
    /// makes them so; diffusers would silently drop the remainder).
    ///
    /// `encoder_hidden_states_image` (image-to-video models only, which
    /// require it): the image encoder's tokens [B, T, image_dim], or for
    /// first-last frame [2B, T, image_dim] (each item's first image, then
    /// its last).
    pub fn forward(
        &self,
        gpu: &Gpu,
        hidden_states: &Tensor,
        timesteps: &[f32],
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_observed(
            gpu,
            hidden_states,
            timesteps,
            encoder_hidden_states,
            encoder_hidden_states_image,
            &mut |_, _| Ok(()),
        )
    }

    /// [`Self::forward`], showing `observe` the intermediate states that
    /// reference cases name in their debug outputs, to locate where an error
    /// starts: `patch_embedding` [B, S, dim] (tokens, frame-major),
    /// `temb` [B, dim], `timestep_proj` [B, 6, dim], `text_embedding`
    /// [B, L, dim], `image_embedding` [B, T, dim] (image-to-video),
    /// `block_{i}` [B, S, dim], `proj_out` [B, S, pt·ph·pw·Cout].
    pub fn forward_observed(
        &self,
        gpu: &Gpu,
        hidden_states: &Tensor,
        timesteps: &[f32],
        encoder_hidden_states: &Tensor,
        encoder_hidden_states_image: Option<&Tensor>,
        observe: &mut dyn FnMut(&str, &Tensor) -> Result<()>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let op = "wan_transformer";
        let [pt, ph, pw] = cfg.patch_size;
        let shape = hidden_states.shape();
        let ok = shape.len() == 5
            && shape[1] == cfg.in_channels
            && shape[2].is_multiple_of(pt)
            && shape[3].is_multiple_of(ph)
            && shape[4].is_multiple_of(pw)
            && shape[2..].iter().all(|&s| s > 0);
        if !ok {
            return Err(EngineError::Shape {
                op,
                expected: format!(
                    "hidden_states [B, {}, F, H, W] with F, H, W positive multiples of {:?}",
                    cfg.in_channels, cfg.patch_size
                ),
                found: fmt_shape(shape),
            });
        }
        let (b, c) = (shape[0], shape[1]);
        let grid = [shape[2] / pt, shape[3] / ph, shape[4] / pw];
        if let Some(&g) = grid.iter().find(|&&g| g > cfg.rope_max_seq_len) {
            return Err(EngineError::Argument {
                op,
                message: format!(
                    "a latent grid of {grid:?} patches has {g} positions on one axis, past the \
                     rotary table's rope_max_seq_len {}",
                    cfg.rope_max_seq_len
                ),
            });
        }
        let text = encoder_hidden_states.shape();
        let tokens: usize = grid.iter().product();
        let per_item = match timesteps.len() {
            n if n == b => 1,
            n if n == b * tokens => tokens,
            _ => 0,
        };
        if per_item == 0 || text.len() != 3 || text[0] != b || text[2] != cfg.text_dim {
            return Err(EngineError::Shape {
                op,
                expected: format!(
                    "{b} timesteps (or {b} · {tokens}, one per token) and encoder_hidden_states \
                     [{b}, L, {}]",
                    cfg.text_dim
                ),
                found: format!(
                    "{} timesteps, encoder_hidden_states {}",
                    timesteps.len(),
                    fmt_shape(text)
                ),
            });
        }
        let dim = cfg.inner_dim();
        let image_tokens = match (cfg.image_dim, encoder_hidden_states_image) {
            (None, None) => None,
            (Some(image_dim), Some(image)) => {
                let s = image.shape();
                let items = if cfg.pos_embed_seq_len.is_some() {
                    2 * b
                } else {
                    b
                };
                if s.len() != 3 || s[0] != items || s[2] != image_dim || s[1] == 0 {
                    return Err(EngineError::Shape {
                        op,
                        expected: format!(
                            "encoder_hidden_states_image [{items}, T, {image_dim}]{}",
                            if items == 2 * b {
                                " (first-last frame: each item's first and last image)"
                            } else {
                                ""
                            }
                        ),
                        found: fmt_shape(s),
                    });
                }
                Some(image)
            }
            (Some(_), None) => {
                return Err(EngineError::Argument {
                    op,
                    message: "this image-to-video transformer needs encoder_hidden_states_image \
                              (the image encoder's tokens)"
                        .into(),
                })
            }
            (None, Some(_)) => {
                return Err(EngineError::Argument {
                    op,
                    message: "encoder_hidden_states_image given to a text-to-video transformer \
                              (its config has no image_dim)"
                        .into(),
                })
            }
        };

        // Patchify: [B, C, F', pt, H', ph, W', pw] → [B, F'H'W', C·pt·ph·pw],
        // the Conv3d's receptive fields in its weight's (c, kt, kh, kw) order.
        let patches = ops::layout::permute(
            gpu,
            &hidden_states.reshape(&[b, c, grid[0], pt, grid[1], ph, grid[2], pw])?,
            &[0, 2, 4, 6, 1, 3, 5, 7],
        )?
        .reshape(&[b, tokens, c * pt * ph * pw])?;
        let mut x = self.patch_embedding.forward(gpu, &patches)?;
        observe("patch_embedding", &x)?;

        // Per-token timesteps that are constant over each latent frame (what
        // the pipelines give: 0 on the conditioning frame, t elsewhere) are
        // embedded once per frame, and the blocks' modulation broadcasts over
        // the frame's tokens: the same values as diffusers' per-token
        // [B, S, 6, dim], without its size (2 GB at 1280x704x121 in f32).
        let per_frame = tokens / grid[0];
        let by_frame = per_item > 1
            && timesteps
                .chunks(per_frame)
                .all(|run| run.iter().all(|t| t.to_bits() == run[0].to_bits()));
        let (groups, grouped): (usize, Vec<f32>) = match by_frame {
            true => (
                grid[0],
                timesteps.iter().step_by(per_frame).copied().collect(),
            ),
            false => (per_item, timesteps.to_vec()),
        };
        let cond = self
            .condition_embedder
            .forward(gpu, &grouped, groups, encoder_hidden_states)?;
        observe("temb", &cond.temb)?;
        observe("timestep_proj", &cond.timestep_proj)?;
        observe("text_embedding", &cond.context)?;
        let image = match (image_tokens, &self.condition_embedder.image_embedder) {
            (Some(tokens), Some(embedder)) => {
                let e = embedder.forward(gpu, tokens)?;
                observe("image_embedding", &e)?;
                Some(e)
            }
            _ => None,
        };
        let rope = self.rope(gpu, grid)?;
        let blocks = self.weights.pp("blocks");
        for i in 0..cfg.num_layers {
            x = match self.blocks.get(i) {
                Some(block) => block.forward(
                    gpu,
                    &x,
                    &cond.context,
                    image.as_ref(),
                    &cond.timestep_proj,
                    &rope,
                )?,
                None => WanTransformerBlock::new(gpu, &blocks.pp(i), cfg)?.forward(
                    gpu,
                    &x,
                    &cond.context,
                    image.as_ref(),
                    &cond.timestep_proj,
                    &rope,
                )?,
            };
            observe(&format!("block_{i}"), &x)?;
        }

        // Output norm modulated by temb and the model's own table, then the head.
        let temb = cond.temb.reshape(&[b, groups, 1, dim])?;
        let shift = ops::add(gpu, &temb, &self.shift_table)?;
        let scale = ops::add(gpu, &temb, &self.scale_table)?;
        let h = ops::norm::layer_norm(gpu, &x, None, None, cfg.eps)?;
        let h = ops::elementwise::modulate(
            gpu,
            &h.reshape(&[b, groups, tokens / groups, dim])?,
            &scale,
            &shift,
        )?
        .reshape(&[b, tokens, dim])?;
        let out = self.proj_out.forward(gpu, &h)?;
        observe("proj_out", &out)?;

        // Unpatchify: [B, F', H', W', pt, ph, pw, Cout] → [B, Cout, F, H, W].
        let cout = cfg.out_channels();
        ops::layout::permute(
            gpu,
            &out.reshape(&[b, grid[0], grid[1], grid[2], pt, ph, pw, cout])?,
            &[0, 7, 1, 4, 2, 5, 3, 6],
        )?
        .reshape(&[b, cout, shape[2], shape[3], shape[4]])
    }

    /// The rotary tables for a grid of patches, uploaded in f32.
    fn rope(&self, gpu: &Gpu, grid: [usize; 3]) -> Result<Rope> {
        let (cos, sin) = rope_tables(self.config.rope_split(), grid, ROPE_THETA);
        let shape = [grid.iter().product(), self.config.attention_head_dim / 2];
        Ok(Rope {
            cos: Tensor::from_f32(gpu, &cos, &shape, DType::F32)?,
            sin: Tensor::from_f32(gpu, &sin, &shape, DType::F32)?,
        })
    }
}

/// `WanRotaryPosEmbed`'s θ (diffusers' default, which Wan uses).
pub const ROPE_THETA: f64 = 10000.0;

/// Every key a block loads under `blocks.`, with its shape (checked without
/// reading data when blocks are streamed).
fn block_shapes(cfg: &WanTransformerConfig) -> Vec<(String, Vec<usize>)> {
    let (dim, ff) = (cfg.inner_dim(), cfg.ffn_dim);
    let mut out = Vec::new();
    for i in 0..cfg.num_layers {
        let mut add = |name: &str, shape: Vec<usize>| out.push((format!("{i}.{name}"), shape));
        for attn in ["attn1", "attn2"] {
            for proj in ["to_q", "to_k", "to_v", "to_out.0"] {
                add(&format!("{attn}.{proj}.weight"), vec![dim, dim]);
                add(&format!("{attn}.{proj}.bias"), vec![dim]);
            }
            add(&format!("{attn}.norm_q.weight"), vec![dim]);
            add(&format!("{attn}.norm_k.weight"), vec![dim]);
        }
        if let Some(kv) = cfg.added_kv_proj_dim {
            for proj in ["add_k_proj", "add_v_proj"] {
                add(&format!("attn2.{proj}.weight"), vec![dim, kv]);
                add(&format!("attn2.{proj}.bias"), vec![dim]);
            }
            add("attn2.norm_added_k.weight", vec![dim]);
        }
        if cfg.cross_attn_norm {
            add("norm2.weight", vec![dim]);
            add("norm2.bias", vec![dim]);
        }
        add("ffn.net.0.proj.weight", vec![ff, dim]);
        add("ffn.net.0.proj.bias", vec![ff]);
        add("ffn.net.2.weight", vec![dim, ff]);
        add("ffn.net.2.bias", vec![dim]);
        add("scale_shift_table", vec![1, 6, dim]);
    }
    out
}
