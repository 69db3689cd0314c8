//! FreeNoise context windows (Qiu et al. 2023, diffusers' `FreeNoiseMixin`)
//! for clips longer than the motion modules' window: the motion modules
//! attend over overlapping windows of frames, and frames past the first
//! window start from shuffled copies of earlier frames' noise.

use rand_chacha::ChaCha8Rng;

use super::AnimateDiff;
use crate::pipelines::Request;

impl AnimateDiff {
    /// The context windows a request runs with (see `Request::context`).
    pub fn context_for(&self, req: &Request) -> Option<(usize, usize)> {
        match req.context {
            Some(c) => Some(c),
            None if req.frames > self.max_frames => Some((self.max_frames.min(16), 4)),
            None => None,
        }
    }
}

/// FreeNoise's "shuffle_context" noise: frames past the first window reuse
/// the noise of earlier frames in shuffled order, window by window, so long
/// clips stay coherent (after diffusers' `_prepare_latents_free_noise`).
pub(super) fn shuffle_context(
    noise: &mut [f32],
    rng: &mut ChaCha8Rng,
    (c, f, hw): (usize, usize, usize),
    (length, stride): (usize, usize),
) {
    use rand::seq::SliceRandom;
    let mut i = length;
    while i < f {
        let start = i - length;
        let end = (start + stride).min(f);
        let mut order: Vec<usize> = (start..end).collect();
        order.shuffle(rng);
        for (k, &src) in order.iter().enumerate() {
            let dst = i + k;
            if dst >= f {
                break;
            }
            for ch in 0..c {
                let (s0, d0) = ((ch * f + src) * hw, (ch * f + dst) * hw);
                noise.copy_within(s0..s0 + hw, d0);
            }
        }
        i += stride;
    }
}
