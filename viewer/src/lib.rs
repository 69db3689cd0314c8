//! `motif view`: Motif's window. A controls panel, the clip forming live
//! (every frame's x0 preview after every step), playback and export after a
//! run, and a gallery of past clips. winit + egui + egui-wgpu, drawn on the
//! engine's own wgpu device; generation runs on a worker thread that owns
//! the engine's [`Gpu`], so the window keeps drawing while it works. The
//! previews are written by a compute shader into textures that egui draws
//! as they are (no copy to the CPU), and the worker keeps the loaded model
//! between Generates.
//!
//! The viewer holds no model logic: a [`Backend`] (the CLI) turns the panel's
//! [`Controls`] into a generation and writes the clip, exactly as
//! `motif generate` does.

mod app;
mod recipe;
mod ui;
mod worker;

use std::path::{Path, PathBuf};

use motif_engine::pipelines::{Event, ModelCache};
use motif_engine::Gpu;
use motif_recipe::{CameraMove, Recipe, Scheduler};

pub use motif_recipe;
pub use recipe::controls_from_recipe;

/// Everything the panel sets: one generation's settings, as concrete
/// values for its widgets; [`Controls::recipe`] is the recipe they make.
#[derive(Debug, Clone, PartialEq)]
pub struct Controls {
    pub prompt: String,
    /// Empty: the style's negative, else the model's.
    pub negative: String,
    pub style: Option<String>,
    pub camera: Option<CameraMove>,
    /// 0 (nearly still) ..= 4 (strong).
    pub motion: f32,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    /// Unlocked: every Generate draws a new seed.
    pub seed_locked: bool,
    pub steps: usize,
    pub guidance: f32,
    pub frames: usize,
    pub fps: f32,
    /// `None`: the model's scheduler config.
    pub scheduler: Option<Scheduler>,
    /// A name from the model list or a path.
    pub model: String,
    /// A still to animate, and how far the other frames may move from it
    /// (anchoring only: a native image-to-video model reads the still itself).
    pub image: Option<PathBuf>,
    pub strength: f32,
    /// The still the clip ends on (a first-last-frame model).
    pub last_image: Option<PathBuf>,
    /// The settings the panel has no widget for (LoRAs, VAE, motion
    /// adapter, Karras, clip skip, a later family's controls), from the
    /// flags or a remixed recipe: passed on unchanged.
    pub extra: Recipe,
}

/// The size, length and sampling a model proposes (its card, else its
/// family's published defaults), and what its family takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub steps: usize,
    pub guidance: f32,
    pub fps: f32,
    /// The model's family ("AnimateDiff", "Wan"); empty when unknown.
    pub family: &'static str,
    /// Widths and heights come in multiples of this (8: the SD VAE; 16:
    /// Wan's VAE × its transformer's patch).
    pub size_multiple: usize,
    /// Frame counts come as 1 + k × this (1: any count; 4: Wan's causal VAE).
    pub frame_step: usize,
    /// Whether the family honours the motion slider, a camera move.
    pub motion: bool,
    pub camera: bool,
    /// What the model does from a prompt and with stills.
    pub takes: Takes,
}

/// How a model takes stills, as the picker shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Takes {
    /// Generates from the prompt alone.
    pub text_to_video: bool,
    pub image: ImageUse,
    /// Takes, and needs, the still the clip ends on (first-last frame).
    pub last_image: bool,
}

/// What a model does with the image slot's still.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageUse {
    /// Takes no still (a text-to-video model without anchoring: Wan T2V).
    None,
    /// The still anchors the first frame of a text-to-video model
    /// (AnimateDiff), the other frames moving from it by `strength`.
    Anchor,
    /// A model trained for image-to-video reads the still (Wan I2V).
    Native,
}

impl Takes {
    /// AnimateDiff's: text-to-video, a still anchoring the first frame.
    pub const ANCHORING: Takes = Takes {
        text_to_video: true,
        image: ImageUse::Anchor,
        last_image: false,
    };

    /// One line for the picker: "text-to-video · image anchoring",
    /// "image-to-video (needs an image)", "first-last frame (needs both images)".
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.text_to_video {
            parts.push("text-to-video");
        }
        match (self.image, self.last_image) {
            (ImageUse::None, _) => {}
            (ImageUse::Anchor, _) => parts.push("image anchoring (first frame)"),
            (ImageUse::Native, false) => parts.push("image-to-video"),
            (ImageUse::Native, true) => parts.push("first-last frame"),
        }
        let mut line = parts.join(" · ");
        if !self.text_to_video {
            line.push_str(if self.last_image {
                " (needs both images)"
            } else {
                " (needs an image)"
            });
        }
        line
    }
}

impl ModelDefaults {
    /// AnimateDiff's published settings and rules (a model whose family
    /// is not known, such as one only a server has).
    pub const ANIMATEDIFF: ModelDefaults = ModelDefaults {
        width: 512,
        height: 512,
        frames: 16,
        steps: 25,
        guidance: 7.5,
        fps: 8.0,
        family: "",
        size_multiple: 8,
        frame_step: 1,
        motion: true,
        camera: true,
        takes: Takes::ANCHORING,
    };

    /// The family's name for messages ("this model" when unknown).
    pub fn family_name(&self) -> &'static str {
        match self.family {
            "" => "this model",
            f => f,
        }
    }

    /// The nearest width or height the model takes.
    pub fn snap_size(&self, v: f64) -> usize {
        let m = self.size_multiple.max(1);
        ((v / m as f64).round() as usize).max(1) * m
    }

    /// The nearest frame count the model takes.
    pub fn snap_frames(&self, frames: usize) -> usize {
        let step = self.frame_step.max(1);
        (frames.max(1) - 1 + step / 2) / step * step + 1
    }
}

impl Controls {
    /// A fresh panel for `model` at its defaults.
    pub fn new(model: &str, d: &ModelDefaults) -> Self {
        Controls {
            prompt: String::new(),
            negative: String::new(),
            style: None,
            camera: None,
            motion: 2.0,
            width: d.width,
            height: d.height,
            seed: 0,
            seed_locked: false,
            steps: d.steps,
            guidance: d.guidance,
            frames: d.frames,
            fps: d.fps,
            scheduler: None,
            model: model.to_string(),
            image: None,
            strength: 0.8,
            last_image: None,
            extra: Recipe::default(),
        }
    }
}

/// A clip the backend wrote.
#[derive(Debug, Clone)]
pub struct Saved {
    pub clip: PathBuf,
    pub recipe: PathBuf,
    pub width: usize,
    pub height: usize,
    pub fps: f32,
    /// RGB8 frames, as written.
    pub frames: Vec<Vec<u8>>,
}

/// What the viewer needs from the program around it.
pub trait Backend: Send + Sync + 'static {
    /// The defaults the panel shows for `model`.
    fn defaults(&self, model: &str) -> anyhow::Result<ModelDefaults>;
    /// Runs one generation on `gpu` with the model from `models` (loaded
    /// there only when it is not the one held), with x0 previews written to
    /// textures (`Request::gpu_previews`) on every step event, and writes
    /// the clip to `output` with its recipe. `say` takes status lines
    /// (`model loaded: …`); `events` returns false to cancel. `Ok(None)`:
    /// cancelled, nothing written.
    fn generate(
        &self,
        gpu: &Gpu,
        models: &mut ModelCache,
        controls: &Controls,
        output: &Path,
        say: &dyn Fn(&str),
        events: &mut dyn FnMut(Event) -> bool,
    ) -> anyhow::Result<Option<Saved>>;

    /// Whether clips can be published to a gallery (the window then shows Publish).
    fn can_publish(&self) -> bool {
        false
    }

    /// Publishes a clip this backend made; returns the address of its page.
    fn publish(&self, _saved: &Saved) -> anyhow::Result<String> {
        anyhow::bail!("local clips have no gallery: run the viewer with --server")
    }
}

/// A model the picker offers.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    pub name: String,
    pub path: String,
    /// What it takes (`None`: unknown here, such as a model only a server has).
    pub takes: Option<Takes>,
}

/// The scripted mode, for tests and documentation screenshots.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Start generating as soon as the window is up.
    pub auto_generate: bool,
    /// Save a PNG of the whole window here (at `screenshot_at_step`, else
    /// when the run ends), print where the clip is drawn, and exit.
    pub screenshot: Option<PathBuf>,
    /// 1-based step after whose preview the screenshot is taken.
    pub screenshot_at_step: Option<usize>,
    /// Press Cancel right after this (1-based) step's preview.
    pub cancel_at_step: Option<usize>,
    /// Press Publish when the run ends (prints `published: URL`).
    pub publish: bool,
    /// Generations in a row, each started when the last is saved (0 or 1:
    /// one); the screenshot is of the last. Shows that the model stays loaded.
    pub repeat: usize,
}

impl Script {
    fn active(&self) -> bool {
        self.auto_generate || self.screenshot.is_some()
    }
}

pub struct Options {
    /// The panel's starting settings.
    pub controls: Controls,
    pub styles: Vec<String>,
    pub models: Vec<ModelChoice>,
    /// Where clips are written and the gallery reads from.
    pub outputs: PathBuf,
    pub script: Script,
}

/// Opens the window and runs until it closes (or, scripted, until the
/// script is done). Returns the process exit code: 0, or 1 when a scripted
/// run failed.
pub fn run(gpu: Gpu, backend: impl Backend, options: Options) -> anyhow::Result<i32> {
    app::run(gpu, Box::new(backend), options)
}
