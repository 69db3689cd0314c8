//! Wan 2.1 image-to-video, as diffusers' `WanImageToVideoPipeline`: the
//! still (and for first-last frame the last one) → CLIP `hidden_states[-2]`
//! for the transformer's image cross-attention; and the conditioning video
//! (the still, then zeros, [then the last still]) encoded by the VAE,
//! normalised, behind a 4-channel frame mask, as the 20 channels the
//! transformer reads beside the 16 of the noisy latents. Wan 2.2 A14B I2V
//! reads the same 20 channels but has no image encoder (no image tokens).

use std::path::Path;

use super::{component, transformer_config_path, Wan};
use crate::error::{LoadError, Result};
use crate::gpu::Gpu;
use crate::models::clip_vision::{ClipVisionConfig, ClipVisionModel};
use crate::models::source::Part;
use crate::models::wan_transformer::WanTransformerConfig;
use crate::pipelines::argument;
use crate::pipelines::image::{
    pil_resize, to_rgb8, ClipImageProcessor, PilFilter, RgbImage, MIN_IMAGE_SIDE,
};
use crate::pipelines::Request;
use crate::tensor::Tensor;
use crate::weights::Weights;

/// The image encoder and its processor of an image-to-video folder.
pub struct ImageConditioning {
    pub encoder: ClipVisionModel,
    pub processor: ClipImageProcessor,
}

impl ImageConditioning {
    pub fn load(gpu: &Gpu, dir: &Path) -> Result<Self> {
        let encoder = ClipVisionModel::from_dir(
            gpu,
            &component(dir, "image_encoder", "the CLIP vision encoder")?,
        )?;
        let processor_dir = component(dir, "image_processor", "preprocessor_config.json")?;
        let processor = ClipImageProcessor::load(&processor_dir.join("preprocessor_config.json"))?;
        let (h, w) = processor.output_size();
        let size = encoder.config.image_size;
        if (h, w) != (size, size) {
            return Err(LoadError::Config {
                path: processor_dir.join("preprocessor_config.json"),
                message: format!(
                    "crop_size {h}x{w} differs from the image encoder's image_size {size}"
                ),
            }
            .into());
        }
        Ok(ImageConditioning { encoder, processor })
    }

    /// A single-file image encoder (ComfyUI's clip_vision_h): such files
    /// carry no processor config, so CLIP's own preprocessing at the
    /// encoder's image size is used (equal to the published I2V folders').
    pub fn from_part(gpu: &Gpu, part: Part<ClipVisionConfig>) -> Result<Self> {
        let processor = ClipImageProcessor::clip(part.config.image_size);
        let encoder = ClipVisionModel::new(
            gpu,
            &Weights::new(part.weights, gpu.precision()),
            part.config,
        )?;
        Ok(ImageConditioning { encoder, processor })
    }
}

/// A folder's image encoder against its transformer's config, before
/// anything loads: an image-to-video transformer without the image
/// encoder it reads (or an image encoder beside a text-to-video one).
pub(super) fn check_folder(
    dir: &Path,
    config: &WanTransformerConfig,
    has_image_encoder: bool,
) -> Result<()> {
    let needs = |message: String| LoadError::Layout {
        path: dir.to_path_buf(),
        message,
    };
    match (config.image_dim, has_image_encoder) {
        (Some(d), false) => Err(needs(format!(
            "this is an image-to-video Wan transformer (image_dim {d}) but model_index.json names \
             no image encoder: the folder needs `image_encoder/` (CLIPVisionModel) and \
             `image_processor/` (CLIPImageProcessor), named in model_index.json"
        ))
        .into()),
        (None, true) => Err(LoadError::Config {
            path: transformer_config_path(dir),
            message: "model_index.json names an image_encoder but this transformer has no \
                      image_dim (a text-to-video transformer)"
                .into(),
        }
        .into()),
        _ => Ok(()),
    }
}

/// The checks across an image-to-video model's parts: an image encoder
/// exactly when the transformer has an image branch, of its width, and for
/// first-last frame as many tokens as `pos_embed` spans.
pub(super) fn check_parts(
    dir: &Path,
    cfg: &WanTransformerConfig,
    image: Option<&ImageConditioning>,
) -> Result<()> {
    let bad = |message: String| LoadError::Config {
        path: transformer_config_path(dir),
        message,
    };
    match (cfg.image_dim, image) {
        (None, None) => Ok(()),
        (Some(d), None) => Err(LoadError::Layout {
            path: dir.to_path_buf(),
            message: format!(
                "this is an image-to-video Wan transformer (image_dim {d}) but the folder has no \
                 image encoder: it needs `image_encoder/` (CLIPVisionModel) and \
                 `image_processor/`, named in model_index.json"
            ),
        }
        .into()),
        (None, Some(_)) => Err(bad(
            "model_index.json names an image_encoder but the transformer has no image_dim \
             (a text-to-video transformer)"
                .into(),
        )
        .into()),
        (Some(d), Some(img)) => {
            let ec = &img.encoder.config;
            if ec.hidden_size != d {
                return Err(bad(format!(
                    "image_dim {d} differs from the image encoder's hidden_size {}",
                    ec.hidden_size
                ))
                .into());
            }
            if let Some(p) = cfg.pos_embed_seq_len {
                if p != 2 * ec.tokens() {
                    return Err(bad(format!(
                        "pos_embed_seq_len {p} differs from two images' tokens, 2 · {}",
                        ec.tokens()
                    ))
                    .into());
                }
            }
            Ok(())
        }
    }
}

/// What the transformer reads beside the latents.
pub(super) struct ImageConditions {
    /// [N, T, D]: N = 1, or 2 (first, last) for first-last frame; None for
    /// a model without an image encoder (Wan 2.2 A14B I2V).
    pub image_embeds: Option<Tensor>,
    /// [4 + z, f, h, w] on the CPU: frame mask, normalised latents of the
    /// conditioning video.
    pub condition: Vec<f32>,
}

impl Wan {
    /// Whether the model animates a still: an image encoder, or a
    /// transformer that reads the conditioning channels (Wan 2.2 A14B I2V
    /// has no image encoder).
    pub(super) fn takes_image(&self) -> bool {
        self.image.is_some() || self.transformer.config.in_channels != self.vae.config.z_dim
    }

    /// The request's stills against the model: image-to-video models
    /// need theirs (first-last frame both), each at least
    /// [`MIN_IMAGE_SIDE`] on a side.
    pub(super) fn check_images(&self, req: &Request) -> Result<()> {
        if req.last_image.is_some() && req.image.is_none() {
            return Err(argument(
                "a last image needs a first image too (--image with --last-image)",
            ));
        }
        if self.takes_image() {
            if req.image.is_none() {
                return Err(argument(format!(
                    "{} is an image-to-video model: give it the still to animate (--image)",
                    self.model.display()
                )));
            }
            if self.transformer.config.pos_embed_seq_len.is_some() && req.last_image.is_none() {
                return Err(argument(format!(
                    "{} is a first-last-frame model: give it the last frame too (--last-image)",
                    self.model.display()
                )));
            }
        }
        for (name, image) in [("image", &req.image), ("last image", &req.last_image)] {
            if let Some(im) = image {
                if im.width < MIN_IMAGE_SIDE || im.height < MIN_IMAGE_SIDE {
                    return Err(argument(format!(
                        "the {name} is {}x{} pixels: at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} \
                         is needed",
                        im.width, im.height
                    )));
                }
                if im.data.len() != im.width * im.height * 3 {
                    return Err(argument(format!(
                        "the {name} holds {} values where {}x{} RGB needs {}",
                        im.data.len(),
                        im.width,
                        im.height,
                        im.width * im.height * 3
                    )));
                }
            }
        }
        Ok(())
    }

    /// The image tokens and the conditioning channels of a validated
    /// image-to-video request, as `WanImageToVideoPipeline` computes them:
    /// `encode_image([image, last_image])`, then `prepare_latents`.
    pub(super) fn image_conditions(
        &self,
        gpu: &Gpu,
        req: &Request,
    ) -> Result<Option<ImageConditions>> {
        let (true, Some(first)) = (self.takes_image(), &req.image) else {
            return Ok(None);
        };
        let stills: Vec<&RgbImage> = std::iter::once(first).chain(&req.last_image).collect();

        // The image encoder on the stills as given (the processor resizes).
        let image_embeds = match &self.image {
            Some(parts) => {
                let (ph, pw) = parts.processor.output_size();
                let pixels: Vec<f32> = stills
                    .iter()
                    .flat_map(|im| parts.processor.preprocess(im))
                    .collect();
                let pixel_values =
                    Tensor::from_f32(gpu, &pixels, &[stills.len(), 3, ph, pw], gpu.precision())?;
                Some(parts.encoder.penultimate_hidden_state(gpu, &pixel_values)?)
            }
            None => None,
        };

        // The conditioning video [1, 3, F, H, W]: the stills at the clip's
        // size (diffusers' VaeImageProcessor: Pillow LANCZOS on bytes, no
        // crop, then x / 255 · 2 − 1), zeros between.
        let (w, h, frames) = (req.width, req.height, req.frames);
        let plane = w * h;
        let mut video = vec![0f32; 3 * frames * plane];
        let mut place = |im: &RgbImage, frame: usize| {
            let rgb = pil_resize(
                &to_rgb8(im),
                (im.width, im.height),
                (w, h),
                PilFilter::Lanczos,
            );
            for p in 0..plane {
                for c in 0..3 {
                    let v = f32::from(rgb[p * 3 + c]) / 255.0;
                    video[(c * frames + frame) * plane + p] = 2.0 * v - 1.0;
                }
            }
        };
        place(first, 0);
        if let Some(last) = &req.last_image {
            place(last, frames - 1);
        }
        let video = Tensor::from_f32(gpu, &video, &[1, 3, frames, h, w], gpu.precision())?;
        // `retrieve_latents(..., sample_mode="argmax")`: the posterior mean.
        let encoded = self.vae.encode(gpu, &video)?.mean;
        let latents = self.vae.normalize_latents(gpu, &encoded)?.to_f32(gpu)?;
        gpu.trim_pool();

        // The frame mask per latent frame: frame 0 stands for the first
        // four mask frames (diffusers repeats its mask 4 times before
        // folding frames into groups of 4), each next latent frame for 4
        // frames; 1 where a still is given.
        let t = self.vae.config.temporal_scale_factor();
        let (_, f, lh, lw) = self.latent_shape(req);
        let given = |frame: usize| frame == 0 || (req.last_image.is_some() && frame == frames - 1);
        let lplane = lh * lw;
        let mut condition = vec![0f32; (t * f) * lplane];
        for j in 0..t {
            for lf in 0..f {
                // Index lf·t + j of the extended list [m0 × t, m1, …, m(F−1)].
                let k = lf * t + j;
                let frame = if k < t { 0 } else { k - (t - 1) };
                if given(frame) {
                    let at = (j * f + lf) * lplane;
                    condition[at..at + lplane].fill(1.0);
                }
            }
        }
        condition.extend_from_slice(&latents);
        Ok(Some(ImageConditions {
            image_embeds,
            condition,
        }))
    }
}
