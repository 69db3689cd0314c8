//! The job a client submits: a [`Recipe`] (the fields of `motif generate`'s
//! recipe that a client may choose), the clip's container and an uploaded
//! still; checked here for everything that needs neither a model nor a GPU.
//! On the wire it is one JSON object, as `POST /api/v1/jobs` documents it.

use base64::Engine as _;
use motif_recipe::{OutputFormat, Recipe, RecipeError};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

pub use motif_recipe::FieldError;

/// The recipe fields a job may set. The others (paths on the server's
/// disk: motion adapter, VAE, LoRAs; a later family's controls) are
/// refused like unknown fields until the API documents them.
pub const RECIPE_FIELDS: [&str; 17] = [
    "prompt",
    "negative",
    "style",
    "camera",
    "motion",
    "aspect",
    "width",
    "height",
    "frames",
    "fps",
    "steps",
    "guidance",
    "seed",
    "model",
    "scheduler",
    "karras",
    "strength",
];

/// A submitted job. Every field but the prompt is optional: the model's
/// defaults fill the rest, as on the command line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRequest {
    /// The generation's settings: only [`RECIPE_FIELDS`], the prompt always.
    pub recipe: Recipe,
    /// mp4 (default), gif or webp.
    pub format: Option<OutputFormat>,
    /// A still to animate: PNG, JPEG or WebP, base64 (standard alphabet, with
    /// or without a `data:image/...;base64,` prefix). Not stored with the job's fields.
    pub image: Option<String>,
    /// The still the clip ends on (a first-last-frame model), as `image`;
    /// only with `image`.
    pub last_image: Option<String>,
}

impl JobRequest {
    /// A job of this prompt and nothing else.
    pub fn new(prompt: &str) -> Self {
        JobRequest {
            recipe: Recipe {
                prompt: Some(prompt.to_string()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Reads a job's JSON object; the error names the field at fault
    /// (`body` when the JSON is not an object).
    pub fn from_value(value: Value) -> Result<JobRequest, FieldError> {
        let Value::Object(mut map) = value else {
            return Err(FieldError::new(
                "body",
                "expected a JSON object with the job's fields",
            ));
        };
        let format = match map.remove("format") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value(v).map_err(|e| FieldError::new("format", e.to_string()))?,
            ),
        };
        let mut still = |field: &str| match map.remove(field) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(FieldError::new(
                field,
                format!("expected base64 text, found {other}"),
            )),
        };
        let image = still("image")?;
        let last_image = still("last_image")?;
        if let Some(key) = map.keys().find(|k| !RECIPE_FIELDS.contains(&k.as_str())) {
            return Err(FieldError::new(
                key,
                format!(
                    "unknown field `{key}`, expected one of: {}, format, image, last_image",
                    RECIPE_FIELDS.join(", ")
                ),
            ));
        }
        let recipe = Recipe::from_map(map).map_err(|e| match e {
            RecipeError::Field(f) => f,
            other => FieldError::new("body", other.to_string()),
        })?;
        if recipe.prompt.is_none() {
            return Err(FieldError::new("prompt", "missing field `prompt`"));
        }
        Ok(JobRequest {
            recipe,
            format,
            image,
            last_image,
        })
    }

    /// The job's fields as stored with it and shown by the API: the recipe
    /// fields set, and the format; never the stills.
    pub fn fields(&self) -> Map<String, Value> {
        // Printed and read back rather than `to_value`d: printing writes an
        // f32 as its shortest form (0.7), as the job was submitted, where a
        // JSON value would hold its f64 widening (0.699999988079071).
        let text = serde_json::to_string(&self.recipe).expect("a recipe always serializes");
        let mut map: Map<String, Value> =
            serde_json::from_str(&text).expect("serde_json reads what it printed");
        map.retain(|k, v| !v.is_null() && RECIPE_FIELDS.contains(&k.as_str()));
        if let Some(f) = self.format {
            map.insert("format".into(), Value::from(f.name()));
        }
        map
    }

    /// The whole request as a client sends it: [`JobRequest::fields`] and the stills.
    pub fn body(&self) -> Value {
        let mut map = self.fields();
        for (field, still) in [("image", &self.image), ("last_image", &self.last_image)] {
            if let Some(b64) = still {
                map.insert(field.into(), Value::from(b64.as_str()));
            }
        }
        Value::Object(map)
    }

    pub fn prompt(&self) -> &str {
        self.recipe.prompt.as_deref().unwrap_or_default()
    }

    pub fn format(&self) -> OutputFormat {
        self.format.unwrap_or(OutputFormat::Mp4)
    }
}

/// Serialized as [`JobRequest::fields`]: what the job table stores.
impl Serialize for JobRequest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.fields().serialize(s)
    }
}

/// Read through [`JobRequest::from_value`].
impl<'de> Deserialize<'de> for JobRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        JobRequest::from_value(value).map_err(serde::de::Error::custom)
    }
}

/// The style and model names a server accepts, from its own machine
/// (`motif styles`, `motif models`).
#[derive(Debug, Clone, Default)]
pub struct Names {
    pub styles: Vec<String>,
    pub models: Vec<String>,
}

impl Names {
    /// Style and model must be names this server knows: never a path, never
    /// a model the OpenAPI document does not list.
    pub fn check(&self, request: &JobRequest) -> Result<(), FieldError> {
        for (field, value, known) in [
            ("style", &request.recipe.style, &self.styles),
            ("model", &request.recipe.model, &self.models),
        ] {
            if let Some(v) = value {
                if !known.contains(v) {
                    return Err(FieldError::new(
                        field,
                        format!("unknown {field} `{v}` (known here: {})", known.join(", ")),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Server-side bounds on what one job may ask for.
#[derive(Debug, Clone)]
pub struct JobLimits {
    pub max_prompt_chars: usize,
    pub max_side: u32,
    pub max_frames: u32,
    pub max_steps: u32,
    pub max_image_bytes: usize,
    pub max_image_side: u32,
}

impl Default for JobLimits {
    fn default() -> Self {
        JobLimits {
            max_prompt_chars: 1000,
            max_side: 1024,
            max_frames: 64,
            max_steps: 100,
            max_image_bytes: 4 << 20,
            max_image_side: 4096,
        }
    }
}

impl JobLimits {
    /// The one bound on a job's size, applied to the clip as it will be made
    /// (the model's defaults filled in, `aspect` turned into pixels), so that
    /// no way of asking for a size escapes it. The error names the field the
    /// size came from: `width`/`height` when given, else `aspect`, else the
    /// model's default (`width`).
    pub fn check_size(
        &self,
        request: &JobRequest,
        size: crate::ClipSize,
    ) -> Result<(), FieldError> {
        let r = &request.recipe;
        let crate::ClipSize {
            width,
            height,
            frames,
        } = size;
        for (field, given, value) in [("width", r.width, width), ("height", r.height, height)] {
            if value > self.max_side {
                let field = match (given, &r.aspect) {
                    (None, Some(_)) => "aspect",
                    _ => field,
                };
                return Err(FieldError::new(
                    field,
                    format!(
                        "the clip would be {width}x{height}: at most {} pixels a side",
                        self.max_side
                    ),
                ));
            }
        }
        if frames > self.max_frames {
            return Err(FieldError::new(
                "frames",
                format!(
                    "the clip would have {frames} frames: at most {}",
                    self.max_frames
                ),
            ));
        }
        Ok(())
    }
}

fn check_range(
    field: &str,
    value: Option<f32>,
    low: f32,
    low_inclusive: bool,
    high: f32,
) -> Result<(), FieldError> {
    if let Some(v) = value {
        let above_low = if low_inclusive { v >= low } else { v > low };
        if !(v.is_finite() && above_low && v <= high) {
            let bound = if low_inclusive { "from" } else { "above" };
            return Err(FieldError::new(
                field,
                format!("{v}: expected a number {bound} {low} to {high}"),
            ));
        }
    }
    Ok(())
}

impl JobRequest {
    /// Checks every field: the recipe's own rules ([`Recipe::validate`]),
    /// then this server's limits. The stills are decoded to be checked
    /// (the job keeps their base64 text).
    pub fn validate(&self, limits: &JobLimits) -> Result<(), FieldError> {
        let r = &self.recipe;
        let prompt = self.prompt();
        let prompt_chars = prompt.chars().count();
        if prompt.trim().is_empty() {
            return Err(FieldError::new("prompt", "the prompt is empty"));
        }
        if prompt_chars > limits.max_prompt_chars {
            return Err(FieldError::new(
                "prompt",
                format!(
                    "{prompt_chars} characters: at most {} allowed",
                    limits.max_prompt_chars
                ),
            ));
        }
        if let Some(n) = &r.negative {
            if n.chars().count() > limits.max_prompt_chars {
                return Err(FieldError::new(
                    "negative",
                    format!("at most {} characters allowed", limits.max_prompt_chars),
                ));
            }
        }
        for (field, value) in [("style", &r.style), ("model", &r.model)] {
            if let Some(v) = value {
                if !is_plain_name(v) {
                    return Err(FieldError::new(
                        field,
                        format!("`{v}`: expected a name (letters, digits, `.`, `_`, `-`, at most one `/`)"),
                    ));
                }
            }
        }
        r.validate()?;
        for (field, value) in [("width", r.width), ("height", r.height)] {
            if let Some(v) = value {
                if v > limits.max_side {
                    return Err(FieldError::new(
                        field,
                        format!(
                            "{v}: expected a multiple of 8 from 8 to {}",
                            limits.max_side
                        ),
                    ));
                }
            }
        }
        if let Some(a) = &r.aspect {
            // Stricter than the recipe's W:H: small plain numbers only.
            let number = |s: &str| {
                (!s.is_empty()
                    && s.len() <= 3
                    && !s.starts_with('0')
                    && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse::<u32>().ok())
                .flatten()
            };
            let parsed = a.split_once(':').and_then(|(w, h)| {
                let (w, h) = (number(w)?, number(h)?);
                (w > 0 && h > 0 && w <= 100 && h <= 100).then_some(())
            });
            if parsed.is_none() {
                return Err(FieldError::new(
                    "aspect",
                    format!("`{a}`: expected W:H with whole numbers from 1 to 100, such as 16:9"),
                ));
            }
        }
        for (field, value, max) in [
            ("frames", r.frames, limits.max_frames),
            ("steps", r.steps, limits.max_steps),
        ] {
            if let Some(v) = value {
                if v > max {
                    return Err(FieldError::new(field, format!("{v}: expected 1 to {max}")));
                }
            }
        }
        // fps and strength must be above 0 for the engine; the API's floors are
        // round numbers instead, because a JSON number like 1e-300 passes "above
        // 0" yet is 0 once it is the engine's f32.
        check_range("fps", r.fps, 0.1, true, 120.0)?;
        check_range("guidance", r.guidance, 0.0, true, 30.0)?;
        check_range("strength", r.strength, 0.01, true, 1.0)?;
        if r.strength.is_some() && self.image.is_none() {
            return Err(FieldError::new("strength", "goes with `image`"));
        }
        if self.last_image.is_some() && self.image.is_none() {
            return Err(FieldError::new(
                "last_image",
                "needs a first image too: send `image` (the first frame) with `last_image`",
            ));
        }
        for (field, still) in [("image", &self.image), ("last_image", &self.last_image)] {
            if let Some(b64) = still {
                check_image(field, b64, limits)?;
            }
        }
        Ok(())
    }
}

/// Model and style names: a catalog name or an org/name of the Hugging Face
/// cache, never a path on the server.
fn is_plain_name(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    !s.is_empty()
        && s.len() <= 200
        && parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        })
}

/// The smallest side a still may have: what the engine takes
/// (`motif_engine::pipelines::MIN_IMAGE_SIDE`, which this crate does not link).
const MIN_IMAGE_SIDE: u32 = 16;

/// Whether a base64 still is too large to hold: its decoded size from the
/// text's length, before anything is decoded.
fn image_too_large(b64: &str, limits: &JobLimits) -> bool {
    base64_body(b64).len() / 4 * 3 > limits.max_image_bytes + 3
}

fn base64_body(b64: &str) -> &str {
    match b64.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => b64,
    }
}

/// Checks the still of `field` (`image` or `last_image`): base64 of a PNG,
/// JPEG or WebP within the byte and side limits.
fn check_image(field: &str, b64: &str, limits: &JobLimits) -> Result<(), FieldError> {
    let body = base64_body(b64);
    // base64 is 4/3 of the bytes: refuse before decoding anything huge.
    if image_too_large(b64, limits) {
        return Err(FieldError::new(
            field,
            format!("larger than {} bytes", limits.max_image_bytes),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| FieldError::new(field, format!("not valid base64: {e}")))?;
    if bytes.len() > limits.max_image_bytes {
        return Err(FieldError::new(
            field,
            format!("larger than {} bytes", limits.max_image_bytes),
        ));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| FieldError::new(field, format!("cannot read it: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        _ => return Err(FieldError::new(field, "not a PNG, JPEG or WebP image")),
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| FieldError::new(field, format!("not a readable image: {e}")))?;
    if w < MIN_IMAGE_SIDE
        || h < MIN_IMAGE_SIDE
        || w > limits.max_image_side
        || h > limits.max_image_side
    {
        return Err(FieldError::new(
            field,
            format!(
                "{w}x{h} pixels: expected {MIN_IMAGE_SIDE} to {} pixels a side",
                limits.max_image_side
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field a job's JSON is refused for, reading or checking it.
    fn refused(json: &str) -> String {
        let limits = JobLimits::default();
        match JobRequest::from_value(serde_json::from_str(json).unwrap()) {
            Err(e) => e.field,
            Ok(job) => job.validate(&limits).unwrap_err().field,
        }
    }

    #[test]
    fn unknown_and_ill_typed_fields_are_named() {
        for (json, field) in [
            (r#"{"prompt": "a", "promt": "b"}"#, "promt"),
            (r#"{"prompt": "a", "vae": "/etc/vae"}"#, "vae"),
            (r#"{"prompt": "a", "shift": 3}"#, "shift"),
            (r#"{"prompt": "a", "width": "wide"}"#, "width"),
            (r#"{"prompt": "a", "seed": -3}"#, "seed"),
            (r#"{"prompt": "a", "format": "avi"}"#, "format"),
            (r#"{"prompt": "a", "image": 7}"#, "image"),
            (r#"{"negative": "a"}"#, "prompt"),
            ("[1]", "body"),
        ] {
            assert_eq!(refused(json), field, "{json}");
        }
    }

    #[test]
    fn bounds_name_their_field() {
        let cases = [
            (r#"{"prompt": "a", "width": 12}"#, "width"),
            (r#"{"prompt": "a", "height": 4096}"#, "height"),
            (r#"{"prompt": "a", "frames": 0}"#, "frames"),
            (r#"{"prompt": "a", "steps": 101}"#, "steps"),
            (r#"{"prompt": "a", "camera": "sideways"}"#, "camera"),
            (r#"{"prompt": "a", "scheduler": "heun"}"#, "scheduler"),
            (r#"{"prompt": "a", "motion": 5}"#, "motion"),
            (r#"{"prompt": "a", "model": "../etc"}"#, "model"),
            (r#"{"prompt": "a", "aspect": "16x9"}"#, "aspect"),
            (r#"{"prompt": "a", "aspect": "160:90"}"#, "aspect"),
            (r#"{"prompt": "a", "image": "aGVsbG8="}"#, "image"),
            (r#"{"prompt": "a", "strength": 0.5}"#, "strength"),
            (r#"{"prompt": " "}"#, "prompt"),
        ];
        for (json, field) in cases {
            assert_eq!(refused(json), field, "{json}");
        }
        let job: JobRequest =
            serde_json::from_str(r#"{"prompt": "a", "model": "org/name", "width": 64}"#).unwrap();
        assert!(job.validate(&JobLimits::default()).is_ok());
    }

    #[test]
    fn last_image_is_checked_like_image_and_needs_it() {
        let png = |w: u32, h: u32| {
            let mut bytes = Vec::new();
            image::RgbImage::new(w, h)
                .write_to(
                    &mut std::io::Cursor::new(&mut bytes),
                    image::ImageFormat::Png,
                )
                .unwrap();
            base64::engine::general_purpose::STANDARD.encode(bytes)
        };
        let (still, small) = (png(32, 16), png(15, 40));
        for (json, field) in [
            (
                format!(r#"{{"prompt": "a", "last_image": "{still}"}}"#),
                "last_image",
            ),
            (
                format!(r#"{{"prompt": "a", "image": "{still}", "last_image": "%%%"}}"#),
                "last_image",
            ),
            (
                format!(r#"{{"prompt": "a", "image": "{still}", "last_image": "{small}"}}"#),
                "last_image",
            ),
            (format!(r#"{{"prompt": "a", "image": "{small}"}}"#), "image"),
            (
                r#"{"prompt": "a", "last_image": 7}"#.to_string(),
                "last_image",
            ),
        ] {
            assert_eq!(refused(&json), field, "{json}");
        }
        let both: JobRequest = serde_json::from_str(&format!(
            r#"{{"prompt": "a", "image": "{still}", "last_image": "{still}"}}"#
        ))
        .unwrap();
        assert!(both.validate(&JobLimits::default()).is_ok());
        // Kept out of the stored fields like the first still, sent again by body().
        assert!(serde_json::to_value(&both)
            .unwrap()
            .get("last_image")
            .is_none());
        assert_eq!(both.body()["last_image"], serde_json::json!(still));
    }

    #[test]
    fn the_wire_shape_round_trips_without_the_still() {
        // f32 values come back as submitted (0.7, not its f64 widening).
        let body = serde_json::json!({"prompt": "a", "camera": "pan-left", "karras": true,
            "motion": 0.7, "strength": 0.7, "format": "gif", "image": "aGVsbG8="});
        let job = JobRequest::from_value(body.clone()).unwrap();
        assert_eq!(job.body(), body);
        let stored = serde_json::to_value(&job).unwrap();
        assert!(stored.get("image").is_none());
        assert_eq!(stored["format"], "gif");
        let again: JobRequest = serde_json::from_value(stored).unwrap();
        assert_eq!(again.recipe, job.recipe);
    }
}
