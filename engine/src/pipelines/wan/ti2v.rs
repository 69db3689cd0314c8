//! Wan 2.2 TI2V-5B: one model for text-to-video and image-to-video, a
//! `WanPipeline` folder with `expand_timesteps` in model_index.json, a
//! 48-channel transformer without an image branch and the Wan 2.2 VAE
//! (16x spatial: sizes are multiples of 32 with the 2x2 patch).
//!
//! Text-to-video is diffusers' `WanPipeline` with `expand_timesteps`: every
//! token gets the step's timestep, which is the same arithmetic as one
//! timestep per item, so the step loop runs unchanged.
//!
//! Image-to-video is `WanImageToVideoPipeline` with `expand_timesteps` and
//! no image encoder: the still, resized to the clip, is encoded by the VAE
//! alone (one frame) and normalised; each step the transformer reads the
//! latents with their first frame replaced by it, and its tokens get
//! timestep 0 (the frame is clean) while the others get t. The scheduler
//! still steps all frames; the first is replaced again before decoding.

use super::Wan;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::pipelines::image::{pil_resize, to_rgb8, PilFilter};
use crate::pipelines::{ModelDefaults, Request};
use crate::tensor::Tensor;

/// The TI2V-5B repository's published settings: 1280x704, 121 frames
/// (5 s at 24 fps), 50 steps, guidance 5.
pub(super) fn ti2v_defaults() -> ModelDefaults {
    ModelDefaults {
        width: 1280,
        height: 704,
        frames: 121,
        steps: 50,
        guidance: 5.0,
        fps: 24.0,
        negative: String::new(),
        camera_prompts: Default::default(),
    }
}

impl Wan {
    /// The normalised latent of the request's still, [z, 1, h, w] on the
    /// CPU, for a TI2V model given `--image` (None otherwise): diffusers'
    /// `prepare_latents` with `expand_timesteps` encodes the image alone as
    /// a one-frame video and takes the posterior mean.
    pub(super) fn first_frame_condition(
        &self,
        gpu: &Gpu,
        req: &Request,
    ) -> Result<Option<Vec<f32>>> {
        let Some(still) = req.image.as_ref().filter(|_| self.expand_timesteps) else {
            return Ok(None);
        };
        // VaeImageProcessor.preprocess: Pillow LANCZOS to the clip's size on
        // bytes, then x / 255 · 2 − 1.
        let (w, h) = (req.width, req.height);
        let rgb = pil_resize(
            &to_rgb8(still),
            (still.width, still.height),
            (w, h),
            PilFilter::Lanczos,
        );
        let plane = w * h;
        let mut video = vec![0f32; 3 * plane];
        for p in 0..plane {
            for c in 0..3 {
                video[c * plane + p] = 2.0 * (f32::from(rgb[p * 3 + c]) / 255.0) - 1.0;
            }
        }
        let video = Tensor::from_f32(gpu, &video, &[1, 3, 1, h, w], gpu.precision())?;
        let encoded = self.vae.encode(gpu, &video)?.mean;
        let latent = self.vae.normalize_latents(gpu, &encoded)?.to_f32(gpu)?;
        gpu.trim_pool();
        Ok(Some(latent))
    }
}

/// `(1 − mask) · condition + mask · latents` with the mask 0 on the first
/// latent frame and 1 elsewhere: latents [z, f, hw] with frame 0 of every
/// channel replaced by `condition` [z, 1, hw].
pub(super) fn with_first_frame(
    latents: &[f32],
    condition: &[f32],
    channels: usize,
    frames: usize,
) -> Vec<f32> {
    let hw = condition.len() / channels;
    let mut out = latents.to_vec();
    for c in 0..channels {
        let at = c * frames * hw;
        out[at..at + hw].copy_from_slice(&condition[c * hw..(c + 1) * hw]);
    }
    out
}

/// The per-token timesteps of one item, token order (f, h, w): 0 on the
/// first latent frame's `tokens_per_frame` tokens, `t` on the rest (the
/// pipeline's `mask[:, ::2, ::2] · t` flattened).
pub(super) fn token_timesteps(t: f32, frames: usize, tokens_per_frame: usize) -> Vec<f32> {
    let mut ts = vec![t; frames * tokens_per_frame];
    ts[..tokens_per_frame].fill(0.0);
    ts
}
