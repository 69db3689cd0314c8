//! Classifier-free guidance (Ho & Salimans 2022), as diffusers' pipelines
//! apply it: the network runs on unconditional and conditional inputs (one
//! [uncond, cond] batch for AnimateDiff, two passes for Wan), and the
//! prediction is pushed away from the unconditional one.

/// Whether a scale asks for guidance: diffusers'
/// `do_classifier_free_guidance` (`guidance_scale > 1`).
pub fn uses_guidance(scale: f32) -> bool {
    scale > 1.0
}

/// The prompts to encode, in diffusers' batch order: [negative, prompt]
/// under guidance, else the prompt alone.
pub fn prompt_batch<'a>(prompt: &'a str, negative: &'a str, scale: f32) -> Vec<&'a str> {
    if uses_guidance(scale) {
        vec![negative, prompt]
    } else {
        vec![prompt]
    }
}

/// `uncond + scale · (cond − uncond)`, for families that run the two
/// predictions as separate passes (Wan, as diffusers' `WanPipeline`).
pub fn guide(uncond: &[f32], cond: &[f32], scale: f32) -> Vec<f32> {
    uncond
        .iter()
        .zip(cond)
        .map(|(u, c)| u + scale * (c - u))
        .collect()
}
