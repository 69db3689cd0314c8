//! One generation's settings as the engine takes them, and the defaults a
//! model proposes for them.

use super::argument;
use super::camera::Camera;
use super::image::RgbImage;
use crate::error::Result;
use crate::schedulers::SchedulerKind;

/// Defaults a model proposes: its `motif.json` (our model card's settings)
/// where present, else its family's published ones.
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

/// `Request::motion` unless set: the middle of 0..4.
pub const DEFAULT_MOTION: f32 = 2.0;
/// `Request::strength` unless set (diffusers' img2img default).
pub const DEFAULT_STRENGTH: f32 = 0.8;

/// One generation. Settings a model's family does not honour must stay at
/// their defaults (`None`, or `Request::new`'s value): the family refuses
/// them by name otherwise (see `Controls`).
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
    /// The flow-matching schedule's shift (Wan); `None`: the model's.
    pub shift: Option<f32>,
    /// The guidance scale of the second, low-noise expert (Wan 2.2's
    /// `guidance_scale_2`); `None`: `guidance`.
    pub guidance_2: Option<f32>,
    /// A still the clip ends on (first-last-frame models).
    pub last_image: Option<RgbImage>,
    /// Input frames to transform, re-noised to `strength` (video to video).
    pub video: Option<Vec<RgbImage>>,
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
            strength: DEFAULT_STRENGTH,
            motion: DEFAULT_MOTION,
            camera: None,
            shift: None,
            guidance_2: None,
            last_image: None,
            video: None,
            latents: None,
            step_noise: None,
            context: None,
            previews: false,
            gpu_previews: false,
            trace: false,
        }
    }

    /// The checks every family makes of the settings they all share: a
    /// size and a frame count of at least 1 whose latents the GPU can index,
    /// at least one step, a finite guidance ≥ 0, and given initial latents of
    /// the length the family's latent shape has (`shape`, for the message).
    pub(crate) fn check_shared(&self, latent_shape: &[usize]) -> Result<()> {
        if self.width == 0 || self.height == 0 || self.frames == 0 {
            return Err(argument(format!(
                "a {}x{} clip of {} frames: width, height and frames must be at least 1",
                self.width, self.height, self.frames
            )));
        }
        // The shaders index tensors with u32: a latent past that would wrap,
        // whatever the adapter's memory (a size derived from an extreme aspect
        // ratio reaches it).
        let values = latent_shape
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64));
        if values.is_none_or(|n| n > u32::MAX as u64) {
            return Err(argument(format!(
                "a {}x{} clip of {} frames has latents of {latent_shape:?}: more values than \
                 the GPU kernels can index (at most {})",
                self.width,
                self.height,
                self.frames,
                u32::MAX
            )));
        }
        if self.steps == 0 {
            return Err(argument("steps must be at least 1"));
        }
        if !(self.guidance.is_finite() && self.guidance >= 0.0) {
            return Err(argument(format!(
                "guidance {} must be a finite number ≥ 0",
                self.guidance
            )));
        }
        let len: usize = latent_shape.iter().product();
        match &self.latents {
            Some(l) if l.len() != len => Err(argument(format!(
                "initial latents have {} values, expected {len} ({latent_shape:?})",
                l.len()
            ))),
            _ => Ok(()),
        }
    }
}
