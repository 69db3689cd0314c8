//! The compiled-pipeline cache on disk: written when a GPU closes, read by
//! the next one, and harmless when its file is damaged.

mod common;

use common::{assert_close, random, upload};
use motif_engine::ops::matmul::{matmul, matmul_reference, MatmulOptions};
use motif_engine::{DType, Gpu, GpuOptions};

fn open(dir: &std::path::Path) -> Gpu {
    Gpu::new(GpuOptions {
        pipeline_cache: Some(dir.to_path_buf()),
        precision: Some(DType::F32),
        ..Default::default()
    })
    .expect("a GPU adapter (install mesa-vulkan-drivers)")
}

/// A product through a few pipelines, checked against the CPU.
fn product_is_right(gpu: &Gpu) {
    let (m, k, n) = (33, 65, 17);
    let (a, av) = upload(gpu, &random(m * k, 1), &[m, k], DType::F32);
    let (b, bv) = upload(gpu, &random(k * n, 2), &[k, n], DType::F32);
    let out = matmul(gpu, &a, &b, &MatmulOptions::default()).expect("matmul");
    let want = matmul_reference(
        &av,
        &[m, k],
        &bv,
        &[k, n],
        None,
        None,
        &MatmulOptions::default(),
    );
    assert_close(
        "matmul through the cache",
        &out.to_f32(gpu).expect("download"),
        &want,
        DType::F32,
        k,
    );
}

#[test]
fn pipelines_are_kept_on_disk_between_runs() {
    let dir = std::env::temp_dir().join(format!("motif-pipeline-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let gpu = open(&dir);
    let Some(path) = gpu.pipeline_cache_path().map(|p| p.to_path_buf()) else {
        // Vulkan adapters (the software driver included) have PIPELINE_CACHE;
        // other backends keep their own caches.
        assert_ne!(
            gpu.adapter_info().backend,
            motif_engine::wgpu::Backend::Vulkan,
            "a Vulkan adapter without a pipeline cache"
        );
        return;
    };
    assert!(
        path.starts_with(&dir),
        "{} not under {}",
        path.display(),
        dir.display()
    );
    assert!(
        !path.exists(),
        "a cache file before any pipeline was compiled"
    );
    product_is_right(&gpu);
    drop(gpu);
    let written = std::fs::metadata(&path)
        .unwrap_or_else(|e| {
            panic!(
                "no cache file at {} after the GPU closed: {e}",
                path.display()
            )
        })
        .len();
    assert!(written > 0, "empty cache file");

    // The next run reads it and computes the same.
    let gpu = open(&dir);
    product_is_right(&gpu);
    drop(gpu);

    // A damaged file is replaced by an empty cache, not an error.
    std::fs::write(&path, b"not a pipeline cache").expect("write");
    let gpu = open(&dir);
    product_is_right(&gpu);
    drop(gpu);
    assert!(
        std::fs::metadata(&path).expect("cache file").len() > 20,
        "the damaged file was not rewritten"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("cache dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.path() != path)
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
