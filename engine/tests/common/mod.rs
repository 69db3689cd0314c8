//! Shared by the operator tests: one GPU for all tests, random inputs, and the
//! one tolerance rule every operator is judged by.
#![allow(dead_code)]

use std::sync::OnceLock;

use half::f16;
use motif_engine::{DType, Gpu, GpuOptions, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Sizes that are not multiples of any tile, swept in every dimension that can vary.
pub const ODD_SIZES: [usize; 4] = [1, 7, 33, 129];

/// The default GPU (the software driver on CI). Opening a device is slow on
/// lavapipe, so all tests of one binary share it.
pub fn gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(GpuOptions::default()).expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

/// A GPU whose largest storage binding is lowered to 4 KiB, so that small
/// tensors take the split path that large ones take on real adapters.
pub fn small_binding_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(GpuOptions {
            max_binding_bytes: Some(4096),
            ..Default::default()
        })
        .expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

/// The dtypes to test: f32 always, f16 where the adapter stores it.
pub fn dtypes() -> Vec<DType> {
    if gpu().has_f16() {
        vec![DType::F32, DType::F16]
    } else {
        vec![DType::F32]
    }
}

/// Uniform values in [-1, 1), reproducible from `seed`.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// The values as the GPU stores them in `dtype` (the reference must start
/// from the same rounded inputs).
pub fn stored(values: &[f32], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => values.to_vec(),
        DType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
    }
}

/// Uploads `values` in `dtype` and returns the tensor with the values the
/// reference should use.
pub fn upload(gpu: &Gpu, values: &[f32], shape: &[usize], dtype: DType) -> (Tensor, Vec<f32>) {
    let t = Tensor::from_f32(gpu, values, shape, dtype).expect("upload");
    (t, stored(values, dtype))
}

/// The tolerance rule, written once for every operator: the largest allowed
/// |gpu − reference| for an output that sums `reduction_len` products, given
/// the reference's largest magnitude. f32 accumulation error grows about as
/// √K ulps; f16 storage adds the rounding of the output (2^-11 relative) —
/// the inputs are already rounded on both sides — so f16 stays near 4e-3
/// relative to the output's scale, well inside 1e-2.
pub fn tolerance(dtype: DType, reduction_len: usize, ref_max_abs: f32) -> f32 {
    let scale = ref_max_abs.max(1e-3);
    let accumulation = f32::EPSILON * 4.0 * (4.0 + (reduction_len as f32).sqrt());
    let storage = match dtype {
        DType::F32 => 0.0,
        DType::F16 => 4.0 * 2f32.powi(-11),
    };
    (accumulation + storage) * scale
}

/// Asserts max |got − want| within [`tolerance`]; the message names the case.
pub fn assert_close(case: &str, got: &[f32], want: &[f32], dtype: DType, reduction_len: usize) {
    assert_eq!(got.len(), want.len(), "{case}: length");
    let ref_max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let tol = tolerance(dtype, reduction_len, ref_max);
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (g - w).abs();
        if e.is_nan() || e > worst.1 {
            worst = (i, if e.is_nan() { f32::INFINITY } else { e });
        }
    }
    assert!(
        worst.1 <= tol,
        "{case} ({dtype}): max |err| {} at {} (got {}, want {}) exceeds tolerance {tol}",
        worst.1,
        worst.0,
        got[worst.0],
        want[worst.0]
    );
}

/// A real-size key list of tests/fixtures/real (tools/fixtures/key_lists.py):
/// its path, the published config, and key -> shape.
pub fn real_key_list(
    name: &str,
) -> (
    std::path::PathBuf,
    serde_json::Value,
    Vec<(String, Vec<usize>)>,
) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/real")
        .join(format!("{name}.json"));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let keys = json["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect();
    (path, json["config"].clone(), keys)
}

/// A dry-run GPU in f32: loading walks key maps and shapes without memory.
pub fn plan_gpu() -> Gpu {
    Gpu::new(GpuOptions {
        plan: true,
        precision: Some(DType::F32),
        ..Default::default()
    })
    .unwrap()
}

/// The kernels (entry point names) that `work` dispatched, from the GPU
/// timer's labels: which variant an op chose. Needs TIMESTAMP_QUERY, which
/// lavapipe, the tests' adapter, has. Tests of one binary share the GPU, so
/// the list may also hold kernels of tests running beside this one: check
/// that a kernel is present, not that another is absent. The GPU has one
/// timer, so calls take turns: a second call's start would otherwise replace
/// the first's timer, and the first would find none at its stop.
pub fn kernels_run<T>(gpu: &Gpu, work: impl FnOnce() -> T) -> (T, Vec<String>) {
    static TIMER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A test that failed inside `work` poisons the lock; the timer is still
    // whole.
    let _turn = TIMER.lock().unwrap_or_else(|e| e.into_inner());
    gpu.synchronize().expect("synchronize before timing");
    assert!(
        gpu.start_timer(),
        "the adapter has no timestamp queries: which kernel ran cannot be seen"
    );
    let out = work();
    let kernels = gpu
        .stop_timer_by_kernel()
        .expect("read the GPU timer")
        .expect("every dispatch timed")
        .into_iter()
        .map(|k| k.kernel)
        .collect();
    (out, kernels)
}
