//! The pipeline's engine-side contract on the fixture model (cases-b): step
//! events carry x0 previews (the GPU projection equals its CPU reference),
//! a callback returning false cancels, and a request is checked before any
//! work. Numerics against diffusers are the conformance cases' job.

mod common;

use motif_engine::models::source::ModelSource;
use motif_engine::pipelines::{self, AnimateDiff, Event, Family, Request};
use motif_engine::EngineError;

fn pipeline() -> AnimateDiff {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases-b");
    AnimateDiff::load(common::gpu(), &ModelSource::folder(&dir)).unwrap()
}

fn tiny(p: &AnimateDiff) -> Request {
    let mut r = Request::new("a red ball", p.defaults());
    (r.width, r.height, r.frames, r.steps, r.seed) = (24, 16, 3, 2, 9);
    r
}

#[test]
fn every_step_reports_a_preview_of_the_x0_estimate() {
    let gpu = common::gpu();
    let p = pipeline();
    let mut req = tiny(&p);
    req.previews = true;
    let mut previews = Vec::new();
    p.generate(gpu, &req, &mut |e| {
        if let Event::Step { preview, .. } = e {
            previews.push(preview.cloned());
        }
        true
    })
    .unwrap();
    assert_eq!(previews.len(), 2);
    for pv in &previews {
        let pv = pv.as_ref().expect("a preview per step");
        // Latent size (the VAE scales by 4), one RGB frame per video frame.
        assert_eq!((pv.width, pv.height, pv.frames.len()), (6, 4, 3));
        assert!(pv.frames.iter().all(|f| f.len() == 6 * 4 * 3));
    }
    assert_ne!(
        previews[0].as_ref().unwrap().frames,
        previews[1].as_ref().unwrap().frames
    );
    // The GPU projection against its CPU reference, on values spanning the range.
    let x0: Vec<f32> = (0..4 * 3 * 4 * 6)
        .map(|i| ((i * 37 % 23) as f32 - 11.0) / 6.0)
        .collect();
    let got = p.latent_rgb().preview(gpu, &x0, 3, 4, 6).unwrap();
    let want = p.latent_rgb().reference(&x0, 3, 4, 6);
    for (g, w) in got.frames.iter().zip(&want) {
        for (&gb, &wv) in g.iter().zip(w) {
            let expect = ((wv + 1.0) * 127.5).clamp(0.0, 255.0);
            assert!((gb as f32 - expect).abs() <= 1.0, "{gb} vs {expect}");
        }
    }
}

#[test]
fn a_callback_returning_false_cancels_and_bad_requests_fail_first() {
    let gpu = common::gpu();
    let p = pipeline();
    let req = tiny(&p);
    let mut steps = 0;
    let r = p.generate(gpu, &req, &mut |e| {
        if let Event::Step { .. } = e {
            steps += 1;
            return false;
        }
        true
    });
    assert!(matches!(r, Err(EngineError::Cancelled)), "{:?}", r.err());
    assert_eq!(steps, 1);
    let mut bad = tiny(&p);
    bad.width = 26;
    let e = p
        .generate(gpu, &bad, &mut |_| {
            panic!("no work before the request is checked")
        })
        .unwrap_err();
    assert!(e.to_string().contains("width 26"), "{e}");
}

#[test]
fn a_setting_the_family_cannot_use_is_refused_by_name() {
    let p = pipeline();
    let mut req = tiny(&p);
    req.shift = Some(5.0);
    let e = p
        .generate(common::gpu(), &req, &mut |_| {
            panic!("no work for a refused request")
        })
        .unwrap_err();
    assert!(
        matches!(&e, EngineError::UnsupportedControl { control, family: "AnimateDiff", .. } if control == "shift"),
        "{e:?}"
    );
    let message = e.to_string();
    assert!(
        message.starts_with("`shift` is not supported by the model ")
            && message.contains("cases-b")
            && message.ends_with("(AnimateDiff family)"),
        "{message}"
    );
    // The same for the other coming settings; validate says it before any work.
    let mut req = tiny(&p);
    req.guidance_2 = Some(3.0);
    assert!(p
        .validate(&req)
        .unwrap_err()
        .to_string()
        .contains("`guidance_2`"));
}

#[test]
fn the_registry_picks_the_family_from_the_pipeline_class() {
    let fixture =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/cases-b");
    let family = pipelines::family_of(&ModelSource::folder(&fixture)).unwrap();
    assert_eq!(family.name, "AnimateDiff");
    let wan = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/wan-a");
    assert_eq!(
        pipelines::family_of(&ModelSource::folder(&wan))
            .unwrap()
            .name,
        "Wan"
    );
    // A class no family runs yet is named, with the ones that run.
    let dir = std::env::temp_dir().join(format!("motif-family-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "WanVACEPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}"#,
    )
    .unwrap();
    let source = ModelSource::folder(&dir);
    let e = pipelines::family_of(&source).err().unwrap();
    assert!(
        matches!(&e, EngineError::UnsupportedFamily { class, .. } if class == "WanVACEPipeline")
    );
    let message = e.to_string();
    assert!(
        message.contains("`WanVACEPipeline` models are not supported yet")
            && message.contains("AnimateDiffPipeline")
            && message.contains("WanPipeline"),
        "{message}"
    );
    // Loading through the registry (as the model cache does) says the same.
    let mut cache = pipelines::ModelCache::default();
    let e = cache.get(common::gpu(), "wan", &source).err().unwrap();
    assert!(e.to_string().contains("`WanVACEPipeline`"), "{e}");
    assert_eq!(cache.key(), None);
    std::fs::remove_dir_all(&dir).unwrap();
}
