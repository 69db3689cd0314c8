//! diffusers' transformer pieces: `Attention` (to_q/k/v, to_out.0),
//! `FeedForward` (GEGLU), `BasicTransformerBlock`, `Transformer2DModel` (the
//! UNet's spatial transformer) and `AnimateDiffTransformer3D` (the motion
//! module, attention over frames).

use super::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::error::{EngineError, Result};
use crate::gpu::Gpu;
use crate::ops::{self, attention::AttentionOptions, layout};
use crate::tensor::Tensor;
use crate::weights::Weights;

/// `Attention(query_dim, heads, dim_head, cross_attention_dim, bias)`.
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
}

impl Attention {
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::new(gpu, &w.pp("to_q"), query_dim, inner, bias)?,
            to_k: Linear::new(gpu, &w.pp("to_k"), context_dim, inner, bias)?,
            to_v: Linear::new(gpu, &w.pp("to_v"), context_dim, inner, bias)?,
            to_out: Linear::new(gpu, &w.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
        })
    }

    /// x [N, L, query_dim]; `context` [N, Lk, context_dim] or self-attention.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let o = self.attend(gpu, x, context)?;
        self.to_out.forward(gpu, &o)
    }

    /// `forward(x, context) + residual`, the residual added in to_out's epilogue.
    pub fn forward_residual(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: &Tensor,
    ) -> Result<Tensor> {
        let o = self.attend(gpu, x, context)?;
        self.to_out.forward_residual(gpu, &o, residual, 1.0)
    }

    /// The heads' outputs, before to_out.
    fn attend(&self, gpu: &Gpu, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        // Each input is packed once for the layers that read it (CPU adapter).
        fn layer(l: &Linear) -> (&Tensor, Option<&Tensor>) {
            (&l.weight, l.bias.as_ref())
        }
        let (q, k, v) = match context {
            None => {
                let layers = [layer(&self.to_q), layer(&self.to_k), layer(&self.to_v)];
                let mut qkv = ops::matmul::linear_each(gpu, x, &layers)?.into_iter();
                let mut next = || qkv.next().expect("one output per layer");
                (next(), next(), next())
            }
            Some(ctx) => {
                let q = self.to_q.forward(gpu, x)?;
                let layers = [layer(&self.to_k), layer(&self.to_v)];
                let mut kv = ops::matmul::linear_each(gpu, ctx, &layers)?.into_iter();
                let mut next = || kv.next().expect("one output per layer");
                (q, next(), next())
            }
        };
        ops::attention::attention(gpu, &q, &k, &v, self.heads, &AttentionOptions::default())
    }
}

/// `FeedForward(dim, activation_fn="geglu")`: net.0.proj to 2·inner, GEGLU, net.2 back.
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
}

impl FeedForward {
    pub fn new(gpu: &Gpu, w: &Weights, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(FeedForward {
            proj_in: Linear::new(gpu, &w.pp("net").pp(0).pp("proj"), dim, 2 * inner, true)?,
            proj_out: Linear::new(gpu, &w.pp("net").pp(2), inner, dim, true)?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward_geglu(gpu, x)?;
        self.proj_out.forward(gpu, &h)
    }

    /// `forward(x) + residual`, the residual added in net.2's epilogue.
    pub fn forward_residual(&self, gpu: &Gpu, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = self.proj_in.forward_geglu(gpu, x)?;
        self.proj_out.forward_residual(gpu, &h, residual, 1.0)
    }
}

/// `BasicTransformerBlock` (layer_norm type): self-attention, a second
/// attention (cross-attention, or self-attention in motion modules), GEGLU
/// feed-forward; each pre-LayerNorm with a residual. Motion modules add a
/// sinusoidal position table after norm1 and norm2.
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
    /// `pos_embed.pe` as [max_seq_length, dim].
    pub pos_embed: Option<Tensor>,
    /// attn2 attends to the block's own input (motion modules).
    pub double_self_attention: bool,
}

/// How a transformer block is built.
pub struct BlockConfig {
    pub dim: usize,
    pub heads: usize,
    /// `None`: the second attention is self-attention.
    pub cross_attention_dim: Option<usize>,
    pub attention_bias: bool,
    /// Frames the position table covers (motion modules only).
    pub positional_embeddings: Option<usize>,
}

impl BasicTransformerBlock {
    pub fn new(gpu: &Gpu, w: &Weights, c: &BlockConfig) -> Result<Self> {
        let head_dim = c.dim / c.heads;
        let context = c.cross_attention_dim.unwrap_or(c.dim);
        let pos_embed = match c.positional_embeddings {
            Some(max_len) => Some(sinusoidal_table(gpu, &w.pp("pos_embed"), max_len, c.dim)?),
            None => None,
        };
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::new(gpu, &w.pp("norm1"), c.dim, 1e-5)?,
            attn1: Attention::new(
                gpu,
                &w.pp("attn1"),
                c.dim,
                c.dim,
                c.heads,
                head_dim,
                c.attention_bias,
            )?,
            norm2: LayerNorm::new(gpu, &w.pp("norm2"), c.dim, 1e-5)?,
            attn2: Attention::new(
                gpu,
                &w.pp("attn2"),
                c.dim,
                context,
                c.heads,
                head_dim,
                c.attention_bias,
            )?,
            norm3: LayerNorm::new(gpu, &w.pp("norm3"), c.dim, 1e-5)?,
            ff: FeedForward::new(gpu, &w.pp("ff"), c.dim)?,
            pos_embed,
            double_self_attention: c.cross_attention_dim.is_none(),
        })
    }

    fn with_positions(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        match &self.pos_embed {
            Some(pe) => {
                let len = x.shape()[1];
                ops::add(gpu, x, &layout::narrow(gpu, pe, 0, 0, len)?)
            }
            None => Ok(x.clone()),
        }
    }

    /// x [N, L, dim]; `context` [N, Lk, cross_dim] for cross-attention blocks.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let h = self.with_positions(gpu, &self.norm1.forward(gpu, x)?)?;
        let x = self.attn1.forward_residual(gpu, &h, None, x)?;
        let h = self.with_positions(gpu, &self.norm2.forward(gpu, &x)?)?;
        let ctx = if self.double_self_attention {
            None
        } else {
            context
        };
        let x = self.attn2.forward_residual(gpu, &h, ctx, &x)?;
        let h = self.norm3.forward(gpu, &x)?;
        self.ff.forward_residual(gpu, &h, &x)
    }
}

impl BasicTransformerBlock {
    /// FreeNoise (diffusers `FreeNoiseTransformerBlock`, pyramid weights):
    /// both attentions run on windows of `length` frames every `stride`
    /// frames of x [N, F, dim], each window's result weighted per frame and
    /// blended; the feed-forward runs on the blend. When the windows do not
    /// end at the last frame, one more window ends there and only its frames
    /// past the previous windows count — and, as diffusers does, each of
    /// those adds one and the same weight (the window's weight at that
    /// offset) to the normaliser.
    pub fn forward_windows(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        length: usize,
        stride: usize,
    ) -> Result<Tensor> {
        let (n, f, c) = (x.shape()[0], x.shape()[1], x.shape()[2]);
        if length == 0 || stride == 0 || f < length {
            return Err(EngineError::Argument {
                op: "context windows",
                message: format!("{f} frames with windows of {length} every {stride}"),
            });
        }
        let mut windows: Vec<(usize, usize)> = (0..=f - length)
            .step_by(stride)
            .map(|i| (i, (i + length).min(f)))
            .collect();
        let complete = windows.last().map(|w| w.1) == Some(f);
        let tail = if complete {
            0
        } else {
            let covered = windows.last().map(|w| w.1).unwrap_or(0);
            windows.push((f - length, f));
            f - covered
        };
        let weights = pyramid_weights(length);
        let mut acc: Option<Tensor> = None;
        let mut norm = vec![0f32; f];
        let dtype = x.dtype();
        for (i, &(start, end)) in windows.iter().enumerate() {
            let chunk = layout::narrow(gpu, x, 1, start, end - start)?;
            let h = self.with_positions(gpu, &self.norm1.forward(gpu, &chunk)?)?;
            let chunk = self.attn1.forward_residual(gpu, &h, None, &chunk)?;
            let h = self.with_positions(gpu, &self.norm2.forward(gpu, &chunk)?)?;
            let chunk = self.attn2.forward_residual(gpu, &h, None, &chunk)?;
            let last_partial = i + 1 == windows.len() && !complete;
            let (keep_from, place_at) = if last_partial {
                (length - tail, f - tail)
            } else {
                (0, start)
            };
            let kept = end - start - keep_from;
            let w: Vec<f32> = weights[keep_from..keep_from + kept].to_vec();
            for (j, wj) in w.iter().enumerate() {
                norm[place_at + j] += if last_partial {
                    weights[length - tail]
                } else {
                    *wj
                };
            }
            let part = layout::narrow(gpu, &chunk, 1, keep_from, kept)?;
            let wt = Tensor::from_f32(gpu, &w, &[1, kept, 1], dtype)?;
            let part = ops::mul(gpu, &part, &wt)?;
            let mut pieces = Vec::new();
            let before = (place_at > 0)
                .then(|| Tensor::zeros(gpu, &[n, place_at, c], dtype))
                .transpose()?;
            let after_len = f - place_at - kept;
            let after = (after_len > 0)
                .then(|| Tensor::zeros(gpu, &[n, after_len, c], dtype))
                .transpose()?;
            if let Some(b) = &before {
                pieces.push(b);
            }
            pieces.push(&part);
            if let Some(a) = &after {
                pieces.push(a);
            }
            let placed = layout::concat(gpu, &pieces, 1)?;
            acc = Some(match acc {
                None => placed,
                Some(a) => ops::add(gpu, &a, &placed)?,
            });
        }
        let acc = acc.ok_or_else(|| EngineError::Argument {
            op: "context windows",
            message: "no window".into(),
        })?;
        let inv: Vec<f32> = norm
            .iter()
            .map(|&v| if v > 0.0 { 1.0 / v } else { 1.0 })
            .collect();
        let x = ops::mul(gpu, &acc, &Tensor::from_f32(gpu, &inv, &[1, f, 1], dtype)?)?;
        let h = self.norm3.forward(gpu, &x)?;
        self.ff.forward_residual(gpu, &h, &x)
    }
}

/// diffusers' "pyramid" frame weights: 1, 2, .., mid, .., 2, 1.
fn pyramid_weights(n: usize) -> Vec<f32> {
    let mid = n.div_ceil(2);
    (0..n)
        .map(|i| (i.min(n - 1 - i) + 1).min(mid) as f32)
        .collect()
}

/// diffusers `SinusoidalPositionalEmbedding`: its `pe` buffer
/// [1, max_len, dim] is part of the state dict diffusers saves (and of the
/// original motion modules, as `pos_encoder.pe`), so it is read like any
/// weight: a file without it is refused rather than given a computed table.
fn sinusoidal_table(gpu: &Gpu, w: &Weights, max_len: usize, dim: usize) -> Result<Tensor> {
    let values = w.set().read_f32(&w.key("pe"), &[1, max_len, dim])?;
    Tensor::from_f32(gpu, &values, &[max_len, dim], w.dtype())
}

/// `Transformer2DModel` on continuous input: GroupNorm, proj_in (1x1 conv or
/// linear), transformer blocks over H·W tokens, proj_out, plus the input.
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

/// `use_linear_projection`: a Linear after flattening, or a 1x1 conv before.
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Transformer2DModel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        channels: usize,
        heads: usize,
        layers: usize,
        cross_attention_dim: usize,
        groups: usize,
        linear_projection: bool,
    ) -> Result<Self> {
        let proj = |name: &str, cin, cout| -> Result<Projection> {
            Ok(if linear_projection {
                Projection::Linear(Linear::new(gpu, &w.pp(name), cin, cout, true)?)
            } else {
                Projection::Conv(Conv2d::new(gpu, &w.pp(name), cin, cout, 1, 1, 0)?)
            })
        };
        let cfg = BlockConfig {
            dim: channels,
            heads,
            cross_attention_dim: Some(cross_attention_dim),
            attention_bias: false,
            positional_embeddings: None,
        };
        Ok(Transformer2DModel {
            norm: GroupNorm::new(gpu, &w.pp("norm"), groups, channels, 1e-6)?,
            proj_in: proj("proj_in", channels, channels)?,
            transformer_blocks: (0..layers)
                .map(|i| BasicTransformerBlock::new(gpu, &w.pp("transformer_blocks").pp(i), &cfg))
                .collect::<Result<Vec<_>>>()?,
            proj_out: proj("proj_out", channels, channels)?,
        })
    }

    /// x [N, C, H, W]; context [N, L, cross_dim].
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let normed = self.norm.forward(gpu, x, false)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            layout::permute(gpu, &t.reshape(&[n, c, h * w])?, &[0, 2, 1])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(gpu, &normed)?)?,
            Projection::Linear(lin) => lin.forward(gpu, &to_tokens(&normed)?)?,
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(gpu, &tokens, Some(context))?;
        }
        let to_image = |t: &Tensor| -> Result<Tensor> {
            layout::permute(gpu, t, &[0, 2, 1])?.reshape(&[n, c, h, w])
        };
        // The residual is fused where proj_out's output is laid out as x (a
        // 1x1 conv); a linear proj_out writes tokens, which are permuted first.
        match &self.proj_out {
            Projection::Conv(conv) => conv.forward_residual(gpu, &to_image(&tokens)?, x, 1.0),
            Projection::Linear(lin) => ops::add(gpu, &to_image(&lin.forward(gpu, &tokens)?)?, x),
        }
    }
}

/// `AnimateDiffTransformer3D`: the motion module. GroupNorm with statistics
/// over all frames of a group, tokens (B·H·W, F, C), proj_in, transformer
/// blocks with two self-attentions over frames, proj_out, plus the input.
pub struct MotionModule {
    pub norm: GroupNorm,
    pub proj_in: Linear,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Linear,
}

/// One call's settings of the motion modules, passed down with every
/// forward so that a loaded model holds none of a previous generation's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MotionOptions {
    /// Multiplies every motion module's residual (1.0 = as trained); the
    /// motion control keeps it near 1.
    pub residual_scale: f32,
    /// FreeNoise context windows (length, stride) for clips longer than
    /// one window; `None` attends over all frames at once.
    pub context_windows: Option<(usize, usize)>,
}

impl Default for MotionOptions {
    /// The modules as trained: full residual, all frames at once.
    fn default() -> Self {
        MotionOptions {
            residual_scale: 1.0,
            context_windows: None,
        }
    }
}

impl MotionModule {
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        channels: usize,
        heads: usize,
        layers: usize,
        groups: usize,
        max_frames: usize,
    ) -> Result<Self> {
        let cfg = BlockConfig {
            dim: channels,
            heads,
            cross_attention_dim: None,
            attention_bias: false,
            positional_embeddings: Some(max_frames),
        };
        Ok(MotionModule {
            norm: GroupNorm::new(gpu, &w.pp("norm"), groups, channels, 1e-6)?,
            proj_in: Linear::new(gpu, &w.pp("proj_in"), channels, channels, true)?,
            transformer_blocks: (0..layers)
                .map(|i| BasicTransformerBlock::new(gpu, &w.pp("transformer_blocks").pp(i), &cfg))
                .collect::<Result<Vec<_>>>()?,
            proj_out: Linear::new(gpu, &w.pp("proj_out"), channels, channels, true)?,
        })
    }

    /// x [B·F, C, H, W] with row = b·F + f.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        frames: usize,
        options: &MotionOptions,
    ) -> Result<Tensor> {
        let (bf, _, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let normed = ops::norm::group_norm_frames(
            gpu,
            x,
            frames,
            self.norm.groups,
            Some(&self.norm.weight),
            Some(&self.norm.bias),
            self.norm.eps,
            false,
        )?;
        let mut tokens = self
            .proj_in
            .forward(gpu, &layout::frames_to_tokens(gpu, &normed, frames)?)?;
        for block in &self.transformer_blocks {
            tokens = match options.context_windows {
                Some((length, stride)) if frames > length => {
                    block.forward_windows(gpu, &tokens, length, stride)?
                }
                _ => block.forward(gpu, &tokens, None)?,
            };
        }
        // residual_scale is applied in proj_out's epilogue; the residual x is
        // laid out as frames, proj_out's output as tokens, so the add
        // follows the permute.
        let scaled = self
            .proj_out
            .forward_scaled(gpu, &tokens, options.residual_scale)?;
        let out = layout::tokens_to_frames(gpu, &scaled, bf / frames, h, w)?;
        ops::add(gpu, &out, x)
    }
}
