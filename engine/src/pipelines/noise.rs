//! Seeded noise, shared by every family: one ChaCha8 stream per generation,
//! seeded from the request, draws the initial latents (with the motion
//! control's shared part and the camera warp) and then any per-step noise,
//! in that order, so that a seed gives the same clip on every run.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::camera::Camera;

/// The generator for one generation.
pub(crate) fn seeded(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` standard normal values.
pub(crate) fn normal(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// The noise a scheduler step draws: the reference case's where given,
/// else `n` values from the generation's stream.
pub(crate) fn step_noise(given: Option<&[f32]>, rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    match given {
        Some(v) => v.to_vec(),
        None => normal(rng, n),
    }
}

/// Gaussian noise [C, F, h, w] with the motion share and camera warp: each
/// frame's noise is `√share · common + √(1-share) · own`, the common plane
/// sampled along the camera move at the frame's place in the clip.
pub(crate) fn initial_noise(
    rng: &mut ChaCha8Rng,
    (c, f, h, w): (usize, usize, usize, usize),
    motion: f32,
    camera: Option<Camera>,
) -> Vec<f32> {
    let independent = normal(rng, c * f * h * w);
    let share = motion_share(motion);
    if share == 0.0 && camera.is_none() {
        return independent;
    }
    // Camera moves need a common part to move; keep at least a little.
    let share = if camera.is_some() {
        share.max(0.3)
    } else {
        share
    };
    let common = normal(rng, c * h * w);
    let (a, b) = (share.sqrt(), (1.0 - share).sqrt());
    let mut out = vec![0f32; c * f * h * w];
    for fi in 0..f {
        let p = if f > 1 {
            fi as f32 / (f - 1) as f32
        } else {
            0.0
        };
        for y in 0..h {
            for x in 0..w {
                let (sx, sy) = match camera {
                    None => (x, y),
                    Some(cam) => super::camera::noise_source(cam, p, x, y, w, h),
                };
                for ch in 0..c {
                    let o = ((ch * f + fi) * h + y) * w + x;
                    out[o] = a * common[(ch * h + sy) * w + sx] + b * independent[o];
                }
            }
        }
    }
    out
}

/// The share of the initial noise common to all frames at motion level m.
pub fn motion_share(m: f32) -> f32 {
    // 0 → 0.6, 1 → 0.4, 2 → 0.2, 3 → 0.1, 4 → 0.
    const SHARE: [f32; 5] = [0.6, 0.4, 0.2, 0.1, 0.0];
    interpolate(&SHARE, m)
}

/// Piecewise-linear lookup of a control value at motion levels 0..=4.
pub(crate) fn interpolate(table: &[f32; 5], m: f32) -> f32 {
    let m = m.clamp(0.0, 4.0);
    let i = (m.floor() as usize).min(3);
    let t = m - i as f32;
    table[i] * (1.0 - t) + table[i + 1] * t
}
