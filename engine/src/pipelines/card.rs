//! `motif.json`, Motif's model card beside a diffusers folder: the settings
//! the model proposes (`defaults`), the words it was trained to read as a
//! camera move (`camera_prompts`) and its latent → RGB preview projection.
//! Other top-level keys (`name`, `description`, `license`, `note`,
//! `training`, …) are the card's free-form notes and are not read; a key
//! inside `defaults` that Motif does not know is an error, so that a typo
//! does not go unnoticed.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ModelDefaults;
use crate::error::LoadError;
use crate::weights::config::read_config;

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct ModelCard {
    #[serde(default)]
    pub defaults: CardDefaults,
    /// Keyed by `Camera::name`.
    #[serde(default)]
    pub camera_prompts: BTreeMap<String, String>,
    /// One row of 3 factors per latent channel.
    pub latent_rgb_factors: Option<Vec<[f32; 3]>>,
    pub latent_rgb_bias: Option<[f32; 3]>,
}

/// The card's `defaults`: each one overrides the family's own.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardDefaults {
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub frames: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub fps: Option<f32>,
    pub negative: Option<String>,
}

impl ModelCard {
    /// The card of the model at `path`: its `motif.json` if it is a folder
    /// that has one, else an empty card. The error names the file and the
    /// field that is unknown or of the wrong type.
    pub fn for_model(path: &Path) -> Result<Self, LoadError> {
        let file = path.join("motif.json");
        match path.is_dir() && file.is_file() {
            true => read_config(&file),
            false => Ok(ModelCard::default()),
        }
    }

    /// The model's defaults: the card's where it sets them, else `family`'s.
    pub fn defaults(&self, family: ModelDefaults) -> ModelDefaults {
        let d = &self.defaults;
        ModelDefaults {
            width: d.width.unwrap_or(family.width),
            height: d.height.unwrap_or(family.height),
            frames: d.frames.unwrap_or(family.frames),
            steps: d.steps.unwrap_or(family.steps),
            guidance: d.guidance.unwrap_or(family.guidance),
            fps: d.fps.unwrap_or(family.fps),
            negative: d.negative.clone().unwrap_or(family.negative),
            camera_prompts: match self.camera_prompts.is_empty() {
                true => family.camera_prompts,
                false => self.camera_prompts.clone(),
            },
        }
    }

    /// The preview projection the card gives, with its bias (zero if absent).
    pub fn latent_rgb(&self) -> Option<(Vec<[f32; 3]>, [f32; 3])> {
        let factors = self.latent_rgb_factors.clone()?;
        Some((factors, self.latent_rgb_bias.unwrap_or([0.0; 3])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn family() -> ModelDefaults {
        ModelDefaults {
            width: 512,
            height: 512,
            frames: 16,
            steps: 25,
            guidance: 7.5,
            fps: 8.0,
            negative: String::new(),
            camera_prompts: BTreeMap::new(),
        }
    }

    #[test]
    fn the_bundled_card_overrides_the_family_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/default");
        let card = ModelCard::for_model(&dir).unwrap();
        let d = card.defaults(family());
        assert_eq!((d.width, d.height, d.frames, d.steps), (128, 128, 16, 8));
        assert_eq!((d.guidance, d.fps), (5.0, 8.0));
        assert_eq!(d.camera_prompts["zoom-in"], "camera zooms in");
        let (factors, bias) = card.latent_rgb().unwrap();
        assert_eq!((factors.len(), bias[0]), (4, -0.29841));
    }

    #[test]
    fn a_misspelt_or_ill_typed_default_is_named() {
        let dir = std::env::temp_dir().join(format!("motif-card-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (json, word) in [
            (r#"{"note": "x", "defaults": {"step": 4}}"#, "`step`"),
            (r#"{"defaults": {"frames": "many"}}"#, "many"),
        ] {
            std::fs::write(dir.join("motif.json"), json).unwrap();
            let e = ModelCard::for_model(&dir).unwrap_err().to_string();
            assert!(e.contains("motif.json") && e.contains(word), "{e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
