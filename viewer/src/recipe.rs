//! The panel's settings and the recipe (`motif_recipe::Recipe`, as
//! `motif generate` writes it): the recipe a Generate makes, and a clip's
//! recipe back into the panel (remix).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use motif_recipe::Recipe;

use crate::Controls;

/// Reads the recipe of `path` (a `.json` sidecar or a clip Motif wrote) over
/// `base`: every setting the recipe records replaces the panel's.
pub fn controls_from_recipe(path: &Path, base: &Controls) -> Result<Controls> {
    let text = motif_video::read_recipe(path)
        .with_context(|| format!("reading the recipe of {}", path.display()))?;
    let recipe =
        Recipe::from_json(&text).with_context(|| format!("{}: the recipe", path.display()))?;
    Ok(base.with_recipe(&recipe))
}

impl Controls {
    /// The recipe of a Generate: the panel's values over the settings it
    /// has no widget for.
    pub fn recipe(&self) -> Recipe {
        Recipe {
            format: None,
            motif_version: None,
            prompt: Some(self.prompt.clone()),
            negative: Some(self.negative.clone()).filter(|n| !n.trim().is_empty()),
            style: self.style.clone(),
            camera: self.camera,
            motion: Some(self.motion),
            width: Some(self.width as u32),
            height: Some(self.height as u32),
            // The panel's width and height are the size.
            aspect: None,
            seed: Some(self.seed),
            steps: Some(self.steps as u32),
            guidance: Some(self.guidance),
            frames: Some(self.frames as u32),
            fps: Some(self.fps),
            scheduler: self.scheduler,
            model: Some(self.model.clone()),
            image: (self.image.as_ref()).map(|p| p.to_string_lossy().into_owned()),
            strength: self.image.as_ref().map(|_| self.strength),
            last_image: (self.last_image.as_ref()).map(|p| p.to_string_lossy().into_owned()),
            ..self.extra.clone()
        }
    }

    /// The panel with every setting `r` records: what it leaves out keeps
    /// the panel's value, but for the negative prompt, style, camera,
    /// scheduler and stills, whose absence is itself a setting.
    pub fn with_recipe(&self, r: &Recipe) -> Controls {
        let mut c = self.clone();
        if let Some(p) = &r.prompt {
            c.prompt = p.clone();
        }
        c.negative = r.negative.clone().unwrap_or_default();
        c.style = r.style.clone();
        c.camera = r.camera;
        c.scheduler = r.scheduler;
        if let Some(m) = &r.model {
            c.model = m.clone();
        }
        c.image = r.image.as_ref().map(PathBuf::from);
        c.last_image = r.last_image.as_ref().map(PathBuf::from);
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = r.$field { c.$field = v as _; } )* };
        }
        set!(strength, motion, width, height, frames, steps, guidance, fps);
        if let Some(v) = r.seed {
            c.seed = v;
            // A remix starts from the recorded clip: same seed until re-rolled.
            c.seed_locked = true;
        }
        c.extra = r.clone();
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ModelDefaults;

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
                ..ModelDefaults::ANIMATEDIFF
            },
        );
        let r = Recipe::from_json(
            r#"{"format": "motif-recipe-v1", "prompt": "a red ball", "negative": "blur",
            "style": "anime", "model": "/m", "image": "still.png", "strength": 0.6,
            "last_image": "end.png", "width": 64,
            "height": 48, "frames": 4, "fps": 12.0, "steps": 2, "guidance": 3.5, "seed": 77,
            "scheduler": "euler", "motion": 3.0, "camera": "pan-left", "karras": true,
            "loras": [["a.safetensors", 0.5]]}"#,
        )
        .unwrap();
        let c = base.with_recipe(&r);
        assert_eq!(c.prompt, "a red ball");
        assert_eq!(c.negative, "blur");
        assert_eq!(c.style.as_deref(), Some("anime"));
        assert_eq!(c.model, "/m");
        assert_eq!(c.image, Some(PathBuf::from("still.png")));
        assert_eq!(c.last_image, Some(PathBuf::from("end.png")));
        assert_eq!((c.width, c.height, c.frames, c.steps), (64, 48, 4, 2));
        assert_eq!(
            (c.strength, c.fps, c.guidance, c.motion),
            (0.6, 12.0, 3.5, 3.0)
        );
        assert_eq!((c.seed, c.seed_locked), (77, true));
        assert_eq!(c.scheduler.map(|s| s.name()), Some("euler"));
        assert_eq!(c.camera.map(|s| s.name()), Some("pan-left"));
        // What the panel does not show goes on to the next Generate.
        let again = c.recipe();
        assert_eq!(again.karras, Some(true));
        assert_eq!(again.loras, r.loras);
        assert_eq!(again.format, None);
        assert_eq!(
            Recipe {
                format: r.format,
                motif_version: None,
                ..again
            },
            r
        );
    }

    #[test]
    fn sizes_and_frames_snap_to_what_the_family_takes() {
        let ad = ModelDefaults::ANIMATEDIFF;
        assert_eq!((ad.snap_size(52.0), ad.snap_frames(16)), (56, 16));
        let wan = ModelDefaults {
            size_multiple: 16,
            frame_step: 4,
            ..ad
        };
        // Wan's published 832x480x81 and the test sizes stay as they are.
        assert_eq!(
            (
                wan.snap_size(832.0),
                wan.snap_size(480.0),
                wan.snap_frames(81)
            ),
            (832, 480, 81)
        );
        assert_eq!(
            (wan.snap_size(48.0), wan.snap_size(32.0), wan.snap_frames(5)),
            (48, 32, 5)
        );
        assert_eq!(
            (wan.snap_size(56.0), wan.snap_frames(16), wan.snap_frames(0)),
            (64, 17, 1)
        );
        assert_eq!(wan.snap_frames(2), 1);
    }
}
