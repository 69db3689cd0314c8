//! A clip's recipe (`motif-recipe-v1`, as `motif generate` writes it) back
//! into the panel's settings: remix.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::Controls;

/// Reads the recipe of `path` (a `.json` sidecar or a clip Motif wrote) over
/// `base`: every setting the recipe records replaces the panel's.
pub fn controls_from_recipe(path: &Path, base: &Controls) -> Result<Controls> {
    let text = motif_video::read_recipe(path)
        .with_context(|| format!("reading the recipe of {}", path.display()))?;
    let recipe: Value = serde_json::from_str(&text)
        .with_context(|| format!("{}: the recipe is not valid JSON", path.display()))?;
    if recipe.get("format").and_then(Value::as_str) != Some("motif-recipe-v1") {
        bail!(
            "{}: not a Motif recipe (expected \"format\": \"motif-recipe-v1\")",
            path.display()
        );
    }
    apply(&recipe, base).with_context(|| format!("{}", path.display()))
}

fn apply(r: &Value, base: &Controls) -> Result<Controls> {
    let field = |k: &str| r.get(k).filter(|v| !v.is_null());
    let string = |k: &str| -> Result<Option<String>> {
        match field(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => bail!("recipe field `{k}` must be a string, found {v}"),
        }
    };
    let number = |k: &str| -> Result<Option<f64>> {
        match field(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| anyhow!("recipe field `{k}` must be a number, found {v}")),
        }
    };
    let mut c = base.clone();
    if let Some(p) = string("prompt")? {
        c.prompt = p;
    }
    c.negative = string("negative")?.unwrap_or_default();
    c.style = string("style")?;
    c.camera = string("camera")?
        .map(|s| s.parse().map_err(|e: String| anyhow!("camera: {e}")))
        .transpose()?;
    c.scheduler = string("scheduler")?
        .map(|s| s.parse().map_err(|e| anyhow!("scheduler: {e}")))
        .transpose()?;
    if let Some(m) = string("model")? {
        c.model = m;
    }
    c.image = string("image")?.map(PathBuf::from);
    if let Some(v) = number("strength")? {
        c.strength = v as f32;
    }
    if let Some(v) = number("motion")? {
        c.motion = v as f32;
    }
    if let Some(v) = number("width")? {
        c.width = v as usize;
    }
    if let Some(v) = number("height")? {
        c.height = v as usize;
    }
    if let Some(v) = number("frames")? {
        c.frames = v as usize;
    }
    if let Some(v) = number("steps")? {
        c.steps = v as usize;
    }
    if let Some(v) = number("guidance")? {
        c.guidance = v as f32;
    }
    if let Some(v) = number("fps")? {
        c.fps = v as f32;
    }
    if let Some(v) = field("seed").and_then(Value::as_u64) {
        c.seed = v;
        // A remix starts from the recorded clip: same seed until re-rolled.
        c.seed_locked = true;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelDefaults;
    use serde_json::json;

    #[test]
    fn every_recorded_setting_comes_back() {
        let base = Controls::new(
            "default",
            &ModelDefaults {
                width: 128,
                height: 128,
                frames: 16,
                steps: 8,
                guidance: 5.0,
                fps: 8.0,
            },
        );
        let r = json!({"format": "motif-recipe-v1", "prompt": "a red ball", "negative": "blur",
            "style": "anime", "model": "/m", "image": "still.png", "strength": 0.6, "width": 64,
            "height": 48, "frames": 4, "fps": 12.0, "steps": 2, "guidance": 3.5, "seed": 77,
            "scheduler": "euler", "motion": 3.0, "camera": "pan-left"});
        let c = apply(&r, &base).unwrap();
        assert_eq!(c.prompt, "a red ball");
        assert_eq!(c.negative, "blur");
        assert_eq!(c.style.as_deref(), Some("anime"));
        assert_eq!(c.model, "/m");
        assert_eq!(c.image, Some(PathBuf::from("still.png")));
        assert_eq!((c.width, c.height, c.frames, c.steps), (64, 48, 4, 2));
        assert_eq!(
            (c.strength, c.fps, c.guidance, c.motion),
            (0.6, 12.0, 3.5, 3.0)
        );
        assert_eq!((c.seed, c.seed_locked), (77, true));
        assert_eq!(c.scheduler.map(|s| s.name()), Some("euler"));
        assert_eq!(c.camera.map(|s| s.name()), Some("pan-left"));
        assert!(apply(&json!({"camera": "sideways"}), &base).is_err());
    }
}
