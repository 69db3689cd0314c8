//! diffusers `AutoencoderKL` (the SD VAE): encoder to a diagonal Gaussian
//! posterior, decoder from latents to images; structure from `vae/config.json`.
//! Frames are independent images: a video is decoded as a batch of frames.

use std::path::Path;

use serde::Deserialize;

use super::nn::{Conv2d, GroupNorm, Linear};
use super::resnet::{ResnetBlock2D, ResnetConfig};
use crate::error::{EngineError, LoadError, Result};
use crate::gpu::Gpu;
use crate::ops::{self, attention::AttentionOptions, layout};
use crate::tensor::{fmt_shape, Tensor};
use crate::weights::{config::read_config, Weights};

fn one() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn sd_scaling() -> f32 {
    0.18215
}
fn silu_name() -> String {
    "silu".into()
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn one_down_block() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn one_up_block() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn sixty_four() -> Vec<usize> {
    vec![64]
}

/// `vae/config.json`, each key absent taking `AutoencoderKL.__init__`'s
/// default. `shift_factor`, `latents_mean` and `latents_std` are not read:
/// diffusers' AnimateDiff pipeline decodes with `latents / scaling_factor`
/// only.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default = "one_down_block")]
    pub down_block_types: Vec<String>,
    #[serde(default = "one_up_block")]
    pub up_block_types: Vec<String>,
    #[serde(default = "sixty_four")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "one")]
    pub layers_per_block: usize,
    #[serde(default = "silu_name")]
    pub act_fn: String,
    #[serde(default = "four")]
    pub latent_channels: usize,
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f32,
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::check(path, read_config(path)?)
    }

    /// A config already parsed as JSON (`path` names it in errors).
    pub fn from_value(path: &Path, value: serde_json::Value) -> Result<Self, LoadError> {
        let cfg = crate::weights::config::config_from_value(path, value)?;
        Self::check(path, cfg)
    }

    fn check(path: &Path, cfg: VaeConfig) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        if cfg.block_out_channels.is_empty() {
            return Err(bad("block_out_channels is empty".into()));
        }
        if cfg.down_block_types.len() != cfg.block_out_channels.len()
            || cfg.up_block_types.len() != cfg.block_out_channels.len()
        {
            return Err(bad(format!(
                "{} down and {} up block types for {} block_out_channels",
                cfg.down_block_types.len(),
                cfg.up_block_types.len(),
                cfg.block_out_channels.len()
            )));
        }
        for t in cfg.down_block_types.iter().chain(&cfg.up_block_types) {
            if t != "DownEncoderBlock2D" && t != "UpDecoderBlock2D" {
                return Err(bad(format!(
                    "block type `{t}` is not supported (DownEncoderBlock2D, UpDecoderBlock2D)"
                )));
            }
        }
        if cfg.act_fn != "silu" {
            return Err(bad(format!(
                "act_fn `{}` is not supported (silu)",
                cfg.act_fn
            )));
        }
        if let Some(c) = cfg
            .block_out_channels
            .iter()
            .find(|&&c| c % cfg.norm_num_groups != 0)
        {
            return Err(bad(format!(
                "block_out_channels {c} is not a multiple of norm_num_groups {}",
                cfg.norm_num_groups
            )));
        }
        Ok(cfg)
    }

    /// 2^(levels − 1): image pixels per latent pixel.
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The VAE's single-head self-attention over pixels (diffusers `Attention`
/// built from the old `AttentionBlock`): group_norm, to_q/k/v, to_out.0, plus
/// the input.
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl VaeAttention {
    fn new(gpu: &Gpu, w: &Weights, c: usize, groups: usize) -> Result<Self> {
        Ok(VaeAttention {
            group_norm: GroupNorm::new(gpu, &w.pp("group_norm"), groups, c, 1e-6)?,
            to_q: Linear::new(gpu, &w.pp("to_q"), c, c, true)?,
            to_k: Linear::new(gpu, &w.pp("to_k"), c, c, true)?,
            to_v: Linear::new(gpu, &w.pp("to_v"), c, c, true)?,
            to_out: Linear::new(gpu, &w.pp("to_out").pp(0), c, c, true)?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let normed = self.group_norm.forward(gpu, x, false)?;
        let tokens = layout::permute(gpu, &normed.reshape(&[n, c, h * w])?, &[0, 2, 1])?;
        let q = self.to_q.forward(gpu, &tokens)?;
        let k = self.to_k.forward(gpu, &tokens)?;
        let v = self.to_v.forward(gpu, &tokens)?;
        let o = ops::attention::attention(gpu, &q, &k, &v, 1, &AttentionOptions::default())?;
        let o = self.to_out.forward(gpu, &o)?;
        let o = layout::permute(gpu, &o, &[0, 2, 1])?.reshape(&[n, c, h, w])?;
        ops::add(gpu, &o, x)
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<VaeAttention>,
}

impl VaeMidBlock {
    fn new(gpu: &Gpu, w: &Weights, c: usize, cfg: &VaeConfig) -> Result<Self> {
        let rc = ResnetConfig {
            in_channels: c,
            out_channels: c,
            temb_channels: None,
            groups: cfg.norm_num_groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        };
        let attentions = if cfg.mid_block_add_attention {
            vec![VaeAttention::new(
                gpu,
                &w.pp("attentions").pp(0),
                c,
                cfg.norm_num_groups,
            )?]
        } else {
            vec![]
        };
        Ok(VaeMidBlock {
            resnets: vec![
                ResnetBlock2D::new(gpu, &w.pp("resnets").pp(0), &rc)?,
                ResnetBlock2D::new(gpu, &w.pp("resnets").pp(1), &rc)?,
            ],
            attentions,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(gpu, x, None)?;
        if let Some(a) = self.attentions.first() {
            h = a.forward(gpu, &h)?;
        }
        self.resnets[1].forward(gpu, &h, None)
    }
}

pub struct EncoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// `Downsample2D`: pad (0, 1, 0, 1), then a 3x3 stride-2 conv without padding.
    pub downsampler: Option<Conv2d>,
}

pub struct DecoderBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// `Upsample2D`: nearest 2x, then a 3x3 conv.
    pub upsampler: Option<Conv2d>,
}

pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<EncoderBlock>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: VaeMidBlock,
    pub up_blocks: Vec<DecoderBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

/// The encoder's output: a diagonal Gaussian per latent pixel.
pub struct Posterior {
    /// [N, L, h, w], unscaled.
    pub mean: Tensor,
    /// [N, L, h, w], clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl AutoencoderKL {
    pub fn new(gpu: &Gpu, w: &Weights, config: VaeConfig) -> Result<Self> {
        let cfg = &config;
        let ch = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let lat = cfg.latent_channels;
        let rc = |cin, cout| ResnetConfig {
            in_channels: cin,
            out_channels: cout,
            temb_channels: None,
            groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        };

        let e = w.pp("encoder");
        let mut down_blocks = Vec::new();
        for (i, &cout) in ch.iter().enumerate() {
            let cin = if i == 0 { ch[0] } else { ch[i - 1] };
            let b = e.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    ResnetBlock2D::new(
                        gpu,
                        &b.pp("resnets").pp(j),
                        &rc(if j == 0 { cin } else { cout }, cout),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let downsampler = if i + 1 < ch.len() {
                let mut conv = Conv2d::new(
                    gpu,
                    &b.pp("downsamplers").pp(0).pp("conv"),
                    cout,
                    cout,
                    3,
                    2,
                    0,
                )?;
                conv.opts.padding = [0, 1, 0, 1];
                Some(conv)
            } else {
                None
            };
            down_blocks.push(EncoderBlock {
                resnets,
                downsampler,
            });
        }
        let top = *ch.last().expect("checked non-empty");
        let encoder = Encoder {
            conv_in: Conv2d::new(gpu, &e.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            down_blocks,
            mid_block: VaeMidBlock::new(gpu, &e.pp("mid_block"), top, cfg)?,
            conv_norm_out: GroupNorm::new(gpu, &e.pp("conv_norm_out"), groups, top, 1e-6)?,
            conv_out: Conv2d::new(gpu, &e.pp("conv_out"), top, 2 * lat, 3, 1, 1)?,
        };

        let d = w.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        for (i, &cout) in rev.iter().enumerate() {
            let cin = if i == 0 { rev[0] } else { rev[i - 1] };
            let b = d.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock2D::new(
                        gpu,
                        &b.pp("resnets").pp(j),
                        &rc(if j == 0 { cin } else { cout }, cout),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let upsampler = if i + 1 < rev.len() {
                Some(Conv2d::new(
                    gpu,
                    &b.pp("upsamplers").pp(0).pp("conv"),
                    cout,
                    cout,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(DecoderBlock { resnets, upsampler });
        }
        let decoder = Decoder {
            conv_in: Conv2d::new(gpu, &d.pp("conv_in"), lat, top, 3, 1, 1)?,
            mid_block: VaeMidBlock::new(gpu, &d.pp("mid_block"), top, cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(gpu, &d.pp("conv_norm_out"), groups, ch[0], 1e-6)?,
            conv_out: Conv2d::new(gpu, &d.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        };
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(
                gpu,
                &w.pp("quant_conv"),
                2 * lat,
                2 * lat,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(Conv2d::new(
                gpu,
                &w.pp("post_quant_conv"),
                lat,
                lat,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        Ok(AutoencoderKL {
            config,
            encoder,
            decoder,
            quant_conv,
            post_quant_conv,
        })
    }

    /// Encodes images [N, 3, H, W] in [-1, 1] to the posterior.
    pub fn encode(&self, gpu: &Gpu, image: &Tensor) -> Result<Posterior> {
        if image.rank() != 4 || image.shape()[1] != self.config.in_channels {
            return Err(EngineError::Shape {
                op: "vae.encode",
                expected: format!("image [N, {}, H, W]", self.config.in_channels),
                found: fmt_shape(image.shape()),
            });
        }
        let e = &self.encoder;
        let mut h = e.conv_in.forward(gpu, image)?;
        for block in &e.down_blocks {
            for r in &block.resnets {
                h = r.forward(gpu, &h, None)?;
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(gpu, &h)?;
            }
        }
        h = e.mid_block.forward(gpu, &h)?;
        h = e.conv_norm_out.forward(gpu, &h, true)?;
        h = e.conv_out.forward(gpu, &h)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(gpu, &h)?;
        }
        let lat = self.config.latent_channels;
        let mean = layout::narrow(gpu, &h, 1, 0, lat)?;
        let logvar =
            ops::elementwise::clamp(gpu, &layout::narrow(gpu, &h, 1, lat, lat)?, -30.0, 20.0)?;
        Ok(Posterior { mean, logvar })
    }

    /// Decodes latents [N, L, h, w] as they are (callers divide by
    /// `scaling_factor` first) to images [N, 3, H, W], not clamped.
    pub fn decode(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        if latents.rank() != 4 || latents.shape()[1] != self.config.latent_channels {
            return Err(EngineError::Shape {
                op: "vae.decode",
                expected: format!("latents [N, {}, h, w]", self.config.latent_channels),
                found: fmt_shape(latents.shape()),
            });
        }
        let d = &self.decoder;
        let mut h = match &self.post_quant_conv {
            Some(p) => p.forward(gpu, latents)?,
            None => latents.clone(),
        };
        h = d.conv_in.forward(gpu, &h)?;
        h = d.mid_block.forward(gpu, &h)?;
        for block in &d.up_blocks {
            for r in &block.resnets {
                h = r.forward(gpu, &h, None)?;
            }
            if let Some(up) = &block.upsampler {
                let (hh, ww) = (h.shape()[2], h.shape()[3]);
                h = up.forward(gpu, &layout::upsample_nearest(gpu, &h, 2 * hh, 2 * ww)?)?;
            }
        }
        h = d.conv_norm_out.forward(gpu, &h, true)?;
        d.conv_out.forward(gpu, &h)
    }

    /// Decodes latents in the pipeline's scaled domain: `decode(latents / scaling_factor)`.
    pub fn decode_scaled(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        let unscaled = ops::scale(gpu, latents, 1.0 / self.config.scaling_factor)?;
        self.decode(gpu, &unscaled)
    }
}

/// diffusers' tiled VAE decoding (`AutoencoderKL.enable_tiling()`): latent
/// tiles of `latent_tile` with a quarter overlap are decoded one at a time
/// and blended linearly where they overlap, so a large frame needs only one
/// tile's activations at a time.
#[derive(Debug, Clone, Copy)]
pub struct Tiling {
    /// `tile_sample_min_size`: the decoded tile's size in pixels.
    pub sample_tile: usize,
    /// `tile_latent_min_size`: the tile's size in latent pixels.
    pub latent_tile: usize,
    /// `tile_overlap_factor` (0.25 in diffusers).
    pub overlap: f32,
}

impl Tiling {
    /// diffusers' defaults: tiles of the config's `sample_size` (512 for SD).
    pub fn for_config(cfg: &VaeConfig, sample_size: usize) -> Self {
        Tiling {
            sample_tile: sample_size,
            latent_tile: sample_size / cfg.scale_factor(),
            overlap: 0.25,
        }
    }
}

/// An image batch on the CPU: values and [N, C, H, W].
pub struct Image {
    pub data: Vec<f32>,
    pub shape: [usize; 4],
}

impl AutoencoderKL {
    /// Decodes latents (unscaled) to CPU images, tile by tile when a side
    /// exceeds `tiling.latent_tile` (exactly diffusers' `tiled_decode`,
    /// including its in-place blending order), else in one pass.
    pub fn decode_tiled(&self, gpu: &Gpu, latents: &Tensor, tiling: &Tiling) -> Result<Image> {
        let s = latents.shape().to_vec();
        if s.len() != 4 {
            return Err(EngineError::Shape {
                op: "vae.decode_tiled",
                expected: "latents [N, L, h, w]".into(),
                found: fmt_shape(&s),
            });
        }
        let (h, w) = (s[2], s[3]);
        if h <= tiling.latent_tile && w <= tiling.latent_tile {
            let out = self.decode(gpu, latents)?;
            let shape = [
                out.shape()[0],
                out.shape()[1],
                out.shape()[2],
                out.shape()[3],
            ];
            return Ok(Image {
                data: out.to_f32(gpu)?,
                shape,
            });
        }
        let overlap_size = ((tiling.latent_tile as f32) * (1.0 - tiling.overlap)) as usize;
        let blend_extent = ((tiling.sample_tile as f32) * tiling.overlap) as usize;
        let row_limit = tiling.sample_tile - blend_extent;
        if overlap_size == 0 {
            return Err(EngineError::Argument {
                op: "vae.decode_tiled",
                message: format!("latent tile {} is too small", tiling.latent_tile),
            });
        }
        // Decode every tile.
        let mut rows: Vec<Vec<Image>> = Vec::new();
        for i in (0..h).step_by(overlap_size) {
            let mut row = Vec::new();
            for j in (0..w).step_by(overlap_size) {
                let th = tiling.latent_tile.min(h - i);
                let tw = tiling.latent_tile.min(w - j);
                let tile = layout::narrow(gpu, &layout::narrow(gpu, latents, 2, i, th)?, 3, j, tw)?;
                let out = self.decode(gpu, &tile)?;
                let shape = [
                    out.shape()[0],
                    out.shape()[1],
                    out.shape()[2],
                    out.shape()[3],
                ];
                row.push(Image {
                    data: out.to_f32(gpu)?,
                    shape,
                });
            }
            rows.push(row);
        }
        // Blend in place, in diffusers' order: each tile with the (already
        // blended) tile above, then with the (already blended) tile to its left.
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                if i > 0 {
                    let (above, this) = split_rows(&mut rows, i);
                    blend(&above[j], &mut this[j], blend_extent, true);
                }
                if j > 0 {
                    let (left, this) = rows[i].split_at_mut(j);
                    blend(&left[j - 1], &mut this[0], blend_extent, false);
                }
            }
        }
        // Crop each tile to row_limit and stitch.
        let [n, c, _, _] = rows[0][0].shape;
        let crop = |t: &Image| (t.shape[2].min(row_limit), t.shape[3].min(row_limit));
        let total_h: usize = rows.iter().map(|r| crop(&r[0]).0).sum();
        let total_w: usize = rows[0].iter().map(|t| crop(t).1).sum();
        let mut data = vec![0f32; n * c * total_h * total_w];
        let mut y0 = 0;
        for row in &rows {
            let mut x0 = 0;
            let th = crop(&row[0]).0;
            for t in row {
                let (ch, cw) = crop(t);
                for plane in 0..n * c {
                    for y in 0..ch {
                        let src = (plane * t.shape[2] + y) * t.shape[3];
                        let dst = (plane * total_h + y0 + y) * total_w + x0;
                        data[dst..dst + cw].copy_from_slice(&t.data[src..src + cw]);
                    }
                }
                x0 += cw;
            }
            y0 += th;
        }
        Ok(Image {
            data,
            shape: [n, c, total_h, total_w],
        })
    }
}

fn split_rows(rows: &mut [Vec<Image>], i: usize) -> (&Vec<Image>, &mut Vec<Image>) {
    let (before, after) = rows.split_at_mut(i);
    (&before[i - 1], &mut after[0])
}

/// diffusers' `blend_v` (vertical) / `blend_h`: the first `extent` rows
/// (columns) of `b` fade in from the last `extent` of `a`, weights in f32.
fn blend(a: &Image, b: &mut Image, extent: usize, vertical: bool) {
    let [n, c, ah, aw] = a.shape;
    let [_, _, bh, bw] = b.shape;
    let extent = if vertical {
        extent.min(ah).min(bh)
    } else {
        extent.min(aw).min(bw)
    };
    for plane in 0..n * c {
        for k in 0..extent {
            let wb = (k as f64 / extent as f64) as f32;
            let wa = (1.0 - k as f64 / extent as f64) as f32;
            if vertical {
                for x in 0..bw.min(aw) {
                    let av = a.data[(plane * ah + ah - extent + k) * aw + x];
                    let bi = (plane * bh + k) * bw + x;
                    b.data[bi] = av * wa + b.data[bi] * wb;
                }
            } else {
                for y in 0..bh.min(ah) {
                    let av = a.data[(plane * ah + y) * aw + aw - extent + k];
                    let bi = (plane * bh + y) * bw + k;
                    b.data[bi] = av * wa + b.data[bi] * wb;
                }
            }
        }
    }
}
