//! Text- and image-to-video pipelines: one folder per model family, plus
//! what every family shares, written once — the request and its events
//! (cancellation included), classifier-free guidance, seeded noise, camera
//! moves, previews and decoding in chunks.
//!
//! Families: `animatediff` (diffusers `AnimateDiffPipeline`).

pub mod animatediff;
pub mod camera;
pub mod decode;
pub mod events;
pub mod guidance;
pub mod image;
pub mod noise;
pub mod preview;
pub mod request;

pub use crate::ops::preview::FrameTextures;
pub use animatediff::AnimateDiff;
pub use camera::Camera;
pub use events::{Event, Generated, Preview, Trace};
pub use image::{fit_image, RgbImage};
pub use noise::motion_share;
pub use preview::LatentRgb;
pub use request::{ModelDefaults, Request};

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

/// One loaded model kept between generations (the viewer's worker), so
/// that a second Generate with the same model does not read and upload its
/// weights again. `key` names what was loaded (model, motion adapter, VAE,
/// LoRAs): the model is loaded again only when it changes.
#[derive(Default)]
pub struct ModelCache {
    loaded: Option<(String, AnimateDiff)>,
}

impl ModelCache {
    /// The model for `key`, loaded from `source` unless it is the one held;
    /// true when it was loaded now. A failed load leaves the cache empty.
    pub fn get(
        &mut self,
        gpu: &Gpu,
        key: &str,
        source: &ModelSource,
    ) -> Result<(&mut AnimateDiff, bool)> {
        let fresh = !matches!(&self.loaded, Some((k, _)) if k == key);
        if fresh {
            // Free the old weights before the new ones take GPU memory.
            self.loaded = None;
            self.loaded = Some((key.to_string(), AnimateDiff::load(gpu, source)?));
        }
        let (_, pipe) = self
            .loaded
            .as_mut()
            .expect("a model was just loaded or was held");
        Ok((pipe, fresh))
    }

    /// The key of the model held, if any.
    pub fn key(&self) -> Option<&str> {
        self.loaded.as_ref().map(|(k, _)| k.as_str())
    }
}
