//! The job a client submits: the recipe fields of `motif generate`, checked
//! here for everything that needs neither a model nor a GPU.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// Camera moves and schedulers as `motif generate` spells them.
pub const CAMERAS: [&str; 8] = [
    "zoom-in",
    "zoom-out",
    "pan-left",
    "pan-right",
    "tilt-up",
    "tilt-down",
    "roll-cw",
    "roll-ccw",
];
pub const SCHEDULERS: [&str; 5] = ["ddim", "euler", "euler-a", "dpm++2m", "lcm"];
pub const FORMATS: [&str; 3] = ["mp4", "gif", "webp"];

/// A submitted job. Every field but the prompt is optional: the model's
/// defaults fill the rest, as on the command line.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub negative: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub camera: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub motion: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aspect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub karras: Option<bool>,
    /// With `image`: how far the other frames may move from the still (0 < S <= 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f32>,
    /// mp4 (default), gif or webp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// A still to animate: PNG, JPEG or WebP, base64 (standard alphabet, with
    /// or without a `data:image/...;base64,` prefix). Not stored in the recipe.
    #[serde(default, skip_serializing)]
    pub image: Option<String>,
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
            ("style", &request.style, &self.styles),
            ("model", &request.model, &self.models),
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

/// A 4xx answer's content: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FieldError {
            field: field.to_string(),
            message: message.into(),
        }
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

fn check_name(field: &str, value: &Option<String>, allowed: &[&str]) -> Result<(), FieldError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => Err(FieldError::new(
            field,
            format!(
                "unknown value `{v}` (expected one of: {})",
                allowed.join(", ")
            ),
        )),
        _ => Ok(()),
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
    /// Checks every field against the limits; returns the decoded still.
    pub fn validate(&self, limits: &JobLimits) -> Result<Option<Vec<u8>>, FieldError> {
        let prompt_chars = self.prompt.chars().count();
        if self.prompt.trim().is_empty() {
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
        if let Some(n) = &self.negative {
            if n.chars().count() > limits.max_prompt_chars {
                return Err(FieldError::new(
                    "negative",
                    format!("at most {} characters allowed", limits.max_prompt_chars),
                ));
            }
        }
        check_name("camera", &self.camera, &CAMERAS)?;
        check_name("scheduler", &self.scheduler, &SCHEDULERS)?;
        check_name("format", &self.format, &FORMATS)?;
        for (field, value) in [("style", &self.style), ("model", &self.model)] {
            if let Some(v) = value {
                if !is_plain_name(v) {
                    return Err(FieldError::new(
                        field,
                        format!("`{v}`: expected a name (letters, digits, `.`, `_`, `-`, at most one `/`)"),
                    ));
                }
            }
        }
        for (field, value) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = value {
                if v == 0 || v % 8 != 0 || v > limits.max_side {
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
        if let Some(a) = &self.aspect {
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
        if let Some(f) = self.frames {
            if f == 0 || f > limits.max_frames {
                return Err(FieldError::new(
                    "frames",
                    format!("{f}: expected 1 to {}", limits.max_frames),
                ));
            }
        }
        if let Some(s) = self.steps {
            if s == 0 || s > limits.max_steps {
                return Err(FieldError::new(
                    "steps",
                    format!("{s}: expected 1 to {}", limits.max_steps),
                ));
            }
        }
        // fps and strength must be above 0 for the engine; the API's floors are
        // round numbers instead, because a JSON number like 1e-300 passes "above
        // 0" yet is 0 once it is the engine's f32.
        check_range("fps", self.fps, 0.1, true, 120.0)?;
        check_range("guidance", self.guidance, 0.0, true, 30.0)?;
        check_range("motion", self.motion, 0.0, true, 4.0)?;
        check_range("strength", self.strength, 0.01, true, 1.0)?;
        if self.strength.is_some() && self.image.is_none() {
            return Err(FieldError::new("strength", "goes with `image`"));
        }
        self.image
            .as_deref()
            .map(|b64| decode_image(b64, limits))
            .transpose()
    }

    pub fn format(&self) -> &str {
        self.format.as_deref().unwrap_or("mp4")
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

fn decode_image(b64: &str, limits: &JobLimits) -> Result<Vec<u8>, FieldError> {
    let body = match b64.split_once(";base64,") {
        Some((head, rest)) if head.starts_with("data:") => rest,
        _ => b64,
    };
    // base64 is 4/3 of the bytes: refuse before decoding anything huge.
    if body.len() / 4 * 3 > limits.max_image_bytes + 3 {
        return Err(FieldError::new(
            "image",
            format!("larger than {} bytes", limits.max_image_bytes),
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| FieldError::new("image", format!("not valid base64: {e}")))?;
    if bytes.len() > limits.max_image_bytes {
        return Err(FieldError::new(
            "image",
            format!("larger than {} bytes", limits.max_image_bytes),
        ));
    }
    let reader = image::ImageReader::new(std::io::Cursor::new(&bytes))
        .with_guessed_format()
        .map_err(|e| FieldError::new("image", format!("cannot read it: {e}")))?;
    match reader.format() {
        Some(image::ImageFormat::Png | image::ImageFormat::Jpeg | image::ImageFormat::WebP) => {}
        _ => return Err(FieldError::new("image", "not a PNG, JPEG or WebP image")),
    }
    let (w, h) = reader
        .into_dimensions()
        .map_err(|e| FieldError::new("image", format!("not a readable image: {e}")))?;
    if w == 0 || h == 0 || w > limits.max_image_side || h > limits.max_image_side {
        return Err(FieldError::new(
            "image",
            format!(
                "{w}x{h}: expected 1 to {} pixels a side",
                limits.max_image_side
            ),
        ));
    }
    Ok(bytes)
}

/// The field named by a serde error from parsing a job, where it names one.
pub fn field_of_serde_error(path: &str, message: &str) -> String {
    for marker in ["unknown field `", "missing field `", "duplicate field `"] {
        if let Some(start) = message.find(marker) {
            let rest = &message[start + marker.len()..];
            if let Some(end) = rest.find('`') {
                return rest[..end].to_string();
            }
        }
    }
    if path.is_empty() || path == "." {
        "body".to_string()
    } else {
        path.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(json: &str) -> Result<JobRequest, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = job(r#"{"prompt": "a", "promt": "b"}"#).unwrap_err();
        assert_eq!(field_of_serde_error("", &e.to_string()), "promt");
    }

    #[test]
    fn bounds_name_their_field() {
        let limits = JobLimits::default();
        let cases = [
            (r#"{"prompt": "a", "width": 12}"#, "width"),
            (r#"{"prompt": "a", "height": 4096}"#, "height"),
            (r#"{"prompt": "a", "frames": 0}"#, "frames"),
            (r#"{"prompt": "a", "camera": "sideways"}"#, "camera"),
            (r#"{"prompt": "a", "model": "../etc"}"#, "model"),
            (r#"{"prompt": "a", "aspect": "16x9"}"#, "aspect"),
            (r#"{"prompt": "a", "image": "aGVsbG8="}"#, "image"),
            (r#"{"prompt": " "}"#, "prompt"),
        ];
        for (json, field) in cases {
            let e = job(json).unwrap().validate(&limits).unwrap_err();
            assert_eq!(e.field, field, "{json}: {}", e.message);
        }
        assert!(job(r#"{"prompt": "a", "model": "org/name", "width": 64}"#)
            .unwrap()
            .validate(&limits)
            .is_ok());
    }
}
