//! The Wan VAE's channel RMS norm (`norm::channel_rms_norm`, diffusers'
//! `WanRMS_norm`) against its CPU reference: f32 and f16, odd sizes swept one
//! dimension at a time, gamma/beta present and absent, fused SiLU, all-zero
//! positions (the 1e-12 floor), and windows of channel blocks.

mod common;

use common::*;
use motif_engine::ops::norm;
use motif_engine::{DType, Gpu};

fn check(gpu: &Gpu, shape: &[usize], gamma_on: bool, beta_on: bool, silu: bool, zero_first: bool) {
    let n: usize = shape.iter().product();
    let c = shape[1];
    for dtype in dtypes() {
        let seed = n as u64 + c as u64;
        let mut values = random(n, seed);
        if zero_first {
            // Position 0 of item 0 is the zero vector: F.normalize divides by
            // the 1e-12 floor and gives 0.
            let s: usize = shape[2..].iter().product();
            for ch in 0..c {
                values[ch * s] = 0.0;
            }
        }
        let (x, xs) = upload(gpu, &values, shape, dtype);
        let gamma = gamma_on.then(|| upload(gpu, &random(c, seed + 1), &[c], dtype));
        let beta = beta_on.then(|| upload(gpu, &random(c, seed + 2), &[c], dtype));
        let want = norm::channel_rms_norm_reference(
            &xs,
            shape,
            gamma.as_ref().map(|g| g.1.as_slice()),
            beta.as_ref().map(|b| b.1.as_slice()),
            1e-12,
            silu,
        );
        let got = norm::channel_rms_norm(
            gpu,
            &x,
            gamma.as_ref().map(|g| &g.0),
            beta.as_ref().map(|b| &b.0),
            1e-12,
            silu,
        )
        .expect("channel_rms_norm runs")
        .to_f32(gpu)
        .unwrap();
        let case =
            format!("channel_rms_norm {shape:?} gamma {gamma_on} beta {beta_on} silu {silu}");
        assert_close(&case, &got, &want, dtype, c);
    }
}

#[test]
fn channel_rms_norm_matches_reference_on_odd_sizes() {
    let gpu = gpu();
    for (i, &size) in ODD_SIZES.iter().enumerate() {
        let variant = (i % 2 == 0, i % 3 != 0, i % 2 == 1);
        check(
            gpu,
            &[2, size, 5, 3],
            variant.0,
            variant.1,
            variant.2,
            i == 0,
        );
        check(
            gpu,
            &[3, 5, size, 2],
            variant.1,
            variant.0,
            !variant.2,
            false,
        );
        check(gpu, &[size, 4, 3], true, false, true, false);
    }
    // The Wan VAE's layout: frames as items, [T, C, H, W].
    check(gpu, &[4, 96, 9, 7], true, false, true, true);
}

#[test]
fn channel_rms_norm_windows_channel_blocks_when_an_item_exceeds_a_binding() {
    // 4 KiB bindings: an f32 item of 33 x 40 values (5280 bytes) is split
    // into channel blocks whose sums of squares accumulate.
    let gpu = small_binding_gpu();
    check(gpu, &[3, 33, 8, 5], true, true, true, true);
    check(gpu, &[2, 7, 9, 11], false, true, false, false);
}

#[test]
fn channel_rms_norm_refuses_bad_shapes() {
    let gpu = gpu();
    let x = motif_engine::Tensor::zeros(gpu, &[2, 3, 4], DType::F32).unwrap();
    let gamma = motif_engine::Tensor::zeros(gpu, &[4], DType::F32).unwrap();
    let err = norm::channel_rms_norm(gpu, &x, Some(&gamma), None, 1e-12, false).unwrap_err();
    assert!(err.to_string().contains("gamma of shape [3]"), "{err}");
    let flat = motif_engine::Tensor::zeros(gpu, &[6], DType::F32).unwrap();
    assert!(norm::channel_rms_norm(gpu, &flat, None, None, 1e-12, false).is_err());
}
