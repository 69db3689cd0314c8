//! Decoding latents to frames a chunk of frames at a time, for families
//! whose VAE decodes frames independently (an image VAE): the chunk size
//! that keeps the decoder's activations bounded, the [C, F, h, w] →
//! [n, C, h, w] regrouping, and the conversion to [0, 1] and RGB8, with a
//! `Decoded` event (and a chance to cancel) per frame. The latents stay on
//! the GPU; the regrouping and the conversion to RGB8 run there, and only
//! the bytes of the frames come back (the f32 frames only for reference
//! cases).

use super::events::{emit, Event};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::tensor::Tensor;

/// Frames the VAE decodes at once at `height` x `width`: as many as keep
/// the decoder's widest full-resolution activation (`widest` channels, a
/// few live at once) within about 256 MiB, at least one. SD's VAE at
/// 512x512 takes one frame at a time; small models decode a whole clip in
/// one pass, which saves the per-dispatch cost of many small ones.
pub fn chunk_frames(widest: usize, height: usize, width: usize) -> usize {
    let per_frame = 4 * widest * height * width * 4;
    ((256usize << 20) / per_frame.max(1)).max(1)
}

/// Decoded frames: RGB8 per frame, and [F, H, W, 3] in [0, 1] where asked
/// for (reference cases compare it before quantisation).
pub(crate) struct Frames {
    pub rgb8: Vec<Vec<u8>>,
    pub f32: Option<Vec<f32>>,
}

impl Frames {
    pub fn new(frames: usize, (hh, ww): (usize, usize), keep_f32: bool) -> Self {
        Frames {
            rgb8: Vec::with_capacity(frames),
            f32: keep_f32.then(|| vec![0f32; frames * hh * ww * 3]),
        }
    }

    /// Adds decoded images [n, 3, H, W] in [-1, 1] as frames `first..`
    /// (those below `total`), with a `Decoded` event each. Without the f32
    /// form, the images become RGB8 on the GPU and only the bytes come back.
    pub fn push_images(
        &mut self,
        gpu: &Gpu,
        images: &Tensor,
        first: usize,
        total: usize,
        events: &mut dyn FnMut(Event) -> bool,
    ) -> Result<()> {
        let count = images.shape().first().copied().unwrap_or(0);
        let pixels = images.numel() / count.max(1) / 3;
        let new = count.min(total.saturating_sub(first));
        match self.f32.as_mut() {
            Some(all) => {
                let values = images.to_f32(gpu)?;
                for (i, image) in values.chunks(3 * pixels).take(new).enumerate() {
                    let fi = first + i;
                    let out = &mut all[fi * pixels * 3..(fi + 1) * pixels * 3];
                    self.rgb8.push(to_frame(image, out));
                }
            }
            None => {
                let rgb = crate::ops::latent::frames_rgb8(gpu, images)?;
                self.rgb8.extend(rgb.into_iter().take(new));
            }
        }
        for fi in first..first + new {
            emit(events, Event::Decoded { frame: fi, total })?;
        }
        Ok(())
    }
}

/// Decodes `latents` [C, F, h, w] (f32, on the GPU) `chunk` frames at a
/// time with `decode` ([n, C, h, w] latents → [n, 3, H, W] images in [-1,
/// 1]); the f32 frames are kept only if `keep_f32`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_in_chunks(
    gpu: &Gpu,
    latents: &Tensor,
    (hh, ww): (usize, usize),
    chunk: usize,
    keep_f32: bool,
    decode: &dyn Fn(&Tensor) -> Result<Tensor>,
    events: &mut dyn FnMut(Event) -> bool,
) -> Result<Frames> {
    let f = latents.shape().get(1).copied().unwrap_or(0);
    let mut frames = Frames::new(f, (hh, ww), keep_f32);
    for f0 in (0..f).step_by(chunk.max(1)) {
        let n = chunk.min(f - f0);
        let z = crate::ops::latent::latent_frames(gpu, latents, f0, n, gpu.precision())?;
        let images = decode(&z)?;
        frames.push_images(gpu, &images, f0, f, events)?;
    }
    Ok(frames)
}

/// One decoded image [3, H, W] in [-1, 1] as a frame: `out` [H, W, 3] gets
/// diffusers' postprocessing (x / 2 + 0.5, clamped to [0, 1]); returns the
/// same as RGB8 (`ops::latent::frame_reference`, which the GPU's
/// `frames_rgb8` matches).
pub(crate) fn to_frame(image: &[f32], out: &mut [f32]) -> Vec<u8> {
    crate::ops::latent::frame_reference(image, out)
}
