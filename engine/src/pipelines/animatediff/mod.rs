//! The AnimateDiff family (diffusers `AnimateDiffPipeline`), with image
//! animation and the creative controls: prompt → CLIP → the motion UNet
//! denoising seeded noise under classifier-free guidance → VAE decode, a
//! chunk of frames at a time. The networks and the per-latent work of a
//! step run on the GPU; the scheduler's per-step coefficients on the CPU.
//!
//! Controls beyond diffusers:
//! - `motion` 0..4 sets how much of the initial noise all frames share
//!   (much at 0: frames start alike and stay close; none at 4) and scales
//!   the motion modules' residual mildly (0.8..1.2), inside their trained
//!   range. Zeroing the residual would make frames independent, not still.
//! - `camera` warps each frame's share of the common noise along the move
//!   (shift, scale or rotation growing over the clip), and during the first
//!   two thirds of the steps pulls every frame's clean estimate and noise
//!   towards frame 0's, warped to that frame's place along the move
//!   (`camera::CameraGuide`): a training-free way to lay the move out,
//!   which the motion modules then keep coherent. It also works for models
//!   trained with zero terminal SNR, which ignore the initial noise's layout.
//! - `image`: the still, VAE-encoded, anchors the first frame at every step
//!   (re-noised to the step's level) and seeds the other frames at
//!   `strength`, as img2img does (`image.rs`).
//! - clips longer than the motion modules' window run through FreeNoise
//!   context windows (`context.rs`).
//!
//! The step loop is in `generate.rs`.

mod context;
mod generate;
mod image;

use std::path::{Path, PathBuf};

use super::card::ModelCard;
use super::controls::{Control, Controls, StillUse, Stills};
use super::events::{Event, Generated};
use super::noise::interpolate;
use super::preview::LatentRgb;
use super::{argument, load_boxed, Family, ModelDefaults, Registered, Request};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::models::clip::ClipTextModel;
use crate::models::source::ModelSource;
use crate::models::unet_motion::UNetMotionModel;
use crate::models::vae::AutoencoderKL;
use crate::prompt;
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::text::tokenizer::{ClipTokenizer, MAX_LENGTH};
use crate::weights::Weights;

/// The diffusers pipeline classes whose folders this family runs: its own,
/// its video-to-video sibling (same parts), and a Stable Diffusion 1.x
/// folder, which takes a motion adapter beside it.
pub const PIPELINE_CLASSES: &[&str] = &[
    "AnimateDiffPipeline",
    "AnimateDiffVideoToVideoPipeline",
    "StableDiffusionPipeline",
];

/// Every control but those of the coming families (flow shift, a second
/// expert's guidance, a last image, an input video).
pub const CONTROLS: Controls = Controls {
    supported: &[
        Control::Motion,
        Control::Camera,
        Control::Image,
        Control::Strength,
        Control::Karras,
        Control::ClipSkip,
        Control::ContextWindows,
        Control::Lora,
        Control::InitialLatents,
        Control::StepNoise,
    ],
    schedulers: &SchedulerKind::DIFFUSION,
};

/// This family's line in the registry (`pipelines::FAMILIES`).
pub const REGISTERED: Registered = Registered {
    name: "AnimateDiff",
    classes: PIPELINE_CLASSES,
    // Single-file SD checkpoints and bare folders of parts: the only
    // layouts ModelSource reads without a model_index.json are this
    // family's.
    unnamed: true,
    controls: CONTROLS,
    // `--image` anchors the first frame of every AnimateDiff model.
    stills: |_| {
        Ok(Stills {
            text_to_video: true,
            image: Some(StillUse::Anchor),
            last_image: false,
        })
    },
    defaults: published_defaults,
    // The SD VAE's 8; the motion module takes any frame count.
    size_multiple: 8,
    frame_step: 1,
    load: load_boxed::<AnimateDiff>,
};

/// AnimateDiff's published settings (512x512, 16 frames at 8 fps, 25
/// steps, guidance 7.5) for the SD VAE's 64-latent size.
fn published_defaults() -> ModelDefaults {
    ModelDefaults {
        width: 512,
        height: 512,
        frames: 16,
        steps: 25,
        guidance: 7.5,
        fps: 8.0,
        negative: String::new(),
        camera_prompts: Default::default(),
    }
}

/// The motion-residual scale at motion level m (0.8 ..= 1.2).
pub fn motion_scale(m: f32) -> f32 {
    interpolate(&[0.8, 0.9, 1.0, 1.1, 1.2], m)
}

pub struct AnimateDiff {
    model: PathBuf,
    tokenizer: ClipTokenizer,
    pub(crate) text_encoder: ClipTextModel,
    pub(crate) unet: UNetMotionModel,
    pub(crate) vae: AutoencoderKL,
    scheduler_config: SchedulerConfig,
    defaults: ModelDefaults,
    /// The motion modules' window (motion_max_seq_length).
    pub max_frames: usize,
    latent_rgb: LatentRgb,
}

/// AnimateDiff's published scheduler (DDIM, linear betas), for models that
/// ship none (single-file checkpoints).
const DEFAULT_SCHEDULER: &str = r#"{"_class_name": "DDIMScheduler", "beta_start": 0.00085,
 "beta_end": 0.012, "beta_schedule": "linear", "clip_sample": false, "num_train_timesteps": 1000,
 "set_alpha_to_one": true, "steps_offset": 1, "timestep_spacing": "linspace", "prediction_type": "epsilon"}"#;

impl Family for AnimateDiff {
    fn load(gpu: &Gpu, source: &ModelSource) -> Result<Self> {
        let tokenizer = source.tokenizer()?;
        let te = source.text_encoder()?;
        super::check_vocabulary(
            tokenizer.vocab_path(),
            tokenizer.max_id(),
            &te.origin,
            te.config.vocab_size,
        )?;
        let text_encoder =
            ClipTextModel::new(gpu, &Weights::new(te.weights, gpu.precision()), te.config)?;
        let unet_part = source.unet()?;
        let max_frames = unet_part.config.motion_max_seq_length;
        let unet = UNetMotionModel::new(
            gpu,
            &Weights::new(unet_part.weights, gpu.precision()),
            unet_part.config,
        )?;
        let vae_part = source.vae()?;
        let vae = AutoencoderKL::new(
            gpu,
            &Weights::new(vae_part.weights, gpu.precision()),
            vae_part.config,
        )?;
        let scheduler_config = match source.scheduler_config() {
            Some(path) => SchedulerConfig::load(&path)?,
            None => SchedulerConfig::from_json(
                serde_json::from_str(DEFAULT_SCHEDULER).map_err(|e| argument(e.to_string()))?,
                Path::new("(built-in AnimateDiff scheduler)"),
            )?,
        };
        let card = ModelCard::for_model(source.path())?;
        let scale = vae.config.scale_factor();
        // AnimateDiff's published settings, at the VAE's 64-latent size.
        let defaults = card.defaults(ModelDefaults {
            width: 64 * scale,
            height: 64 * scale,
            frames: max_frames.min(16),
            ..published_defaults()
        });
        let latent_rgb = LatentRgb::new(card.latent_rgb(), vae.config.latent_channels);
        Ok(AnimateDiff {
            model: source.path().to_path_buf(),
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            defaults,
            max_frames,
            latent_rgb,
        })
    }

    fn family(&self) -> &'static str {
        REGISTERED.name
    }

    fn model(&self) -> &Path {
        &self.model
    }

    fn defaults(&self) -> &ModelDefaults {
        &self.defaults
    }

    fn controls(&self) -> Controls {
        CONTROLS
    }

    fn scale_factor(&self) -> usize {
        self.vae.config.scale_factor()
    }

    fn check_values(&self, req: &Request) -> Result<()> {
        let s = self.scale_factor();
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % s != 0 {
                return Err(argument(format!(
                    "{name} {v} is not a positive multiple of {s} (the VAE's scale factor)"
                )));
            }
        }
        if req.frames == 0 {
            return Err(argument("frames must be at least 1"));
        }
        if let Some((length, stride)) = self.context_for(req) {
            if length == 0 || stride == 0 || length > self.max_frames || req.frames < length {
                return Err(argument(format!(
                    "context windows of {length} frames every {stride} for {} frames: expected 1 ≤ length ≤ {} (the motion module's window) and ≤ frames, stride ≥ 1",
                    req.frames, self.max_frames
                )));
            }
        }
        if !(0.0..=4.0).contains(&req.motion) {
            return Err(argument(format!("motion {} is outside 0..4", req.motion)));
        }
        if req.image.is_some() && !(req.strength > 0.0 && req.strength <= 1.0) {
            return Err(argument(format!(
                "strength {} is outside (0, 1]",
                req.strength
            )));
        }
        if req.clip_skip + 1 > 2 {
            return Err(argument(format!(
                "clip skip {} is not supported (0 or 1)",
                req.clip_skip
            )));
        }
        let (c, f, h, w) = self.latent_shape(req);
        req.check_shared(&[1, c, f, h, w])
    }

    fn generate(
        &self,
        gpu: &Gpu,
        req: &Request,
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Generated> {
        self.validate(req)?;
        self.run(gpu, req, events)
    }
}

impl AnimateDiff {
    /// Replaces the model's scheduler config (reference cases, `--scheduler`
    /// presets that need other settings).
    pub fn set_scheduler_config(&mut self, config: SchedulerConfig) {
        self.scheduler_config = config;
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// The preview projection of this model's latents.
    pub fn latent_rgb(&self) -> &LatentRgb {
        &self.latent_rgb
    }

    /// The latent shape (C, F, h, w) of a request.
    fn latent_shape(&self, req: &Request) -> (usize, usize, usize, usize) {
        let s = self.scale_factor();
        (
            self.vae.config.latent_channels,
            req.frames,
            req.height / s,
            req.width / s,
        )
    }

    /// Prompt embeddings [rows, 77, D] for `prompts` (weighted syntax allowed).
    pub(crate) fn encode_prompts(
        &self,
        gpu: &Gpu,
        prompts: &[&str],
        clip_skip: usize,
    ) -> Result<(Vec<[u32; MAX_LENGTH]>, Vec<f32>)> {
        let encoded: Vec<_> = prompts
            .iter()
            .map(|p| prompt::encode(&self.tokenizer, p))
            .collect();
        let ids: Vec<Vec<u32>> = encoded.iter().map(|(ids, _)| ids.to_vec()).collect();
        let out = self.text_encoder.forward(gpu, &ids)?;
        let hidden = if clip_skip == 1 {
            out.clip_skip1_hidden_state
        } else {
            out.last_hidden_state
        };
        let mut values = hidden.to_f32(gpu)?;
        let per = values.len() / prompts.len().max(1);
        for (row, (_, weights)) in values.chunks_mut(per).zip(&encoded) {
            prompt::apply_weights(row, weights);
        }
        Ok((encoded.iter().map(|(ids, _)| *ids).collect(), values))
    }

    /// Frames the VAE decodes at once at `height` x `width` (see
    /// [`super::decode::chunk_frames`]), from the decoder's widest block.
    pub(crate) fn decode_chunk(&self, height: usize, width: usize) -> usize {
        let widest = self
            .vae
            .config
            .block_out_channels
            .first()
            .copied()
            .unwrap_or(128);
        super::decode::chunk_frames(widest, height, width)
    }
}
