//! `motif generate`: settings from flags, a recipe (`--from`), a style
//! preset and the model's defaults, in that order of precedence; every check
//! that needs no GPU runs before the GPU opens; the clip is written under a
//! temporary name and renamed at the end, with its recipe beside it and
//! inside it.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use motif_engine::models::source::{ModelSource, ModelSpec};
use motif_engine::pipelines::{
    Camera, Control, Event, ModelCache, Request, RgbImage, MIN_IMAGE_SIDE,
};
use motif_engine::schedulers::SchedulerKind;
use motif_engine::Gpu;
use motif_recipe::{CameraMove, FieldError, Lora, Recipe, Scheduler};
use serde_json::{json, Value};

use crate::catalog;

/// The settings of one generation as flags: `motif generate` and `motif
/// view` both flatten this group (the prompt stays theirs: positional in
/// one, `--prompt` in the other). Each flag is a [`Recipe`] field.
#[derive(Args, Debug, Clone, Default)]
pub struct RecipeArgs {
    /// What to steer away from (classifier-free guidance's negative prompt).
    #[arg(long)]
    pub negative: Option<String>,
    /// A diffusers folder, a single-file .safetensors checkpoint, a name from `motif models`, or an org/name in the Hugging Face cache.
    #[arg(long, short = 'm', env = "MOTIF_MODEL")]
    pub model: Option<String>,
    /// AnimateDiff motion module for a plain SD model: folder, file (original or diffusers format) or org/name.
    #[arg(long)]
    pub motion_adapter: Option<String>,
    /// A VAE to use instead of the model's: .safetensors file (LDM, diffusers or Wan names) or folder.
    #[arg(long)]
    pub vae: Option<String>,
    /// The text encoder of a single-file Wan model: a UMT5 .safetensors file (ComfyUI's umt5_xxl, tokenizer inside).
    #[arg(long)]
    pub text_encoder: Option<String>,
    /// The low-noise expert of a single-file Wan 2.2 A14B model, when it is not the …low_noise… file beside the …high_noise… --model.
    #[arg(long = "transformer-2")]
    pub transformer_2: Option<String>,
    /// A LoRA to fuse, with an optional weight (default 1): FILE or FILE:0.8. Repeatable.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Animate this still (PNG, JPEG or WebP): it becomes the first frame. AnimateDiff resizes and centre-crops it to the output size; a Wan image-to-video model resizes it (without cropping, as diffusers does) and also reads it through its CLIP image encoder.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// With --image, on a first-last-frame model (Wan2.1-FLF2V): the still the clip ends on.
    #[arg(long)]
    pub last_image: Option<PathBuf>,
    /// With --image: how far the other frames may move from the still, 0 < S <= 1 [default: 0.8].
    #[arg(long)]
    pub strength: Option<f32>,
    /// Output width in pixels (a multiple of 8).
    #[arg(long)]
    pub width: Option<u32>,
    /// Output height in pixels (a multiple of 8).
    #[arg(long)]
    pub height: Option<u32>,
    /// Aspect ratio such as 16:9, 9:16, 1:1, 4:5: keeps the model's pixel count (or the given width or height).
    #[arg(long)]
    pub aspect: Option<String>,
    /// Number of frames.
    #[arg(long)]
    pub frames: Option<u32>,
    /// Frames per second of the written clip.
    #[arg(long)]
    pub fps: Option<f32>,
    /// Denoising steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale; 1 skips the unconditional pass.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Seed for the noise: the same seed gives the same clip on the same adapter. Random (and printed) when absent; fixed, it locks the viewer's seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// ddim, euler, euler-a, dpm++2m or lcm [default: the model's scheduler config].
    #[arg(long)]
    pub scheduler: Option<Scheduler>,
    /// Karras sigmas (euler, dpm++2m).
    #[arg(long)]
    pub karras: bool,
    /// How much the clip moves, 0 (nearly still) to 4 (strong) [default: 2].
    #[arg(long)]
    pub motion: Option<f32>,
    /// zoom-in, zoom-out, pan-left, pan-right, tilt-up, tilt-down, roll-cw or roll-ccw.
    #[arg(long)]
    pub camera: Option<CameraMove>,
    /// A style preset (see `motif styles`).
    #[arg(long)]
    pub style: Option<String>,
    /// Use the text encoder's penultimate layer (1) instead of the last (0).
    #[arg(long)]
    pub clip_skip: Option<u32>,
    /// Flow-matching models (Wan): the sampler's shift, over the model's
    /// scheduler config (Wan 2.1 ships 3.0 for 480p, 5.0 is used for 720p).
    #[arg(long)]
    pub shift: Option<f32>,
    /// Two-expert models (Wan 2.2 A14B): the guidance scale of the low-noise expert [default: --guidance].
    #[arg(long = "guidance-2")]
    pub guidance_2: Option<f32>,
}

impl RecipeArgs {
    /// The flags given, as recipe fields (`prompt` is the command's own).
    pub fn recipe(&self, prompt: Option<String>) -> Result<Recipe> {
        let loras = (self.loras.iter())
            .map(|s| Lora::parse(s).map_err(flag_error))
            .collect::<Result<Vec<_>>>()?;
        Ok(Recipe {
            prompt,
            negative: self.negative.clone(),
            model: self.model.clone(),
            motion_adapter: self.motion_adapter.clone(),
            vae: self.vae.clone(),
            text_encoder: self.text_encoder.clone(),
            transformer_2: self.transformer_2.clone(),
            loras,
            image: self
                .image
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            last_image: self
                .last_image
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            strength: self.strength,
            width: self.width,
            height: self.height,
            aspect: self.aspect.clone(),
            frames: self.frames,
            fps: self.fps,
            steps: self.steps,
            guidance: self.guidance,
            seed: self.seed,
            scheduler: self.scheduler,
            karras: self.karras.then_some(true),
            motion: self.motion,
            camera: self.camera,
            style: self.style.clone(),
            clip_skip: self.clip_skip,
            shift: self.shift,
            guidance_2: self.guidance_2,
            ..Default::default()
        })
    }
}

#[derive(Args, Debug, Clone, Default)]
#[command(after_help = "\
Defaults come from the model: its motif.json card where it has one, else AnimateDiff's \
(512x512, 16 frames, 25 steps, guidance 7.5, 8 fps, the model's scheduler). Flags override \
a --from recipe, which overrides a --style preset, which overrides the model.

Prompt weighting: (word:1.3) sets a weight, (word) multiplies by 1.1, ((word)) by 1.21, \
[word] divides by 1.1; \\( and \\) are literal brackets.

Camera moves name how the picture content moves: pan-left shifts it left, tilt-up up, \
zoom-in enlarges it, roll-cw turns it clockwise.")]
pub struct GenerateArgs {
    /// What the clip shows.
    pub prompt: Option<String>,
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Output file: .mp4, .gif, .webp, or a folder (no extension) of PNG frames [default: motif-SEED.mp4].
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    /// Remix: start from this recipe (a clip's .json sidecar, or a clip Motif wrote); flags given here override it.
    #[arg(long)]
    pub from: Option<PathBuf>,
    /// No progress bar.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print one JSON event per line on stdout (start, step, decoded, done) instead of a progress bar.
    #[arg(long)]
    pub json: bool,
}

impl GenerateArgs {
    /// The flags over the `--from` recipe.
    pub fn recipe(&self) -> Result<Recipe> {
        let flags = self.recipe.recipe(self.prompt.clone())?;
        Ok(match &self.from {
            Some(path) => flags.over(read_recipe(path)?),
            None => flags,
        })
    }
}

/// A recipe field at fault on the command line: shown as its flag
/// (`--width 30: expected ...`); the server names the field from it.
#[derive(Debug)]
pub struct FlagError(pub FieldError);

impl std::fmt::Display for FlagError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let field = self.0.field.as_str();
        match field {
            "prompt" => write!(f, "the prompt: {}", self.0.reason),
            "loras" => write!(f, "--lora {}", self.0.reason),
            _ => write!(f, "--{} {}", field.replace('_', "-"), self.0.reason),
        }
    }
}

impl std::error::Error for FlagError {}

/// A recipe field's error as an `anyhow` error that keeps its field.
pub fn flag_error(e: FieldError) -> anyhow::Error {
    FlagError(e).into()
}

/// The recipe field an error of [`prepare`] or [`generate_cached`] is about,
/// where it is about one.
pub fn recipe_field(e: &anyhow::Error) -> Option<&FieldError> {
    e.chain()
        .find_map(|c| c.downcast_ref::<FlagError>())
        .map(|f| &f.0)
}

/// Reads the recipe of a `.json` sidecar or of a clip Motif wrote.
pub fn read_recipe(path: &Path) -> Result<Recipe> {
    let text = motif_video::read_recipe(path)
        .with_context(|| format!("reading the recipe of {}", path.display()))?;
    Recipe::from_json(&text).with_context(|| format!("{}: the recipe", path.display()))
}

/// The recipe's scheduler as the engine's.
fn engine_scheduler(s: Scheduler) -> SchedulerKind {
    match s {
        Scheduler::Ddim => SchedulerKind::Ddim,
        Scheduler::Euler => SchedulerKind::Euler,
        Scheduler::EulerAncestral => SchedulerKind::EulerAncestral,
        Scheduler::DpmPp2m => SchedulerKind::DpmPp2m,
        Scheduler::Lcm => SchedulerKind::Lcm,
        Scheduler::UniPc => SchedulerKind::UniPc,
        Scheduler::FlowEuler => SchedulerKind::FlowMatchEuler,
    }
}

/// The engine's scheduler as the recipe records it.
fn recipe_scheduler(s: SchedulerKind) -> Scheduler {
    match s {
        SchedulerKind::Ddim => Scheduler::Ddim,
        SchedulerKind::Euler => Scheduler::Euler,
        SchedulerKind::EulerAncestral => Scheduler::EulerAncestral,
        SchedulerKind::DpmPp2m => Scheduler::DpmPp2m,
        SchedulerKind::Lcm => Scheduler::Lcm,
        SchedulerKind::UniPc => Scheduler::UniPc,
        SchedulerKind::FlowMatchEuler => Scheduler::FlowEuler,
    }
}

/// Everything that decides a clip: the recipe with the CLI's defaults
/// (prompt, model, seed, motion, strength, clip skip) filled in.
#[derive(Debug, Clone)]
struct Settings {
    recipe: Recipe,
    prompt: String,
    model: String,
    seed: u64,
    strength: f32,
    motion: f32,
    clip_skip: u32,
}

impl Settings {
    /// Checks every value that needs no model and fills in the defaults.
    fn resolve(recipe: Recipe) -> Result<Self> {
        let prompt = recipe
            .prompt
            .clone()
            .ok_or_else(|| anyhow!("no prompt: pass the text of the clip (or --from a recipe)"))?;
        let model = match &recipe.model {
            Some(m) => m.clone(),
            // Recorded by name, so that a recipe replays on another machine.
            None => "default".to_string(),
        };
        recipe.validate().map_err(flag_error)?;
        // The model's family refuses what it cannot honour (shift, a second
        // guidance, a last image) by name; inputs no family takes yet (an
        // input video) are refused here, before anything is read.
        if let Some(field) = recipe
            .family_controls()
            .into_iter()
            .find(|f| !matches!(*f, "shift" | "guidance_2" | "last_image"))
        {
            return Err(flag_error(FieldError::new(
                field,
                format!("is not supported by any model family yet (model {model})"),
            )));
        }
        if recipe.last_image.is_some() && recipe.image.is_none() {
            return Err(flag_error(FieldError::new(
                "last_image",
                "needs a first image too: pass --image FIRST with --last-image LAST",
            )));
        }
        if let Some(name) = &recipe.style {
            catalog::style(name)
                .map_err(|e| flag_error(FieldError::new("style", format!("{name}: {e}"))))?;
        }
        let seed = recipe.seed.unwrap_or_else(|| rand::random::<u32>() as u64);
        Ok(Settings {
            prompt,
            model,
            seed,
            strength: recipe.strength.unwrap_or(0.8),
            motion: recipe.motion.unwrap_or(2.0),
            clip_skip: recipe.clip_skip.unwrap_or(0),
            recipe,
        })
    }

    fn image(&self) -> Option<PathBuf> {
        self.recipe.image.as_ref().map(PathBuf::from)
    }

    fn camera(&self) -> Option<Camera> {
        // The engine's camera type is the recipe's.
        self.recipe.camera
    }

    /// The recipe the clip is written with: every setting as resolved, in
    /// the fields (and the `null`s) the release before this one wrote.
    fn written(&self, req: &Request, fps: f32, scheduler: SchedulerKind) -> Recipe {
        let r = &self.recipe;
        Recipe {
            motif_version: Some(env!("CARGO_PKG_VERSION").to_string()),
            prompt: Some(self.prompt.clone()),
            negative: Some(req.negative.clone()),
            style: r.style.clone(),
            model: Some(self.model.clone()),
            motion_adapter: r.motion_adapter.clone(),
            vae: r.vae.clone(),
            text_encoder: r.text_encoder.clone(),
            transformer_2: r.transformer_2.clone(),
            loras: r.loras.clone(),
            image: r.image.clone(),
            last_image: r.last_image.clone(),
            strength: r.image.as_ref().map(|_| self.strength),
            width: Some(req.width as u32),
            height: Some(req.height as u32),
            frames: Some(req.frames as u32),
            fps: Some(fps),
            steps: Some(req.steps as u32),
            guidance: Some(req.guidance),
            seed: Some(self.seed),
            scheduler: Some(recipe_scheduler(scheduler)),
            karras: Some(r.karras.unwrap_or(false)),
            motion: Some(self.motion),
            camera: r.camera,
            clip_skip: Some(self.clip_skip),
            shift: req.shift,
            guidance_2: req.guidance_2,
            ..Default::default()
        }
    }
}

fn load_image(path: &Path) -> Result<RgbImage> {
    let img = image::open(path)
        .with_context(|| {
            format!(
                "{}: cannot read the image (PNG, JPEG or WebP expected)",
                path.display()
            )
        })?
        .to_rgb8();
    let (w, h) = img.dimensions();
    if (w as usize) < MIN_IMAGE_SIDE || (h as usize) < MIN_IMAGE_SIDE {
        bail!(
            "{}: the image is {w}x{h} pixels; at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is needed",
            path.display()
        );
    }
    Ok(RgbImage {
        width: w as usize,
        height: h as usize,
        data: img.into_raw().iter().map(|&v| v as f32 / 255.0).collect(),
    })
}

/// Emits progress: a bar on a terminal, JSON lines, or nothing.
struct Progress {
    json: bool,
    start: Instant,
}

impl Progress {
    fn new(args: &GenerateArgs) -> Self {
        Progress {
            json: args.json,
            start: Instant::now(),
        }
    }

    fn show_bar(&self, args: &GenerateArgs) -> bool {
        !args.quiet && !args.json && std::io::stderr().is_terminal()
    }

    fn event(&self, value: Value) {
        if self.json {
            println!("{value}");
        }
    }
}

/// A generation ready to run: settings checked, stills read, model found,
/// output format known. Nothing has touched the GPU yet.
pub struct Prepared {
    settings: Settings,
    output: PathBuf,
    image: Option<RgbImage>,
    last_image: Option<RgbImage>,
    source: ModelSource,
    /// What the model was opened from (model, adapter, VAE, LoRAs): equal
    /// keys load equal weights, so a cached model can be reused.
    model_key: String,
    camera_lora: Option<PathBuf>,
}

impl Prepared {
    pub fn seed(&self) -> u64 {
        self.settings.seed
    }

    /// What the model is opened from (model, motion adapter, VAE, LoRAs):
    /// the key of a [`ModelCache`] that may already hold it.
    pub fn model_key(&self) -> &str {
        &self.model_key
    }

    /// The clip's width, height and frame count as [`generate_cached`] will
    /// make them, from the model's card and family without loading it: the
    /// size a server bounds before queueing a job.
    pub fn clip_size(&self) -> Result<(u32, u32, u32)> {
        let family = motif_engine::pipelines::family_of(&self.source)?;
        let defaults = family.defaults_for(&self.source)?;
        let r = &self.settings.recipe;
        let (width, height) = r
            .size(
                (defaults.width as u32, defaults.height as u32),
                family.size_multiple as u32,
            )
            .map_err(flag_error)?;
        let frames = r.frames.unwrap_or(defaults.frames as u32);
        Ok((width, height, frames))
    }
}

/// A clip written to disk.
pub struct Finished {
    pub output: PathBuf,
    pub recipe: PathBuf,
    pub clip: motif_engine::pipelines::Generated,
    pub fps: f32,
}

/// Every check that needs no GPU: the recipe's values, the still, the
/// LoRA files, the output format (`output`, default `motif-SEED.mp4`), the
/// model's files. An error about a recipe field carries it ([`recipe_field`]).
pub fn prepare(recipe: Recipe, output: Option<PathBuf>) -> Result<Prepared> {
    let mut settings = Settings::resolve(recipe)?;
    let output = output.unwrap_or_else(|| PathBuf::from(format!("motif-{}.mp4", settings.seed)));
    motif_video::format_for(&output).with_context(|| format!("--output {}", output.display()))?;
    let image = settings
        .image()
        .map(|p| load_image(&p).map_err(|e| flag_error(FieldError::new("image", format!("{e:#}")))))
        .transpose()?;
    let last_image = (settings.recipe.last_image.as_ref())
        .map(|p| {
            load_image(Path::new(p))
                .map_err(|e| flag_error(FieldError::new("last_image", format!("{e:#}"))))
        })
        .transpose()?;

    let model = catalog::resolve_model_name(&settings.model).map_err(|e| {
        flag_error(FieldError::new(
            "model",
            format!("{}: {e:#}", settings.model),
        ))
    })?;
    let mut spec = model_spec(&settings, &model)?;
    // A Wan transformer alone: the one text encoder and VAE of the models
    // folder that fit it are taken, said aloud, and written into the
    // recipe so that it replays with the same files.
    let picked = catalog::companions(
        Path::new(&model),
        spec.text_encoder.is_none(),
        spec.vae.is_none(),
    )
    .map_err(|e| {
        flag_error(FieldError::new(
            "model",
            format!("{}: {e:#}", settings.model),
        ))
    })?;
    for (flag, name, path) in picked {
        eprintln!(
            "{}: using {name} ({}), the only one in the models folder that fits",
            flag.name(),
            path.display()
        );
        let path = Some(path.to_string_lossy().into_owned());
        match flag {
            catalog::Flag::TextEncoder => {
                (settings.recipe.text_encoder, spec.text_encoder) = (Some(name), path)
            }
            _ => (settings.recipe.vae, spec.vae) = (Some(name), path),
        }
    }
    // A motion LoRA the model ships for this camera move
    // (`motion_loras/<move>.safetensors`) replaces the training-free warp.
    let camera_lora = settings.recipe.camera.and_then(|c| {
        let p = Path::new(&model)
            .join("motion_loras")
            .join(format!("{}.safetensors", c.name()));
        p.is_file().then_some(p)
    });
    if let Some(p) = &camera_lora {
        spec.loras.push((p.to_string_lossy().into_owned(), 1.0));
    }
    let source = ModelSource::open(&spec).map_err(|e| {
        flag_error(FieldError::new(
            "model",
            format!("{}: cannot open it: {e:#}", settings.model),
        ))
    })?;
    Ok(Prepared {
        settings,
        output,
        image,
        last_image,
        source,
        model_key: format!("{spec:?}"),
        camera_lora,
    })
}

/// Loads the model, generates and writes the clip with its recipe.
/// `say` receives status lines, `on_request` the final request just before
/// denoising starts (it may ask for previews), `events` every engine event (returning false cancels).
/// `Ok(None)`: cancelled, nothing written.
pub fn generate_on(
    gpu: &Gpu,
    prepared: Prepared,
    say: &dyn Fn(&str),
    on_request: &mut dyn FnMut(&mut Request),
    events: &mut dyn FnMut(Event) -> bool,
) -> Result<Option<Finished>> {
    let mut models = ModelCache::default();
    generate_cached(gpu, prepared, &mut models, say, on_request, events)
}

/// [`generate_on`] with the model taken from `models`: loaded only when it
/// is not the one held (the viewer keeps one between Generates). `say`
/// reports `model loaded: PATH (S s)` or `model kept loaded: PATH`.
pub fn generate_cached(
    gpu: &Gpu,
    prepared: Prepared,
    models: &mut ModelCache,
    say: &dyn Fn(&str),
    on_request: &mut dyn FnMut(&mut Request),
    events: &mut dyn FnMut(Event) -> bool,
) -> Result<Option<Finished>> {
    let Prepared {
        settings,
        output,
        image,
        last_image,
        source,
        model_key,
        camera_lora,
    } = prepared;
    say(&format!("adapter: {} ({})", gpu.adapter(), gpu.precision()));
    if models.key() != Some(model_key.as_str()) {
        say(&format!("loading {}", source.path().display()));
    }
    let started = Instant::now();
    let (pipe, loaded) = models
        .get(gpu, &model_key, &source)
        .with_context(|| format!("loading the model {}", source.path().display()))?;
    say(&match loaded {
        true => format!(
            "model loaded: {} ({:.1} s)",
            source.path().display(),
            started.elapsed().as_secs_f64()
        ),
        false => format!("model kept loaded: {}", source.path().display()),
    });
    let defaults = pipe.defaults().clone();
    let r = &settings.recipe;
    let (width, height) = r
        .size(
            (defaults.width as u32, defaults.height as u32),
            pipe.scale_factor() as u32,
        )
        .map_err(flag_error)?;
    let (width, height) = (width as usize, height as usize);

    // A camera move the model was trained to read from the caption.
    let user_prompt = match r
        .camera
        .filter(|_| camera_lora.is_none())
        .and_then(|c| defaults.camera_prompts.get(c.name()))
    {
        Some(words) => {
            say(&format!("camera: adding \"{words}\" to the prompt"));
            format!("{}, {words}", settings.prompt)
        }
        None => settings.prompt.clone(),
    };
    let (prompt, style_negative) = match &r.style {
        Some(name) => {
            let s = catalog::style(name)?;
            (s.prompt.replace("{prompt}", &user_prompt), Some(s.negative))
        }
        None => (user_prompt, None),
    };
    let mut req = Request::new(prompt, &defaults);
    req.negative = match (&r.negative, style_negative) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => n,
        (None, None) => defaults.negative.clone(),
    };
    req.width = width;
    req.height = height;
    req.frames = r.frames.map_or(defaults.frames, |f| f as usize);
    req.steps = r.steps.map_or(defaults.steps, |s| s as usize);
    req.guidance = r.guidance.unwrap_or(defaults.guidance);
    req.seed = settings.seed;
    req.scheduler = r.scheduler.map(engine_scheduler);
    req.karras = r.karras.filter(|k| *k);
    req.shift = r.shift;
    req.guidance_2 = r.guidance_2;
    req.clip_skip = settings.clip_skip as usize;
    req.image = image;
    req.last_image = last_image;
    req.strength = settings.strength;
    req.motion = settings.motion;
    req.camera = if camera_lora.is_some() {
        None
    } else {
        settings.camera()
    };
    if let Some(p) = &camera_lora {
        say(&format!("camera: motion LoRA {}", p.display()));
    }
    pipe.validate(&req)?;
    // As diffusers: the low-noise expert's guidance is the first's unless
    // given; the recipe records the value used.
    if req.guidance_2.is_none() && pipe.controls().supports(Control::SecondGuidance) {
        req.guidance_2 = Some(req.guidance);
    }
    let fps = r.fps.unwrap_or(defaults.fps);
    on_request(&mut req);

    let clip = match pipe.generate(gpu, &req, events) {
        Ok(c) => c,
        Err(motif_engine::EngineError::Cancelled) => return Ok(None),
        Err(e) => return Err(e).context("generating"),
    };
    let recipe_text = settings.written(&req, fps, clip.scheduler).to_json_pretty();
    motif_video::write_clip(
        &output,
        &motif_video::Clip {
            width: clip.width as u32,
            height: clip.height as u32,
            fps,
            frames: clip.frames.clone(),
        },
        &recipe_text,
    )
    .with_context(|| format!("writing {}", output.display()))?;
    Ok(Some(Finished {
        recipe: motif_video::sidecar_path(&output),
        output,
        clip,
        fps,
    }))
}

pub fn run(gpu_for: impl FnOnce() -> Result<Gpu>, args: &GenerateArgs) -> Result<()> {
    let prepared = prepare(args.recipe()?, args.output.clone())?;
    let seed = prepared.seed();
    let gpu = gpu_for()?;
    let mut progress = Progress::new(args);
    let say = |msg: &str| {
        if !args.quiet && !args.json {
            eprintln!("{msg}");
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be installed (tests call run() once per process).
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }
    let show_bar = progress.show_bar(args);
    let result = {
        let progress = &mut progress;
        let stop = stop.clone();
        let mut on_request = |req: &mut Request| {
            let second = (req.guidance_2)
                .map(|g| format!(" (low-noise expert {g})"))
                .unwrap_or_default();
            say(&format!(
                "generating {}x{}, {} frames, {} steps, guidance {}{second}, seed {}",
                req.width, req.height, req.frames, req.steps, req.guidance, seed
            ));
            progress.event(json!({"event": "start", "seed": seed, "width": req.width,
                                  "height": req.height, "frames": req.frames, "steps": req.steps}));
        };
        let mut bar: Option<indicatif::ProgressBar> = None;
        let r = generate_on(&gpu, prepared, &say, &mut on_request, &mut |event| {
            match event {
                Event::Started { steps } => {
                    if show_bar {
                        let b = indicatif::ProgressBar::new(steps as u64);
                        b.set_style(
                            indicatif::ProgressStyle::with_template(
                                "{msg} [{bar:30}] step {pos}/{len}  {per_sec}  ETA {eta}",
                            )
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                            .progress_chars("=> "),
                        );
                        b.set_message("denoising");
                        bar = Some(b);
                    }
                }
                Event::Step {
                    index,
                    total,
                    timestep,
                    ..
                } => {
                    if let Some(b) = &bar {
                        b.set_position(index as u64 + 1);
                    }
                    progress.event(json!({"event": "step", "step": index + 1, "total": total, "timestep": timestep,
                                          "elapsed_s": progress.start.elapsed().as_secs_f64()}));
                }
                Event::Decoded { frame, total } => {
                    if let Some(b) = bar.take() {
                        b.finish_and_clear();
                    }
                    progress.event(json!({"event": "decoded", "frame": frame + 1, "total": total}));
                }
                Event::Expert { name, freed, step } => {
                    let line = match freed {
                        Some(f) => format!("step {}: {f} freed, loading {name}", step + 1),
                        None => format!("step {}: loading {name}", step + 1),
                    };
                    match &bar {
                        Some(b) => b.println(&line),
                        None => say(&line),
                    }
                    progress.event(json!({"event": "expert", "expert": name, "freed": freed,
                                          "step": step + 1}));
                }
            }
            !stop.load(Ordering::SeqCst)
        });
        if let Some(b) = bar.take() {
            b.finish_and_clear();
        }
        r
    };
    let finished = match result? {
        Some(f) => f,
        None => {
            eprintln!("interrupted: nothing written");
            std::process::exit(130);
        }
    };
    let seconds = progress.start.elapsed().as_secs_f64();
    progress.event(
        json!({"event": "done", "output": finished.output.to_string_lossy(), "seed": seed,
                          "recipe": finished.recipe.to_string_lossy(), "seconds": seconds}),
    );
    if !args.json {
        if !args.quiet {
            eprintln!("seed {} · {:.1} s", seed, seconds);
        }
        println!("{}", finished.output.display());
    }
    Ok(())
}

/// The files the settings name, each name resolved to its path (a name
/// from `motif models` for --text-encoder, --vae, --motion-adapter, --lora).
fn model_spec(settings: &Settings, model: &str) -> Result<ModelSpec> {
    use catalog::Flag;
    let r = &settings.recipe;
    let resolve = |flag: Flag, field: &str, spec: &Option<String>| {
        spec.as_deref()
            .map(|s| {
                catalog::resolve_file_name(flag, s)
                    .map_err(|e| flag_error(FieldError::new(field, format!("{s}: {e:#}"))))
            })
            .transpose()
    };
    let loras = (r.loras.iter())
        .map(|Lora(file, weight)| {
            let path = catalog::resolve_file_name(Flag::Lora, file)
                .map_err(|e| flag_error(FieldError::new("loras", format!("{file}: {e:#}"))))?;
            if !Path::new(&path).is_file() {
                return Err(flag_error(FieldError::new(
                    "loras",
                    format!("{file}: not a file"),
                )));
            }
            Ok((path, *weight))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ModelSpec {
        model: model.to_string(),
        motion_adapter: resolve(Flag::MotionAdapter, "motion_adapter", &r.motion_adapter)?,
        vae: resolve(Flag::Vae, "vae", &r.vae)?,
        text_encoder: resolve(Flag::TextEncoder, "text_encoder", &r.text_encoder)?,
        transformer_config: None,
        transformer_2: resolve(Flag::Transformer2, "transformer_2", &r.transformer_2)?,
        loras,
    })
}
