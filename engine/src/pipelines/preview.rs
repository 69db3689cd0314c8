//! Previews of the x0 estimate while a clip denoises, for every family: a
//! linear latent → RGB projection (the model card's `latent_rgb_factors`
//! and `latent_rgb_bias`, else a fit for the VAE's latent space), run on the
//! GPU, read back as RGB8 or written straight into a window's textures.

use super::FrameTextures;
use super::Preview;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::tensor::{DType, Tensor};

/// SD1.x latent → RGB factors for previews (4 × 3, then a bias), the
/// widely used linear fit of the SD VAE decoder's mean colour.
const SD_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// A model's latent → RGB projection: one row of 3 factors per latent
/// channel, then a bias; RGB comes out in [-1, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct LatentRgb {
    pub factors: Vec<[f32; 3]>,
    pub bias: [f32; 3],
}

impl LatentRgb {
    /// The card's factors where they have one row per latent channel; else
    /// SD's fit for 4 channels, or a grey mean of the channels.
    pub fn new(card: Option<(Vec<[f32; 3]>, [f32; 3])>, latent_channels: usize) -> Self {
        match card.filter(|(f, _)| f.len() == latent_channels) {
            Some((factors, bias)) => LatentRgb { factors, bias },
            None if latent_channels == 4 => LatentRgb {
                factors: SD_LATENT_RGB.to_vec(),
                bias: [0.0; 3],
            },
            None => LatentRgb {
                factors: vec![[1.0 / latent_channels as f32; 3]; latent_channels],
                bias: [0.0; 3],
            },
        }
    }

    /// x0 latents [C, F, h, w] → RGB8 preview frames at latent size, on the
    /// GPU (channels last, then one [C → 3] linear layer), mapped from
    /// [-1, 1] to bytes.
    pub fn preview(
        &self,
        gpu: &Gpu,
        x0: &[f32],
        frames: usize,
        h: usize,
        w: usize,
    ) -> Result<Preview> {
        let c = self.factors.len();
        let latents = Tensor::from_f32(gpu, x0, &[c, frames, h, w], DType::F32)?;
        self.preview_of(gpu, &latents)
    }

    /// [`LatentRgb::preview`] of x0 latents already on the GPU, [C, F, h, w]
    /// f32: only the RGB8 frames come back.
    pub fn preview_of(&self, gpu: &Gpu, latents: &Tensor) -> Result<Preview> {
        let (c, frames, h, w) = self.check_latents(latents)?;
        let pixels = crate::ops::layout::permute(gpu, latents, &[1, 2, 3, 0])?
            .reshape(&[frames * h * w, c])?;
        let weight: Vec<f32> = (0..3)
            .flat_map(|k| self.factors.iter().map(move |row| row[k]))
            .collect();
        let weight = Tensor::from_f32(gpu, &weight, &[3, c], DType::F32)?;
        let bias = Tensor::from_f32(gpu, &self.bias, &[3], DType::F32)?;
        let rgb = crate::ops::matmul::linear(
            gpu,
            &pixels,
            &weight,
            Some(&bias),
            crate::ops::Activation::None,
        )?
        .to_f32(gpu)?;
        let frames_rgb = rgb
            .chunks(h * w * 3)
            .map(|f| {
                f.iter()
                    .map(|&v| ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
                    .collect()
            })
            .collect();
        Ok(Preview {
            width: w,
            height: h,
            frames: frames_rgb,
        })
    }

    /// The previews of [`LatentRgb::preview`] written into `target`'s
    /// layers by a compute shader, without leaving the GPU.
    pub fn to_textures(
        &self,
        gpu: &Gpu,
        x0: &[f32],
        frames: usize,
        h: usize,
        w: usize,
        target: &FrameTextures,
    ) -> Result<()> {
        let c = self.factors.len();
        let latents = Tensor::from_f32(gpu, x0, &[c, frames, h, w], DType::F32)?;
        crate::ops::preview::latent_rgb_to_textures(gpu, &latents, &self.factors, self.bias, target)
    }

    /// The latent shape (C, F, h, w) of x0 latents for a preview: C equal to
    /// the projection's rows.
    fn check_latents(&self, latents: &Tensor) -> Result<(usize, usize, usize, usize)> {
        let s = latents.shape();
        if s.len() != 4 || s[0] != self.factors.len() || latents.dtype() != DType::F32 {
            return Err(crate::error::EngineError::Shape {
                op: "latent preview",
                expected: format!("f32 latents [{}, F, h, w]", self.factors.len()),
                found: format!("{} {}", latents.dtype(), crate::tensor::fmt_shape(s)),
            });
        }
        Ok((s[0], s[1], s[2], s[3]))
    }

    /// The CPU reference of [`LatentRgb::preview`] and
    /// [`LatentRgb::to_textures`]: per frame, [h, w, 3] in [-1, 1].
    pub fn reference(&self, x0: &[f32], frames: usize, h: usize, w: usize) -> Vec<Vec<f32>> {
        let c = self.factors.len();
        (0..frames)
            .map(|fi| {
                (0..h * w * 3)
                    .map(|i| {
                        let (p, k) = (i / 3, i % 3);
                        self.bias[k]
                            + (0..c)
                                .map(|ch| self.factors[ch][k] * x0[(ch * frames + fi) * h * w + p])
                                .sum::<f32>()
                    })
                    .collect()
            })
            .collect()
    }
}

/// A run's step previews: RGB8 read back when the request asks for
/// `previews`, and textures rewritten every step for `gpu_previews` (made
/// on the first step, kept for the run).
#[derive(Default)]
pub(crate) struct StepPreviews {
    pub textures: Option<FrameTextures>,
}

impl StepPreviews {
    /// This step's previews of x0 [C, F, h, w] (f32, on the GPU: both
    /// previews read the same tensor): the RGB8 frames if `rgb`, and the
    /// textures rewritten if `textures`.
    pub fn update(
        &mut self,
        gpu: &Gpu,
        projection: &LatentRgb,
        x0: &Tensor,
        rgb: bool,
        textures: bool,
    ) -> Result<Option<Preview>> {
        let preview = match rgb {
            true => Some(projection.preview_of(gpu, x0)?),
            false => None,
        };
        if textures {
            let (_, f, h, w) = projection.check_latents(x0)?;
            let target = match self.textures.take() {
                Some(t) => t,
                None => FrameTextures::new(gpu, w, h, f)?,
            };
            crate::ops::preview::latent_rgb_to_textures(
                gpu,
                x0,
                &projection.factors,
                projection.bias,
                &target,
            )?;
            self.textures = Some(target);
        }
        Ok(preview)
    }
}
