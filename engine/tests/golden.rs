//! The bundled model (assets/models/default) at a small size, through the
//! engine's API, against frames and latents committed in
//! tests/fixtures/golden: a restructuring of the pipeline must leave clips
//! bit-identical. Four generations run on one loaded model, each exercising
//! a control (camera and motion, a still, FreeNoise context windows), so a
//! setting that leaks from one generation into the next shows up too.
//!
//! The files hold what the adapter named in golden.json produced in f32: on
//! that adapter and driver the comparison is exact; elsewhere float
//! rounding differs, so the frames must only stay close (the check then
//! proves the API runs, not bit-identity).
//!
//! Regenerate (only when a change is meant to alter clips):
//! `MOTIF_WRITE_GOLDEN=1 cargo test --release -p motif-engine --test golden`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use motif_engine::models::source::ModelSource;
use motif_engine::pipelines::{AnimateDiff, Camera, Family, Generated, Request, RgbImage};
use motif_engine::{DType, Gpu, GpuOptions};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/golden")
}

/// f32 whatever the adapter, so that other adapters stay comparable.
fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(GpuOptions {
            precision: Some(DType::F32),
            ..Default::default()
        })
        .expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

fn adapter(gpu: &Gpu) -> String {
    let a = gpu.adapter();
    format!("{} / {}", a.name, a.driver)
}

/// A 40x30 still: a diagonal colour ramp with a bright square.
fn still() -> RgbImage {
    let (width, height) = (40, 30);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        for x in 0..width {
            let square = (12..24).contains(&x) && (8..20).contains(&y);
            data.push(if square {
                0.95
            } else {
                x as f32 / width as f32
            });
            data.push(if square {
                0.9
            } else {
                y as f32 / height as f32
            });
            data.push(0.3);
        }
    }
    RgbImage {
        width,
        height,
        data,
    }
}

/// The generations, by name: 64x64, 4 frames, 2 steps, fixed seeds.
fn requests(defaults: &motif_engine::pipelines::ModelDefaults) -> Vec<(&'static str, Request)> {
    let base = |seed: u64| {
        let mut r = Request::new("a red ball bouncing on green grass", defaults);
        (r.width, r.height, r.frames, r.steps, r.seed) = (64, 64, 4, 2, seed);
        r
    };
    let mut camera = base(11);
    camera.camera = Some(Camera::ZoomIn);
    camera.motion = 3.5;
    let mut image = base(5);
    image.image = Some(still());
    image.strength = 0.7;
    image.motion = 1.0;
    let mut context = base(3);
    context.context = Some((3, 1));
    vec![
        ("camera-motion", camera),
        ("text", base(7)),
        ("image", image),
        ("context-windows", context),
    ]
}

/// Frames (RGB8, frame after frame) then the final latents (f32 LE).
fn bytes(clip: &Generated) -> Vec<u8> {
    let mut out: Vec<u8> = clip.frames.concat();
    out.extend(clip.latents.iter().flat_map(|v| v.to_le_bytes()));
    out
}

fn generate_all() -> Vec<(&'static str, Vec<u8>)> {
    let gpu = gpu();
    let source = ModelSource::folder(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/models/default"),
    );
    let pipe = AnimateDiff::load(gpu, &source).unwrap();
    let requests = requests(pipe.defaults());
    requests
        .into_iter()
        .map(|(name, req)| {
            let clip = pipe.generate(gpu, &req, &mut |_| true).unwrap();
            assert_eq!((clip.width, clip.height, clip.frames.len()), (64, 64, 4));
            (name, bytes(&clip))
        })
        .collect()
}

#[test]
fn the_bundled_model_makes_the_committed_clips() {
    let runs = generate_all();
    let gpu = gpu();
    if std::env::var_os("MOTIF_WRITE_GOLDEN").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        for (name, data) in &runs {
            std::fs::write(dir().join(format!("{name}.bin")), data).unwrap();
        }
        let manifest = serde_json::json!({
            "adapter": adapter(gpu),
            "precision": "f32",
            "size": "64x64, 4 frames, 2 steps",
            "layout": "RGB8 frames, frame after frame, then the final latents [1, C, F, h, w] as f32 little-endian",
            "runs": runs.iter().map(|(n, d)| serde_json::json!({"name": n, "bytes": d.len()})).collect::<Vec<_>>(),
        });
        std::fs::write(
            dir().join("golden.json"),
            serde_json::to_string_pretty(&manifest).unwrap() + "\n",
        )
        .unwrap();
        return;
    }
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap();
    let exact = manifest["adapter"].as_str() == Some(adapter(gpu).as_str());
    for (name, got) in &runs {
        let want = std::fs::read(dir().join(format!("{name}.bin"))).unwrap();
        assert_eq!(got.len(), want.len(), "{name}: size");
        let frame_bytes = 64 * 64 * 3 * 4;
        if exact {
            let first = got.iter().zip(&want).position(|(g, w)| g != w);
            assert!(
                first.is_none(),
                "{name}: differs from the golden clip at byte {first:?} (frames end at {frame_bytes})"
            );
        } else {
            // Another adapter: rounding differs, the picture must not.
            let diff: Vec<f32> = got[..frame_bytes]
                .iter()
                .zip(&want[..frame_bytes])
                .map(|(&g, &w)| (g as f32 - w as f32).abs())
                .collect();
            let mean = diff.iter().sum::<f32>() / diff.len() as f32;
            assert!(
                mean <= 2.0,
                "{name}: mean difference {mean} levels on {} (golden written on {})",
                adapter(gpu),
                manifest["adapter"]
            );
        }
    }
}
