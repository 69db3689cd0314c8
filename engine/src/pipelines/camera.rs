//! Camera moves without training, shared by every family: the move as a
//! map from output to source positions, the warp of the initial noise's
//! common part along it, and camera guidance (pulling every frame's clean
//! estimate and noise towards frame 0's, warped to the frame's place along
//! the move). Directions name how the picture content moves on screen.

use crate::error::Result;
use crate::schedulers::Scheduler;

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

/// How strongly the camera move steers step k of n (see `camera_guide`):
/// strong while the layout forms, none in the last third of the steps.
pub(crate) fn camera_weight(k: usize, n: usize) -> f32 {
    let progress = k as f32 / n.max(1) as f32;
    (0.8 * (1.0 - 1.5 * progress)).max(0.0)
}

/// Camera guidance, training-free: the latents for the next step, with
/// every frame's clean estimate and noise pulled towards frame 0's, warped
/// along the move to that frame's place in the clip. The latents are split
/// as `a·x0 + b·eps` at the next timestep (a and b from the scheduler's
/// own `add_noise`, so this holds for every scheduler); the x0 parts mix
/// linearly, the noise parts with square-root weights so that they stay
/// unit-variance. Latents are [C, F, h, w].
#[allow(clippy::too_many_arguments)]
pub(crate) fn camera_guide(
    scheduler: &Scheduler,
    cam: Camera,
    latents: &[f32],
    x0: &[f32],
    next: f64,
    weight: f32,
    c: usize,
    f: usize,
    h: usize,
    w: usize,
) -> Result<Vec<f32>> {
    let a = scheduler.add_noise(&[1.0], &[0.0], next)?[0];
    let b = scheduler.add_noise(&[0.0], &[1.0], next)?[0];
    if b <= 1e-6 {
        return Ok(latents.to_vec());
    }
    let eps: Vec<f32> = latents
        .iter()
        .zip(x0)
        .map(|(l, x)| (l - a * x) / b)
        .collect();
    let (keep_x, take_x) = (1.0 - weight, weight);
    let (keep_e, take_e) = ((1.0 - weight).sqrt(), weight.sqrt());
    let mut out = latents.to_vec();
    let plane = h * w;
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
                for ch in 0..c {
                    let frame0 = ch * f * plane;
                    let o = frame0 + fi * plane + y * w + x;
                    let wx0 = bilinear(&x0[frame0..frame0 + plane], w, h, sx, sy);
                    let we0 = bilinear(&eps[frame0..frame0 + plane], w, h, sx, sy);
                    let xm = keep_x * x0[o] + take_x * wx0;
                    let em = keep_e * eps[o] + take_e * we0;
                    out[o] = a * xm + b * em;
                }
            }
        }
    }
    Ok(out)
}

/// Bilinear sample of a [h, w] plane at (x, y), inside the plane.
fn bilinear(plane: &[f32], w: usize, h: usize, x: f32, y: f32) -> f32 {
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let row = |yy: usize| plane[yy * w + x0] * (1.0 - fx) + plane[yy * w + x1] * fx;
    row(y0) * (1.0 - fy) + row(y1) * fy
}
