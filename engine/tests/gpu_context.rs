//! The GPU context and tensors: round trips, the buffer pool, one submission
//! per chain of operators, the split-binding setting, and input errors.

mod common;

use common::*;
use motif_engine::{ops, DType, EngineError, Gpu, GpuOptions, Tensor};

#[test]
fn values_round_trip_in_f32_and_f16() {
    let gpu = gpu();
    let x = random(1001, 1);
    let t = Tensor::from_f32(gpu, &x, &[7, 11, 13], DType::F32).unwrap();
    assert_eq!(t.to_f32(gpu).unwrap(), x);
    if gpu.has_f16() {
        // f16 storage rounds to nearest: relative error at most 2^-11.
        let h = Tensor::from_f32(gpu, &x, &[1001], DType::F16).unwrap();
        for (g, w) in h.to_f32(gpu).unwrap().iter().zip(&x) {
            assert!(
                (g - w).abs() <= w.abs() * 2f32.powi(-11) + 1e-7,
                "{g} vs {w}"
            );
        }
    }
    let z = Tensor::zeros(gpu, &[3, 5], DType::F32).unwrap();
    assert!(z.to_f32(gpu).unwrap().iter().all(|&v| v == 0.0));
}

#[test]
fn a_chain_of_operators_is_one_submission() {
    // A private GPU so that other tests' submissions do not interleave.
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let x = Tensor::from_f32(&gpu, &random(4096, 2), &[4096], DType::F32).unwrap();
    let before = gpu.submissions();
    let mut y = x.clone();
    for _ in 0..20 {
        y = ops::silu(&gpu, &ops::add(&gpu, &y, &x).unwrap()).unwrap();
    }
    assert_eq!(
        gpu.submissions(),
        before,
        "operators must not submit on their own"
    );
    let _ = y.to_f32(&gpu).unwrap();
    assert_eq!(gpu.submissions(), before + 1);
}

#[test]
fn the_pool_reuses_freed_buffers_and_reports_peaks() {
    let gpu = Gpu::new(GpuOptions::default()).unwrap();
    let a = Tensor::empty(&gpu, &[1000, 1000], DType::F32).unwrap();
    let s1 = gpu.pool_stats();
    assert!(s1.peak_allocated_bytes >= 4_000_000 && s1.live_bytes >= 4_000_000);
    drop(a);
    assert_eq!(gpu.pool_stats().live_bytes, 0);
    let b = Tensor::empty(&gpu, &[999, 1001], DType::F32).unwrap();
    let s2 = gpu.pool_stats();
    assert_eq!(
        s2.buffers_created, s1.buffers_created,
        "same size class must reuse the buffer"
    );
    assert_eq!(s2.buffers_reused, s1.buffers_reused + 1);
    assert_eq!(s2.allocated_bytes, s1.allocated_bytes);
    drop(b);
    gpu.trim_pool();
    assert_eq!(gpu.pool_stats().allocated_bytes, 0);
}

#[test]
fn binding_limit_setting_is_validated_and_applied() {
    let small = small_binding_gpu();
    assert_eq!(small.max_binding_bytes(), 4096);
    assert!(gpu().max_binding_bytes() > 4096);
    let e = Gpu::new(GpuOptions {
        max_binding_bytes: Some(8),
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(e.to_string().contains("max_binding_bytes"), "{e}");
}

#[test]
fn bad_uploads_and_reshapes_are_errors() {
    let gpu = gpu();
    let e = Tensor::from_f32(gpu, &[1.0, 2.0, 3.0], &[2, 2], DType::F32).unwrap_err();
    assert!(
        matches!(e, EngineError::Shape { .. }) && e.to_string().contains("[2, 2]"),
        "{e}"
    );
    let t = Tensor::zeros(gpu, &[2, 3], DType::F32).unwrap();
    assert_eq!(t.reshape(&[3, 2]).unwrap().shape(), &[3, 2]);
    let e = t.reshape(&[4, 2]).unwrap_err();
    assert!(
        e.to_string().contains("reshape") && e.to_string().contains("[4, 2]"),
        "{e}"
    );
    let huge = gpu.max_buffer_bytes() / 4 + 1;
    let e = Tensor::empty(gpu, &[huge as usize], DType::F32).unwrap_err();
    assert!(matches!(e, EngineError::BufferTooLarge { .. }), "{e}");
}

#[test]
fn default_precision_follows_the_adapter() {
    let gpu = gpu();
    if gpu.adapter().is_cpu {
        assert_eq!(gpu.precision(), DType::F32);
    } else if gpu.has_f16() {
        assert_eq!(gpu.precision(), DType::F16);
    }
    let f32_gpu = Gpu::new(GpuOptions {
        precision: Some(DType::F32),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(f32_gpu.precision(), DType::F32);
}

#[test]
fn unknown_adapter_names_the_request_and_lists_adapters() {
    let e = Gpu::new(GpuOptions {
        adapter: Some("no-such-gpu".into()),
        ..Default::default()
    })
    .err()
    .unwrap();
    let msg = e.to_string();
    assert!(msg.contains("no-such-gpu") && msg.contains("[0]"), "{msg}");
}
