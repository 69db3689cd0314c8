//! Image animation: the still, VAE-encoded, seeds every frame at
//! `strength` (img2img) and anchors the first frame at every step,
//! re-noised to the step's level.

use super::AnimateDiff;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::latent;
use crate::pipelines::image::{image_to_chw, RgbImage};
use crate::schedulers::Scheduler;
use crate::tensor::{DType, Tensor};

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

    /// The still and its noise on the GPU, [C, h, w] each, for the steps.
    pub fn upload(&self, gpu: &Gpu, (c, h, w): (usize, usize, usize)) -> Result<DeviceAnchor> {
        let upload = |v: &[f32]| Tensor::from_f32(gpu, v, &[c, h, w], DType::F32);
        Ok(DeviceAnchor {
            still: upload(&self.still)?,
            noise0: upload(&self.noise0)?,
        })
    }
}

/// [`Anchor`]'s still and noise on the GPU.
pub(super) struct DeviceAnchor {
    still: Tensor,
    noise0: Tensor,
}

impl DeviceAnchor {
    /// `latents` [C, F, h, w] (f32) with frame 0 the still at the next
    /// step's noise level (`next`; the clean still after the last step).
    pub fn apply(
        &self,
        gpu: &Gpu,
        scheduler: &Scheduler,
        latents: &Tensor,
        next: Option<f64>,
    ) -> Result<Tensor> {
        let target = match next {
            Some(next) => {
                let program = scheduler.add_noise_program(next)?;
                latent::run_program(gpu, &program, &[&self.still, &self.noise0])?.swap_remove(0)
            }
            None => self.still.clone(),
        };
        latent::put_frame(gpu, latents, 0, &target)
    }
}
