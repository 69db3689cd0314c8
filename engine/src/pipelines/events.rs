//! What a generation reports while it runs and what it returns, the same
//! for every family. A caller's `events` callback returning false cancels:
//! the generation stops at the next event with `EngineError::Cancelled`.

use super::FrameTextures;
use crate::error::{EngineError, Result};
use crate::schedulers::SchedulerKind;
use crate::text::tokenizer::MAX_LENGTH;

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
    /// A two-expert model (Wan 2.2 A14B) changes expert before step
    /// `step`: `freed` (if any) has left the device, `name` loads now.
    Expert {
        name: &'static str,
        freed: Option<&'static str>,
        step: usize,
    },
}

/// Sends `event` to the caller's callback; `Err(Cancelled)` when it
/// returned false. Every family reports through this, so cancellation
/// means the same everywhere.
pub(crate) fn emit(events: &mut dyn FnMut(Event) -> bool, event: Event) -> Result<()> {
    match events(event) {
        true => Ok(()),
        false => Err(EngineError::Cancelled),
    }
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
    /// Image-to-video: the image encoder's tokens [N, T, D] (N = 2 for a
    /// first and a last image).
    pub image_embeds: Vec<f32>,
    /// Image-to-video: the conditioning channels beside the latents
    /// [1, 4 + z, f, h, w] (frame mask, encoded conditioning video).
    pub condition: Vec<f32>,
}

#[derive(Debug, Clone)]
pub struct Generated {
    pub width: usize,
    pub height: usize,
    /// RGB8 frames.
    pub frames: Vec<Vec<u8>>,
    /// [F, H, W, 3] in [0, 1], before quantisation: only for a request
    /// with `trace` (reference cases); a clip is kept in one form, RGB8.
    pub frames_f32: Option<Vec<f32>>,
    /// Final latents [1, C, F, h, w].
    pub latents: Vec<f32>,
    pub scheduler: SchedulerKind,
    pub trace: Option<Trace>,
}
