//! Decoding latents to frames a chunk of frames at a time, for families
//! whose VAE decodes frames independently (an image VAE): the chunk size
//! that keeps the decoder's activations bounded, the [C, F, h, w] →
//! [n, C, h, w] regrouping, and the conversion to [0, 1] and RGB8, with a
//! `Decoded` event (and a chance to cancel) per frame.

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

/// Decoded frames: RGB8 per frame, and [F, H, W, 3] in [0, 1].
pub(crate) struct Frames {
    pub rgb8: Vec<Vec<u8>>,
    pub f32: Vec<f32>,
}

/// Decodes `latents` [C, F, h, w] `chunk` frames at a time with `decode`
/// ([n, C, h, w] latents → [n, 3, H, W] images in [-1, 1]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_in_chunks(
    gpu: &Gpu,
    latents: &[f32],
    (c, f, h, w): (usize, usize, usize, usize),
    (hh, ww): (usize, usize),
    chunk: usize,
    decode: &dyn Fn(&Tensor) -> Result<Tensor>,
    events: &mut dyn FnMut(Event) -> bool,
) -> Result<Frames> {
    let mut frames_f32 = vec![0f32; f * hh * ww * 3];
    let mut frames = Vec::with_capacity(f);
    for f0 in (0..f).step_by(chunk) {
        let n = chunk.min(f - f0);
        let mut z = vec![0f32; n * c * h * w];
        for (i, fi) in (f0..f0 + n).enumerate() {
            for ch in 0..c {
                let o = (ch * f + fi) * h * w;
                let d = (i * c + ch) * h * w;
                z[d..d + h * w].copy_from_slice(&latents[o..o + h * w]);
            }
        }
        let zt = Tensor::from_f32(gpu, &z, &[n, c, h, w], gpu.precision())?;
        let images = decode(&zt)?.to_f32(gpu)?;
        for (i, image) in images.chunks(3 * hh * ww).enumerate() {
            let fi = f0 + i;
            let out = &mut frames_f32[fi * hh * ww * 3..(fi + 1) * hh * ww * 3];
            frames.push(to_frame(image, out));
            emit(
                events,
                Event::Decoded {
                    frame: fi,
                    total: f,
                },
            )?;
        }
    }
    Ok(Frames {
        rgb8: frames,
        f32: frames_f32,
    })
}

/// One decoded image [3, H, W] in [-1, 1] as a frame: `out` [H, W, 3] gets
/// diffusers' postprocessing (x / 2 + 0.5, clamped to [0, 1]); returns the
/// same as RGB8.
pub(crate) fn to_frame(image: &[f32], out: &mut [f32]) -> Vec<u8> {
    let pixels = out.len() / 3;
    let mut rgb = vec![0u8; pixels * 3];
    for p in 0..pixels {
        for k in 0..3 {
            let v = (image[k * pixels + p] / 2.0 + 0.5).clamp(0.0, 1.0);
            out[p * 3 + k] = v;
            rgb[p * 3 + k] = (v * 255.0).round() as u8;
        }
    }
    rgb
}
