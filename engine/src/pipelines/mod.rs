//! Text- and image-to-video pipelines: one folder per model family, plus
//! what every family shares, written once — the request and its events
//! (cancellation included), the model card, the controls a family declares,
//! classifier-free guidance, seeded noise, camera moves, previews and
//! decoding in chunks.
//!
//! A family implements [`Family`] and has a line in [`FAMILIES`], which
//! picks it by the pipeline class a model folder names (model_index.json's
//! `_class_name`). Adding a family is its folder here, its architectures in
//! `models/`, and that line.

pub mod animatediff;
pub mod camera;
pub mod card;
pub mod controls;
pub mod decode;
pub mod events;
pub mod guidance;
pub mod image;
pub mod noise;
pub mod preview;
pub mod prompt_cache;
pub mod request;
pub mod wan;

use std::path::Path;

pub use crate::ops::preview::FrameTextures;
pub use animatediff::AnimateDiff;
pub use camera::Camera;
pub use card::ModelCard;
pub use controls::{Control, Controls, StillUse, Stills};
pub use events::{Event, Generated, Preview, Trace};
pub use image::{fit_image, RgbImage, MIN_IMAGE_SIDE};
pub use noise::motion_share;
pub use preview::LatentRgb;
pub use request::{ModelDefaults, Request};
pub use wan::Wan;

use crate::error::{EngineError, Result};
use crate::gpu::Gpu;
use crate::models::source::ModelSource;

/// A request the engine refuses, in the words of `generate`.
pub(crate) fn argument(message: impl Into<String>) -> EngineError {
    EngineError::Argument {
        op: "generate",
        message: message.into(),
    }
}

/// Refuses a tokenizer whose ids the text encoder's embedding table cannot
/// hold: a token id at or past the table's `rows` would read past the table
/// (or, clamped, another token's row), so the two files cannot be one
/// model's. A table larger than the vocabulary is fine (UMT5's is padded).
pub(crate) fn check_vocabulary(
    tokenizer_file: &Path,
    max_id: u32,
    encoder_config: &Path,
    rows: usize,
) -> Result<(), crate::error::LoadError> {
    if max_id as usize >= rows {
        return Err(crate::error::LoadError::Config {
            path: tokenizer_file.to_path_buf(),
            message: format!(
                "token id {max_id} does not fit the text encoder's embedding table of {rows} rows \
                 (`vocab_size` of {}): expected ids below {rows}; this tokenizer is not the \
                 text encoder's",
                encoder_config.display()
            ),
        });
    }
    Ok(())
}

/// A model family: an architecture and its pipeline, loaded onto a GPU.
/// A loaded model keeps no state from one generation to the next
/// (`generate` takes `&self`), so a cache can hold it between requests.
pub trait Family: Send {
    /// Loads every part of `source` onto `gpu` in the GPU's precision.
    fn load(gpu: &Gpu, source: &ModelSource) -> Result<Self>
    where
        Self: Sized;

    /// The family's name in messages ("AnimateDiff").
    fn family(&self) -> &'static str;

    /// Where the model was loaded from, for messages.
    fn model(&self) -> &Path;

    /// The settings the model proposes: its card's over the family's own.
    fn defaults(&self) -> &ModelDefaults;

    /// The request settings the family honours.
    fn controls(&self) -> Controls;

    /// Pixels per latent pixel: width and height must be multiples of it.
    fn scale_factor(&self) -> usize;

    /// The family's own checks of a request's values (sizes, ranges),
    /// before any GPU work.
    fn check_values(&self, req: &Request) -> Result<()>;

    /// Checks a request before any GPU work: a setting the family does not
    /// honour is refused by name ([`EngineError::UnsupportedControl`]),
    /// then the family checks the values.
    fn validate(&self, req: &Request) -> Result<()> {
        self.controls().check(req, self.family(), self.model())?;
        self.check_values(req)
    }

    /// Runs one generation (validating `req` first). `events` receives
    /// progress and previews and returns false to cancel: the result is
    /// then `EngineError::Cancelled`.
    fn generate(
        &self,
        gpu: &Gpu,
        req: &Request,
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Generated>;
}

/// A family's line in the registry.
pub struct Registered {
    pub name: &'static str,
    /// The pipeline classes (model_index.json `_class_name`) it runs.
    pub classes: &'static [&'static str],
    /// Whether it runs sources that name no class: single-file checkpoints
    /// and folders without a model_index.json.
    pub unnamed: bool,
    pub controls: Controls,
    /// How a model of the family takes stills, from its configs alone.
    pub stills: fn(&ModelSource) -> Result<Stills>,
    /// The settings the family publishes, before a model's card: what a
    /// surface (the viewer's panel) proposes without loading the weights.
    pub defaults: fn() -> ModelDefaults,
    /// Widths and heights are multiples of this for the family's usual
    /// models (the loaded model's `scale_factor` is the exact rule).
    pub size_multiple: usize,
    /// Frame counts are 1 + k × this (1: any count), for the same models.
    pub frame_step: usize,
    pub load: fn(&Gpu, &ModelSource) -> Result<Box<dyn Family>>,
}

impl Registered {
    /// What `source` proposes before it is loaded: its card's defaults
    /// over the family's published ones.
    pub fn defaults_for(&self, source: &ModelSource) -> Result<ModelDefaults> {
        let card = ModelCard::for_model(source.path())?;
        Ok(card.defaults((self.defaults)()))
    }
}

/// The registry's `load` for a family type.
pub(crate) fn load_boxed<F: Family + 'static>(
    gpu: &Gpu,
    source: &ModelSource,
) -> Result<Box<dyn Family>> {
    Ok(Box::new(F::load(gpu, source)?))
}

/// Every family this build runs, one line each.
pub const FAMILIES: &[Registered] = &[animatediff::REGISTERED, wan::REGISTERED];

/// The family that runs `source`, from the pipeline class it names.
pub fn family_of(source: &ModelSource) -> Result<&'static Registered> {
    let class = source.pipeline_class()?;
    family_for_class(class.as_deref()).ok_or_else(|| EngineError::UnsupportedFamily {
        model: source.path().to_path_buf(),
        class: class.unwrap_or_else(|| "(no pipeline class)".into()),
        supported: FAMILIES
            .iter()
            .flat_map(|f| f.classes.iter().copied())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// How `source` takes stills (its family's reading of its configs; no
/// weight is read).
pub fn stills_of(source: &ModelSource) -> Result<Stills> {
    (family_of(source)?.stills)(source)
}

/// The family that runs models naming pipeline `class` (model_index.json's
/// `_class_name`; `None` for single files and folders without one), if this
/// build has it.
pub fn family_for_class(class: Option<&str>) -> Option<&'static Registered> {
    FAMILIES.iter().find(|f| match class {
        Some(c) => f.classes.contains(&c),
        None => f.unnamed,
    })
}

/// Loads `source` with the family that runs it. LoRAs are refused here
/// for a family that cannot fuse them.
pub fn load(gpu: &Gpu, source: &ModelSource) -> Result<Box<dyn Family>> {
    let family = family_of(source)?;
    if source.loras().next().is_some() && !family.controls.supports(Control::Lora) {
        return Err(EngineError::UnsupportedControl {
            control: Control::Lora.field().into(),
            model: source.path().to_path_buf(),
            family: family.name,
        });
    }
    (family.load)(gpu, source)
}

/// One loaded model kept between generations (the viewer's worker), so
/// that a second Generate with the same model does not read and upload its
/// weights again. `key` names what was loaded (model, motion adapter, VAE,
/// LoRAs): the model is loaded again only when it changes.
#[derive(Default)]
pub struct ModelCache {
    loaded: Option<(String, Box<dyn Family>)>,
}

impl ModelCache {
    /// The model for `key`, loaded from `source` (by its family) unless it
    /// is the one held; true when it was loaded now. A failed load leaves
    /// the cache empty.
    pub fn get(
        &mut self,
        gpu: &Gpu,
        key: &str,
        source: &ModelSource,
    ) -> Result<(&mut dyn Family, bool)> {
        let fresh = !matches!(&self.loaded, Some((k, _)) if k == key);
        if fresh {
            // Free the old weights before the new ones take GPU memory.
            self.loaded = None;
            self.loaded = Some((key.to_string(), load(gpu, source)?));
        }
        let (_, model) = self
            .loaded
            .as_mut()
            .expect("a model was just loaded or was held");
        Ok((model.as_mut(), fresh))
    }

    /// The key of the model held, if any.
    pub fn key(&self) -> Option<&str> {
        self.loaded.as_ref().map(|(k, _)| k.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::source::ModelSpec;

    #[test]
    fn a_family_is_picked_by_class_and_proposes_its_defaults_unloaded() {
        assert_eq!(
            family_for_class(Some("WanPipeline")).map(|f| f.name),
            Some("Wan")
        );
        assert_eq!(family_for_class(None).map(|f| f.name), Some("AnimateDiff"));
        assert!(family_for_class(Some("FluxPipeline")).is_none());
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/wan-a");
        let source = ModelSource::open(&ModelSpec {
            model: dir.into(),
            motion_adapter: None,
            vae: None,
            loras: Vec::new(),
            ..Default::default()
        })
        .unwrap();
        let family = family_of(&source).unwrap();
        let d = family.defaults_for(&source).unwrap();
        assert_eq!((d.width, d.height, d.frames, d.fps), (832, 480, 81, 16.0));
        assert_eq!((family.size_multiple, family.frame_step), (16, 4));
        // The published defaults are ones the family's own rules take.
        for f in FAMILIES {
            let d = (f.defaults)();
            assert!(d.width.is_multiple_of(f.size_multiple), "{}", f.name);
            assert!(d.height.is_multiple_of(f.size_multiple), "{}", f.name);
            assert!((d.frames - 1).is_multiple_of(f.frame_step), "{}", f.name);
        }
    }

    #[test]
    fn how_a_model_takes_stills_is_read_from_its_configs() {
        let open = |name: &str| {
            let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/");
            let source = ModelSource::open(&ModelSpec {
                model: format!("{dir}{name}"),
                ..Default::default()
            })
            .unwrap();
            stills_of(&source).unwrap()
        };
        assert_eq!(open("wan-a"), Stills::TEXT);
        let i2v = open("wan-i2v");
        assert_eq!(
            (i2v.text_to_video, i2v.image, i2v.last_image),
            (false, Some(StillUse::Native), false)
        );
        let flf = open("wan-flf2v");
        assert_eq!((flf.image, flf.last_image), (Some(StillUse::Native), true));
        // TI2V-5B takes text or a still; A14B's I2V experts (no image
        // encoder) a still only.
        let ti2v = open("wan-ti2v");
        assert_eq!(
            (ti2v.text_to_video, ti2v.image, ti2v.last_image),
            (true, Some(StillUse::Native), false)
        );
        let a14b = open("wan-a14b/i2v");
        assert_eq!(
            (a14b.text_to_video, a14b.image, a14b.last_image),
            (false, Some(StillUse::Native), false)
        );
        assert_eq!(open("wan-a14b/t2v"), Stills::TEXT);
        let bundled = open("../../assets/models/default");
        assert_eq!(
            (bundled.text_to_video, bundled.image, bundled.last_image),
            (true, Some(StillUse::Anchor), false)
        );
    }
}
