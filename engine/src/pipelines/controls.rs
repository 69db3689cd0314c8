//! The settings of a request that not every family can honour, how a
//! family declares the ones it does, and the refusal of the others: a
//! setting a family cannot use is an error naming it and the model, never
//! silently dropped.

use std::path::Path;

use super::request::{DEFAULT_MOTION, DEFAULT_STRENGTH};
use super::Request;
use crate::error::{EngineError, Result};
use crate::schedulers::SchedulerKind;

/// A request setting that only some families honour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `motion` 0..4 (noise shared across frames, motion-module scale).
    Motion,
    /// `camera`: a training-free camera move.
    Camera,
    /// `image`: a still to animate.
    Image,
    /// `strength`: how far an image or video input is re-noised.
    Strength,
    /// `karras`: Karras sigmas for the scheduler.
    Karras,
    /// `clip_skip`: text-encoder layers skipped from the end.
    ClipSkip,
    /// `context`: FreeNoise context windows for long clips.
    ContextWindows,
    /// LoRA files fused into the weights (a load-time setting).
    Lora,
    /// `shift`: the flow-matching schedule's shift.
    Shift,
    /// `guidance_2`: the guidance scale of a second (low-noise) expert.
    SecondGuidance,
    /// `last_image`: a still the clip ends on.
    LastImage,
    /// `video`: input frames to transform.
    InputVideo,
    /// `latents`: given initial latents (reference cases).
    InitialLatents,
    /// `step_noise`: given per-step noise (reference cases).
    StepNoise,
}

impl Control {
    pub const ALL: [Control; 14] = [
        Control::Motion,
        Control::Camera,
        Control::Image,
        Control::Strength,
        Control::Karras,
        Control::ClipSkip,
        Control::ContextWindows,
        Control::Lora,
        Control::Shift,
        Control::SecondGuidance,
        Control::LastImage,
        Control::InputVideo,
        Control::InitialLatents,
        Control::StepNoise,
    ];

    /// The `Request` field that carries it (`loras` for LoRAs, which come
    /// with the model source): the name an error and a recipe use.
    pub fn field(self) -> &'static str {
        match self {
            Control::Motion => "motion",
            Control::Camera => "camera",
            Control::Image => "image",
            Control::Strength => "strength",
            Control::Karras => "karras",
            Control::ClipSkip => "clip_skip",
            Control::ContextWindows => "context",
            Control::Lora => "loras",
            Control::Shift => "shift",
            Control::SecondGuidance => "guidance_2",
            Control::LastImage => "last_image",
            Control::InputVideo => "video",
            Control::InitialLatents => "latents",
            Control::StepNoise => "step_noise",
        }
    }

    /// Whether `req` asks for it: an optional setting given, or a number
    /// away from [`Request::new`]'s default (a family without the control
    /// runs as if it had its default).
    pub fn is_set(self, req: &Request) -> bool {
        match self {
            Control::Motion => req.motion != DEFAULT_MOTION,
            Control::Camera => req.camera.is_some(),
            Control::Image => req.image.is_some(),
            Control::Strength => req.strength != DEFAULT_STRENGTH,
            Control::Karras => req.karras.is_some(),
            Control::ClipSkip => req.clip_skip != 0,
            Control::ContextWindows => req.context.is_some(),
            // Checked when the model loads (see `pipelines::load`).
            Control::Lora => false,
            Control::Shift => req.shift.is_some(),
            Control::SecondGuidance => req.guidance_2.is_some(),
            Control::LastImage => req.last_image.is_some(),
            Control::InputVideo => req.video.is_some(),
            Control::InitialLatents => req.latents.is_some(),
            Control::StepNoise => req.step_noise.is_some(),
        }
    }
}

/// How a model takes stills, read from its configs without loading a
/// weight: what the viewer's model picker shows and what the server and
/// Discord's /animate check before queueing a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stills {
    /// Generates from the prompt alone (an image-to-video model needs its still).
    pub text_to_video: bool,
    /// What it does with `image`, if it takes one.
    pub image: Option<StillUse>,
    /// Takes, and needs, `last_image` (a first-last-frame model).
    pub last_image: bool,
}

impl Stills {
    /// A text-to-video model that takes no still.
    pub const TEXT: Stills = Stills {
        text_to_video: true,
        image: None,
        last_image: false,
    };
}

/// How a model uses the still it is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StillUse {
    /// The still is VAE-encoded and pins the first frame of a text-to-video
    /// model at every step (AnimateDiff): the motion is the text model's.
    Anchor,
    /// The model was trained on image conditioning and reads the still
    /// itself (Wan image-to-video).
    Native,
}

/// What a family honours: the controls, and the schedulers
/// `Request::scheduler` may name.
#[derive(Debug, Clone, Copy)]
pub struct Controls {
    pub supported: &'static [Control],
    pub schedulers: &'static [SchedulerKind],
}

impl Controls {
    pub fn supports(&self, control: Control) -> bool {
        self.supported.contains(&control)
    }

    /// Refuses the first setting of `req` that these controls do not
    /// cover, naming it, the model and its family.
    pub fn check(&self, req: &Request, family: &'static str, model: &Path) -> Result<()> {
        let refuse = |control: String| EngineError::UnsupportedControl {
            control,
            model: model.to_path_buf(),
            family,
        };
        if let Some(c) = Control::ALL
            .into_iter()
            .find(|&c| !self.supports(c) && c.is_set(req))
        {
            return Err(refuse(c.field().to_string()));
        }
        match req.scheduler {
            Some(kind) if !self.schedulers.contains(&kind) => {
                Err(refuse(format!("scheduler {}", kind.name())))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::{Camera, ModelDefaults};

    /// A family that honours a still and DDIM only.
    const STILLS: Controls = Controls {
        supported: &[Control::Image],
        schedulers: &[SchedulerKind::Ddim],
    };

    fn request() -> Request {
        let defaults = ModelDefaults {
            width: 64,
            height: 64,
            frames: 4,
            steps: 2,
            guidance: 5.0,
            fps: 8.0,
            negative: String::new(),
            camera_prompts: Default::default(),
        };
        Request::new("a ball", &defaults)
    }

    fn refused(req: &Request) -> String {
        match STILLS.check(req, "Stills", Path::new("models/stills")) {
            Err(EngineError::UnsupportedControl { control, .. }) => control,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn settings_left_at_their_defaults_pass_and_others_are_named() {
        assert!(STILLS
            .check(&request(), "Stills", Path::new("models/stills"))
            .is_ok());
        let mut r = request();
        r.motion = 3.0;
        assert_eq!(refused(&r), "motion");
        let mut r = request();
        r.camera = Some(Camera::PanLeft);
        assert_eq!(refused(&r), "camera");
        let mut r = request();
        r.scheduler = Some(SchedulerKind::Euler);
        assert_eq!(refused(&r), "scheduler euler");
        let mut r = request();
        r.video = Some(Vec::new());
        let e = STILLS
            .check(&r, "Stills", Path::new("models/stills"))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "`video` is not supported by the model models/stills (Stills family)"
        );
    }
}
