//! `motif view`: opens the viewer with the panel set from flags (and a
//! `--remix` recipe); generations go through the same code as
//! `motif generate`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use motif_engine::models::source::{ModelSource, ModelSpec};
use motif_engine::pipelines::{self, Control, Event, ModelCache, ModelCard, StillUse, Stills};
use motif_engine::Gpu;
use motif_viewer::{Controls, ImageUse, ModelChoice, ModelDefaults, Saved, Script, Takes};

use crate::catalog;
use crate::generate::{self, RecipeArgs};
use crate::remote::Remote;

#[derive(Args, Debug, Clone, Default)]
#[command(after_help = "\
Scripted mode (tests, documentation): --auto-generate starts at once; --screenshot saves a PNG \
of the whole window when the run ends (or after --screenshot-at-step N), prints the clip's \
rectangle in it as `clip_rect: X Y W H`, and exits (0 on success, 1 when the generation failed).")]
pub struct ViewArgs {
    /// The prompt in the panel.
    #[arg(long)]
    pub prompt: Option<String>,
    /// The panel's settings (those it has no widget for, such as --lora, go with every Generate).
    #[command(flatten)]
    pub recipe: RecipeArgs,
    /// Load every setting of this recipe (a clip's .json or a clip Motif wrote) into the panel; flags override it.
    #[arg(long)]
    pub remix: Option<PathBuf>,
    /// Where clips are saved and the gallery reads [default: $XDG_DATA_HOME/motif/outputs, else ~/.local/share/motif/outputs].
    #[arg(long, env = "MOTIF_OUTPUTS")]
    pub outputs: Option<PathBuf>,
    /// Start generating as soon as the window opens.
    #[arg(long)]
    pub auto_generate: bool,
    /// Save a PNG of the window (when the run ends, or at --screenshot-at-step), print the clip's rectangle, exit.
    #[arg(long)]
    pub screenshot: Option<PathBuf>,
    /// Take the screenshot after this step's preview (1-based), then exit.
    #[arg(long, requires = "screenshot")]
    pub screenshot_at_step: Option<usize>,
    /// Press Cancel right after this step's preview (1-based).
    #[arg(long)]
    pub cancel_at_step: Option<usize>,
    /// Generate on a `motif serve` at this URL (http://HOST:PORT) instead of this machine.
    #[arg(long, requires = "token")]
    pub server: Option<String>,
    /// The API token for --server (`motif admin create-token --user NAME`).
    #[arg(long, env = "MOTIF_TOKEN")]
    pub token: Option<String>,
    /// Scripted: press Publish when the run ends (with --server), print `published: URL`.
    #[arg(long, requires = "server")]
    pub publish: bool,
    /// With --auto-generate: generate this many times in a row (the model stays loaded); the screenshot is of the last.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
}

/// Generations for the viewer, through `motif generate`'s code.
struct Engine;

impl motif_viewer::Backend for Engine {
    fn defaults(&self, model: &str) -> Result<ModelDefaults> {
        model_defaults(model)
    }

    fn generate(
        &self,
        gpu: &Gpu,
        models: &mut ModelCache,
        c: &Controls,
        output: &Path,
        say: &dyn Fn(&str),
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Option<Saved>> {
        let prepared = generate::prepare(c.recipe(), Some(output.to_path_buf()))?;
        // Previews straight into textures the window draws: the frames stay on the GPU.
        let finished = generate::generate_cached(
            gpu,
            prepared,
            models,
            say,
            &mut |req| req.gpu_previews = true,
            events,
        )?;
        Ok(finished.map(|f| Saved {
            clip: f.output,
            recipe: f.recipe,
            width: f.clip.width,
            height: f.clip.height,
            fps: f.fps,
            frames: f.clip.frames,
        }))
    }
}

/// The source of the model at `path` as a Generate would open it (a Wan
/// transformer file with the parts of the models folder that fit it; the
/// generation itself says which it takes), or `None` when this machine
/// cannot open it.
fn open_model(path: &str) -> Option<ModelSource> {
    let mut spec = ModelSpec {
        model: path.to_string(),
        ..Default::default()
    };
    // A Wan transformer file opens with the parts of the models folder
    // that fit it (the generation itself says which it takes).
    for (flag, _, picked) in
        catalog::companions(Path::new(path), true, true, true).unwrap_or_default()
    {
        let picked = Some(picked.to_string_lossy().into_owned());
        match flag {
            catalog::Flag::TextEncoder => spec.text_encoder = picked,
            catalog::Flag::ImageEncoder => spec.image_encoder = picked,
            _ => spec.vae = picked,
        }
    }
    ModelSource::open(&spec).ok()
}

/// How the model named `model` takes stills, from its configs: what the
/// viewer's picker shows and what the server checks a job's stills against.
pub(crate) fn model_stills(model: &str) -> Result<Stills> {
    let path = catalog::resolve_model_name(model).with_context(|| format!("--model {model}"))?;
    let source = open_model(&path)
        .with_context(|| format!("--model {model}: the model cannot be opened"))?;
    Ok(pipelines::stills_of(&source)?)
}

/// What a model proposes before it is loaded: its card's defaults
/// (`motif.json`) over its family's published ones, and what the family
/// takes (size multiple, frame step, motion, camera, stills). A model this
/// machine cannot open (a name only a server has) gets AnimateDiff's, under
/// its card if it has one here.
pub(crate) fn model_defaults(model: &str) -> Result<ModelDefaults> {
    let path = catalog::resolve_model_name(model).with_context(|| format!("--model {model}"))?;
    let family = open_model(&path).and_then(|source| {
        let family = pipelines::family_of(&source).ok()?;
        let stills = (family.stills)(&source).ok()?;
        Some((family, stills, source))
    });
    let Some((family, stills, source)) = family else {
        let card = ModelCard::for_model(Path::new(&path))
            .with_context(|| format!("reading the card of {path}"))?;
        let d = card.defaults((pipelines::animatediff::REGISTERED.defaults)());
        return Ok(ModelDefaults {
            width: d.width,
            height: d.height,
            frames: d.frames,
            steps: d.steps,
            guidance: d.guidance,
            fps: d.fps,
            ..ModelDefaults::ANIMATEDIFF
        });
    };
    let d = family
        .defaults_for(&source)
        .with_context(|| format!("reading the card of {path}"))?;
    let takes = |c| family.controls.supports(c);
    Ok(ModelDefaults {
        width: d.width,
        height: d.height,
        frames: d.frames,
        steps: d.steps,
        guidance: d.guidance,
        fps: d.fps,
        family: family.name,
        size_multiple: family.size_multiple,
        frame_step: family.frame_step,
        motion: takes(Control::Motion),
        camera: takes(Control::Camera),
        takes: viewer_takes(stills),
    })
}

/// The engine's [`Stills`] in the viewer's words.
fn viewer_takes(stills: Stills) -> Takes {
    Takes {
        text_to_video: stills.text_to_video,
        image: match stills.image {
            None => ImageUse::None,
            Some(StillUse::Anchor) => ImageUse::Anchor,
            Some(StillUse::Native) => ImageUse::Native,
        },
        last_image: stills.last_image,
    }
}

fn outputs_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("XDG_DATA_HOME").filter(|s| !s.is_empty()) {
        return PathBuf::from(p).join("motif").join("outputs");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/motif/outputs"),
        None => PathBuf::from("motif-outputs"),
    }
}

/// The panel from the flags over the recipe over the model's defaults.
fn controls(args: &ViewArgs) -> Result<Controls> {
    let mut flags = args.recipe.recipe(args.prompt.clone())?;
    flags.validate().map_err(generate::flag_error)?;
    if let Some(v) = &flags.style {
        catalog::style(v)?;
    }
    let model = match &flags.model {
        Some(m) => m.clone(),
        // By name, as `motif generate` records it.
        None => "default".to_string(),
    };
    let defaults = model_defaults(&model)?;
    // The panel shows a size, not a ratio: --aspect becomes one here, at
    // the model's pixel count as `motif generate` makes it.
    if flags.aspect.is_some() {
        let (w, h) = flags
            .size(
                (defaults.width as u32, defaults.height as u32),
                defaults.size_multiple as u32,
            )
            .map_err(generate::flag_error)?;
        (flags.width, flags.height, flags.aspect) = (Some(w), Some(h), None);
    }
    let mut c = Controls::new(&model, &defaults);
    if let Some(r) = &args.remix {
        c = motif_viewer::controls_from_recipe(r, &c)?;
    }
    let seed_locked = flags.seed.is_some() || c.seed_locked;
    let mut c = c.with_recipe(&flags.over(c.recipe()));
    c.seed_locked = seed_locked;
    Ok(c)
}

pub fn run(gpu_for: impl FnOnce() -> Result<Gpu>, args: &ViewArgs) -> Result<i32> {
    let controls = controls(args)?;
    let styles = catalog::styles()?.into_iter().map(|s| s.name).collect();
    let models = catalog::list_models()
        .into_iter()
        .filter(catalog::Listed::is_model)
        .map(|m| {
            let path = m.path.to_string_lossy().into_owned();
            ModelChoice {
                takes: model_stills(&path).ok().map(viewer_takes),
                name: m.name,
                path,
            }
        })
        .collect();
    let gpu = gpu_for()?;
    let options = motif_viewer::Options {
        controls,
        styles,
        models,
        outputs: args.outputs.clone().unwrap_or_else(outputs_dir),
        script: Script {
            auto_generate: args.auto_generate,
            screenshot: args.screenshot.clone(),
            screenshot_at_step: args.screenshot_at_step,
            cancel_at_step: args.cancel_at_step,
            publish: args.publish,
            repeat: args.repeat as usize,
        },
    };
    match (&args.server, &args.token) {
        (Some(server), Some(token)) => {
            let defaults = model_defaults(&options.controls.model)?;
            let remote = Remote {
                server: server.clone(),
                token: token.clone(),
                defaults,
                jobs: Default::default(),
            };
            motif_viewer::run(gpu, remote, options)
        }
        _ => motif_viewer::run(gpu, Engine, options),
    }
}
