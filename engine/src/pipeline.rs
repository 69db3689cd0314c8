//! The AnimateDiff text-to-video pipeline (diffusers `AnimateDiffPipeline`),
//! with image animation and the creative controls: prompt → CLIP → the
//! motion UNet denoising seeded noise under classifier-free guidance → VAE
//! decode, frame by frame. The scheduler runs on the CPU in f32 (latents are
//! small); the networks run on the GPU.
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
//!   (`camera_guide`): a training-free way to lay the move out, which the
//!   motion modules then keep coherent. It also works for models trained
//!   with zero terminal SNR, which ignore the initial noise's layout.
//!   Directions name how the picture content moves on screen.
//! - `image`: the still, VAE-encoded, anchors the first frame at every step
//!   (re-noised to the step's level) and seeds the other frames at
//!   `strength`, as img2img does.

use std::path::Path;
use std::str::FromStr;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{EngineError, Result};
use crate::gpu::Gpu;
use crate::models::clip::ClipTextModel;
use crate::models::source::ModelSource;
use crate::models::unet_motion::UNetMotionModel;
use crate::models::vae::AutoencoderKL;
use crate::prompt;
use crate::schedulers::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::tensor::{DType, Tensor};
use crate::text::tokenizer::{ClipTokenizer, MAX_LENGTH};
use crate::weights::config::read_json;
use crate::weights::Weights;

pub use crate::ops::preview::FrameTextures;

fn argument(message: impl Into<String>) -> EngineError {
    EngineError::Argument {
        op: "generate",
        message: message.into(),
    }
}

/// A camera move, applied without training (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Camera {
    ZoomIn,
    ZoomOut,
    PanLeft,
    PanRight,
    TiltUp,
    TiltDown,
    RollCw,
    RollCcw,
}

impl Camera {
    pub const ALL: [Camera; 8] = [
        Camera::ZoomIn,
        Camera::ZoomOut,
        Camera::PanLeft,
        Camera::PanRight,
        Camera::TiltUp,
        Camera::TiltDown,
        Camera::RollCw,
        Camera::RollCcw,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Camera::ZoomIn => "zoom-in",
            Camera::ZoomOut => "zoom-out",
            Camera::PanLeft => "pan-left",
            Camera::PanRight => "pan-right",
            Camera::TiltUp => "tilt-up",
            Camera::TiltDown => "tilt-down",
            Camera::RollCw => "roll-cw",
            Camera::RollCcw => "roll-ccw",
        }
    }

    /// Where frame content at progress `p` (0..1) samples the common noise:
    /// maps an output latent position (centred coordinates) to a source one.
    fn source(self, p: f32, x: f32, y: f32, w: f32, h: f32) -> (f32, f32) {
        // A quarter of the frame over the clip for shifts, 1.5x for zooms,
        // 20 degrees for rolls.
        let shift_x = 0.25 * w * p;
        let shift_y = 0.25 * h * p;
        let zoom = 1.0 + 0.5 * p;
        let angle = 20f32.to_radians() * p;
        match self {
            Camera::PanLeft => (x + shift_x, y),
            Camera::PanRight => (x - shift_x, y),
            Camera::TiltUp => (x, y + shift_y),
            Camera::TiltDown => (x, y - shift_y),
            Camera::ZoomIn => (x / zoom, y / zoom),
            Camera::ZoomOut => (x * zoom, y * zoom),
            // Content turns clockwise on screen (y grows downwards).
            Camera::RollCw => rotate(x, y, -angle),
            Camera::RollCcw => rotate(x, y, angle),
        }
    }
}

fn rotate(x: f32, y: f32, a: f32) -> (f32, f32) {
    (x * a.cos() - y * a.sin(), x * a.sin() + y * a.cos())
}

impl FromStr for Camera {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Camera::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown camera move `{s}` (expected one of: {})",
                    Camera::ALL.map(|c| c.name()).join(", ")
                )
            })
    }
}

/// An RGB image with values in [0, 1], row-major, 3 channels interleaved.
#[derive(Debug, Clone)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

/// Defaults a model proposes: its `motif.json` (our model card's settings)
/// where present, else AnimateDiff's published ones.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDefaults {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    pub fps: f32,
    pub negative: String,
    /// Words the model was trained to read as a camera move (`camera_prompts`
    /// in motif.json, keyed by `Camera::name`): the CLI adds them to the
    /// prompt along with the noise warp.
    pub camera_prompts: std::collections::BTreeMap<String, String>,
}

/// One generation.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    pub negative: String,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    pub seed: u64,
    pub scheduler: Option<SchedulerKind>,
    pub karras: Option<bool>,
    /// Layers to skip from the end of the text encoder (0 = last layer).
    pub clip_skip: usize,
    pub image: Option<RgbImage>,
    pub strength: f32,
    /// 0 (nearly still) ..= 4 (strong motion).
    pub motion: f32,
    pub camera: Option<Camera>,
    /// Initial latents [1, C, F, h, w] instead of seeded noise (reference
    /// cases); still multiplied by the scheduler's init_noise_sigma.
    pub latents: Option<Vec<f32>>,
    /// Per-step noise for schedulers that draw it (reference cases).
    pub step_noise: Option<Vec<Vec<f32>>>,
    /// FreeNoise context windows (length, stride) for the motion modules.
    /// `None`: none when the clip fits the motion module's window, else
    /// windows of min(16, window) frames every 4.
    pub context: Option<(usize, usize)>,
    /// Compute x0 previews for every step event, read back as RGB8 (for
    /// callers that store or send them: the server's PNG previews).
    pub previews: bool,
    /// Write every step's x0 previews into textures on the GPU instead
    /// (for a window on the same device: the frames stay on the GPU).
    pub gpu_previews: bool,
    /// Keep per-step latents and the prompt embeddings in the output.
    pub trace: bool,
}

impl Request {
    pub fn new(prompt: impl Into<String>, defaults: &ModelDefaults) -> Self {
        Request {
            prompt: prompt.into(),
            negative: defaults.negative.clone(),
            width: defaults.width,
            height: defaults.height,
            frames: defaults.frames,
            steps: defaults.steps,
            guidance: defaults.guidance,
            seed: 0,
            scheduler: None,
            karras: None,
            clip_skip: 0,
            image: None,
            strength: 0.8,
            motion: 2.0,
            camera: None,
            latents: None,
            step_noise: None,
            context: None,
            previews: false,
            gpu_previews: false,
            trace: false,
        }
    }
}

/// Low-resolution RGB frames of the current x0 estimate.
#[derive(Debug, Clone)]
pub struct Preview {
    pub width: usize,
    pub height: usize,
    /// One RGB8 frame per video frame.
    pub frames: Vec<Vec<u8>>,
}

pub enum Event<'a> {
    /// Prompts encoded, denoising starts.
    Started {
        steps: usize,
    },
    Step {
        index: usize,
        total: usize,
        timestep: f64,
        preview: Option<&'a Preview>,
        /// With `gpu_previews`: the textures this step's previews were
        /// written into (the same textures every step of a run).
        gpu_preview: Option<&'a FrameTextures>,
    },
    Decoded {
        frame: usize,
        total: usize,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub timesteps: Vec<f64>,
    /// Latents after each step.
    pub step_latents: Vec<Vec<f32>>,
    /// [uncond?, cond] ids.
    pub prompt_ids: Vec<[u32; MAX_LENGTH]>,
    /// [uncond?, cond] embeddings, each [77, D].
    pub prompt_embeds: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub width: usize,
    pub height: usize,
    /// RGB8 frames.
    pub frames: Vec<Vec<u8>>,
    /// [F, H, W, 3] in [0, 1], before quantisation.
    pub frames_f32: Vec<f32>,
    /// Final latents [1, C, F, h, w].
    pub latents: Vec<f32>,
    pub scheduler: SchedulerKind,
    pub trace: Option<Trace>,
}

/// SD1.x latent → RGB factors for previews (4 × 3, then a bias), the
/// widely used linear fit of the SD VAE decoder's mean colour.
const SD_LATENT_RGB: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

pub struct AnimateDiff {
    tokenizer: ClipTokenizer,
    pub(crate) text_encoder: ClipTextModel,
    pub(crate) unet: UNetMotionModel,
    pub(crate) vae: AutoencoderKL,
    scheduler_config: SchedulerConfig,
    pub defaults: ModelDefaults,
    /// The motion modules' window (motion_max_seq_length).
    pub max_frames: usize,
    latent_rgb: Vec<[f32; 3]>,
    latent_rgb_bias: [f32; 3],
}

/// One loaded model kept between generations (the viewer's worker), so
/// that a second Generate with the same model does not read and upload its
/// weights again. `key` names what was loaded (model, motion adapter, VAE,
/// LoRAs): the model is loaded again only when it changes.
#[derive(Default)]
pub struct ModelCache {
    loaded: Option<(String, AnimateDiff)>,
}

impl ModelCache {
    /// The model for `key`, loaded from `source` unless it is the one held;
    /// true when it was loaded now. A failed load leaves the cache empty.
    pub fn get(
        &mut self,
        gpu: &Gpu,
        key: &str,
        source: &ModelSource,
    ) -> Result<(&mut AnimateDiff, bool)> {
        let fresh = !matches!(&self.loaded, Some((k, _)) if k == key);
        if fresh {
            // Free the old weights before the new ones take GPU memory.
            self.loaded = None;
            self.loaded = Some((key.to_string(), AnimateDiff::load(gpu, source)?));
        }
        let (_, pipe) = self
            .loaded
            .as_mut()
            .expect("a model was just loaded or was held");
        Ok((pipe, fresh))
    }

    /// The key of the model held, if any.
    pub fn key(&self) -> Option<&str> {
        self.loaded.as_ref().map(|(k, _)| k.as_str())
    }
}

/// AnimateDiff's published scheduler (DDIM, linear betas), for models that
/// ship none (single-file checkpoints).
const DEFAULT_SCHEDULER: &str = r#"{"_class_name": "DDIMScheduler", "beta_start": 0.00085,
 "beta_end": 0.012, "beta_schedule": "linear", "clip_sample": false, "num_train_timesteps": 1000,
 "set_alpha_to_one": true, "steps_offset": 1, "timestep_spacing": "linspace", "prediction_type": "epsilon"}"#;

impl AnimateDiff {
    /// Loads every part of `source` onto `gpu` in the GPU's precision.
    pub fn load(gpu: &Gpu, source: &ModelSource) -> Result<Self> {
        let tokenizer = source.tokenizer()?;
        let te = source.text_encoder()?;
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
        let card = match source.path().is_dir() {
            true => {
                let p = source.path().join("motif.json");
                if p.is_file() {
                    Some(read_json(&p)?)
                } else {
                    None
                }
            }
            false => None,
        };
        let scale = vae.config.scale_factor();
        let get = |k: &str| {
            card.as_ref()
                .and_then(|c| c.get("defaults"))
                .and_then(|d| d.get(k))
        };
        let num = |k: &str, d: f64| get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let defaults = ModelDefaults {
            width: num("width", (64 * scale) as f64) as usize,
            height: num("height", (64 * scale) as f64) as usize,
            frames: num("frames", max_frames.min(16) as f64) as usize,
            steps: num("steps", 25.0) as usize,
            guidance: num("guidance", 7.5) as f32,
            fps: num("fps", 8.0) as f32,
            negative: get("negative")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string(),
            camera_prompts: card
                .as_ref()
                .and_then(|c| c.get("camera_prompts"))
                .and_then(|v| v.as_object())
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
        };
        let latent_channels = vae.config.latent_channels;
        let factors = card
            .as_ref()
            .and_then(|c| c.get("latent_rgb_factors"))
            .and_then(|f| serde_json::from_value::<Vec<[f32; 3]>>(f.clone()).ok())
            .filter(|f| f.len() == latent_channels);
        let (latent_rgb, latent_rgb_bias) = match factors {
            Some(f) => {
                let bias = card
                    .as_ref()
                    .and_then(|c| c.get("latent_rgb_bias"))
                    .and_then(|b| serde_json::from_value::<[f32; 3]>(b.clone()).ok())
                    .unwrap_or([0.0; 3]);
                (f, bias)
            }
            None if latent_channels == 4 => (SD_LATENT_RGB.to_vec(), [0.0; 3]),
            None => (
                vec![[1.0 / latent_channels as f32; 3]; latent_channels],
                [0.0; 3],
            ),
        };
        Ok(AnimateDiff {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            defaults,
            max_frames,
            latent_rgb,
            latent_rgb_bias,
        })
    }

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

    /// Pixels per latent pixel.
    pub fn scale_factor(&self) -> usize {
        self.vae.config.scale_factor()
    }

    /// Checks a request against the model before any GPU work.
    pub fn validate(&self, req: &Request) -> Result<()> {
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
        if req.steps == 0 {
            return Err(argument("steps must be at least 1"));
        }
        if !(req.guidance.is_finite() && req.guidance >= 0.0) {
            return Err(argument(format!(
                "guidance {} must be a finite number ≥ 0",
                req.guidance
            )));
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
        let latents_len = self.latent_len(req);
        if let Some(l) = &req.latents {
            if l.len() != latents_len {
                return Err(argument(format!(
                    "initial latents have {} values, expected {latents_len}",
                    l.len()
                )));
            }
        }
        Ok(())
    }

    /// The context windows a request runs with (see `Request::context`).
    pub fn context_for(&self, req: &Request) -> Option<(usize, usize)> {
        match req.context {
            Some(c) => Some(c),
            None if req.frames > self.max_frames => Some((self.max_frames.min(16), 4)),
            None => None,
        }
    }

    fn latent_len(&self, req: &Request) -> usize {
        let s = self.scale_factor();
        self.vae.config.latent_channels * req.frames * (req.height / s) * (req.width / s)
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

    /// Frames the VAE decodes at once at `height` x `width`: as many as keep
    /// the decoder's widest full-resolution activation (a few live at once)
    /// within about 256 MiB, at least one. SD's VAE at 512x512 takes one
    /// frame at a time; small models decode a whole clip in one pass, which
    /// saves the per-dispatch cost of many small ones.
    pub(crate) fn decode_chunk(&self, height: usize, width: usize) -> usize {
        let widest = self
            .vae
            .config
            .block_out_channels
            .first()
            .copied()
            .unwrap_or(128);
        let per_frame = 4 * widest * height * width * 4;
        ((256usize << 20) / per_frame.max(1)).max(1)
    }

    /// Gaussian noise [1, C, F, h, w] with the motion share and camera warp.
    fn initial_noise(&self, rng: &mut ChaCha8Rng, req: &Request) -> Vec<f32> {
        let s = self.scale_factor();
        let (c, f, h, w) = (
            self.vae.config.latent_channels,
            req.frames,
            req.height / s,
            req.width / s,
        );
        let mut normal =
            |n: usize| -> Vec<f32> { (0..n).map(|_| StandardNormal.sample(rng)).collect() };
        let independent = normal(c * f * h * w);
        let share = motion_share(req.motion);
        if share == 0.0 && req.camera.is_none() {
            return independent;
        }
        // Camera moves need a common part to move; keep at least a little.
        let share = if req.camera.is_some() {
            share.max(0.3)
        } else {
            share
        };
        let common = normal(c * h * w);
        let (a, b) = (share.sqrt(), (1.0 - share).sqrt());
        let mut out = vec![0f32; c * f * h * w];
        for fi in 0..f {
            let p = if f > 1 {
                fi as f32 / (f - 1) as f32
            } else {
                0.0
            };
            for y in 0..h {
                for x in 0..w {
                    let (sx, sy) = match req.camera {
                        None => (x, y),
                        Some(cam) => {
                            let (cx, cy) = (
                                x as f32 - (w as f32 - 1.0) / 2.0,
                                y as f32 - (h as f32 - 1.0) / 2.0,
                            );
                            let (ux, uy) = cam.source(p, cx, cy, w as f32, h as f32);
                            let wrap = |v: f32, n: usize| {
                                ((v.round() as i64).rem_euclid(n as i64)) as usize
                            };
                            (
                                wrap(ux + (w as f32 - 1.0) / 2.0, w),
                                wrap(uy + (h as f32 - 1.0) / 2.0, h),
                            )
                        }
                    };
                    for ch in 0..c {
                        let o = ((ch * f + fi) * h + y) * w + x;
                        out[o] = a * common[(ch * h + sy) * w + sx] + b * independent[o];
                    }
                }
            }
        }
        out
    }

    /// x0 latents [1, C, F, h, w] → RGB8 preview frames at latent size: the
    /// model's linear latent-to-RGB projection, run on the GPU (channels
    /// last, then one [C → 3] linear layer), mapped from [-1, 1] to bytes.
    pub fn preview(
        &self,
        gpu: &Gpu,
        x0: &[f32],
        frames: usize,
        h: usize,
        w: usize,
    ) -> Result<Preview> {
        let c = self.latent_rgb.len();
        let latents = Tensor::from_f32(gpu, x0, &[c, frames, h, w], DType::F32)?;
        let pixels = crate::ops::layout::permute(gpu, &latents, &[1, 2, 3, 0])?
            .reshape(&[frames * h * w, c])?;
        let weight: Vec<f32> = (0..3)
            .flat_map(|k| self.latent_rgb.iter().map(move |row| row[k]))
            .collect();
        let weight = Tensor::from_f32(gpu, &weight, &[3, c], DType::F32)?;
        let bias = Tensor::from_f32(gpu, &self.latent_rgb_bias, &[3], DType::F32)?;
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

    /// The previews of [`AnimateDiff::preview`] written into `target`'s
    /// layers by a compute shader, without leaving the GPU.
    pub fn preview_to_textures(
        &self,
        gpu: &Gpu,
        x0: &[f32],
        frames: usize,
        h: usize,
        w: usize,
        target: &FrameTextures,
    ) -> Result<()> {
        let c = self.latent_rgb.len();
        let latents = Tensor::from_f32(gpu, x0, &[c, frames, h, w], DType::F32)?;
        crate::ops::preview::latent_rgb_to_textures(
            gpu,
            &latents,
            &self.latent_rgb,
            self.latent_rgb_bias,
            target,
        )
    }

    /// The CPU reference of [`AnimateDiff::preview`] and
    /// [`AnimateDiff::preview_to_textures`], for tests.
    pub fn preview_reference(
        &self,
        x0: &[f32],
        frames: usize,
        h: usize,
        w: usize,
    ) -> Vec<Vec<f32>> {
        let c = self.latent_rgb.len();
        (0..frames)
            .map(|fi| {
                (0..h * w * 3)
                    .map(|i| {
                        let (p, k) = (i / 3, i % 3);
                        self.latent_rgb_bias[k]
                            + (0..c)
                                .map(|ch| {
                                    self.latent_rgb[ch][k] * x0[(ch * frames + fi) * h * w + p]
                                })
                                .sum::<f32>()
                    })
                    .collect()
            })
            .collect()
    }

    /// The still as latents [C, h, w] (posterior mean × scaling factor).
    fn encode_image(
        &self,
        gpu: &Gpu,
        image: &RgbImage,
        width: usize,
        height: usize,
    ) -> Result<Vec<f32>> {
        let fitted = fit_image(image, width, height);
        let mut chw = vec![0f32; 3 * width * height];
        for p in 0..width * height {
            for k in 0..3 {
                chw[k * width * height + p] = fitted[p * 3 + k] * 2.0 - 1.0;
            }
        }
        let t = Tensor::from_f32(gpu, &chw, &[1, 3, height, width], gpu.precision())?;
        let post = self.vae.encode(gpu, &t)?;
        let scale = self.vae.config.scaling_factor;
        Ok(post.mean.to_f32(gpu)?.iter().map(|v| v * scale).collect())
    }

    /// Runs one generation. `events` returns false to cancel (the result is
    /// then `EngineError::Cancelled`).
    pub fn generate(
        &mut self,
        gpu: &Gpu,
        req: &Request,
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Generated> {
        self.validate(req)?;
        let s = self.scale_factor();
        let (c, f, h, w) = (
            self.vae.config.latent_channels,
            req.frames,
            req.height / s,
            req.width / s,
        );
        let n = c * f * h * w;
        let mut rng = ChaCha8Rng::seed_from_u64(req.seed);
        let mut scheduler = Scheduler::new(&self.scheduler_config, req.scheduler, req.karras)?;

        // Prompts: [uncond, cond] under guidance, as diffusers orders them.
        let cfg = req.guidance > 1.0;
        let prompts: Vec<&str> = if cfg {
            vec![req.negative.as_str(), req.prompt.as_str()]
        } else {
            vec![req.prompt.as_str()]
        };
        let (ids, embeds) = self.encode_prompts(gpu, &prompts, req.clip_skip)?;
        let per_prompt = embeds.len() / prompts.len();
        // Each prompt's states repeated per frame: rows b·F + f.
        let mut ehs = Vec::with_capacity(per_prompt * prompts.len() * f);
        for row in embeds.chunks(per_prompt) {
            for _ in 0..f {
                ehs.extend_from_slice(row);
            }
        }
        let dim = per_prompt / MAX_LENGTH;
        let ehs = Tensor::from_f32(
            gpu,
            &ehs,
            &[prompts.len() * f, MAX_LENGTH, dim],
            gpu.precision(),
        )?;

        self.unet.set_motion_scale(motion_scale(req.motion));
        let context = self.context_for(req);
        self.unet.set_context_windows(context);
        let noise = match &req.latents {
            Some(l) => l.clone(),
            None => {
                let mut noise = self.initial_noise(&mut rng, req);
                if let Some((length, stride)) = context {
                    shuffle_context(&mut noise, &mut rng, c, f, h * w, length, stride);
                }
                noise
            }
        };
        let (start, anchor) = match &req.image {
            Some(image) => {
                let start = scheduler.set_timesteps_for_strength(req.steps, req.strength as f64)?;
                let z0 = self.encode_image(gpu, image, req.width, req.height)?;
                (start, Some(z0))
            }
            None => {
                scheduler.set_timesteps(req.steps)?;
                (0, None)
            }
        };
        let timesteps = scheduler.timesteps().to_vec();
        let mut latents = match &anchor {
            Some(z0) => {
                // Every frame starts from the still, noised to the strength.
                let mut init = vec![0f32; n];
                for ch in 0..c {
                    for fi in 0..f {
                        let o = (ch * f + fi) * h * w;
                        init[o..o + h * w].copy_from_slice(&z0[ch * h * w..(ch + 1) * h * w]);
                    }
                }
                scheduler.add_noise(&init, &noise, timesteps[start])?
            }
            None => {
                let sigma = scheduler.init_noise_sigma();
                noise.iter().map(|v| v * sigma).collect()
            }
        };
        let total = timesteps.len() - start;
        if !events(Event::Started { steps: total }) {
            return Err(EngineError::Cancelled);
        }
        let mut trace = req.trace.then(|| Trace {
            timesteps: timesteps[start..].to_vec(),
            prompt_ids: ids.clone(),
            prompt_embeds: embeds.clone(),
            ..Default::default()
        });
        // The still and its frame-0 noise, [C, h, w] each, for anchoring.
        let anchor0 = anchor.as_ref().map(|z0| {
            let noise0: Vec<f32> = (0..c)
                .flat_map(|ch| noise[ch * f * h * w..ch * f * h * w + h * w].to_vec())
                .collect();
            (z0.clone(), noise0)
        });
        let batch = prompts.len();
        let mut gpu_frames: Option<FrameTextures> = None;
        for (k, &t) in timesteps.iter().enumerate().skip(start) {
            let model_in = scheduler.scale_model_input(&latents, k)?;
            let mut x = Vec::with_capacity(n * batch);
            for _ in 0..batch {
                x.extend_from_slice(&model_in);
            }
            let x = Tensor::from_f32(gpu, &x, &[batch, c, f, h, w], gpu.precision())?;
            let pred = self.unet.forward(gpu, &x, &[t as f32], &ehs)?.to_f32(gpu)?;
            let guided: Vec<f32> = if cfg {
                let (u, co) = pred.split_at(n);
                u.iter()
                    .zip(co)
                    .map(|(u, co)| u + req.guidance * (co - u))
                    .collect()
            } else {
                pred
            };
            let step_noise = if scheduler.needs_noise(k) {
                Some(
                    match req.step_noise.as_ref().and_then(|v| v.get(k - start)) {
                        Some(v) => v.clone(),
                        None => (0..n)
                            .map(|_| StandardNormal.sample(&mut rng))
                            .collect::<Vec<f32>>(),
                    },
                )
            } else {
                None
            };
            let out = scheduler.step(&guided, k, &latents, step_noise.as_deref())?;
            latents = out.prev_sample;
            if let (Some(cam), Some(&next)) = (req.camera, timesteps.get(k + 1)) {
                let x0 = out.denoised.as_ref().unwrap_or(&out.pred_original);
                let weight = camera_weight(k - start, total);
                if weight > 0.0 {
                    latents =
                        camera_guide(&scheduler, cam, &latents, x0, next, weight, c, f, h, w)?;
                }
            }
            if let Some((frame0, noise0)) = &anchor0 {
                // The first frame is the still, at the next step's noise level.
                let target = match timesteps.get(k + 1) {
                    Some(&next) => scheduler.add_noise(frame0, noise0, next)?,
                    None => frame0.clone(),
                };
                for ch in 0..c {
                    let o = ch * f * h * w;
                    latents[o..o + h * w].copy_from_slice(&target[ch * h * w..(ch + 1) * h * w]);
                }
            }
            if let Some(tr) = trace.as_mut() {
                tr.step_latents.push(latents.clone());
            }
            let preview = match req.previews {
                true => {
                    let x0 = out.denoised.as_ref().unwrap_or(&out.pred_original);
                    Some(self.preview(gpu, x0, f, h, w)?)
                }
                false => None,
            };
            if req.gpu_previews {
                let x0 = out.denoised.as_ref().unwrap_or(&out.pred_original);
                let target = match gpu_frames.take() {
                    Some(t) => t,
                    None => FrameTextures::new(gpu, w, h, f)?,
                };
                self.preview_to_textures(gpu, x0, f, h, w, &target)?;
                gpu_frames = Some(target);
            }
            if !events(Event::Step {
                index: k - start,
                total,
                timestep: t,
                preview: preview.as_ref(),
                gpu_preview: gpu_frames.as_ref(),
            }) {
                return Err(EngineError::Cancelled);
            }
        }

        // Decode a chunk of frames at a time: [1, C, F, h, w] → [n, C, h, w].
        let (hh, ww) = (req.height, req.width);
        let chunk = self.decode_chunk(hh, ww);
        let mut frames_f32 = vec![0f32; f * hh * ww * 3];
        let mut frames = Vec::with_capacity(f);
        for f0 in (0..f).step_by(chunk) {
            let n = chunk.min(f - f0);
            let mut z = vec![0f32; n * c * h * w];
            for (i, fi) in (f0..f0 + n).enumerate() {
                for ch in 0..c {
                    let o = (ch * f + fi) * h * w;
                    let d = (i * c + ch) * h * w;
                    z[d..d + h * w].copy_from_slice(&latents[o..o + h * w]);
                }
            }
            let zt = Tensor::from_f32(gpu, &z, &[n, c, h, w], gpu.precision())?;
            let images = self.vae.decode_scaled(gpu, &zt)?.to_f32(gpu)?;
            for (i, image) in images.chunks(3 * hh * ww).enumerate() {
                let fi = f0 + i;
                let out = &mut frames_f32[fi * hh * ww * 3..(fi + 1) * hh * ww * 3];
                let mut rgb = vec![0u8; hh * ww * 3];
                for p in 0..hh * ww {
                    for k in 0..3 {
                        let v = (image[k * hh * ww + p] / 2.0 + 0.5).clamp(0.0, 1.0);
                        out[p * 3 + k] = v;
                        rgb[p * 3 + k] = (v * 255.0).round() as u8;
                    }
                }
                frames.push(rgb);
                if !events(Event::Decoded {
                    frame: fi,
                    total: f,
                }) {
                    return Err(EngineError::Cancelled);
                }
            }
        }
        Ok(Generated {
            width: ww,
            height: hh,
            frames,
            frames_f32,
            latents,
            scheduler: scheduler.kind(),
            trace,
        })
    }
}

/// FreeNoise's "shuffle_context" noise: frames past the first window reuse
/// the noise of earlier frames in shuffled order, window by window, so long
/// clips stay coherent (after diffusers' `_prepare_latents_free_noise`).
fn shuffle_context(
    noise: &mut [f32],
    rng: &mut ChaCha8Rng,
    c: usize,
    f: usize,
    hw: usize,
    length: usize,
    stride: usize,
) {
    use rand::seq::SliceRandom;
    let mut i = length;
    while i < f {
        let start = i - length;
        let end = (start + stride).min(f);
        let mut order: Vec<usize> = (start..end).collect();
        order.shuffle(rng);
        for (k, &src) in order.iter().enumerate() {
            let dst = i + k;
            if dst >= f {
                break;
            }
            for ch in 0..c {
                let (s0, d0) = ((ch * f + src) * hw, (ch * f + dst) * hw);
                noise.copy_within(s0..s0 + hw, d0);
            }
        }
        i += stride;
    }
}

/// How strongly the camera move steers step k of n (see `camera_guide`):
/// strong while the layout forms, none in the last third of the steps.
fn camera_weight(k: usize, n: usize) -> f32 {
    let progress = k as f32 / n.max(1) as f32;
    (0.8 * (1.0 - 1.5 * progress)).max(0.0)
}

/// Camera guidance, training-free: the latents for the next step, with
/// every frame's clean estimate and noise pulled towards frame 0's, warped
/// along the move to that frame's place in the clip. The latents are split
/// as `a·x0 + b·eps` at the next timestep (a and b from the scheduler's
/// own `add_noise`, so this holds for every scheduler); the x0 parts mix
/// linearly, the noise parts with square-root weights so that they stay
/// unit-variance.
#[allow(clippy::too_many_arguments)]
fn camera_guide(
    scheduler: &Scheduler,
    cam: Camera,
    latents: &[f32],
    x0: &[f32],
    next: f64,
    weight: f32,
    c: usize,
    f: usize,
    h: usize,
    w: usize,
) -> Result<Vec<f32>> {
    let a = scheduler.add_noise(&[1.0], &[0.0], next)?[0];
    let b = scheduler.add_noise(&[0.0], &[1.0], next)?[0];
    if b <= 1e-6 {
        return Ok(latents.to_vec());
    }
    let eps: Vec<f32> = latents
        .iter()
        .zip(x0)
        .map(|(l, x)| (l - a * x) / b)
        .collect();
    let (keep_x, take_x) = (1.0 - weight, weight);
    let (keep_e, take_e) = ((1.0 - weight).sqrt(), weight.sqrt());
    let mut out = latents.to_vec();
    let plane = h * w;
    for fi in 1..f {
        let p = fi as f32 / (f - 1) as f32;
        for y in 0..h {
            for x in 0..w {
                let (cx, cy) = (
                    x as f32 - (w as f32 - 1.0) / 2.0,
                    y as f32 - (h as f32 - 1.0) / 2.0,
                );
                let (ux, uy) = cam.source(p, cx, cy, w as f32, h as f32);
                let sx = (ux + (w as f32 - 1.0) / 2.0).clamp(0.0, (w - 1) as f32);
                let sy = (uy + (h as f32 - 1.0) / 2.0).clamp(0.0, (h - 1) as f32);
                for ch in 0..c {
                    let frame0 = ch * f * plane;
                    let o = frame0 + fi * plane + y * w + x;
                    let wx0 = bilinear(&x0[frame0..frame0 + plane], w, h, sx, sy);
                    let we0 = bilinear(&eps[frame0..frame0 + plane], w, h, sx, sy);
                    let xm = keep_x * x0[o] + take_x * wx0;
                    let em = keep_e * eps[o] + take_e * we0;
                    out[o] = a * xm + b * em;
                }
            }
        }
    }
    Ok(out)
}

/// Bilinear sample of a [h, w] plane at (x, y), inside the plane.
fn bilinear(plane: &[f32], w: usize, h: usize, x: f32, y: f32) -> f32 {
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let row = |yy: usize| plane[yy * w + x0] * (1.0 - fx) + plane[yy * w + x1] * fx;
    row(y0) * (1.0 - fy) + row(y1) * fy
}

/// The share of the initial noise common to all frames at motion level m.
pub fn motion_share(m: f32) -> f32 {
    // 0 → 0.6, 1 → 0.4, 2 → 0.2, 3 → 0.1, 4 → 0.
    const SHARE: [f32; 5] = [0.6, 0.4, 0.2, 0.1, 0.0];
    interpolate(&SHARE, m)
}

/// The motion-residual scale at motion level m (0.8 ..= 1.2).
pub fn motion_scale(m: f32) -> f32 {
    interpolate(&[0.8, 0.9, 1.0, 1.1, 1.2], m)
}

fn interpolate(table: &[f32; 5], m: f32) -> f32 {
    let m = m.clamp(0.0, 4.0);
    let i = (m.floor() as usize).min(3);
    let t = m - i as f32;
    table[i] * (1.0 - t) + table[i + 1] * t
}

/// Resizes (bilinear) and centre-crops `image` to cover width × height.
pub fn fit_image(image: &RgbImage, width: usize, height: usize) -> Vec<f32> {
    let scale = (width as f32 / image.width as f32).max(height as f32 / image.height as f32);
    let (sw, sh) = (image.width as f32 * scale, image.height as f32 * scale);
    let (ox, oy) = ((sw - width as f32) / 2.0, (sh - height as f32) / 2.0);
    let mut out = vec![0f32; width * height * 3];
    let px = |x: usize, y: usize, k: usize| image.data[(y * image.width + x) * 3 + k];
    for y in 0..height {
        for x in 0..width {
            let fx = ((x as f32 + 0.5 + ox) / scale - 0.5).clamp(0.0, (image.width - 1) as f32);
            let fy = ((y as f32 + 0.5 + oy) / scale - 0.5).clamp(0.0, (image.height - 1) as f32);
            let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
            let (x1, y1) = (
                (x0 + 1).min(image.width - 1),
                (y0 + 1).min(image.height - 1),
            );
            let (tx, ty) = (fx - x0 as f32, fy - y0 as f32);
            for k in 0..3 {
                let top = px(x0, y0, k) * (1.0 - tx) + px(x1, y0, k) * tx;
                let bottom = px(x0, y1, k) * (1.0 - tx) + px(x1, y1, k) * tx;
                out[(y * width + x) * 3 + k] = top * (1.0 - ty) + bottom * ty;
            }
        }
    }
    out
}
