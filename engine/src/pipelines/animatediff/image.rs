//! Image animation: the still, VAE-encoded, seeds every frame at
//! `strength` (img2img) and anchors the first frame at every step,
//! re-noised to the step's level.

use super::AnimateDiff;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::pipelines::image::{image_to_chw, RgbImage};
use crate::schedulers::Scheduler;
use crate::tensor::Tensor;

impl AnimateDiff {
    /// The still as latents [C, h, w] (posterior mean × scaling factor).
    pub(super) fn encode_image(
        &self,
        gpu: &Gpu,
        image: &RgbImage,
        width: usize,
        height: usize,
    ) -> Result<Vec<f32>> {
        let chw = image_to_chw(image, width, height);
        let t = Tensor::from_f32(gpu, &chw, &[1, 3, height, width], gpu.precision())?;
        let post = self.vae.encode(gpu, &t)?;
        let scale = self.vae.config.scaling_factor;
        Ok(post.mean.to_f32(gpu)?.iter().map(|v| v * scale).collect())
    }
}

/// The still `z0` [C, h, w] and frame 0's initial noise, for anchoring.
pub(super) struct Anchor {
    still: Vec<f32>,
    noise0: Vec<f32>,
}

impl Anchor {
    /// `noise` is the clip's initial noise [C, F, h, w].
    pub fn new(still: Vec<f32>, noise: &[f32], (c, f, hw): (usize, usize, usize)) -> Self {
        let noise0 = (0..c)
            .flat_map(|ch| noise[ch * f * hw..ch * f * hw + hw].to_vec())
            .collect();
        Anchor { still, noise0 }
    }

    /// The first latents: every frame the still, noised to `timestep`.
    pub fn start(
        &self,
        scheduler: &Scheduler,
        noise: &[f32],
        timestep: f64,
        (c, f, hw): (usize, usize, usize),
    ) -> Result<Vec<f32>> {
        let mut init = vec![0f32; c * f * hw];
        for ch in 0..c {
            for fi in 0..f {
                let o = (ch * f + fi) * hw;
                init[o..o + hw].copy_from_slice(&self.still[ch * hw..(ch + 1) * hw]);
            }
        }
        scheduler.add_noise(&init, noise, timestep)
    }

    /// Sets frame 0 of `latents` to the still at the next step's noise
    /// level (`next`; the clean still after the last step).
    pub fn apply(
        &self,
        scheduler: &Scheduler,
        latents: &mut [f32],
        next: Option<f64>,
        (c, f, hw): (usize, usize, usize),
    ) -> Result<()> {
        let target = match next {
            Some(next) => scheduler.add_noise(&self.still, &self.noise0, next)?,
            None => self.still.clone(),
        };
        for ch in 0..c {
            let o = ch * f * hw;
            latents[o..o + hw].copy_from_slice(&target[ch * hw..(ch + 1) * hw]);
        }
        Ok(())
    }
}
