//! diffusers `AutoencoderKLWan` (models/autoencoders/autoencoder_kl_wan.py),
//! the Wan video VAE: the 2.1 one (4x temporal and 8x spatial compression
//! to 16 latent channels) and the 2.2 one of TI2V-5B (`is_residual`,
//! `patch_size` 2: frames folded 2x2 into 12 channels first, residual down
//! and up blocks whose shortcuts average or duplicate pixels into channels,
//! 16x spatial compression to 48 channels). Both causal in time. Structure
//! from `vae/config.json`; struct and field names mirror diffusers' module
//! tree, so `vae/*.safetensors` keys map one to one.
//!
//! Layout: diffusers works on [B, C, T, H, W]. Here one video at a time is
//! held frame-major, [T, C, H, W]: every layer but the time convolutions is
//! per frame, so frames are the batch of the 2-D operators, a run of frames
//! is a contiguous slice, and `upsample3d`'s interleaving of its two channel
//! halves into twice the frames is a plain reshape.
//!
//! Causal 3-D convolutions run on the tuned 2-D convolution: out[t] =
//! Σ_kt conv2d(x[t·stride + kt], W[:, :, kt]) over the past-padded stream of
//! frames is one conv2d whose input stacks, per output frame, the kT frames
//! it reads as kT·Cin channels, against the kernel rearranged once at load
//! to [Cout, kT·Cin, kh, kw]. This reuses every conv2d kernel (packed on CPU
//! adapters, tiled, tensor cores) instead of a new family that would have
//! to be tuned again, and keeps all taps in one f32 accumulator (summing
//! per-tap convolutions through the stored output would round the partial
//! sums to f16); the price is a copy of the input kT frames wide.
//!
//! Chunking and the feature cache are diffusers': the encoder sees frame 0
//! alone, then chunks of 4 frames; the decoder one latent frame at a time.
//! Every causal convolution keeps the last `CACHE_T` = 2 frames of its input
//! stream, which replace the zero time-padding on the next chunk, so memory
//! is the cache plus one chunk whatever the clip's length.
//!
//! Convolution weights stay f32 in f16 mode too, against f16 activations
//! (conv2d's f32-weight variant): on the wan-a case set's decode, computed in
//! f32 with one kind of weight rounded to f16, the convolution weights alone
//! put the output 2.1e-2 off diffusers' (biases 6.5e-3, norm scales 5.6e-3),
//! and the whole f16 decode was 3.07e-2, over the f16 budget of 3e-2; with
//! f32 convolution weights it is 1.5e-2. diffusers' own Wan examples load
//! this VAE in float32 too. The price is 2 bytes more per weight (about
//! 250 MB for Wan 2.1's 127 M).

use std::path::Path;

use serde::Deserialize;

use super::nn::Conv2d;
use crate::error::{EngineError, LoadError, Result};
use crate::gpu::{DType, Gpu};
use crate::ops::{self, attention::AttentionOptions, conv2d, layout, norm, Activation};
use crate::tensor::{fmt_shape, Tensor};
use crate::weights::{config::read_config, Weights};

/// Frames of its input each causal convolution keeps for the next chunk.
const CACHE_T: usize = 2;
/// `F.normalize`'s floor on the norm in `WanRMS_norm`.
const RMS_EPS: f32 = 1e-12;
/// Video frames per encoder chunk after the first frame (diffusers' `_encode`).
const ENCODE_CHUNK: usize = 4;
/// Every convolution weight's dtype, whatever the precision (see the
/// module's header). Biases and norm scales follow the precision: conv2d's
/// epilogue reads them as it stores the output.
const CONV_WEIGHT_DTYPE: DType = DType::F32;

/// `name` of `w` in [`CONV_WEIGHT_DTYPE`].
fn conv_weight(gpu: &Gpu, w: &Weights, name: &str, shape: &[usize]) -> Result<Tensor> {
    w.set().upload(gpu, &w.key(name), shape, CONV_WEIGHT_DTYPE)
}

/// `nn.Conv2d` (nn::Conv2d's layout) with its weight in [`CONV_WEIGHT_DTYPE`].
fn conv2d_layer(
    gpu: &Gpu,
    w: &Weights,
    (cin, cout): (usize, usize),
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    Ok(Conv2d {
        weight: conv_weight(gpu, w, "weight", &[cout, cin, kernel, kernel])?,
        bias: w.tensor(gpu, "bias", &[cout])?,
        opts: conv2d::Conv2dOptions {
            stride,
            padding: [padding; 4],
            activation: Activation::None,
        },
    })
}

fn base_dim() -> usize {
    96
}
fn z_dim() -> usize {
    16
}
fn dim_mult() -> Vec<usize> {
    vec![1, 2, 4, 4]
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn temperal_downsample() -> Vec<bool> {
    vec![false, true, true]
}
fn latents_mean() -> Vec<f32> {
    vec![
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
        0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
    ]
}
fn latents_std() -> Vec<f32> {
    vec![
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
        1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
    ]
}

/// `vae/config.json` of `AutoencoderKLWan`, with diffusers' defaults (the
/// Wan 2.1 VAE). Fields diffusers writes that do not change the network
/// (`_class_name`, `dropout`, `scale_factor_*`, ...) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct WanVaeConfig {
    #[serde(default = "base_dim")]
    pub base_dim: usize,
    #[serde(default)]
    pub decoder_base_dim: Option<usize>,
    #[serde(default = "z_dim")]
    pub z_dim: usize,
    #[serde(default = "dim_mult")]
    pub dim_mult: Vec<usize>,
    #[serde(default = "two")]
    pub num_res_blocks: usize,
    #[serde(default)]
    pub attn_scales: Vec<f64>,
    #[serde(default = "temperal_downsample")]
    pub temperal_downsample: Vec<bool>,
    #[serde(default = "latents_mean")]
    pub latents_mean: Vec<f32>,
    #[serde(default = "latents_std")]
    pub latents_std: Vec<f32>,
    #[serde(default)]
    pub is_residual: bool,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
}

impl WanVaeConfig {
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        Self::check(path, read_config(path)?)
    }

    /// A config already parsed as JSON (`path` names it in errors).
    pub fn from_value(path: &Path, value: serde_json::Value) -> Result<Self, LoadError> {
        let cfg = crate::weights::config::config_from_value(path, value)?;
        Self::check(path, cfg)
    }

    fn check(path: &Path, cfg: WanVaeConfig) -> Result<Self, LoadError> {
        let bad = |message: String| LoadError::Config {
            path: path.to_path_buf(),
            message,
        };
        if cfg.dim_mult.is_empty()
            || cfg.dim_mult.contains(&0)
            || cfg.base_dim == 0
            || cfg.z_dim == 0
            || cfg.decoder_base_dim == Some(0)
        {
            return Err(bad(format!(
                "base_dim {}, decoder_base_dim {:?}, z_dim {} and dim_mult {:?} must be non-empty \
                 and non-zero",
                cfg.base_dim, cfg.decoder_base_dim, cfg.z_dim, cfg.dim_mult
            )));
        }
        let p = cfg.patch();
        if p == 0
            || !cfg.in_channels.is_multiple_of(p * p)
            || !cfg.out_channels.is_multiple_of(p * p)
        {
            return Err(bad(format!(
                "patch_size {:?}: in_channels {} and out_channels {} must be multiples of its square",
                cfg.patch_size, cfg.in_channels, cfg.out_channels
            )));
        }
        if cfg.temperal_downsample.len() + 1 < cfg.dim_mult.len() {
            return Err(bad(format!(
                "temperal_downsample has {} entries, expected one per downsampling level ({})",
                cfg.temperal_downsample.len(),
                cfg.dim_mult.len() - 1
            )));
        }
        if !cfg.attn_scales.is_empty() {
            // diffusers' encoder calls its attention blocks with the feature
            // cache, which they do not take: such a VAE cannot run there either.
            return Err(bad(format!(
                "attn_scales {:?} is not supported (Wan VAEs use [])",
                cfg.attn_scales
            )));
        }
        if cfg.latents_mean.len() != cfg.z_dim || cfg.latents_std.len() != cfg.z_dim {
            return Err(bad(format!(
                "latents_mean has {} and latents_std {} values, expected z_dim = {}",
                cfg.latents_mean.len(),
                cfg.latents_std.len(),
                cfg.z_dim
            )));
        }
        if cfg.latents_std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(bad(format!(
                "latents_std {:?} has a zero or non-finite value",
                cfg.latents_std
            )));
        }
        if cfg.is_residual {
            cfg.check_shortcuts().map_err(bad)?;
        }
        Ok(cfg)
    }

    /// The residual blocks' shortcuts fold pixels into channels (AvgDown3D
    /// averages groups of them, DupUp3D repeats them): the channel counts
    /// must divide as diffusers asserts when it builds them.
    fn check_shortcuts(&self) -> std::result::Result<(), String> {
        let levels = self.dim_mult.len();
        let enc: Vec<usize> = std::iter::once(1)
            .chain(self.dim_mult.iter().copied())
            .map(|m| self.base_dim * m)
            .collect();
        for i in 0..levels - 1 {
            let factor = 4 * if self.temperal_downsample[i] { 2 } else { 1 };
            if !(enc[i] * factor).is_multiple_of(enc[i + 1]) {
                return Err(format!(
                    "encoder level {i}: {} channels × {factor} pixels do not divide into {} \
                     (AvgDown3D)",
                    enc[i],
                    enc[i + 1]
                ));
            }
        }
        let dec = self.decoder_dims();
        let up = self.temporal_upsample();
        for i in 0..levels - 1 {
            let factor = 4 * if up[i] { 2 } else { 1 };
            if !(dec[i + 1] * factor).is_multiple_of(dec[i]) {
                return Err(format!(
                    "decoder level {i}: {} channels × {factor} pixels are not a multiple of {} \
                     (DupUp3D)",
                    dec[i + 1],
                    dec[i]
                ));
            }
        }
        Ok(())
    }

    /// `patch_size`, 1 when absent (Wan 2.1).
    pub fn patch(&self) -> usize {
        self.patch_size.unwrap_or(1)
    }

    /// Channels of the video itself: the encoder's `in_channels` hold
    /// patch² pixels of each (12 = 3 · 2 · 2 for Wan 2.2).
    pub fn video_channels(&self) -> usize {
        self.in_channels / (self.patch() * self.patch())
    }

    /// The decoder's widths per level: its base times [the last multiplier,
    /// then the multipliers reversed].
    fn decoder_dims(&self) -> Vec<usize> {
        let dim = self.decoder_base_dim.unwrap_or(self.base_dim);
        let levels = self.dim_mult.len();
        std::iter::once(self.dim_mult[levels - 1])
            .chain(self.dim_mult.iter().rev().copied())
            .map(|m| dim * m)
            .collect()
    }

    /// The decoder upsamples in time where the encoder downsampled, in reverse.
    fn temporal_upsample(&self) -> Vec<bool> {
        self.temperal_downsample[..self.dim_mult.len() - 1]
            .iter()
            .rev()
            .copied()
            .collect()
    }

    /// Pixels per latent pixel along each side: 2^(levels − 1) · patch_size
    /// (8 for Wan 2.1, 16 for Wan 2.2).
    pub fn spatial_scale_factor(&self) -> usize {
        (1 << (self.dim_mult.len() - 1)) * self.patch()
    }

    /// Video frames per latent frame after the first: 2^(temporal downsamplings).
    pub fn temporal_scale_factor(&self) -> usize {
        let levels = self.dim_mult.len() - 1;
        1 << self.temperal_downsample[..levels]
            .iter()
            .filter(|&&t| t)
            .count()
    }

    /// Video frames that `latent_frames` decode to: the first latent frame
    /// gives one frame, every later one `temporal_scale_factor()`.
    pub fn frames_for_latent_frames(&self, latent_frames: usize) -> usize {
        match latent_frames {
            0 => 0,
            f => 1 + (f - 1) * self.temporal_scale_factor(),
        }
    }
}

/// `WanCausalConv3d`: an `nn.Conv3d` whose time padding is all on the past
/// side (2·pad frames before, none after) and whose spatial padding is
/// zeros on both sides, as `F.pad(x, (w, w, h, h, 2·t, 0))`. On chunks
/// after the first, cached frames of the previous chunk stand in for as
/// many of the zero frames.
pub struct WanCausalConv3d {
    /// The kernel with its time taps moved into the input channels:
    /// [Cout, kT·Cin, kh, kw], channel kt·Cin + c = `weight[:, c, kt]`.
    pub weight: Tensor,
    /// `nn.Conv3d`'s bias: every one in the Wan VAE has it (`bias=True`).
    pub bias: Tensor,
    pub time_kernel: usize,
    /// Zero frames before the input (2 · padding[0]).
    pub time_padding: usize,
    pub time_stride: usize,
    /// Spatial stride and symmetric padding.
    pub opts: conv2d::Conv2dOptions,
}

/// Bytes of stacked input (kT frames side by side per output frame) one
/// conv2d call may take; longer chunks run in groups of output frames, so
/// that full-size frames do not need kT copies of the whole chunk at once.
const MAX_STACKED_BYTES: u64 = 256 << 20;

impl WanCausalConv3d {
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        cin: usize,
        cout: usize,
        kernel: [usize; 3],
        stride: [usize; 3],
        padding: [usize; 3],
    ) -> Result<Self> {
        let [kt, kh, kw] = kernel;
        let shape = [cout, cin, kt, kh, kw];
        let stacked = [cout, kt * cin, kh, kw];
        let weight = if kt == 1 || gpu.is_plan() {
            // One tap needs no rearranging; a dry run has no values to
            // rearrange (it checks the key and shape and accounts the memory).
            conv_weight(gpu, w, "weight", &shape)?.reshape(&stacked)?
        } else {
            // Stored [Cout, Cin, kT, kh, kw]; the time taps become blocks of
            // input channels, rearranged on the CPU once, at load.
            let values = w.set().read_f32(&w.key("weight"), &shape)?;
            let taps = kh * kw;
            let mut out = vec![0f32; values.len()];
            for o in 0..cout {
                for c in 0..cin {
                    for t in 0..kt {
                        let src = ((o * cin + c) * kt + t) * taps;
                        let dst = ((o * kt + t) * cin + c) * taps;
                        out[dst..dst + taps].copy_from_slice(&values[src..src + taps]);
                    }
                }
            }
            Tensor::from_f32(gpu, &out, &stacked, CONV_WEIGHT_DTYPE)?.into_constant()
        };
        Ok(WanCausalConv3d {
            weight,
            bias: w.tensor(gpu, "bias", &[cout])?,
            time_kernel: kt,
            time_padding: 2 * padding[0],
            time_stride: stride[0],
            opts: conv2d::Conv2dOptions {
                stride: stride[1],
                padding: [padding[2], padding[2], padding[1], padding[1]],
                activation: Activation::None,
            },
        })
    }

    /// `x` [T, Cin, H, W] → [T', Cout, H', W']. `cache` holds runs of the
    /// frames that precede `x`, oldest first: the last `time_padding` of
    /// them replace as many of the zero frames; `residual`, of the
    /// output's shape, is added.
    ///
    /// out[t] = Σ_kt conv2d(stream[t·stride + kt], W[:, :, kt]) is one
    /// conv2d over the kT frames each output reads, stacked as channels:
    /// every tap is summed in the kernel's f32 accumulator, and the output
    /// is stored once.
    pub fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        cache: &[Tensor],
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let kt = self.time_kernel;
        let frames = x.shape()[0];
        if kt == 1 && self.time_padding == 0 && self.time_stride == 1 {
            return self.conv(gpu, x, residual);
        }
        let cache = if self.time_padding > 0 { cache } else { &[] };
        let available: usize = cache.iter().map(|c| c.shape()[0]).sum();
        let cached = available.min(self.time_padding);
        let zeros = self.time_padding - cached;
        let stream_len = zeros + cached + frames;
        if stream_len < kt || frames == 0 {
            return Err(EngineError::Shape {
                op: "WanCausalConv3d",
                expected: format!(
                    "at least {} input frames",
                    kt.saturating_sub(zeros + cached).max(1)
                ),
                found: fmt_shape(x.shape()),
            });
        }
        let out_frames = (stream_len - kt) / self.time_stride + 1;
        // The stream the taps read: [zeros, cache, x].
        let mut parts: Vec<Tensor> = Vec::new();
        if zeros > 0 {
            let mut shape = x.shape().to_vec();
            shape[0] = zeros;
            parts.push(Tensor::zeros(gpu, &shape, x.dtype())?);
        }
        let mut skip = available - cached;
        for c in cache {
            let n = c.shape()[0];
            if skip >= n {
                skip -= n;
                continue;
            }
            parts.push(if skip > 0 {
                layout::narrow_rows(gpu, c, skip, n - skip)?
            } else {
                c.clone()
            });
            skip = 0;
        }
        let stream = if parts.is_empty() {
            x.clone()
        } else {
            parts.push(x.clone());
            layout::concat_rows(gpu, &parts.iter().collect::<Vec<_>>())?
        };
        drop(parts);
        let frame_bytes = x.size_bytes() / frames as u64;
        let group =
            ((MAX_STACKED_BYTES / (kt as u64 * frame_bytes).max(1)) as usize).clamp(1, out_frames);
        let mut outputs = Vec::new();
        for t0 in (0..out_frames).step_by(group) {
            let n = group.min(out_frames - t0);
            // [n, kT·Cin, H, W]: output t reads the kT consecutive frames
            // from (t0 + t)·stride, which side by side are its channels.
            let whole = n == 1 && kt == stream.shape()[0];
            let windows = (t0..t0 + n)
                .filter(|_| !whole)
                .map(|t| layout::narrow_rows(gpu, &stream, t * self.time_stride, kt))
                .collect::<Result<Vec<_>>>()?;
            let stacked = if whole {
                // The one window is the whole stream: no copy.
                stream.clone()
            } else if windows.len() == 1 {
                windows[0].clone()
            } else {
                layout::concat_rows(gpu, &windows.iter().collect::<Vec<_>>())?
            };
            drop(windows);
            let s = stream.shape();
            let stacked = stacked.reshape(&[n, kt * s[1], s[2], s[3]])?;
            let residual = match residual {
                Some(r) if n < out_frames => Some(layout::narrow_rows(gpu, r, t0, n)?),
                other => other.cloned(),
            };
            outputs.push(self.conv(gpu, &stacked, residual.as_ref())?);
        }
        if outputs.len() == 1 {
            return Ok(outputs.pop().expect("one group"));
        }
        layout::concat_rows(gpu, &outputs.iter().collect::<Vec<_>>())
    }

    fn conv(&self, gpu: &Gpu, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let bias = Some(&self.bias);
        match residual {
            Some(residual) => {
                let r = conv2d::Conv2dResidual {
                    residual,
                    scale: 1.0,
                };
                conv2d::conv2d_residual(gpu, x, &self.weight, bias, &self.opts, &r)
            }
            None => conv2d::conv2d(gpu, x, &self.weight, bias, &self.opts),
        }
    }
}

/// Frames start..start + len of item `item` of a video [N, C, F, H, W], in
/// the frame-major layout [len, C, H, W]; only those frames are copied.
fn frames_of(gpu: &Gpu, video: &Tensor, item: usize, start: usize, len: usize) -> Result<Tensor> {
    let x = if video.shape()[0] == 1 {
        video.clone()
    } else {
        layout::narrow(gpu, video, 0, item, 1)?
    };
    let x = if len == x.shape()[2] {
        x
    } else {
        layout::narrow(gpu, &x, 2, start, len)?
    };
    if len == 1 {
        let s = x.shape();
        return x.reshape(&[1, s[1], s[3], s[4]]);
    }
    layout::video_to_frames(gpu, &x)
}

/// diffusers' `patchify` on frames [T, C, H, W] → [T, C·p·p, H/p, W/p]:
/// channel c·p² + x·p + y holds pixel (y, x) of each p × p block (the
/// column offset before the row's, as diffusers permutes). p = 1: x itself.
fn patchify(gpu: &Gpu, x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (t, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (hp, wp) = (h / p, w / p);
    layout::permute(gpu, &x.reshape(&[t, c, hp, p, wp, p])?, &[0, 1, 5, 3, 2, 4])?.reshape(&[
        t,
        c * p * p,
        hp,
        wp,
    ])
}

/// diffusers' `unpatchify`, the inverse of [`patchify`]: [T, C·p·p, H, W]
/// → [T, C, H·p, W·p].
fn unpatchify(gpu: &Gpu, x: &Tensor, p: usize) -> Result<Tensor> {
    if p == 1 {
        return Ok(x.clone());
    }
    let (t, cp, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let c = cp / (p * p);
    layout::permute(gpu, &x.reshape(&[t, c, p, p, h, w])?, &[0, 1, 4, 3, 5, 2])?.reshape(&[
        t,
        c,
        h * p,
        w * p,
    ])
}

/// The last `CACHE_T` frames of the stream [previous, x]: what diffusers
/// stores in `feat_cache` after a causal convolution reads `x`. Kept as
/// runs of frames, oldest first, that share the tensors they come from
/// where they can: a frame at a time (the decoder's full-resolution
/// levels), the cache is `x` itself and the previous frame, no copy.
fn next_cache(gpu: &Gpu, previous: &[Tensor], x: &Tensor) -> Result<Vec<Tensor>> {
    let t = x.shape()[0];
    if t > CACHE_T {
        return Ok(vec![layout::narrow_rows(gpu, x, t - CACHE_T, CACHE_T)?]);
    }
    let mut kept = vec![x.clone()];
    let mut wanted = CACHE_T - t;
    for p in previous.iter().rev() {
        if wanted == 0 {
            break;
        }
        let n = p.shape()[0];
        let take = n.min(wanted);
        kept.push(if take == n {
            p.clone()
        } else {
            layout::narrow_rows(gpu, p, n - take, take)?
        });
        wanted -= take;
    }
    kept.reverse();
    Ok(kept)
}

/// One entry of diffusers' `feat_cache`.
#[derive(Clone, Default)]
enum CacheSlot {
    #[default]
    Empty,
    /// `upsample3d` has seen its first chunk (diffusers' "Rep"): its time
    /// convolution starts on the next one, from zero padding.
    Rep,
    /// Runs of frames, oldest first (see `next_cache`).
    Frames(Vec<Tensor>),
}

/// diffusers' `feat_cache` with its `feat_idx`: one slot per causal
/// convolution (and temporal resample), visited in forward order; the index
/// restarts at every chunk.
#[derive(Default)]
struct FeatureCache {
    slots: Vec<CacheSlot>,
    idx: usize,
}

impl FeatureCache {
    fn start_chunk(&mut self) {
        self.idx = 0;
    }

    fn next(&mut self) -> &mut CacheSlot {
        if self.idx == self.slots.len() {
            self.slots.push(CacheSlot::Empty);
        }
        self.idx += 1;
        &mut self.slots[self.idx - 1]
    }
}

/// A causal convolution run with its slot of the feature cache.
fn cached_conv(
    gpu: &Gpu,
    conv: &WanCausalConv3d,
    x: &Tensor,
    cache: &mut FeatureCache,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let slot = cache.next();
    let previous = match std::mem::take(slot) {
        CacheSlot::Frames(frames) => frames,
        _ => Vec::new(),
    };
    let kept = next_cache(gpu, &previous, x)?;
    let out = conv.forward(gpu, x, &previous, residual)?;
    drop(previous);
    *slot = CacheSlot::Frames(kept);
    Ok(out)
}

/// `WanRMS_norm`: F.normalize over channels · √C · gamma. `gamma` is stored
/// [C, 1, 1, 1] (`images=False`) or [C, 1, 1]. diffusers builds every one of
/// these norms with `bias=False`, so the architecture has no bias to load.
pub struct WanRmsNorm {
    pub gamma: Tensor,
}

impl WanRmsNorm {
    fn new(gpu: &Gpu, w: &Weights, c: usize, images: bool) -> Result<Self> {
        let shape: &[usize] = if images { &[c, 1, 1] } else { &[c, 1, 1, 1] };
        Ok(WanRmsNorm {
            gamma: w.tensor(gpu, "gamma", shape)?.reshape(&[c])?,
        })
    }

    /// x [T, C, H, W], SiLU fused when `silu`.
    fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        norm::channel_rms_norm(gpu, x, Some(&self.gamma), None, RMS_EPS, silu)
    }
}

/// `WanResidualBlock`: norm1 → SiLU → conv1 → norm2 → SiLU → (dropout,
/// none at inference) → conv2, plus the shortcut (a 1x1x1 causal conv when
/// the channel count changes).
pub struct WanResidualBlock {
    pub norm1: WanRmsNorm,
    pub conv1: WanCausalConv3d,
    pub norm2: WanRmsNorm,
    pub conv2: WanCausalConv3d,
    pub conv_shortcut: Option<WanCausalConv3d>,
}

impl WanResidualBlock {
    fn new(gpu: &Gpu, w: &Weights, cin: usize, cout: usize) -> Result<Self> {
        let conv3 = |name: &str, ci, co| {
            WanCausalConv3d::new(gpu, &w.pp(name), ci, co, [3; 3], [1; 3], [1; 3])
        };
        Ok(WanResidualBlock {
            norm1: WanRmsNorm::new(gpu, &w.pp("norm1"), cin, false)?,
            conv1: conv3("conv1", cin, cout)?,
            norm2: WanRmsNorm::new(gpu, &w.pp("norm2"), cout, false)?,
            conv2: conv3("conv2", cout, cout)?,
            conv_shortcut: if cin != cout {
                Some(WanCausalConv3d::new(
                    gpu,
                    &w.pp("conv_shortcut"),
                    cin,
                    cout,
                    [1; 3],
                    [1; 3],
                    [0; 3],
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(gpu, x, &[], None)?,
            None => x.clone(),
        };
        let h = self.norm1.forward(gpu, x, true)?;
        let h = cached_conv(gpu, &self.conv1, &h, cache, None)?;
        let h = self.norm2.forward(gpu, &h, true)?;
        // x + h: the shortcut enters the accumulation of conv2's taps.
        cached_conv(gpu, &self.conv2, &h, cache, Some(&shortcut))
    }
}

/// `WanAttentionBlock`: single-head self-attention over the H·W pixels of
/// each frame, with its own RMS norm and 1x1 convolutions; q, k, v are the
/// three thirds of `to_qkv`'s output channels.
pub struct WanAttentionBlock {
    pub norm: WanRmsNorm,
    pub to_qkv: Conv2d,
    pub proj: Conv2d,
}

impl WanAttentionBlock {
    fn new(gpu: &Gpu, w: &Weights, c: usize) -> Result<Self> {
        Ok(WanAttentionBlock {
            norm: WanRmsNorm::new(gpu, &w.pp("norm"), c, true)?,
            to_qkv: conv2d_layer(gpu, &w.pp("to_qkv"), (c, 3 * c), 1, 1, 0)?,
            proj: conv2d_layer(gpu, &w.pp("proj"), (c, c), 1, 1, 0)?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        let (t, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
        let normed = self.norm.forward(gpu, x, false)?;
        let qkv = self
            .to_qkv
            .forward(gpu, &normed)?
            .reshape(&[t, 3 * c, h * w])?;
        // diffusers: qkv [T, 1, 3C, HW] → permute → [T, 1, HW, 3C] → chunk(3, -1).
        let tokens = layout::permute(gpu, &qkv, &[0, 2, 1])?;
        let q = layout::narrow(gpu, &tokens, 2, 0, c)?;
        let k = layout::narrow(gpu, &tokens, 2, c, c)?;
        let v = layout::narrow(gpu, &tokens, 2, 2 * c, c)?;
        let o = ops::attention::attention(gpu, &q, &k, &v, 1, &AttentionOptions::default())?;
        let o = layout::permute(gpu, &o, &[0, 2, 1])?.reshape(&[t, c, h, w])?;
        self.proj.forward_residual(gpu, &o, x, 1.0)
    }
}

/// `WanMidBlock`: resnet, then (attention, resnet) once.
pub struct WanMidBlock {
    pub attentions: Vec<WanAttentionBlock>,
    pub resnets: Vec<WanResidualBlock>,
}

impl WanMidBlock {
    fn new(gpu: &Gpu, w: &Weights, c: usize) -> Result<Self> {
        Ok(WanMidBlock {
            attentions: vec![WanAttentionBlock::new(gpu, &w.pp("attentions").pp(0), c)?],
            resnets: vec![
                WanResidualBlock::new(gpu, &w.pp("resnets").pp(0), c, c)?,
                WanResidualBlock::new(gpu, &w.pp("resnets").pp(1), c, c)?,
            ],
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(gpu, x, cache)?;
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = attn.forward(gpu, &h)?;
            h = resnet.forward(gpu, &h, cache)?;
        }
        Ok(h)
    }
}

/// `WanResample`'s modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResampleMode {
    /// Nearest-exact 2x (= nearest at 2x), then a 3x3 conv.
    Upsample2d,
    /// `time_conv` doubles the frames (not on the first chunk), then as 2d.
    Upsample3d,
    /// Zero pad (0, 1, 0, 1), then a 3x3 stride-2 conv.
    Downsample2d,
    /// As 2d, then `time_conv` (3x1x1, stride 2 in time) over the previous
    /// chunk's last frame and this chunk (not on the first chunk).
    Downsample3d,
}

/// `WanResample`: `resample.1` is the `nn.Conv2d` of diffusers' Sequential
/// (index 0 is the upsampling or the zero padding, which have no weights).
pub struct WanResample {
    pub mode: ResampleMode,
    pub resample: Conv2d,
    pub time_conv: Option<WanCausalConv3d>,
}

impl WanResample {
    /// `upsample_out`: the upsampling convolution's output channels
    /// (diffusers' `upsample_out_dim`: dim / 2 in Wan 2.1's WanUpBlock,
    /// dim in Wan 2.2's WanResidualUpBlock); unused when downsampling.
    fn new(
        gpu: &Gpu,
        w: &Weights,
        dim: usize,
        mode: ResampleMode,
        upsample_out: usize,
    ) -> Result<Self> {
        let conv = w.pp("resample").pp(1);
        let (resample, time_conv) = match mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                let resample = conv2d_layer(gpu, &conv, (dim, upsample_out), 3, 1, 1)?;
                let time_conv = (mode == ResampleMode::Upsample3d)
                    .then(|| {
                        WanCausalConv3d::new(
                            gpu,
                            &w.pp("time_conv"),
                            dim,
                            2 * dim,
                            [3, 1, 1],
                            [1; 3],
                            [1, 0, 0],
                        )
                    })
                    .transpose()?;
                (resample, time_conv)
            }
            ResampleMode::Downsample2d | ResampleMode::Downsample3d => {
                let mut resample = conv2d_layer(gpu, &conv, (dim, dim), 3, 2, 0)?;
                resample.opts.padding = [0, 1, 0, 1];
                let time_conv = (mode == ResampleMode::Downsample3d)
                    .then(|| {
                        WanCausalConv3d::new(
                            gpu,
                            &w.pp("time_conv"),
                            dim,
                            dim,
                            [3, 1, 1],
                            [2, 1, 1],
                            [0; 3],
                        )
                    })
                    .transpose()?;
                (resample, time_conv)
            }
        };
        Ok(WanResample {
            mode,
            resample,
            time_conv,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut x = x.clone();
        if let (ResampleMode::Upsample3d, Some(time_conv)) = (self.mode, &self.time_conv) {
            let slot = cache.next();
            let previous = match &*slot {
                // The first chunk keeps its frame count.
                CacheSlot::Empty => None,
                // The second starts the time convolution from zero padding.
                CacheSlot::Rep => Some(Vec::new()),
                CacheSlot::Frames(frames) => Some(frames.clone()),
            };
            if previous.is_none() {
                *slot = CacheSlot::Rep;
            }
            if let Some(previous) = previous {
                let kept = next_cache(gpu, &previous, &x)?;
                let y = time_conv.forward(gpu, &x, &previous, None)?;
                *slot = CacheSlot::Frames(kept);
                // [T, 2C, H, W]: channel half s of frame τ is frame 2τ + s
                // (diffusers' reshape to (2, C) and stack on the time axis).
                let s = y.shape();
                x = y.reshape(&[2 * s[0], s[1] / 2, s[2], s[3]])?;
            }
        }
        let x = match self.mode {
            ResampleMode::Upsample2d | ResampleMode::Upsample3d => {
                let (h, w) = (x.shape()[2], x.shape()[3]);
                let up = layout::upsample_nearest(gpu, &x, 2 * h, 2 * w)?;
                self.resample.forward(gpu, &up)?
            }
            _ => self.resample.forward(gpu, &x)?,
        };
        if let (ResampleMode::Downsample3d, Some(time_conv)) = (self.mode, &self.time_conv) {
            let t = x.shape()[0];
            let last = layout::narrow_rows(gpu, &x, t - 1, 1)?;
            let slot = cache.next();
            match std::mem::replace(slot, CacheSlot::Frames(vec![last])) {
                // The first chunk passes through; its last frame is kept.
                CacheSlot::Empty | CacheSlot::Rep => return Ok(x),
                CacheSlot::Frames(previous) => {
                    let mut parts: Vec<&Tensor> = previous.iter().collect();
                    parts.push(&x);
                    let stream = layout::concat_rows(gpu, &parts)?;
                    return time_conv.forward(gpu, &stream, &[], None);
                }
            }
        }
        Ok(x)
    }
}

/// An entry of `WanEncoder3d.down_blocks`: in Wan 2.1 a flat list of
/// residual blocks and resamples; in Wan 2.2 one residual down block per level.
pub enum WanDownLayer {
    Residual(Box<WanResidualBlock>),
    Resample(Box<WanResample>),
    ResidualDown(Box<WanResidualDownBlock>),
}

/// `AvgDown3D`, the parameter-free shortcut of Wan 2.2's down blocks: each
/// `factor_t` × `factor_s` × `factor_s` block of pixels becomes channels
/// (c · factor + (t, y, x) within the block), and groups of
/// `in · factor / out` consecutive channels are averaged. A chunk whose
/// frame count is not a multiple of `factor_t` gets zero frames in front,
/// as diffusers pads (the first chunk, one frame).
///
/// x [T, C, H, W] → [⌈T / factor_t⌉, out, H / factor_s, W / factor_s].
pub fn avg_down_3d(
    gpu: &Gpu,
    x: &Tensor,
    out_channels: usize,
    factor_t: usize,
    factor_s: usize,
) -> Result<Tensor> {
    let (t, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let factor = factor_t * factor_s * factor_s;
    let (hs, ws) = (h / factor_s, w / factor_s);
    if !(c * factor).is_multiple_of(out_channels) || hs * factor_s != h || ws * factor_s != w {
        return Err(EngineError::Shape {
            op: "AvgDown3D",
            expected: format!(
                "[T, C, H, W] with H, W multiples of {factor_s} and C · {factor} a multiple of \
                 {out_channels}"
            ),
            found: fmt_shape(x.shape()),
        });
    }
    let pad = (factor_t - t % factor_t) % factor_t;
    let x = match pad {
        0 => x.clone(),
        _ => {
            let zeros = Tensor::zeros(gpu, &[pad, c, h, w], x.dtype())?;
            layout::concat_rows(gpu, &[&zeros, x])?
        }
    };
    let ts = (t + pad) / factor_t;
    let group = c * factor / out_channels;
    // [T', ft, C, H', fs, W', fs] → [T', C, ft, fs, fs, H', W']: channel
    // c · factor + (it · fs + iy) · fs + ix, diffusers' order.
    let blocks = layout::permute(
        gpu,
        &x.reshape(&[ts, factor_t, c, hs, factor_s, ws, factor_s])?,
        &[0, 2, 1, 4, 6, 3, 5],
    )?;
    if group == 1 {
        return blocks.reshape(&[ts, out_channels, hs, ws]);
    }
    // The mean over each group of channels, group index outermost so that
    // each member is a run of rows.
    let members = layout::permute(
        gpu,
        &blocks.reshape(&[ts, out_channels, group, hs * ws])?,
        &[2, 0, 1, 3],
    )?
    .reshape(&[group, ts * out_channels * hs * ws])?;
    let mut sum = layout::narrow_rows(gpu, &members, 0, 1)?;
    for g in 1..group {
        sum = ops::add(gpu, &sum, &layout::narrow_rows(gpu, &members, g, 1)?)?;
    }
    ops::elementwise::scale(gpu, &sum, 1.0 / group as f32)?.reshape(&[ts, out_channels, hs, ws])
}

/// `DupUp3D`, the parameter-free shortcut of Wan 2.2's up blocks, the
/// inverse fold of [`avg_down_3d`]: each channel repeated `out · factor /
/// in` times (repeat_interleave), then channel (o, t, y, x) of the
/// result spread to pixel (y, x) of frame t in an `factor_t` × `factor_s`
/// × `factor_s` block. On the first chunk diffusers keeps only the last of
/// each block's frames (the causal first frame).
///
/// x [T, Cin, H, W] → [T · factor_t, out, H · factor_s, W · factor_s]
/// (T · factor_t − factor_t + 1 frames on the first chunk).
pub fn dup_up_3d(
    gpu: &Gpu,
    x: &Tensor,
    out_channels: usize,
    factor_t: usize,
    factor_s: usize,
    first_chunk: bool,
) -> Result<Tensor> {
    let (t, c, h, w) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let factor = factor_t * factor_s * factor_s;
    if !(out_channels * factor).is_multiple_of(c) {
        return Err(EngineError::Shape {
            op: "DupUp3D",
            expected: format!("[T, C, H, W] with {out_channels} · {factor} a multiple of C"),
            found: fmt_shape(x.shape()),
        });
    }
    let repeats = out_channels * factor / c;
    // repeat_interleave along channels: a broadcast into the repeated shape.
    let repeated = ops::add(
        gpu,
        &Tensor::zeros(gpu, &[t, c, repeats, h, w], x.dtype())?,
        &x.reshape(&[t, c, 1, h, w])?,
    )?;
    // [T, out, ft, fs, fs, H, W] → [T, ft, out, H, fs, W, fs].
    let spread = layout::permute(
        gpu,
        &repeated.reshape(&[t, out_channels, factor_t, factor_s, factor_s, h, w])?,
        &[0, 2, 1, 5, 3, 6, 4],
    )?
    .reshape(&[t * factor_t, out_channels, h * factor_s, w * factor_s])?;
    match first_chunk && factor_t > 1 {
        true => layout::narrow_rows(gpu, &spread, factor_t - 1, t * factor_t - (factor_t - 1)),
        false => Ok(spread),
    }
}

/// `WanResidualDownBlock` (Wan 2.2): residual blocks, then the level's
/// downsampler, plus [`avg_down_3d`] of the block's input.
pub struct WanResidualDownBlock {
    pub resnets: Vec<WanResidualBlock>,
    pub downsampler: Option<WanResample>,
    out_channels: usize,
    factor_t: usize,
    factor_s: usize,
}

impl WanResidualDownBlock {
    fn forward(&self, gpu: &Gpu, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(gpu, &h, cache)?;
        }
        if let Some(d) = &self.downsampler {
            h = d.forward(gpu, &h, cache)?;
        }
        let shortcut = avg_down_3d(gpu, x, self.out_channels, self.factor_t, self.factor_s)?;
        ops::add(gpu, &h, &shortcut)
    }
}

/// `WanEncoder3d`.
pub struct WanEncoder3d {
    pub conv_in: WanCausalConv3d,
    pub down_blocks: Vec<WanDownLayer>,
    pub mid_block: WanMidBlock,
    pub norm_out: WanRmsNorm,
    pub conv_out: WanCausalConv3d,
}

impl WanEncoder3d {
    fn new(gpu: &Gpu, w: &Weights, cfg: &WanVaeConfig) -> Result<Self> {
        let dim = cfg.base_dim;
        let dims: Vec<usize> = std::iter::once(1)
            .chain(cfg.dim_mult.iter().copied())
            .map(|m| dim * m)
            .collect();
        let conv =
            |w: &Weights, ci, co| WanCausalConv3d::new(gpu, w, ci, co, [3; 3], [1; 3], [1; 3]);
        let mut down_blocks = Vec::new();
        let levels = cfg.dim_mult.len();
        for i in 0..levels {
            let mut cin = dims[i];
            let cout = dims[i + 1];
            if cfg.is_residual {
                let b = w.pp("down_blocks").pp(i);
                let down = i + 1 != levels;
                let temporal = down && cfg.temperal_downsample[i];
                let resnets = (0..cfg.num_res_blocks)
                    .map(|j| {
                        let ci = if j == 0 { cin } else { cout };
                        WanResidualBlock::new(gpu, &b.pp("resnets").pp(j), ci, cout)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let mode = match temporal {
                    true => ResampleMode::Downsample3d,
                    false => ResampleMode::Downsample2d,
                };
                let downsampler = down
                    .then(|| WanResample::new(gpu, &b.pp("downsampler"), cout, mode, cout))
                    .transpose()?;
                down_blocks.push(WanDownLayer::ResidualDown(Box::new(WanResidualDownBlock {
                    resnets,
                    downsampler,
                    out_channels: cout,
                    factor_t: if temporal { 2 } else { 1 },
                    factor_s: if down { 2 } else { 1 },
                })));
                continue;
            }
            for _ in 0..cfg.num_res_blocks {
                let b = w.pp("down_blocks").pp(down_blocks.len());
                down_blocks.push(WanDownLayer::Residual(Box::new(WanResidualBlock::new(
                    gpu, &b, cin, cout,
                )?)));
                cin = cout;
            }
            if i + 1 != levels {
                let mode = if cfg.temperal_downsample[i] {
                    ResampleMode::Downsample3d
                } else {
                    ResampleMode::Downsample2d
                };
                let b = w.pp("down_blocks").pp(down_blocks.len());
                let resample = WanResample::new(gpu, &b, cout, mode, cout)?;
                down_blocks.push(WanDownLayer::Resample(Box::new(resample)));
            }
        }
        let top = dims[levels];
        Ok(WanEncoder3d {
            conv_in: conv(&w.pp("conv_in"), cfg.in_channels, dims[0])?,
            down_blocks,
            mid_block: WanMidBlock::new(gpu, &w.pp("mid_block"), top)?,
            norm_out: WanRmsNorm::new(gpu, &w.pp("norm_out"), top, false)?,
            conv_out: conv(&w.pp("conv_out"), top, 2 * cfg.z_dim)?,
        })
    }

    fn forward(&self, gpu: &Gpu, x: &Tensor, cache: &mut FeatureCache) -> Result<Tensor> {
        cache.start_chunk();
        let mut h = cached_conv(gpu, &self.conv_in, x, cache, None)?;
        for layer in &self.down_blocks {
            h = match layer {
                WanDownLayer::Residual(r) => r.forward(gpu, &h, cache)?,
                WanDownLayer::Resample(r) => r.forward(gpu, &h, cache)?,
                WanDownLayer::ResidualDown(r) => r.forward(gpu, &h, cache)?,
            };
        }
        h = self.mid_block.forward(gpu, &h, cache)?;
        h = self.norm_out.forward(gpu, &h, true)?;
        cached_conv(gpu, &self.conv_out, &h, cache, None)
    }
}

/// `WanUpBlock`: resnets, then optionally `upsamplers.0`; or Wan 2.2's
/// `WanResidualUpBlock`: resnets, optionally `upsampler`, plus
/// [`dup_up_3d`] of the block's input when it upsamples.
pub struct WanUpBlock {
    pub resnets: Vec<WanResidualBlock>,
    pub upsamplers: Vec<WanResample>,
    /// `avg_shortcut` (a DupUp3D): output channels, factor_t, factor_s.
    pub avg_shortcut: Option<(usize, usize, usize)>,
}

/// `WanDecoder3d`.
pub struct WanDecoder3d {
    pub conv_in: WanCausalConv3d,
    pub mid_block: WanMidBlock,
    pub up_blocks: Vec<WanUpBlock>,
    pub norm_out: WanRmsNorm,
    pub conv_out: WanCausalConv3d,
}

impl WanDecoder3d {
    fn new(gpu: &Gpu, w: &Weights, cfg: &WanVaeConfig) -> Result<Self> {
        let levels = cfg.dim_mult.len();
        let dims = cfg.decoder_dims();
        let temperal_upsample = cfg.temporal_upsample();
        let conv =
            |w: &Weights, ci, co| WanCausalConv3d::new(gpu, w, ci, co, [3; 3], [1; 3], [1; 3]);
        let mut up_blocks = Vec::new();
        for i in 0..levels {
            // Wan 2.1: the previous block's upsampler halved the channels
            // (Wan 2.2's keep them).
            let cin = if i > 0 && !cfg.is_residual {
                dims[i] / 2
            } else {
                dims[i]
            };
            let cout = dims[i + 1];
            let b = w.pp("up_blocks").pp(i);
            let resnets = (0..cfg.num_res_blocks + 1)
                .map(|j| {
                    let ci = if j == 0 { cin } else { cout };
                    WanResidualBlock::new(gpu, &b.pp("resnets").pp(j), ci, cout)
                })
                .collect::<Result<Vec<_>>>()?;
            let up = i + 1 != levels;
            let upsamplers = if up {
                let mode = if temperal_upsample[i] {
                    ResampleMode::Upsample3d
                } else {
                    ResampleMode::Upsample2d
                };
                vec![match cfg.is_residual {
                    true => WanResample::new(gpu, &b.pp("upsampler"), cout, mode, cout)?,
                    false => {
                        WanResample::new(gpu, &b.pp("upsamplers").pp(0), cout, mode, cout / 2)?
                    }
                }]
            } else {
                vec![]
            };
            let factor_t = if up && temperal_upsample[i] { 2 } else { 1 };
            up_blocks.push(WanUpBlock {
                resnets,
                upsamplers,
                avg_shortcut: (cfg.is_residual && up).then_some((cout, factor_t, 2)),
            });
        }
        let out_dim = dims[levels];
        Ok(WanDecoder3d {
            conv_in: conv(&w.pp("conv_in"), cfg.z_dim, dims[0])?,
            mid_block: WanMidBlock::new(gpu, &w.pp("mid_block"), dims[0])?,
            up_blocks,
            norm_out: WanRmsNorm::new(gpu, &w.pp("norm_out"), out_dim, false)?,
            conv_out: conv(&w.pp("conv_out"), out_dim, cfg.out_channels)?,
        })
    }

    /// `first_chunk`: the first latent frame (Wan 2.2's DupUp3D shortcuts
    /// keep one frame of it, as the causal convolutions do).
    fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        cache: &mut FeatureCache,
        first_chunk: bool,
    ) -> Result<Tensor> {
        cache.start_chunk();
        let mut h = cached_conv(gpu, &self.conv_in, x, cache, None)?;
        h = self.mid_block.forward(gpu, &h, cache)?;
        // The blocks after the last temporal upsampling keep the frame
        // count, and they are the full-resolution ones: run them a frame at
        // a time, so that only one frame of their activations is live (at
        // 832x480, four frames of the last level's are over a gigabyte).
        // Frame by frame is the same arithmetic: each causal convolution's
        // feature cache holds the frames before, as between chunks.
        let per_frame = self
            .up_blocks
            .iter()
            .rposition(|b| {
                b.upsamplers
                    .iter()
                    .any(|u| u.mode == ResampleMode::Upsample3d)
            })
            .map_or(0, |i| i + 1);
        for block in &self.up_blocks[..per_frame] {
            h = block.forward(gpu, &h, cache, first_chunk)?;
        }
        let frames = h.shape()[0];
        if frames == 1 {
            return self.forward_tail(gpu, &h, cache, per_frame, first_chunk);
        }
        let first_slot = cache.idx;
        let mut outputs = Vec::with_capacity(frames);
        for t in 0..frames {
            // Every frame visits the same cache slots, in order.
            cache.idx = first_slot;
            let frame = layout::narrow_rows(gpu, &h, t, 1)?;
            outputs.push(self.forward_tail(gpu, &frame, cache, per_frame, first_chunk)?);
        }
        drop(h);
        layout::concat_rows(gpu, &outputs.iter().collect::<Vec<_>>())
    }

    /// Up blocks `from..`, `norm_out` and `conv_out`.
    fn forward_tail(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        cache: &mut FeatureCache,
        from: usize,
        first_chunk: bool,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for block in &self.up_blocks[from..] {
            h = block.forward(gpu, &h, cache, first_chunk)?;
        }
        h = self.norm_out.forward(gpu, &h, true)?;
        cached_conv(gpu, &self.conv_out, &h, cache, None)
    }
}

impl WanUpBlock {
    fn forward(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        cache: &mut FeatureCache,
        first_chunk: bool,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(gpu, &h, cache)?;
        }
        for up in &self.upsamplers {
            h = up.forward(gpu, &h, cache)?;
        }
        match self.avg_shortcut {
            Some((out, factor_t, factor_s)) => {
                let shortcut = dup_up_3d(gpu, x, out, factor_t, factor_s, first_chunk)?;
                ops::add(gpu, &h, &shortcut)
            }
            None => Ok(h),
        }
    }
}

/// The encoder's output: a diagonal Gaussian per latent position, of the
/// raw latent (before the pipeline's mean/std normalisation).
pub struct WanPosterior {
    /// [N, z, f, h, w].
    pub mean: Tensor,
    /// [N, z, f, h, w], clamped to [-30, 20] as diffusers'
    /// `DiagonalGaussianDistribution` does.
    pub logvar: Tensor,
}

/// diffusers' spatial tiling of the decoder (`enable_tiling`): tiles of
/// `tile_sample_min_*` pixels every `tile_sample_stride_*` pixels, each
/// decoded whole (all frames, its own feature cache) and blended linearly
/// with the tiles above and to the left over the overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WanTiling {
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_sample_stride_height: usize,
    pub tile_sample_stride_width: usize,
}

impl Default for WanTiling {
    /// diffusers' defaults: 256-pixel tiles every 192 pixels.
    fn default() -> Self {
        WanTiling {
            tile_sample_min_height: 256,
            tile_sample_min_width: 256,
            tile_sample_stride_height: 192,
            tile_sample_stride_width: 192,
        }
    }
}

/// A decoded video on the CPU: values and [N, C, F, H, W].
#[derive(Debug, Clone)]
pub struct Video {
    pub data: Vec<f32>,
    pub shape: [usize; 5],
}

/// `AutoencoderKLWan`.
pub struct AutoencoderKLWan {
    pub config: WanVaeConfig,
    pub encoder: WanEncoder3d,
    pub quant_conv: WanCausalConv3d,
    pub post_quant_conv: WanCausalConv3d,
    pub decoder: WanDecoder3d,
}

impl AutoencoderKLWan {
    pub fn new(gpu: &Gpu, w: &Weights, config: WanVaeConfig) -> Result<Self> {
        let z = config.z_dim;
        let one =
            |name: &str, c| WanCausalConv3d::new(gpu, &w.pp(name), c, c, [1; 3], [1; 3], [0; 3]);
        Ok(AutoencoderKLWan {
            encoder: WanEncoder3d::new(gpu, &w.pp("encoder"), &config)?,
            quant_conv: one("quant_conv", 2 * z)?,
            post_quant_conv: one("post_quant_conv", z)?,
            decoder: WanDecoder3d::new(gpu, &w.pp("decoder"), &config)?,
            config,
        })
    }

    /// Loads a `vae/` folder: `config.json` and its safetensors weights.
    pub fn load(gpu: &Gpu, dir: &Path) -> Result<Self> {
        let config = WanVaeConfig::load(&dir.join("config.json"))?;
        let set = crate::weights::WeightSet::open_dir(dir)?;
        let w = Weights::new(std::sync::Arc::new(set), gpu.precision());
        Self::new(gpu, &w, config)
    }

    fn check_video_shape(&self, op: &'static str, video: &Tensor) -> Result<()> {
        let s = video.shape();
        let sf = self.config.spatial_scale_factor();
        let expected = |what: String| EngineError::Shape {
            op,
            expected: what,
            found: fmt_shape(s),
        };
        if s.len() != 5 || s[1] != self.config.video_channels() {
            return Err(expected(format!(
                "video [N, {}, F, H, W] in [-1, 1]",
                self.config.video_channels()
            )));
        }
        let frames = s[2];
        if frames == 0 || !(frames - 1).is_multiple_of(ENCODE_CHUNK) {
            let below = (frames.max(1) - 1) / ENCODE_CHUNK * ENCODE_CHUNK + 1;
            return Err(expected(format!(
                "1 + 4k frames (frame 0 is encoded alone, then chunks of 4): pass {below} or {} frames",
                below + ENCODE_CHUNK
            )));
        }
        let (h, w) = (s[3], s[4]);
        if h == 0 || w == 0 || !h.is_multiple_of(sf) || !w.is_multiple_of(sf) {
            let round = |v: usize| (v / sf).max(1) * sf;
            return Err(expected(format!(
                "height and width multiples of {sf}: pass {}x{} (HxW)",
                round(h),
                round(w)
            )));
        }
        Ok(())
    }

    /// Encodes a video [N, C, F, H, W] in [-1, 1] (F = 1 + 4k) to the raw
    /// latent's posterior, as diffusers' `encode(x).latent_dist`: frame 0
    /// alone, then chunks of 4 frames through the feature cache.
    pub fn encode(&self, gpu: &Gpu, video: &Tensor) -> Result<WanPosterior> {
        self.check_video_shape("AutoencoderKLWan.encode", video)?;
        let n = video.shape()[0];
        let frames_total = video.shape()[2];
        let z = self.config.z_dim;
        let p = self.config.patch();
        let (mut means, mut logvars) = (Vec::new(), Vec::new());
        for item in 0..n {
            let mut cache = FeatureCache::default();
            let mut chunks = Vec::new();
            let mut start = 0;
            while start < frames_total {
                let len = if start == 0 { 1 } else { ENCODE_CHUNK };
                let x = patchify(gpu, &frames_of(gpu, video, item, start, len)?, p)?;
                let h = self.encoder.forward(gpu, &x, &mut cache)?;
                chunks.push(self.quant_conv.forward(gpu, &h, &[], None)?);
                start += len;
            }
            let enc = layout::concat_rows(gpu, &chunks.iter().collect::<Vec<_>>())?;
            let f = enc.shape()[0];
            let mean = layout::narrow(gpu, &enc, 1, 0, z)?;
            let logvar = layout::narrow(gpu, &enc, 1, z, z)?;
            let logvar = ops::elementwise::clamp(gpu, &logvar, -30.0, 20.0)?;
            means.push(layout::frames_to_video(gpu, &mean, f)?);
            logvars.push(layout::frames_to_video(gpu, &logvar, f)?);
        }
        let stack = |v: &[Tensor]| layout::concat(gpu, &v.iter().collect::<Vec<_>>(), 0);
        Ok(WanPosterior {
            mean: stack(&means)?,
            logvar: stack(&logvars)?,
        })
    }

    fn check_latents_shape(&self, op: &'static str, latents: &Tensor) -> Result<()> {
        let s = latents.shape();
        if s.len() != 5 || s[1] != self.config.z_dim || s[2] == 0 {
            return Err(EngineError::Shape {
                op,
                expected: format!("raw latents [N, {}, f >= 1, h, w]", self.config.z_dim),
                found: fmt_shape(s),
            });
        }
        Ok(())
    }

    /// Decodes raw latents [N, z, f, h, w] (already un-normalised, see
    /// [`Self::denormalize_latents`]) chunk by chunk, as diffusers' `_decode`:
    /// one latent frame at a time through the feature cache. `sink` gets
    /// (batch item, index of the chunk's first frame, frames [Tc, C, H, W]
    /// clamped to [-1, 1]) as each chunk is ready; only the cache and one
    /// chunk are held on the device.
    pub fn decode_chunks(
        &self,
        gpu: &Gpu,
        latents: &Tensor,
        sink: impl FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        self.decode_chunks_with(gpu, latents, true, sink)
    }

    fn decode_chunks_with(
        &self,
        gpu: &Gpu,
        latents: &Tensor,
        clamp: bool,
        mut sink: impl FnMut(usize, usize, Tensor) -> Result<()>,
    ) -> Result<()> {
        self.check_latents_shape("AutoencoderKLWan.decode", latents)?;
        let (n, f) = (latents.shape()[0], latents.shape()[2]);
        for item in 0..n {
            let mut cache = FeatureCache::default();
            let mut first = 0;
            for i in 0..f {
                // post_quant_conv is 1x1x1: per latent frame, like the rest.
                let x = frames_of(gpu, latents, item, i, 1)?;
                let x = self.post_quant_conv.forward(gpu, &x, &[], None)?;
                let out = self.decoder.forward(gpu, &x, &mut cache, i == 0)?;
                let mut out = unpatchify(gpu, &out, self.config.patch())?;
                if clamp {
                    out = ops::elementwise::clamp(gpu, &out, -1.0, 1.0)?;
                }
                if i == 0 {
                    // The first chunk's shapes (one frame where the next
                    // chunks have four) do not come again: its free
                    // buffers go back to the driver rather than sit in
                    // the pool beside the next chunks' (gigabytes at 832x480).
                    gpu.trim_pool();
                }
                let len = out.shape()[0];
                sink(item, first, out)?;
                first += len;
            }
        }
        Ok(())
    }

    /// `vae.decode(latents).sample`: raw latents [N, z, f, h, w] → video
    /// [N, C, F, H, W] in [-1, 1], F = 1 + 4(f − 1) for Wan 2.1.
    pub fn decode(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        self.decode_whole(gpu, latents, true)
    }

    /// The chunks of every item gathered into [N, C, F, H, W].
    fn decode_whole(&self, gpu: &Gpu, latents: &Tensor, clamp: bool) -> Result<Tensor> {
        let n = latents.shape().first().copied().unwrap_or(0);
        let mut items: Vec<Vec<Tensor>> = (0..n).map(|_| Vec::new()).collect();
        self.decode_chunks_with(gpu, latents, clamp, |item, _, chunk| {
            items[item].push(chunk);
            Ok(())
        })?;
        let videos = items
            .iter()
            .map(|chunks| {
                let frames = layout::concat_rows(gpu, &chunks.iter().collect::<Vec<_>>())?;
                let f = frames.shape()[0];
                layout::frames_to_video(gpu, &frames, f)
            })
            .collect::<Result<Vec<_>>>()?;
        layout::concat(gpu, &videos.iter().collect::<Vec<_>>(), 0)
    }

    /// The latents the pipeline's denoiser works on → raw latents for
    /// [`Self::decode`]: diffusers' `latents / (1 / std) + mean`, per
    /// channel of [N, z, f, h, w].
    pub fn denormalize_latents(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        self.check_latents_shape("AutoencoderKLWan.denormalize_latents", latents)?;
        let std = self.per_channel(gpu, &self.config.latents_std, latents)?;
        let mean = self.per_channel(gpu, &self.config.latents_mean, latents)?;
        ops::add(gpu, &ops::mul(gpu, latents, &std)?, &mean)
    }

    /// Raw latents from [`Self::encode`] → the denoiser's domain, the
    /// inverse: `(latents − mean) · (1 / std)`.
    pub fn normalize_latents(&self, gpu: &Gpu, latents: &Tensor) -> Result<Tensor> {
        self.check_latents_shape("AutoencoderKLWan.normalize_latents", latents)?;
        let neg_mean: Vec<f32> = self.config.latents_mean.iter().map(|m| -m).collect();
        let inv_std: Vec<f32> = self.config.latents_std.iter().map(|s| 1.0 / s).collect();
        let neg_mean = self.per_channel(gpu, &neg_mean, latents)?;
        let inv_std = self.per_channel(gpu, &inv_std, latents)?;
        ops::mul(gpu, &ops::add(gpu, latents, &neg_mean)?, &inv_std)
    }

    fn per_channel(&self, gpu: &Gpu, values: &[f32], like: &Tensor) -> Result<Tensor> {
        Tensor::from_f32(gpu, values, &[1, values.len(), 1, 1, 1], like.dtype())
    }

    /// [`Self::decode`] with diffusers' spatial tiling: when the latents
    /// are larger than one tile (`tile_sample_min_* / 8` latent pixels),
    /// tiles are decoded one at a time and blended on the CPU (exactly
    /// diffusers' `tiled_decode`, in-place blending order included); else
    /// one plain decode. Returns the clamped video on the CPU.
    pub fn tiled_decode(&self, gpu: &Gpu, latents: &Tensor, tiling: &WanTiling) -> Result<Video> {
        self.check_latents_shape("AutoencoderKLWan.tiled_decode", latents)?;
        let sf = self.config.spatial_scale_factor();
        let s = latents.shape().to_vec();
        let (h, w) = (s[3], s[4]);
        let (min_h, min_w) = (
            tiling.tile_sample_min_height / sf,
            tiling.tile_sample_min_width / sf,
        );
        let (stride_h, stride_w) = (
            tiling.tile_sample_stride_height / sf,
            tiling.tile_sample_stride_width / sf,
        );
        if min_h == 0 || min_w == 0 || stride_h == 0 || stride_w == 0 {
            return Err(EngineError::Argument {
                op: "AutoencoderKLWan.tiled_decode",
                message: format!(
                    "tile sizes and strides must be at least {sf} pixels (one latent pixel): {tiling:?}"
                ),
            });
        }
        let download = |t: &Tensor| -> Result<Video> {
            let sh = t.shape();
            Ok(Video {
                data: t.to_f32(gpu)?,
                shape: [sh[0], sh[1], sh[2], sh[3], sh[4]],
            })
        };
        if h <= min_h && w <= min_w {
            return download(&self.decode(gpu, latents)?);
        }
        // Tiles are decoded unclamped: diffusers blends, then clamps.
        let mut rows: Vec<Vec<Video>> = Vec::new();
        for i in (0..h).step_by(stride_h) {
            let mut row = Vec::new();
            for j in (0..w).step_by(stride_w) {
                let tile = layout::narrow(gpu, latents, 3, i, min_h.min(h - i))?;
                let tile = layout::narrow(gpu, &tile, 4, j, min_w.min(w - j))?;
                row.push(download(&self.decode_whole(gpu, &tile, false)?)?);
            }
            rows.push(row);
        }
        let blend_h = tiling
            .tile_sample_min_height
            .saturating_sub(tiling.tile_sample_stride_height);
        let blend_w = tiling
            .tile_sample_min_width
            .saturating_sub(tiling.tile_sample_stride_width);
        for i in 0..rows.len() {
            for j in 0..rows[i].len() {
                if i > 0 {
                    let (above, this) = rows.split_at_mut(i);
                    blend(&above[i - 1][j], &mut this[0][j], blend_h, 3);
                }
                if j > 0 {
                    let (left, this) = rows[i].split_at_mut(j);
                    blend(&left[j - 1], &mut this[0], blend_w, 4);
                }
            }
        }
        let (sample_h, sample_w) = (h * sf, w * sf);
        let (crop_h, crop_w) = (
            tiling.tile_sample_stride_height,
            tiling.tile_sample_stride_width,
        );
        let [n, c, f, _, _] = rows[0][0].shape;
        let (out_h, out_w) = (
            sample_h.min(rows.iter().map(|r| r[0].shape[3].min(crop_h)).sum()),
            sample_w.min(rows[0].iter().map(|t| t.shape[4].min(crop_w)).sum()),
        );
        let mut data = vec![0f32; n * c * f * out_h * out_w];
        let mut y0 = 0;
        for row in &rows {
            let mut x0 = 0;
            for t in row {
                let [_, _, _, th, tw] = t.shape;
                let (ch, cw) = (th.min(crop_h), tw.min(crop_w));
                for plane in 0..n * c * f {
                    for y in 0..ch.min(out_h.saturating_sub(y0)) {
                        let cols = cw.min(out_w.saturating_sub(x0));
                        let src = (plane * th + y) * tw;
                        let dst = (plane * out_h + y0 + y) * out_w + x0;
                        for (d, v) in data[dst..dst + cols]
                            .iter_mut()
                            .zip(&t.data[src..src + cols])
                        {
                            *d = v.clamp(-1.0, 1.0);
                        }
                    }
                }
                x0 += cw;
            }
            y0 += row[0].shape[3].min(crop_h);
        }
        Ok(Video {
            data,
            shape: [n, c, f, out_h, out_w],
        })
    }
}

/// diffusers' `blend_v` (dim 3, rows) / `blend_h` (dim 4, columns) on
/// [N, C, F, H, W]: the first `extent` rows (columns) of `b` fade in from
/// the last `extent` of `a`; the weights are Python floats, applied in f32.
fn blend(a: &Video, b: &mut Video, extent: usize, dim: usize) {
    let [n, c, f, ah, aw] = a.shape;
    let [_, _, _, bh, bw] = b.shape;
    let extent = if dim == 3 {
        extent.min(ah).min(bh)
    } else {
        extent.min(aw).min(bw)
    };
    for plane in 0..n * c * f {
        for k in 0..extent {
            let wa = (1.0 - k as f64 / extent as f64) as f32;
            let wb = (k as f64 / extent as f64) as f32;
            if dim == 3 {
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

#[cfg(test)]
mod tests {
    use super::{blend, Video};

    fn video(h: usize, w: usize, value: f32) -> Video {
        Video {
            data: vec![value; 2 * h * w],
            shape: [1, 1, 2, h, w],
        }
    }

    #[test]
    fn blend_fades_linearly_from_the_previous_tile() {
        // diffusers' blend_v / blend_h: row (column) k of the overlap is
        // a · (1 − k/e) + b · k/e; the rest of b is untouched.
        let a = video(4, 3, 1.0);
        let mut b = video(5, 3, 0.0);
        blend(&a, &mut b, 4, 3);
        for plane in 0..2 {
            for y in 0..5 {
                let want = if y < 4 { 1.0 - y as f32 / 4.0 } else { 0.0 };
                for x in 0..3 {
                    assert_eq!(b.data[(plane * 5 + y) * 3 + x], want, "row {y}");
                }
            }
        }
        let a = video(2, 6, 2.0);
        let mut b = video(2, 4, 0.0);
        // The extent is capped by the narrower tile.
        blend(&a, &mut b, 8, 4);
        for x in 0..4 {
            assert_eq!(b.data[x], 2.0 * (1.0 - x as f32 / 4.0), "column {x}");
        }
    }
}
