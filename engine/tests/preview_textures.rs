//! GPU-direct previews: the compute shader's texture layers hold what the
//! CPU reference computes (read back here, in the test only), and a
//! generation with `gpu_previews` rewrites the same textures every step with
//! what the RGB8 preview path reports.

mod common;

use motif_engine::models::source::ModelSource;
use motif_engine::ops::preview::{latent_rgb_to_textures, FrameTextures};
use motif_engine::pipelines::{AnimateDiff, Event, Family, Request};
use motif_engine::{DType, Tensor};

fn pipeline() -> AnimateDiff {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases-b");
    AnimateDiff::load(common::gpu(), &ModelSource::folder(&dir)).unwrap()
}

/// Every texel against the reference in [-1, 1] mapped to bytes (±1 for
/// rounding), alpha opaque.
fn assert_matches_reference(rgba: &[Vec<u8>], want: &[Vec<f32>]) {
    assert_eq!(rgba.len(), want.len());
    for (fi, (g, w)) in rgba.iter().zip(want).enumerate() {
        assert_eq!(g.len() / 4, w.len() / 3, "frame {fi}: pixel count");
        for (p, (texel, rgb)) in g.chunks(4).zip(w.chunks(3)).enumerate() {
            for k in 0..3 {
                let expect = ((rgb[k] + 1.0) * 127.5).clamp(0.0, 255.0);
                assert!(
                    (texel[k] as f32 - expect).abs() <= 1.0,
                    "frame {fi} pixel {p} channel {k}: {} vs {expect}",
                    texel[k]
                );
            }
            assert_eq!(texel[3], 255, "frame {fi} pixel {p}: alpha");
        }
    }
}

#[test]
fn the_shader_writes_the_reference_projection_into_the_texture_layers() {
    let gpu = common::gpu();
    let p = pipeline();
    // An odd width (a padded copy row) and values spanning past [-1, 1].
    let (f, h, w) = (3, 5, 7);
    let x0: Vec<f32> = (0..4 * f * h * w)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 6.0)
        .collect();
    let target = FrameTextures::new(gpu, w, h, f).unwrap();
    p.latent_rgb()
        .to_textures(gpu, &x0, f, h, w, &target)
        .unwrap();
    assert_matches_reference(
        &target.read_rgba(gpu).unwrap(),
        &p.latent_rgb().reference(&x0, f, h, w),
    );
}

#[test]
fn every_step_rewrites_the_same_textures_with_the_rgb_preview() {
    let gpu = common::gpu();
    let p = pipeline();
    let mut req = Request::new("a red ball", p.defaults());
    (req.width, req.height, req.frames, req.steps, req.seed) = (24, 16, 3, 2, 9);
    req.previews = true;
    req.gpu_previews = true;
    let mut ids = Vec::new();
    let mut steps = Vec::new();
    p.generate(gpu, &req, &mut |e| {
        if let Event::Step {
            preview,
            gpu_preview,
            ..
        } = e
        {
            let textures = gpu_preview.expect("gpu_previews gives textures every step");
            let rgb = preview.expect("previews gives RGB8 every step");
            assert_eq!(
                (textures.width, textures.height, textures.frames()),
                (6, 4, 3)
            );
            let rgba = textures.read_rgba(gpu).unwrap();
            for (t, c) in rgba.iter().zip(&rgb.frames) {
                for (texel, px) in t.chunks(4).zip(c.chunks(3)) {
                    for k in 0..3 {
                        assert!(texel[k].abs_diff(px[k]) <= 1, "{texel:?} vs {px:?}");
                    }
                }
            }
            ids.push(textures.id);
            steps.push(rgba);
        }
        true
    })
    .unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1], "one set of textures per run");
    assert_ne!(steps[0], steps[1], "the second step rewrote the textures");
}

#[test]
fn mismatched_latents_are_refused() {
    let gpu = common::gpu();
    let target = FrameTextures::new(gpu, 4, 4, 2).unwrap();
    let latents = Tensor::zeros(gpu, &[4, 3, 4, 4], DType::F32).unwrap();
    let err = latent_rgb_to_textures(gpu, &latents, &[[0.0; 3]; 4], [0.0; 3], &target)
        .unwrap_err()
        .to_string();
    assert!(err.contains("preview"), "{err}");
    assert!(FrameTextures::new(gpu, 0, 4, 2).is_err());
}
