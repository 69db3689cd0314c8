//! Camera moves without training, shared by every family: the move as a
//! map from output to source positions, the warp of the initial noise's
//! common part along it, and camera guidance (pulling every frame's clean
//! estimate and noise towards frame 0's, warped to the frame's place along
//! the move). Directions name how the picture content moves on screen.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::latent::{self, CameraMix, WARP_VALUES};
use crate::schedulers::Scheduler;
use crate::tensor::{DType, Tensor};

/// A camera move: the recipe's own name set (`motif_recipe::CameraMove`,
/// what every surface reads and writes); what a move does is here.
pub use motif_recipe::CameraMove as Camera;

/// Where frame content at progress `p` (0..1) samples the common noise:
/// maps an output latent position (centred coordinates) to a source one.
fn source(camera: Camera, p: f32, x: f32, y: f32, w: f32, h: f32) -> (f32, f32) {
    // A quarter of the frame over the clip for shifts, 1.5x for zooms,
    // 20 degrees for rolls.
    let shift_x = 0.25 * w * p;
    let shift_y = 0.25 * h * p;
    let zoom = 1.0 + 0.5 * p;
    let angle = 20f32.to_radians() * p;
    match camera {
        Camera::PanLeft => (x + shift_x, y),
        Camera::PanRight => (x - shift_x, y),
        Camera::TiltUp => (x, y + shift_y),
        Camera::TiltDown => (x, y - shift_y),
        Camera::ZoomIn => (x / zoom, y / zoom),
        Camera::ZoomOut => (x * zoom, y * zoom),
        // Content turns clockwise on screen (y grows downwards).
        Camera::RollCw => rotate(x, y, -angle),
        Camera::RollCcw => rotate(x, y, angle),
    }
}

/// The latent pixel of a [h, w] plane that pixel (x, y) of the frame at
/// progress `p` takes the common noise from: nearest, wrapping around
/// the edges so that every output pixel draws real noise.
pub(crate) fn noise_source(
    camera: Camera,
    p: f32,
    x: usize,
    y: usize,
    w: usize,
    h: usize,
) -> (usize, usize) {
    let (cx, cy) = (
        x as f32 - (w as f32 - 1.0) / 2.0,
        y as f32 - (h as f32 - 1.0) / 2.0,
    );
    let (ux, uy) = source(camera, p, cx, cy, w as f32, h as f32);
    let wrap = |v: f32, n: usize| ((v.round() as i64).rem_euclid(n as i64)) as usize;
    (
        wrap(ux + (w as f32 - 1.0) / 2.0, w),
        wrap(uy + (h as f32 - 1.0) / 2.0, h),
    )
}

fn rotate(x: f32, y: f32, a: f32) -> (f32, f32) {
    (x * a.cos() - y * a.sin(), x * a.sin() + y * a.cos())
}

/// How strongly the camera move steers step k of n (see `CameraGuide`):
/// strong while the layout forms, none in the last third of the steps.
pub(crate) fn camera_weight(k: usize, n: usize) -> f32 {
    let progress = k as f32 / n.max(1) as f32;
    (0.8 * (1.0 - 1.5 * progress)).max(0.0)
}

/// Camera guidance, training-free, on the GPU: the latents for the next
/// step, with every frame's clean estimate and noise pulled towards frame
/// 0's, warped along the move to that frame's place in the clip. The
/// latents are split as `a·x0 + b·eps` at the next timestep (a and b from
/// the scheduler's own `add_noise`, so this holds for every scheduler); the
/// x0 parts mix linearly, the noise parts with square-root weights so that
/// they stay unit-variance (`ops::latent::camera_mix`).
pub(crate) struct CameraGuide {
    /// Where each pixel of frames 1.. samples frame 0 ([`warp_table`]),
    /// uploaded once per generation.
    warp: Tensor,
}

impl CameraGuide {
    /// The guide for latents [C, F, h, w]; None for a single frame, which
    /// has nothing to pull towards.
    pub fn new(gpu: &Gpu, cam: Camera, (f, h, w): (usize, usize, usize)) -> Result<Option<Self>> {
        if f < 2 {
            return Ok(None);
        }
        let table = warp_table(cam, f, h, w);
        let warp = Tensor::from_f32(gpu, &table, &[f - 1, h * w, WARP_VALUES], DType::F32)?;
        Ok(Some(CameraGuide { warp }))
    }

    /// Latents [C, F, h, w] (f32) after one step, with their clean estimate
    /// `x0`, guided towards the move with `weight` at the noise level of
    /// timestep `next`.
    pub fn apply(
        &self,
        gpu: &Gpu,
        scheduler: &Scheduler,
        latents: &Tensor,
        x0: &Tensor,
        next: f64,
        weight: f32,
    ) -> Result<Tensor> {
        let (a, b) = scheduler.noise_scales(next)?;
        if b <= 1e-6 {
            return Ok(latents.clone());
        }
        let mix = CameraMix {
            a,
            b,
            keep_x: 1.0 - weight,
            take_x: weight,
            keep_e: (1.0 - weight).sqrt(),
            take_e: weight.sqrt(),
        };
        let x0 = x0.reshape(latents.shape())?;
        latent::camera_mix(gpu, latents, &x0, &self.warp, mix)
    }
}

/// For every pixel of frames 1..f of an [h, w] latent plane, the frame-0
/// pixels it samples along the move and their bilinear weights
/// ([f − 1, h·w, WARP_VALUES], see `ops::latent::camera_mix`): the source
/// position at the frame's place in the clip, clamped inside the plane.
pub(crate) fn warp_table(cam: Camera, f: usize, h: usize, w: usize) -> Vec<f32> {
    let mut table = Vec::with_capacity(f.saturating_sub(1) * h * w * WARP_VALUES);
    for fi in 1..f {
        let p = fi as f32 / (f - 1) as f32;
        for y in 0..h {
            for x in 0..w {
                let (cx, cy) = (
                    x as f32 - (w as f32 - 1.0) / 2.0,
                    y as f32 - (h as f32 - 1.0) / 2.0,
                );
                let (ux, uy) = source(cam, p, cx, cy, w as f32, h as f32);
                let sx = (ux + (w as f32 - 1.0) / 2.0).clamp(0.0, (w - 1) as f32);
                let sy = (uy + (h as f32 - 1.0) / 2.0).clamp(0.0, (h - 1) as f32);
                let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
                let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
                table.extend([
                    (y0 * w + x0) as f32,
                    (y0 * w + x1) as f32,
                    (y1 * w + x0) as f32,
                    (y1 * w + x1) as f32,
                    fx,
                    fy,
                ]);
            }
        }
    }
    table
}
