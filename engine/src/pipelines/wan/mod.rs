//! The Wan 2.1 text-to-video family (diffusers `WanPipeline`): prompt →
//! UMT5 (embeddings past each prompt's length zeroed) → the Wan diffusion
//! transformer denoising seeded noise under classifier-free guidance with a
//! flow-matching sampler (UniPC or Euler) → the causal video VAE, decoded a
//! latent frame at a time. Equal to diffusers 0.42 on the reference case
//! sets (tests/fixtures/wan-*).
//!
//! What diffusers does silently and Motif refuses instead: frame counts
//! that are not 4k + 1 and sizes that are not multiples of 16 (diffusers
//! rounds them down with a log line); the error names the nearest valid
//! values. The creative controls of the AnimateDiff family (motion, camera,
//! and stills on a text-to-video model) have no verified effect on Wan
//! without trained weights for them: they are refused by name (see
//! [`CONTROLS`]).
//!
//! Wan 2.1 image-to-video (`WanImageToVideoPipeline`, I2V and first-last
//! frame FLF2V) is the same family: a folder with `image_encoder/` (CLIP
//! vision) and `image_processor/` whose transformer takes 36 channels
//! (noise, a frame mask, the encoded conditioning video) and the image
//! tokens in its cross-attention (see `image.rs`).
//!
//! Wan 2.2 A14B (T2V and I2V) is two transformers, a high- and a
//! low-noise expert, switched at a boundary timestep (see `experts.rs`);
//! its I2V has no image encoder: the still reaches it through the
//! conditioning channels alone.
//!
//! Wan 2.2 TI2V-5B (`expand_timesteps`: text-to-video, and image-to-video
//! through the VAE alone) is `ti2v.rs`.
//!
//! The step loop is in `generate.rs`.

mod experts;
mod files;
mod generate;
mod image;
mod ti2v;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;

use super::card::ModelCard;
use super::controls::{Control, Controls, StillUse, Stills};
use super::events::{Event, Generated};
use super::preview::LatentRgb;
use super::prompt_cache::{EncoderIdentity, PromptCache};
use super::{argument, load_boxed, Family, ModelDefaults, Registered, Request};
use crate::error::{LoadError, Result};
use crate::gpu::Gpu;
use crate::models::source::ModelSource;
use crate::models::umt5::{BlockResidency, UMT5Config, UMT5EncoderModel};
use crate::models::wan_transformer::{WanTransformer3DModel, WanTransformerConfig};
use crate::models::wan_vae::AutoencoderKLWan;
use crate::schedulers::{SchedulerConfig, SchedulerKind};
use crate::text::umt5::{Umt5Tokenizer, UMT5_MAX_LENGTH};
use crate::weights::{LoraTarget, WeightSet, Weights};

/// The diffusers pipeline class whose folders this family runs.
pub const PIPELINE_CLASSES: &[&str] = &["WanPipeline", "WanImageToVideoPipeline"];

/// Wan's own settings: the flow shift, and given latents (reference cases).
pub const CONTROLS: Controls = Controls {
    // LoRAs are fused into the transformer (`weights::lora`, Wan layouts).
    supported: &[Control::Shift, Control::InitialLatents, Control::Lora],
    // `euler` names flow-matching Euler on a Wan model (the sampler
    // resolves it against the flow-matching config).
    schedulers: &[
        SchedulerKind::UniPc,
        SchedulerKind::FlowMatchEuler,
        SchedulerKind::Euler,
    ],
};

/// An image-to-video model (Wan2.1-I2V): the still is required.
pub const CONTROLS_I2V: Controls = Controls {
    supported: &[Control::Shift, Control::InitialLatents, Control::Image],
    schedulers: CONTROLS.schedulers,
};

/// Wan 2.2 TI2V-5B: text-to-video, or image-to-video given a still.
pub const CONTROLS_TI2V: Controls = Controls {
    supported: &[
        Control::Shift,
        Control::InitialLatents,
        Control::Lora,
        Control::Image,
    ],
    schedulers: CONTROLS.schedulers,
};

/// A first-last-frame model (Wan2.1-FLF2V): both stills are required.
pub const CONTROLS_FLF2V: Controls = Controls {
    supported: &[
        Control::Shift,
        Control::InitialLatents,
        Control::Image,
        Control::LastImage,
    ],
    schedulers: CONTROLS.schedulers,
};

/// The family's line in the registry.
pub const REGISTERED: Registered = Registered {
    name: "Wan",
    classes: PIPELINE_CLASSES,
    // Wan folders always name their class.
    unnamed: false,
    controls: CONTROLS,
    stills,
    defaults: published_defaults,
    // The VAE's 8 × the transformer's 2x2 patch; the VAE is causal in
    // time and 4x temporally compressed (Wan 2.1).
    size_multiple: 16,
    frame_step: 4,
    load: load_boxed::<Wan>,
};

/// How a Wan model takes stills, from model_index.json and the
/// transformer's config as `load` reads them: an image encoder makes it
/// image-to-video, the transformer's `pos_embed_seq_len` first-last frame.
fn stills(source: &ModelSource) -> Result<Stills> {
    // From the configs alone (headers for single files): TI2V takes text or
    // a still; an image-to-video transformer (with an image encoder, or
    // A14B's I2V experts without one) reads more channels than it predicts
    // and takes a still only, FLF2V a last one too.
    let (config, ti2v) = match source.wan_files() {
        Some(files) => (files.transformer()?.config, files.vae()?.config.is_residual),
        None => {
            let dir = source.path();
            let index: WanIndex =
                crate::weights::config::read_config(&dir.join("model_index.json"))?;
            let transformer_dir = component(dir, "transformer", "the Wan transformer")?;
            let config = WanTransformerConfig::load(&transformer_dir.join("config.json"))?;
            (config, index.expand_timesteps)
        }
    };
    Ok(match (ti2v, config.in_channels != config.out_channels()) {
        (true, _) => Stills {
            text_to_video: true,
            image: Some(StillUse::Native),
            last_image: false,
        },
        (false, true) => Stills {
            text_to_video: false,
            image: Some(StillUse::Native),
            last_image: config.pos_embed_seq_len.is_some(),
        },
        (false, false) => Stills::TEXT,
    })
}

/// The Wan 2.1 repositories' published settings: 832x480, 81 frames
/// (5 s at 16 fps), 50 steps, guidance 5.
fn published_defaults() -> ModelDefaults {
    ModelDefaults {
        width: 832,
        height: 480,
        frames: 81,
        steps: 50,
        guidance: 5.0,
        fps: 16.0,
        negative: String::new(),
        camera_prompts: Default::default(),
    }
}

/// Text encoders larger than this run block by block, with only the
/// current block's weights on the device: UMT5-XXL is 11.4 GB in f16 and
/// is never resident whole (a small model is faster kept resident).
const STREAM_TEXT_ENCODER_ABOVE: u64 = 1 << 30;

/// Wan 2.1's latent → RGB fit for previews (16 × 3, then a bias): the
/// published factors of ComfyUI's `latent_formats.Wan21`.
const WAN21_LATENT_RGB: [[f32; 3]; 16] = [
    [-0.1299, -0.1692, 0.2932],
    [0.0671, 0.0406, 0.0442],
    [0.3568, 0.2548, 0.1747],
    [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328],
    [0.0296, -0.0956, -0.0665],
    [-0.3477, -0.4059, -0.2925],
    [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364],
    [-0.1293, 0.0740, 0.1636],
    [0.0680, 0.3019, 0.1128],
    [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699],
    [0.0060, -0.0633, 0.0005],
    [0.3477, 0.2275, 0.2950],
    [0.1984, 0.0913, 0.1861],
];
const WAN21_LATENT_RGB_BIAS: [f32; 3] = [-0.1835, -0.0868, -0.3360];

/// A Wan 2.1 text-to-video model loaded onto a GPU.
pub struct Wan {
    model: PathBuf,
    tokenizer: Umt5Tokenizer,
    text_encoder: UMT5EncoderModel,
    /// One transformer, or Wan 2.2 A14B's two experts.
    transformer: experts::Experts,
    vae: AutoencoderKLWan,
    /// Image-to-video models: the CLIP image encoder and its processor.
    image: Option<image::ImageConditioning>,
    /// Wan 2.2 TI2V (`expand_timesteps` in model_index.json): see `ti2v.rs`.
    expand_timesteps: bool,
    scheduler_config: SchedulerConfig,
    defaults: ModelDefaults,
    latent_rgb: LatentRgb,
    /// Text tokens per prompt (diffusers' `max_sequence_length`, 512).
    max_sequence_length: usize,
    /// Prompt embeddings on disk (None: off) and what keys them.
    prompt_cache: Option<PromptCache>,
    encoder_identity: Option<EncoderIdentity>,
    /// Text encoder forward passes so far (a cache hit runs none).
    text_encoder_runs: AtomicUsize,
}

/// What `model_index.json` of a Wan folder says beyond its class.
#[derive(serde::Deserialize)]
struct WanIndex {
    #[serde(default)]
    boundary_ratio: Option<f64>,
    #[serde(default)]
    expand_timesteps: bool,
    #[serde(default)]
    transformer_2: Option<serde_json::Value>,
    #[serde(default)]
    image_encoder: Option<serde_json::Value>,
}

/// Whether a model_index.json component entry names a part: diffusers
/// writes `[library, class]`, and `[null, null]` (or null) for an absent
/// optional one.
fn present(entry: &Option<serde_json::Value>) -> bool {
    match entry {
        None | Some(serde_json::Value::Null) => false,
        Some(serde_json::Value::Array(parts)) => parts.iter().any(|p| !p.is_null()),
        Some(_) => true,
    }
}

/// The folder of one component (`transformer/`, `vae/`, …), or an error
/// naming the model folder and the missing part.
fn component(dir: &Path, name: &str, holds: &str) -> Result<PathBuf, LoadError> {
    let path = dir.join(name);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(LoadError::Layout {
            path: dir.to_path_buf(),
            message: format!("a Wan folder needs `{name}/` ({holds}); it is missing"),
        })
    }
}

/// Where a model's transformer config is, for messages: a folder's
/// `transformer/config.json`, or the single file itself.
fn transformer_config_path(model: &Path) -> PathBuf {
    match model.is_dir() {
        true => model.join("transformer").join("config.json"),
        false => model.to_path_buf(),
    }
}

/// Bytes of the safetensors files in `dir`.
fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

impl Wan {
    /// The nearest frame counts the VAE takes (1 + 4k) around `frames`.
    fn valid_frames(&self, frames: usize) -> (usize, usize) {
        let t = self.vae.config.temporal_scale_factor();
        let below = (frames.max(1) - 1) / t * t + 1;
        (below, below + t)
    }

    /// Pixels per side that one transformer token covers (VAE × patch):
    /// widths and heights must be multiples of it (16 for Wan 2.1).
    fn size_multiple(&self) -> usize {
        let [_, ph, pw] = self.transformer.config.patch_size;
        self.vae.config.spatial_scale_factor() * ph.max(pw)
    }

    /// The latent shape [C, f, h, w] of a request (C = the VAE's z; an
    /// image-to-video transformer takes more channels, see `image.rs`).
    fn latent_shape(&self, req: &Request) -> (usize, usize, usize, usize) {
        let s = self.vae.config.spatial_scale_factor();
        let t = self.vae.config.temporal_scale_factor();
        (
            self.vae.config.z_dim,
            (req.frames - 1) / t + 1,
            req.height / s,
            req.width / s,
        )
    }

    /// Replaces the model's scheduler config (reference cases).
    pub fn set_scheduler_config(&mut self, config: SchedulerConfig) {
        self.scheduler_config = config;
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    /// Text tokens per prompt (diffusers' `max_sequence_length`; 512, what
    /// Wan was trained with). Reference cases set other lengths.
    /// Where prompt embeddings are cached (None: nowhere). Loading picks
    /// `prompts/` in Motif's cache folder (see
    /// [`PromptCache::default_location`]).
    pub fn set_prompt_cache(&mut self, cache: Option<PromptCache>) {
        self.prompt_cache = cache;
    }

    pub fn prompt_cache(&self) -> Option<&PromptCache> {
        self.prompt_cache.as_ref()
    }

    /// How many times the text encoder has run since loading: a
    /// generation whose prompts were all cached adds none.
    pub fn text_encoder_runs(&self) -> usize {
        self.text_encoder_runs
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_max_sequence_length(&mut self, len: usize) {
        self.max_sequence_length = len;
    }

    pub fn latent_rgb(&self) -> &LatentRgb {
        &self.latent_rgb
    }

    /// Marks the model as Wan 2.2 TI2V (model_index.json's
    /// `expand_timesteps`; a single file's transformer of 48 channels
    /// beside the Wan 2.2 VAE): its published defaults (unless its card
    /// sets others), and a transformer without an image branch, as the
    /// pipelines assume.
    fn set_expand_timesteps(&mut self, on: bool) -> Result<()> {
        self.expand_timesteps = on;
        if !on {
            return Ok(());
        }
        if self.transformer.config.image_dim.is_some() {
            return Err(LoadError::Config {
                path: transformer_config_path(&self.model),
                message: "expand_timesteps (Wan 2.2 TI2V) with an image-to-video transformer \
                          (image_dim set): TI2V conditions on the VAE-encoded image alone"
                    .into(),
            }
            .into());
        }
        self.defaults = ModelCard::for_model(&self.model)?.defaults(ti2v::ti2v_defaults());
        Ok(())
    }

    /// The checks across parts and the model's card, shared by folders and
    /// single files. `config_path` names the transformer's config in errors.
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        dir: PathBuf,
        tokenizer: Umt5Tokenizer,
        text_encoder: UMT5EncoderModel,
        transformer: experts::Experts,
        vae: AutoencoderKLWan,
        image: Option<image::ImageConditioning>,
        scheduler_config: SchedulerConfig,
        scheduler_path: PathBuf,
        encoder_identity: Option<EncoderIdentity>,
    ) -> Result<Self> {
        if !scheduler_config.is_flow_matching()? {
            return Err(LoadError::Config {
                path: scheduler_path,
                message: "Wan needs a flow-matching scheduler (UniPCMultistepScheduler with \
                          use_flow_sigmas, or FlowMatchEulerDiscreteScheduler)"
                    .into(),
            }
            .into());
        }
        if text_encoder.config.d_model != transformer.config.text_dim {
            return Err(LoadError::Config {
                path: transformer_config_path(&dir),
                message: format!(
                    "text_dim {} differs from the text encoder's d_model {}",
                    transformer.config.text_dim, text_encoder.config.d_model
                ),
            }
            .into());
        }
        // Image-to-video: noise z + frame mask (the VAE's temporal factor)
        // + the encoded conditioning video z; Wan 2.2 A14B I2V reads those
        // channels without an image branch.
        let z = vae.config.z_dim;
        let conditioned = 2 * z + vae.config.temporal_scale_factor();
        let (expected, what) = match transformer.config.image_dim {
            None if transformer.config.in_channels == conditioned => (conditioned, String::new()),
            None => (z, "the VAE's z_dim".to_string()),
            Some(_) => (
                conditioned,
                format!(
                    "2 · z_dim + {} (noise, frame mask, encoded image) for image-to-video",
                    vae.config.temporal_scale_factor()
                ),
            ),
        };
        if transformer.config.in_channels != expected {
            return Err(LoadError::Config {
                path: transformer_config_path(&dir),
                message: format!(
                    "in_channels {} differs from {what} = {expected}",
                    transformer.config.in_channels
                ),
            }
            .into());
        }
        if transformer.config.out_channels() != z {
            return Err(LoadError::Config {
                path: transformer_config_path(&dir),
                message: format!(
                    "out_channels {} differs from the VAE's z_dim {z}",
                    transformer.config.out_channels()
                ),
            }
            .into());
        }
        image::check_parts(&dir, &transformer.config, image.as_ref())?;
        let card = ModelCard::for_model(&dir)?;
        let defaults = card.defaults(published_defaults());
        let latent_rgb = LatentRgb::new(
            card.latent_rgb().or_else(|| {
                (vae.config.z_dim == 16).then(|| (WAN21_LATENT_RGB.to_vec(), WAN21_LATENT_RGB_BIAS))
            }),
            vae.config.z_dim,
        );
        Ok(Wan {
            model: dir,
            tokenizer,
            text_encoder,
            transformer,
            vae,
            image,
            expand_timesteps: false,
            scheduler_config,
            defaults,
            latent_rgb,
            max_sequence_length: UMT5_MAX_LENGTH,
            prompt_cache: PromptCache::default_location(),
            encoder_identity,
            text_encoder_runs: AtomicUsize::new(0),
        })
    }
}

impl Family for Wan {
    fn load(gpu: &Gpu, source: &ModelSource) -> Result<Self> {
        if let Some(files) = source.wan_files() {
            return Self::from_files(gpu, files, source);
        }
        let dir = source.path().to_path_buf();
        let index_path = dir.join("model_index.json");
        let index: WanIndex = crate::weights::config::read_config(&index_path)?;
        // Whether the folder is image-to-video, from the configs alone:
        // parts missing are named before any weight reaches the GPU.
        let transformer_dir = component(&dir, "transformer", "the Wan transformer")?;
        let transformer_config = WanTransformerConfig::load(&transformer_dir.join("config.json"))?;
        image::check_folder(&dir, &transformer_config, present(&index.image_encoder))?;
        // LoRAs are checked against the transformer (headers only) before
        // any part goes to the GPU.
        let first = experts::ExpertWeights {
            weights: Weights::new(
                source.fuse_loras(
                    WeightSet::open_dir(&transformer_dir)?,
                    LoraTarget::Transformer,
                )?,
                gpu.precision(),
            ),
            config: transformer_config,
        };
        // Wan 2.2 A14B: the second expert's config and weights are checked
        // (headers only) before any part goes to the GPU.
        let second = experts::open_second(gpu, &dir, &index, source, &first)?;
        let tokenizer_dir = component(&dir, "tokenizer", "tokenizer.json")?;
        let tokenizer = Umt5Tokenizer::from_dir(&tokenizer_dir)?;
        let te_dir = component(&dir, "text_encoder", "the UMT5 encoder")?;
        let residency = if weight_bytes(&te_dir) > STREAM_TEXT_ENCODER_ABOVE {
            BlockResidency::Streamed
        } else {
            BlockResidency::Resident
        };
        let te_config_path = te_dir.join("config.json");
        let te_config = UMT5Config::load(&te_config_path)?;
        super::check_vocabulary(
            tokenizer.path(),
            tokenizer.max_id(),
            &te_config_path,
            te_config.vocab_size,
        )?;
        let text_encoder = UMT5EncoderModel::from_dir(gpu, &te_dir, residency)?;
        // Without an identity (a file that cannot be read now), nothing is
        // cached rather than something keyed on less than the encoder.
        let encoder_identity =
            EncoderIdentity::of(&te_dir, &tokenizer_dir.join("tokenizer.json")).ok();
        let transformer = match second {
            None => experts::Experts::single(WanTransformer3DModel::new(
                gpu,
                &first.weights,
                first.config,
                BlockResidency::Resident,
            )?),
            Some((second, boundary_ratio)) => {
                experts::Experts::pair(gpu, [first, second], boundary_ratio)?
            }
        };
        let vae = AutoencoderKLWan::load(gpu, &component(&dir, "vae", "the Wan VAE")?)?;
        let image = match present(&index.image_encoder) {
            true => Some(image::ImageConditioning::load(gpu, &dir)?),
            false => None,
        };
        let scheduler_path =
            component(&dir, "scheduler", "scheduler_config.json")?.join("scheduler_config.json");
        let scheduler_config = SchedulerConfig::load(&scheduler_path)?;
        let mut wan = Self::assemble(
            dir,
            tokenizer,
            text_encoder,
            transformer,
            vae,
            image,
            scheduler_config,
            scheduler_path,
            encoder_identity,
        )?;
        wan.set_expand_timesteps(index.expand_timesteps)?;
        Ok(wan)
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
        if self.transformer.is_pair() {
            return match self.takes_image() {
                true => experts::CONTROLS_A14B_I2V,
                false => experts::CONTROLS_A14B,
            };
        }
        // Wan 2.2 TI2V: text-to-video, or image-to-video given a still.
        if self.expand_timesteps {
            return CONTROLS_TI2V;
        }
        // A conditioning-channel transformer without an image encoder is
        // image-to-video too (as diffusers runs it).
        match (
            self.takes_image(),
            self.transformer.config.pos_embed_seq_len,
        ) {
            (false, _) => CONTROLS,
            (true, None) => CONTROLS_I2V,
            (true, Some(_)) => CONTROLS_FLF2V,
        }
    }

    fn scale_factor(&self) -> usize {
        self.size_multiple()
    }

    fn check_values(&self, req: &Request) -> Result<()> {
        let m = self.size_multiple();
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % m != 0 {
                let below = (v / m).max(1) * m;
                return Err(argument(format!(
                    "{name} {v}: this Wan model takes multiples of {m} (the VAE's {} × the \
                     transformer's patch); pass {below} or {}",
                    self.vae.config.spatial_scale_factor(),
                    below + m
                )));
            }
        }
        let t = self.vae.config.temporal_scale_factor();
        if req.frames == 0 || !(req.frames - 1).is_multiple_of(t) {
            let (below, above) = self.valid_frames(req.frames);
            return Err(argument(format!(
                "frames {}: Wan takes 1 + {t}k frames (its VAE is causal in time); pass {below} or {above}",
                req.frames
            )));
        }
        if let Some(g) = req.guidance_2 {
            if !g.is_finite() {
                return Err(argument(format!(
                    "guidance_2 {g} must be a number (the low-noise expert's guidance scale)"
                )));
            }
        }
        if let Some(shift) = req.shift {
            if !(shift.is_finite() && shift > 0.0) {
                return Err(argument(format!("shift {shift} must be a number > 0")));
            }
        }
        self.check_images(req)?;
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
