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
use motif_engine::pipelines::{Camera, Event, ModelCache, ModelDefaults, Request, RgbImage};
use motif_engine::schedulers::SchedulerKind;
use motif_engine::Gpu;
use serde_json::{json, Value};

use crate::catalog;

const RECIPE_FORMAT: &str = "motif-recipe-v1";

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
    /// What to steer away from (classifier-free guidance's negative prompt).
    #[arg(long)]
    pub negative: Option<String>,
    /// A diffusers folder, a single-file .safetensors checkpoint, a name from `motif models`, or an org/name in the Hugging Face cache.
    #[arg(long, short = 'm', env = "MOTIF_MODEL")]
    pub model: Option<String>,
    /// AnimateDiff motion module for a plain SD model: folder, file (original or diffusers format) or org/name.
    #[arg(long)]
    pub motion_adapter: Option<String>,
    /// A VAE to use instead of the model's: .safetensors file (LDM or diffusers names) or folder.
    #[arg(long)]
    pub vae: Option<String>,
    /// A LoRA to fuse, with an optional weight (default 1): FILE or FILE:0.8. Repeatable.
    #[arg(long = "lora", value_name = "FILE[:WEIGHT]")]
    pub loras: Vec<String>,
    /// Animate this still (PNG, JPEG or WebP): it becomes the first frame, resized and centre-cropped to the output size.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// With --image: how far the other frames may move from the still, 0 < S <= 1 [default: 0.8].
    #[arg(long)]
    pub strength: Option<f32>,
    /// Output width in pixels (a multiple of 8).
    #[arg(long)]
    pub width: Option<usize>,
    /// Output height in pixels (a multiple of 8).
    #[arg(long)]
    pub height: Option<usize>,
    /// Aspect ratio such as 16:9, 9:16, 1:1, 4:5: keeps the model's pixel count (or the given width or height).
    #[arg(long)]
    pub aspect: Option<String>,
    /// Number of frames.
    #[arg(long)]
    pub frames: Option<usize>,
    /// Frames per second of the written clip.
    #[arg(long)]
    pub fps: Option<f32>,
    /// Denoising steps.
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; 1 skips the unconditional pass.
    #[arg(long)]
    pub guidance: Option<f32>,
    /// Seed for the noise: the same seed gives the same clip on the same adapter. Random (and printed) when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// ddim, euler, euler-a, dpm++2m or lcm [default: the model's scheduler config].
    #[arg(long)]
    pub scheduler: Option<String>,
    /// Karras sigmas (euler, dpm++2m).
    #[arg(long)]
    pub karras: bool,
    /// How much the clip moves, 0 (nearly still) to 4 (strong) [default: 2].
    #[arg(long)]
    pub motion: Option<f32>,
    /// zoom-in, zoom-out, pan-left, pan-right, tilt-up, tilt-down, roll-cw or roll-ccw.
    #[arg(long)]
    pub camera: Option<String>,
    /// A style preset (see `motif styles`).
    #[arg(long)]
    pub style: Option<String>,
    /// Use the text encoder's penultimate layer (1) instead of the last (0).
    #[arg(long)]
    pub clip_skip: Option<usize>,
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

/// Everything that decides a clip, as recorded in its recipe.
#[derive(Debug, Clone)]
struct Settings {
    prompt: String,
    negative: Option<String>,
    model: String,
    motion_adapter: Option<String>,
    vae: Option<String>,
    loras: Vec<(String, f32)>,
    image: Option<PathBuf>,
    strength: f32,
    width: Option<usize>,
    height: Option<usize>,
    aspect: Option<(usize, usize)>,
    frames: Option<usize>,
    fps: Option<f32>,
    steps: Option<usize>,
    guidance: Option<f32>,
    seed: u64,
    scheduler: Option<SchedulerKind>,
    karras: bool,
    motion: f32,
    camera: Option<Camera>,
    style: Option<String>,
    clip_skip: usize,
}

fn parse_lora(s: &str) -> Result<(String, f32)> {
    // A weight is what follows the last ':' if it parses (Windows paths have ':' too).
    if let Some((file, w)) = s.rsplit_once(':') {
        if let Ok(w) = w.parse::<f32>() {
            if !w.is_finite() {
                bail!("--lora {s}: the weight must be a finite number");
            }
            return Ok((file.to_string(), w));
        }
    }
    Ok((s.to_string(), 1.0))
}

fn parse_aspect(s: &str) -> Result<(usize, usize)> {
    let bad = || anyhow!("--aspect {s}: expected W:H with positive whole numbers, such as 16:9");
    let (a, b) = s.split_once(':').ok_or_else(bad)?;
    let (a, b) = (
        a.trim().parse::<usize>().map_err(|_| bad())?,
        b.trim().parse::<usize>().map_err(|_| bad())?,
    );
    if a == 0 || b == 0 {
        return Err(bad());
    }
    Ok((a, b))
}

fn get<'a>(recipe: &'a Value, key: &str) -> Option<&'a Value> {
    recipe.get(key).filter(|v| !v.is_null())
}

fn recipe_str(recipe: &Value, key: &str) -> Result<Option<String>> {
    match get(recipe, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => bail!("recipe field `{key}` must be a string, found {other}"),
    }
}

fn recipe_num(recipe: &Value, key: &str) -> Result<Option<f64>> {
    match get(recipe, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| anyhow!("recipe field `{key}` must be a number, found {v}")),
    }
}

fn read_recipe(path: &Path) -> Result<Value> {
    let text = motif_video::read_recipe(path)
        .with_context(|| format!("reading the recipe of {}", path.display()))?;
    let recipe: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: the recipe is not valid JSON", path.display()))?;
    if recipe.get("format").and_then(Value::as_str) != Some(RECIPE_FORMAT) {
        bail!(
            "{}: not a Motif recipe (expected \"format\": \"{RECIPE_FORMAT}\")",
            path.display()
        );
    }
    Ok(recipe)
}

impl Settings {
    /// Flags over the recipe; checks every value that needs no model.
    fn resolve(args: &GenerateArgs, recipe: Option<&Value>) -> Result<Self> {
        let empty = json!({});
        let r = recipe.unwrap_or(&empty);
        let prompt = match (&args.prompt, recipe_str(r, "prompt")?) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) => p,
            (None, None) => bail!("no prompt: pass the text of the clip (or --from a recipe)"),
        };
        let model = match (&args.model, recipe_str(r, "model")?) {
            (Some(m), _) => m.clone(),
            (None, Some(m)) => m,
            // Recorded by name, so that a recipe replays on another checkout.
            (None, None) => catalog::default_model().map(|_| "default".to_string()).ok_or_else(|| {
                anyhow!(
                    "no --model given and no bundled default model is installed yet: pass a diffusers AnimateDiff folder, \
                     a single-file SD1.5 checkpoint with --motion-adapter, a name from `motif models`, or an org/name in \
                     the Hugging Face cache (MOTIF_MODEL sets a default)"
                )
            })?,
        };
        let loras = if !args.loras.is_empty() {
            args.loras
                .iter()
                .map(|s| parse_lora(s))
                .collect::<Result<Vec<_>>>()?
        } else {
            match get(r, "loras") {
                None => Vec::new(),
                Some(v) => {
                    serde_json::from_value::<Vec<(String, f32)>>(v.clone()).map_err(|_| {
                        anyhow!("recipe field `loras` must be a list of [file, weight] pairs")
                    })?
                }
            }
        };
        let scheduler = match args.scheduler.clone().or(recipe_str(r, "scheduler")?) {
            None => None,
            Some(s) => Some(
                s.parse::<SchedulerKind>()
                    .map_err(|e| anyhow!("--scheduler: {e}"))?,
            ),
        };
        let camera = match args.camera.clone().or(recipe_str(r, "camera")?) {
            None => None,
            Some(s) => Some(s.parse::<Camera>().map_err(|e| anyhow!("--camera: {e}"))?),
        };
        let style = args.style.clone().or(recipe_str(r, "style")?);
        if let Some(name) = &style {
            catalog::style(name)?;
        }
        let aspect = match args.aspect.clone().or(recipe_str(r, "aspect")?) {
            None => None,
            Some(s) => Some(parse_aspect(&s)?),
        };
        let usize_of = |flag: Option<usize>, key: &str| -> Result<Option<usize>> {
            match flag {
                Some(v) => Ok(Some(v)),
                None => Ok(recipe_num(r, key)?.map(|v| v as usize)),
            }
        };
        let f32_of = |flag: Option<f32>, key: &str| -> Result<Option<f32>> {
            match flag {
                Some(v) => Ok(Some(v)),
                None => Ok(recipe_num(r, key)?.map(|v| v as f32)),
            }
        };
        let width = usize_of(args.width, "width")?;
        let height = usize_of(args.height, "height")?;
        for (name, v) in [("--width", width), ("--height", height)] {
            if let Some(v) = v {
                if v == 0 || v % 8 != 0 {
                    bail!("{name} {v}: expected a positive multiple of 8");
                }
            }
        }
        let frames = usize_of(args.frames, "frames")?;
        if frames == Some(0) {
            bail!("--frames must be at least 1");
        }
        let steps = usize_of(args.steps, "steps")?;
        if steps == Some(0) {
            bail!("--steps must be at least 1");
        }
        let fps = f32_of(args.fps, "fps")?;
        if let Some(f) = fps {
            if !(f.is_finite() && f > 0.0 && f <= 120.0) {
                bail!("--fps {f}: expected a number above 0 and at most 120");
            }
        }
        let guidance = f32_of(args.guidance, "guidance")?;
        if let Some(g) = guidance {
            if !(g.is_finite() && g >= 0.0) {
                bail!("--guidance {g}: expected a number >= 0");
            }
        }
        let motion = f32_of(args.motion, "motion")?.unwrap_or(2.0);
        if !(0.0..=4.0).contains(&motion) {
            bail!("--motion {motion}: expected a value from 0 (nearly still) to 4 (strong)");
        }
        let strength = f32_of(args.strength, "strength")?.unwrap_or(0.8);
        if !(strength > 0.0 && strength <= 1.0) {
            bail!("--strength {strength}: expected a value above 0 and at most 1");
        }
        let clip_skip = usize_of(args.clip_skip, "clip_skip")?.unwrap_or(0);
        if clip_skip > 1 {
            bail!("--clip-skip {clip_skip}: expected 0 or 1");
        }
        let seed = match args.seed {
            Some(s) => s,
            None => match recipe_num(r, "seed")? {
                Some(s) => get(r, "seed").and_then(Value::as_u64).unwrap_or(s as u64),
                None => rand::random::<u32>() as u64,
            },
        };
        Ok(Settings {
            prompt,
            negative: args.negative.clone().or(recipe_str(r, "negative")?),
            model,
            motion_adapter: args
                .motion_adapter
                .clone()
                .or(recipe_str(r, "motion_adapter")?),
            vae: args.vae.clone().or(recipe_str(r, "vae")?),
            loras,
            image: args
                .image
                .clone()
                .or(recipe_str(r, "image")?.map(PathBuf::from)),
            strength,
            width,
            height,
            aspect,
            frames,
            fps,
            steps,
            guidance,
            seed,
            scheduler,
            karras: args.karras || get(r, "karras").and_then(Value::as_bool).unwrap_or(false),
            motion,
            camera,
            style,
            clip_skip,
        })
    }

    /// The final size: explicit sizes, else the aspect ratio at the model's
    /// pixel count (or at the given width or height), else the model's size.
    fn size(&self, d: &ModelDefaults, multiple: usize) -> Result<(usize, usize)> {
        let round = |v: f64| ((v / multiple as f64).round() as usize).max(1) * multiple;
        let (w, h) = match (self.width, self.height, self.aspect) {
            (Some(w), Some(h), _) => (w, h),
            (Some(w), None, Some((a, b))) => (w, round(w as f64 * b as f64 / a as f64)),
            (None, Some(h), Some((a, b))) => (round(h as f64 * a as f64 / b as f64), h),
            (None, None, Some((a, b))) => {
                let area = (d.width * d.height) as f64;
                let w = (area * a as f64 / b as f64).sqrt();
                (round(w), round(w * b as f64 / a as f64))
            }
            (Some(w), None, None) => (w, d.height),
            (None, Some(h), None) => (d.width, h),
            (None, None, None) => (d.width, d.height),
        };
        for (name, v) in [("width", w), ("height", h)] {
            if v % multiple != 0 {
                bail!("{name} {v} is not a multiple of {multiple} (the model's VAE scale factor)");
            }
        }
        Ok((w, h))
    }

    fn recipe(&self, req: &Request, fps: f32, scheduler: SchedulerKind) -> Value {
        json!({
            "format": RECIPE_FORMAT,
            "motif_version": env!("CARGO_PKG_VERSION"),
            "prompt": self.prompt,
            "negative": req.negative,
            "style": self.style,
            "model": self.model,
            "motion_adapter": self.motion_adapter,
            "vae": self.vae,
            "loras": self.loras,
            "image": self.image.as_ref().map(|p| p.to_string_lossy().into_owned()),
            "strength": self.image.as_ref().map(|_| self.strength),
            "width": req.width,
            "height": req.height,
            "frames": req.frames,
            "fps": fps,
            "steps": req.steps,
            "guidance": req.guidance,
            "seed": self.seed,
            "scheduler": scheduler.name(),
            "karras": self.karras,
            "motion": self.motion,
            "camera": self.camera.map(|c| c.name()),
            "clip_skip": self.clip_skip,
        })
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
    if w == 0 || h == 0 {
        bail!("{}: the image is empty", path.display());
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
}

/// A clip written to disk.
pub struct Finished {
    pub output: PathBuf,
    pub recipe: PathBuf,
    pub clip: motif_engine::pipelines::Generated,
    pub fps: f32,
}

/// Every check that needs no GPU: flags over the recipe, the still, the
/// LoRA files, the output format, the model's files.
pub fn prepare(args: &GenerateArgs) -> Result<Prepared> {
    let recipe = args.from.as_deref().map(read_recipe).transpose()?;
    let settings = Settings::resolve(args, recipe.as_ref())?;
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("motif-{}.mp4", settings.seed)));
    motif_video::format_for(&output).with_context(|| format!("--output {}", output.display()))?;
    let image = settings.image.as_deref().map(load_image).transpose()?;
    for (file, _) in &settings.loras {
        if !Path::new(file).is_file() {
            bail!("--lora {file}: no such file");
        }
    }

    let model = catalog::resolve_model_name(&settings.model);
    let mut spec = model_spec(&settings, &model);
    // A motion LoRA the model ships for this camera move
    // (`motion_loras/<move>.safetensors`) replaces the training-free warp.
    let camera_lora = settings.camera.and_then(|c| {
        let p = Path::new(&model)
            .join("motion_loras")
            .join(format!("{}.safetensors", c.name()));
        p.is_file().then_some(p)
    });
    if let Some(p) = &camera_lora {
        spec.loras.push((p.to_string_lossy().into_owned(), 1.0));
    }
    let source = ModelSource::open(&spec).context("opening the model")?;
    Ok(Prepared {
        settings,
        output,
        image,
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
    let (width, height) = settings.size(&defaults, pipe.scale_factor())?;

    // A camera move the model was trained to read from the caption.
    let user_prompt = match settings
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
    let (prompt, style_negative) = match &settings.style {
        Some(name) => {
            let s = catalog::style(name)?;
            (s.prompt.replace("{prompt}", &user_prompt), Some(s.negative))
        }
        None => (user_prompt, None),
    };
    let mut req = Request::new(prompt, &defaults);
    req.negative = match (&settings.negative, style_negative) {
        (Some(n), _) => n.clone(),
        (None, Some(n)) => n,
        (None, None) => defaults.negative.clone(),
    };
    req.width = width;
    req.height = height;
    req.frames = settings.frames.unwrap_or(defaults.frames);
    req.steps = settings.steps.unwrap_or(defaults.steps);
    req.guidance = settings.guidance.unwrap_or(defaults.guidance);
    req.seed = settings.seed;
    req.scheduler = settings.scheduler;
    req.karras = settings.karras.then_some(true);
    req.clip_skip = settings.clip_skip;
    req.image = image;
    req.strength = settings.strength;
    req.motion = settings.motion;
    req.camera = if camera_lora.is_some() {
        None
    } else {
        settings.camera
    };
    if let Some(p) = &camera_lora {
        say(&format!("camera: motion LoRA {}", p.display()));
    }
    pipe.validate(&req)?;
    let fps = settings.fps.unwrap_or(defaults.fps);
    on_request(&mut req);

    let clip = match pipe.generate(gpu, &req, events) {
        Ok(c) => c,
        Err(motif_engine::EngineError::Cancelled) => return Ok(None),
        Err(e) => return Err(e).context("generating"),
    };
    let recipe = settings.recipe(&req, fps, clip.scheduler);
    let recipe_text = serde_json::to_string_pretty(&recipe)?;
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
    let prepared = prepare(args)?;
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
            say(&format!(
                "generating {}x{}, {} frames, {} steps, guidance {}, seed {}",
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

fn model_spec(settings: &Settings, model: &str) -> ModelSpec {
    ModelSpec {
        model: model.to_string(),
        motion_adapter: settings.motion_adapter.clone(),
        vae: settings.vae.clone(),
        loras: settings.loras.clone(),
    }
}
