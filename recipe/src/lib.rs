//! A recipe: every setting of one generation, as `motif generate` records it
//! beside and inside a clip (`"format": "motif-recipe-v1"`), as `--from` and
//! the viewer's remix read it back, and as the server's job request carries
//! it. One serde type for all of them, so that a field is named, typed and
//! checked once.
//!
//! Reading ([`Recipe::from_json`], [`Recipe::from_value`]) refuses unknown
//! and ill-typed fields with an error naming the field; [`Recipe::validate`]
//! checks every value that needs no model, again naming the field. What only
//! a model can decide (its sizes, which controls its family supports) is
//! checked where the model is.
//!
//! The format tag changes only when an existing field changes meaning:
//! fields added later are optional, so recipes written by an older release
//! keep loading.

mod names;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use names::{CameraMove, OutputFormat, Scheduler};

/// The format tag of the recipes this crate reads and writes.
pub const FORMAT: &str = "motif-recipe-v1";

/// The `"format"` field of a recipe file: the one version there is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FormatTag {
    #[serde(rename = "motif-recipe-v1")]
    V1,
}

/// A LoRA fused into the model: its file and weight, written `[file, weight]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lora(pub String, pub f32);

impl Lora {
    /// `FILE` or `FILE:WEIGHT` (weight 1 when absent). The weight is what
    /// follows the last `:` if it parses, since Windows paths have `:` too.
    pub fn parse(s: &str) -> Result<Lora, FieldError> {
        if let Some((file, w)) = s.rsplit_once(':') {
            if let Ok(w) = w.parse::<f32>() {
                if !w.is_finite() {
                    return Err(FieldError::new(
                        "loras",
                        format!("{s}: the weight must be a finite number"),
                    ));
                }
                return Ok(Lora(file.to_string(), w));
            }
        }
        Ok(Lora(s.to_string(), 1.0))
    }
}

/// Every setting of one generation. All fields are optional: what a recipe
/// leaves out comes from the flags, the style preset or the model's card.
///
/// The fields `motif generate` has always written serialize as `null` when
/// absent, exactly as the release before this type wrote them; the fields
/// added since are left out when absent, so an AnimateDiff recipe reads the
/// same as before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// `motif-recipe-v1` in a recipe file; absent in a job request.
    #[serde(default)]
    pub format: Option<FormatTag>,
    /// The Motif release that wrote it (informative).
    #[serde(default)]
    pub motif_version: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    /// What to steer away from (classifier-free guidance's negative prompt).
    #[serde(default)]
    pub negative: Option<String>,
    /// A style preset's name.
    #[serde(default)]
    pub style: Option<String>,
    /// A model: folder, file, catalog name or Hugging Face org/name.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub motion_adapter: Option<String>,
    #[serde(default)]
    pub vae: Option<String>,
    /// A text encoder file for a single-file model (Wan's UMT5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_encoder: Option<String>,
    /// The low-noise expert file of a single-file Wan 2.2 A14B model, when
    /// it is not found by name beside `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transformer_2: Option<String>,
    #[serde(default)]
    pub loras: Vec<Lora>,
    /// A still to animate (a path).
    #[serde(default)]
    pub image: Option<String>,
    /// With `image`: how far the other frames may move from the still, (0, 1].
    #[serde(default)]
    pub strength: Option<f32>,
    /// `W:H`: the model's pixel count (or the given width or height) at this ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect: Option<String>,
    #[serde(default)]
    pub width: Option<u32>,
    #[serde(default)]
    pub height: Option<u32>,
    #[serde(default)]
    pub frames: Option<u32>,
    #[serde(default)]
    pub fps: Option<f32>,
    #[serde(default)]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale.
    #[serde(default)]
    pub guidance: Option<f32>,
    #[serde(default)]
    pub seed: Option<u64>,
    #[serde(default)]
    pub scheduler: Option<Scheduler>,
    /// Karras sigmas (euler, dpm++2m).
    #[serde(default)]
    pub karras: Option<bool>,
    /// 0 (nearly still) ..= 4 (strong).
    #[serde(default)]
    pub motion: Option<f32>,
    #[serde(default)]
    pub camera: Option<CameraMove>,
    /// 1: the text encoder's penultimate layer.
    #[serde(default)]
    pub clip_skip: Option<u32>,
    /// Flow-matching shift of the sigma schedule (Wan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shift: Option<f32>,
    /// A second guidance scale (Wan 2.2's low-noise expert).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_2: Option<f32>,
    /// A still the clip ends on (a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_image: Option<String>,
    /// An input video to restyle (a path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video: Option<String>,
    /// With `video`: how far the clip may move from it, (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub video_strength: Option<f32>,
}

/// What is wrong with one field of a recipe: its name and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}`: {reason}")]
pub struct FieldError {
    /// The field's name as the recipe (and the server's API) spells it.
    pub field: String,
    /// What is wrong, starting with the value found where there is one.
    pub reason: String,
}

impl FieldError {
    pub fn new(field: &str, reason: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// Why a recipe could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RecipeError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("expected a JSON object of recipe fields")]
    NotAnObject,
    #[error("not a Motif recipe (expected \"format\": \"{FORMAT}\")")]
    NotARecipe,
    /// An unknown field, or one of the wrong type.
    #[error(transparent)]
    Field(#[from] FieldError),
}

impl RecipeError {
    /// The field at fault, where one is.
    pub fn field(&self) -> Option<&str> {
        match self {
            RecipeError::NotARecipe => Some("format"),
            RecipeError::Field(e) => Some(&e.field),
            RecipeError::Json(_) | RecipeError::NotAnObject => None,
        }
    }
}

impl Recipe {
    /// A recipe file's text (a sidecar, or the metadata inside a clip):
    /// it must carry the format tag.
    pub fn from_json(text: &str) -> Result<Recipe, RecipeError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| RecipeError::Json(e.to_string()))?;
        if value.get("format").and_then(Value::as_str) != Some(FORMAT) {
            return Err(match value {
                Value::Object(_) => RecipeError::NotARecipe,
                _ => RecipeError::NotAnObject,
            });
        }
        Recipe::from_value(value)
    }

    /// Recipe fields as a JSON object, with or without the format tag (a
    /// job request has none). Unknown and ill-typed fields are named.
    pub fn from_value(value: Value) -> Result<Recipe, RecipeError> {
        let Value::Object(map) = value else {
            return Err(RecipeError::NotAnObject);
        };
        Recipe::from_map(map)
    }

    /// [`Recipe::from_value`] of an object already taken apart.
    pub fn from_map(map: Map<String, Value>) -> Result<Recipe, RecipeError> {
        match serde_json::from_value(Value::Object(map.clone())) {
            Ok(recipe) => Ok(recipe),
            // serde's error says what is wrong but not where: every field is
            // optional, so the culprit is the one field that fails alone.
            Err(whole) => {
                for (key, value) in map {
                    let alone = Value::Object(Map::from_iter([(key.clone(), value)]));
                    if let Err(e) = serde_json::from_value::<Recipe>(alone) {
                        return Err(FieldError::new(&key, e.to_string()).into());
                    }
                }
                Err(RecipeError::Json(whole.to_string()))
            }
        }
    }

    /// The recipe as a JSON object, the fields in a stable order (sorted),
    /// as recipe files are written.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).expect("a recipe is plain data that always serializes")
    }

    /// The recipe file's text: the format tag set, pretty-printed.
    pub fn to_json_pretty(&self) -> String {
        let tagged = Recipe {
            format: Some(FormatTag::V1),
            ..self.clone()
        };
        serde_json::to_string_pretty(&tagged.to_value()).expect("a JSON value always prints")
    }

    /// This recipe's fields where it has them, else `base`'s: flags over a
    /// `--from` recipe, a remix's changes over the remixed clip.
    pub fn over(self, base: Recipe) -> Recipe {
        Recipe {
            format: self.format.or(base.format),
            motif_version: self.motif_version.or(base.motif_version),
            prompt: self.prompt.or(base.prompt),
            negative: self.negative.or(base.negative),
            style: self.style.or(base.style),
            model: self.model.or(base.model),
            motion_adapter: self.motion_adapter.or(base.motion_adapter),
            vae: self.vae.or(base.vae),
            text_encoder: self.text_encoder.or(base.text_encoder),
            transformer_2: self.transformer_2.or(base.transformer_2),
            loras: if self.loras.is_empty() {
                base.loras
            } else {
                self.loras
            },
            image: self.image.or(base.image),
            strength: self.strength.or(base.strength),
            aspect: self.aspect.or(base.aspect),
            width: self.width.or(base.width),
            height: self.height.or(base.height),
            frames: self.frames.or(base.frames),
            fps: self.fps.or(base.fps),
            steps: self.steps.or(base.steps),
            guidance: self.guidance.or(base.guidance),
            seed: self.seed.or(base.seed),
            scheduler: self.scheduler.or(base.scheduler),
            karras: self.karras.or(base.karras),
            motion: self.motion.or(base.motion),
            camera: self.camera.or(base.camera),
            clip_skip: self.clip_skip.or(base.clip_skip),
            shift: self.shift.or(base.shift),
            guidance_2: self.guidance_2.or(base.guidance_2),
            last_image: self.last_image.or(base.last_image),
            video: self.video.or(base.video),
            video_strength: self.video_strength.or(base.video_strength),
        }
    }

    /// The fields set that a model family without these controls must
    /// refuse by name (AnimateDiff has none of them).
    pub fn family_controls(&self) -> Vec<&'static str> {
        [
            ("shift", self.shift.is_some()),
            ("guidance_2", self.guidance_2.is_some()),
            ("last_image", self.last_image.is_some()),
            ("video", self.video.is_some()),
            ("video_strength", self.video_strength.is_some()),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .collect()
    }

    /// The aspect ratio, `W:H` with positive whole numbers.
    pub fn aspect_ratio(&self) -> Result<Option<(u32, u32)>, FieldError> {
        let Some(a) = &self.aspect else {
            return Ok(None);
        };
        let bad = || {
            FieldError::new(
                "aspect",
                format!("{a}: expected W:H with positive whole numbers, such as 16:9"),
            )
        };
        let (w, h) = a.split_once(':').ok_or_else(bad)?;
        let (w, h) = (
            w.trim().parse::<u32>().map_err(|_| bad())?,
            h.trim().parse::<u32>().map_err(|_| bad())?,
        );
        if w == 0 || h == 0 {
            return Err(bad());
        }
        Ok(Some((w, h)))
    }

    /// Checks every value that needs no model; the error names the first
    /// field at fault and why.
    pub fn validate(&self) -> Result<(), FieldError> {
        for (field, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v {
                if v == 0 || v % 8 != 0 {
                    return Err(FieldError::new(
                        field,
                        format!("{v}: expected a positive multiple of 8"),
                    ));
                }
            }
        }
        self.aspect_ratio()?;
        for (field, v) in [("frames", self.frames), ("steps", self.steps)] {
            if v == Some(0) {
                return Err(FieldError::new(field, "0: expected at least 1"));
            }
        }
        if let Some(f) = self.fps {
            if !(f.is_finite() && f > 0.0 && f <= 120.0) {
                return Err(FieldError::new(
                    "fps",
                    format!("{f}: expected a number above 0 and at most 120"),
                ));
            }
        }
        for (field, v) in [("guidance", self.guidance), ("guidance_2", self.guidance_2)] {
            if let Some(g) = v {
                if !(g.is_finite() && g >= 0.0) {
                    return Err(FieldError::new(
                        field,
                        format!("{g}: expected a number >= 0"),
                    ));
                }
            }
        }
        if let Some(m) = self.motion {
            if !(0.0..=4.0).contains(&m) {
                return Err(FieldError::new(
                    "motion",
                    format!("{m}: expected a value from 0 (nearly still) to 4 (strong)"),
                ));
            }
        }
        for (field, v) in [
            ("strength", self.strength),
            ("video_strength", self.video_strength),
        ] {
            if let Some(s) = v {
                if !(s > 0.0 && s <= 1.0) {
                    return Err(FieldError::new(
                        field,
                        format!("{s}: expected a value above 0 and at most 1"),
                    ));
                }
            }
        }
        if let Some(c) = self.clip_skip {
            if c > 1 {
                return Err(FieldError::new(
                    "clip_skip",
                    format!("{c}: expected 0 or 1"),
                ));
            }
        }
        if let Some(s) = self.shift {
            if !(s.is_finite() && s > 0.0) {
                return Err(FieldError::new(
                    "shift",
                    format!("{s}: expected a number above 0"),
                ));
            }
        }
        for Lora(file, weight) in &self.loras {
            if file.is_empty() {
                return Err(FieldError::new("loras", "a LoRA without a file"));
            }
            if !weight.is_finite() {
                return Err(FieldError::new(
                    "loras",
                    format!("{file}: the weight must be a finite number"),
                ));
            }
        }
        Ok(())
    }

    /// The clip's size: explicit width and height, else the aspect ratio at
    /// the model's pixel count (or at the given width or height), else the
    /// model's `default` size; rounded to `multiple` (the VAE's scale factor)
    /// where derived, refused where given and not a multiple of it.
    pub fn size(&self, default: (u32, u32), multiple: u32) -> Result<(u32, u32), FieldError> {
        let m = multiple.max(1) as f64;
        // A side derived from the aspect ratio is refused where it would not
        // fit a u32 (it would wrap into a small, wrong size); the server's
        // own bound on sizes applies to what this returns.
        let round = |v: f64| -> Result<u32, FieldError> {
            let side = ((v / m).round()).max(1.0) * m;
            if side <= u32::MAX as f64 {
                Ok(side as u32)
            } else {
                Err(FieldError::new(
                    "aspect",
                    format!(
                        "{}: gives a side of {side} pixels",
                        self.aspect.as_deref().unwrap_or_default()
                    ),
                ))
            }
        };
        let (w, h) = match (self.width, self.height, self.aspect_ratio()?) {
            (Some(w), Some(h), _) => (w, h),
            (Some(w), None, Some((a, b))) => (w, round(w as f64 * b as f64 / a as f64)?),
            (None, Some(h), Some((a, b))) => (round(h as f64 * a as f64 / b as f64)?, h),
            (None, None, Some((a, b))) => {
                let area = default.0 as f64 * default.1 as f64;
                let w = (area * a as f64 / b as f64).sqrt();
                (round(w)?, round(w * b as f64 / a as f64)?)
            }
            (Some(w), None, None) => (w, default.1),
            (None, Some(h), None) => (default.0, h),
            (None, None, None) => default,
        };
        for (field, v) in [("width", w), ("height", h)] {
            let m = multiple.max(1);
            if v % m != 0 {
                let below = (v / m).max(1) * m;
                return Err(FieldError::new(
                    field,
                    format!(
                        "{v}: not a multiple of {m} (what the model's latents need); pass {below} or {}",
                        below + m
                    ),
                ));
            }
        }
        Ok((w, h))
    }
}
