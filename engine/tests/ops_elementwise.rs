//! Elementwise operators against their CPU reference, f32 and f16, odd sizes,
//! broadcasting, and the windowed path for tensors over the binding limit.

mod common;

use common::*;
use motif_engine::ops::{self, elementwise, Activation};
use motif_engine::{EngineError, Gpu};

const ACTS: [Activation; 5] = [
    Activation::None,
    Activation::Silu,
    Activation::GeluErf,
    Activation::GeluTanh,
    Activation::QuickGelu,
];

fn check_unary(gpu: &Gpu, n: usize, seed: u64) {
    for dtype in dtypes() {
        // Spread inputs over [-8, 8) so that the activations' tails are covered.
        let x: Vec<f32> = random(n, seed).iter().map(|v| v * 8.0).collect();
        let (t, xs) = upload(gpu, &x, &[n], dtype);
        for act in ACTS {
            let got = elementwise::unary(gpu, &t, 0.75, act)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
            let want: Vec<f32> = xs
                .iter()
                .map(|&v| act.apply_reference(v as f64 * 0.75) as f32)
                .collect();
            assert_close(&format!("unary {act:?} n={n}"), &got, &want, dtype, 1);
        }
    }
}

#[test]
fn unary_matches_reference_on_odd_sizes() {
    for (i, n) in ODD_SIZES.into_iter().chain([4096 * 17 + 3]).enumerate() {
        check_unary(gpu(), n, i as u64);
    }
}

#[test]
fn unary_splits_tensors_over_the_binding_limit() {
    check_unary(small_binding_gpu(), 5000, 9);
}

type NamedOp = fn(&Gpu, &motif_engine::Tensor) -> motif_engine::Result<motif_engine::Tensor>;

#[test]
fn named_activations_match_reference() {
    let gpu = gpu();
    let x = random(129, 3);
    let (t, xs) = upload(gpu, &x, &[129], motif_engine::DType::F32);
    let cases: [(Activation, NamedOp); 4] = [
        (Activation::Silu, ops::silu),
        (Activation::GeluErf, ops::gelu_erf),
        (Activation::GeluTanh, ops::gelu_tanh),
        (Activation::QuickGelu, ops::quick_gelu),
    ];
    for (act, f) in cases {
        let got = f(gpu, &t).unwrap().to_f32(gpu).unwrap();
        let want: Vec<f32> = xs
            .iter()
            .map(|&v| act.apply_reference(v as f64) as f32)
            .collect();
        assert_close(
            &format!("{act:?}"),
            &got,
            &want,
            motif_engine::DType::F32,
            1,
        );
    }
    let got = ops::scale(gpu, &t, -2.5).unwrap().to_f32(gpu).unwrap();
    let want: Vec<f32> = xs.iter().map(|v| v * -2.5).collect();
    assert_close("scale", &got, &want, motif_engine::DType::F32, 1);
}

fn check_binary(gpu: &Gpu, a_shape: &[usize], b_shape: &[usize], seed: u64) {
    for dtype in dtypes() {
        let na: usize = a_shape.iter().product();
        let nb: usize = b_shape.iter().product();
        let (a, av) = upload(gpu, &random(na, seed), a_shape, dtype);
        let (b, bv) = upload(gpu, &random(nb, seed + 1), b_shape, dtype);
        for (mul, act) in [
            (false, Activation::None),
            (true, Activation::None),
            (false, Activation::Silu),
        ] {
            let got = elementwise::binary(gpu, &a, &b, mul, 1.5, act)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
            let want = elementwise::binary_reference(&av, a_shape, &bv, b_shape, mul, 1.5, act);
            assert_close(
                &format!("binary mul={mul} {act:?} {a_shape:?} {b_shape:?}"),
                &got,
                &want,
                dtype,
                2,
            );
        }
    }
}

#[test]
fn add_and_mul_broadcast_like_numpy() {
    let gpu = gpu();
    for &n in &ODD_SIZES {
        check_binary(gpu, &[n], &[n], n as u64);
        check_binary(gpu, &[2, n, 3], &[n, 1], n as u64);
    }
    // Per-channel bias on (N, C, H, W), per-item time embedding (N, C, 1, 1), scalar.
    check_binary(gpu, &[2, 7, 5, 3], &[7, 1, 1], 11);
    check_binary(gpu, &[2, 7, 5, 3], &[2, 7, 1, 1], 12);
    check_binary(gpu, &[3, 33], &[1], 13);
    check_binary(gpu, &[2, 1, 3, 4, 5, 6, 7, 2, 3], &[4, 1, 6, 1, 2, 1], 14);
}

#[test]
fn binary_splits_tensors_over_the_binding_limit() {
    let gpu = small_binding_gpu();
    check_binary(gpu, &[3000], &[3000], 21);
    check_binary(gpu, &[4, 33, 40], &[33, 1], 22);
}

#[test]
fn geglu_matches_reference() {
    for (gpu, rows) in [
        (gpu(), [1usize, 7, 33]),
        (small_binding_gpu(), [129, 40, 3]),
    ] {
        for dtype in dtypes() {
            for (&r, &d) in rows.iter().zip(&[1usize, 33, 7]) {
                let x: Vec<f32> = random(r * 2 * d, 5).iter().map(|v| v * 4.0).collect();
                let (t, xs) = upload(gpu, &x, &[r, 2 * d], dtype);
                let got = ops::geglu(gpu, &t).unwrap();
                assert_eq!(got.shape(), &[r, d]);
                let want = elementwise::geglu_reference(&xs, 2 * d);
                assert_close(
                    &format!("geglu {r}x{d}"),
                    &got.to_f32(gpu).unwrap(),
                    &want,
                    dtype,
                    1,
                );
            }
        }
    }
}

#[test]
fn mismatched_operands_are_errors_that_name_the_op_and_shapes() {
    let gpu = gpu();
    let a = motif_engine::Tensor::zeros(gpu, &[2, 3], motif_engine::DType::F32).unwrap();
    let b = motif_engine::Tensor::zeros(gpu, &[4], motif_engine::DType::F32).unwrap();
    let e = ops::add(gpu, &a, &b).unwrap_err();
    assert!(matches!(e, EngineError::Shape { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("elementwise") && msg.contains("[2, 3]") && msg.contains("[4]"),
        "{msg}"
    );
    if gpu.has_f16() {
        let h = motif_engine::Tensor::zeros(gpu, &[2, 3], motif_engine::DType::F16).unwrap();
        let msg = ops::add(gpu, &a, &h).unwrap_err().to_string();
        assert!(msg.contains("dtype") && msg.contains("f16"), "{msg}");
    }
    let odd = motif_engine::Tensor::zeros(gpu, &[3, 5], motif_engine::DType::F32).unwrap();
    assert!(ops::geglu(gpu, &odd)
        .unwrap_err()
        .to_string()
        .contains("geglu"));
}

#[test]
fn erf_reference_is_exact() {
    // Known values of erf to 15 digits.
    for (x, want) in [
        (0.5, 0.520499877813047),
        (1.0, 0.842700792949715),
        (2.0, 0.995322265018953),
        (3.5, 0.999999256901628),
    ] {
        assert!(
            (elementwise::erf_reference(x) - want).abs() < 1e-13,
            "erf({x})"
        );
        assert!((elementwise::erf_reference(-x) + want).abs() < 1e-13);
    }
}

#[test]
fn clamp_bounds_every_value() {
    for (gpu, n) in [(gpu(), 129usize), (small_binding_gpu(), 3000)] {
        for dtype in dtypes() {
            let x: Vec<f32> = random(n, 17).iter().map(|v| v * 50.0).collect();
            let (t, xs) = upload(gpu, &x, &[n], dtype);
            let got = elementwise::clamp(gpu, &t, -30.0, 20.0)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
            let want: Vec<f32> = xs.iter().map(|v| v.clamp(-30.0, 20.0)).collect();
            assert_close(&format!("clamp n={n}"), &got, &want, dtype, 1);
        }
    }
}

/// modulate (x·(1+scale)+shift) and gated_add (x + y·gate) with the shapes
/// a DiT block uses ([B, S, D] against [B, 1, D]) and odd sizes, plus the
/// windowed path.
#[test]
fn modulate_and_gated_add_match_reference() {
    let check =
        |gpu: &Gpu, dtypes: Vec<motif_engine::DType>, b: usize, s: usize, d: usize, seed: u64| {
            for dtype in dtypes {
                let shape = [b, s, d];
                let small = [b, 1, d];
                let (x, xs) = upload(gpu, &random(b * s * d, seed), &shape, dtype);
                let (y, ys) = upload(gpu, &random(b * s * d, seed + 1), &shape, dtype);
                let (sc, scs) = upload(gpu, &random(b * d, seed + 2), &small, dtype);
                let (sh, shs) = upload(gpu, &random(b * d, seed + 3), &small, dtype);
                let got = elementwise::modulate(gpu, &x, &sc, &sh)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap();
                let want = elementwise::modulate_reference(&xs, &shape, &scs, &shs, &small);
                assert_close(&format!("modulate {shape:?}"), &got, &want, dtype, 2);
                let got = elementwise::gated_add(gpu, &x, &y, &sc)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap();
                let want = elementwise::gated_add_reference(&xs, &shape, &ys, &scs, &small);
                assert_close(&format!("gated_add {shape:?}"), &got, &want, dtype, 2);
            }
        };
    for (i, &n) in ODD_SIZES.iter().enumerate() {
        check(gpu(), dtypes(), 2, n, 33, 900 + i as u64);
        check(gpu(), dtypes(), 1, 7, n, 950 + i as u64);
    }
    // 4 KiB bindings: 2·37·29 f32 values run in windows.
    check(
        small_binding_gpu(),
        vec![motif_engine::DType::F32],
        2,
        37,
        29,
        990,
    );
    let gpu = gpu();
    let (x, _) = upload(gpu, &random(12, 1), &[2, 2, 3], motif_engine::DType::F32);
    let (bad, _) = upload(gpu, &random(4, 2), &[2, 1, 2], motif_engine::DType::F32);
    assert!(matches!(
        elementwise::modulate(gpu, &x, &bad, &bad),
        Err(EngineError::Shape { .. })
    ));
    assert!(matches!(
        elementwise::gated_add(gpu, &x, &bad, &bad),
        Err(EngineError::Shape { .. })
    ));
}

/// Where every offset and count holds whole vectors, unary, binary and GEGLU
/// take their vec4 kernels; those give the scalar kernels' results bit for
/// bit (the same arithmetic per element), which a 4k + 1 input, left to the
/// scalar kernels, shows on its first 4k elements. Broadcast operands whose
/// innermost dim is a multiple of 4 (per-channel bias over rows of 12, a row
/// vector over rows) take the broadcast vector kernel.
#[test]
fn whole_vectors_take_the_vec4_kernels_with_the_scalar_results() {
    let gpu = gpu();
    for dtype in dtypes() {
        let n = 4 * 1031;
        let x: Vec<f32> = random(n + 1, 40).iter().map(|v| v * 8.0).collect();
        let y = random(n + 1, 41);
        let (xv, xs) = upload(gpu, &x[..n], &[n], dtype);
        let (yv, ys) = upload(gpu, &y[..n], &[n], dtype);
        let (x1, _) = upload(gpu, &x, &[n + 1], dtype);
        let (y1, _) = upload(gpu, &y, &[n + 1], dtype);
        for act in ACTS {
            let (got, ran) = kernels_run(gpu, || {
                elementwise::unary(gpu, &xv, 0.75, act)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap()
            });
            assert!(ran.iter().any(|k| k == "unary4"), "unary {act:?}: {ran:?}");
            let want: Vec<f32> = xs
                .iter()
                .map(|&v| act.apply_reference(v as f64 * 0.75) as f32)
                .collect();
            assert_close(&format!("unary4 {act:?}"), &got, &want, dtype, 1);
            let scalar = elementwise::unary(gpu, &x1, 0.75, act)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
            assert_eq!(got, scalar[..n], "unary4 {act:?} against the scalar kernel");

            let (got, ran) = kernels_run(gpu, || {
                elementwise::binary(gpu, &xv, &yv, true, 1.5, act)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap()
            });
            assert!(
                ran.iter().any(|k| k == "binary4"),
                "binary {act:?}: {ran:?}"
            );
            let want = elementwise::binary_reference(&xs, &[n], &ys, &[n], true, 1.5, act);
            assert_close(&format!("binary4 {act:?}"), &got, &want, dtype, 2);
            let scalar = elementwise::binary(gpu, &x1, &y1, true, 1.5, act)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
            assert_eq!(
                got,
                scalar[..n],
                "binary4 {act:?} against the scalar kernel"
            );
        }

        for (a_shape, b_shape) in [
            (&[2usize, 5, 3, 12][..], &[5usize, 1, 1][..]),
            (&[2, 5, 3, 12], &[2, 5, 1, 1]),
            (&[7, 16], &[16]),
            (&[3, 4, 8], &[3, 1, 8]),
        ] {
            let na: usize = a_shape.iter().product();
            let nb: usize = b_shape.iter().product();
            let (a, av) = upload(gpu, &random(na, 42), a_shape, dtype);
            let (b, bv) = upload(gpu, &random(nb, 43), b_shape, dtype);
            let (got, ran) = kernels_run(gpu, || {
                elementwise::binary(gpu, &a, &b, false, 1.0, Activation::Silu)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap()
            });
            assert!(
                ran.iter().any(|k| k == "binary4_broadcast"),
                "{a_shape:?} + {b_shape:?}: {ran:?}"
            );
            let want = elementwise::binary_reference(
                &av,
                a_shape,
                &bv,
                b_shape,
                false,
                1.0,
                Activation::Silu,
            );
            assert_close(
                &format!("binary4_broadcast {a_shape:?} {b_shape:?}"),
                &got,
                &want,
                dtype,
                2,
            );
        }

        for (rows, d) in [(1usize, 4usize), (33, 64), (5, 320)] {
            let x: Vec<f32> = random(rows * 2 * d, 44).iter().map(|v| v * 4.0).collect();
            let (t, xs) = upload(gpu, &x, &[rows, 2 * d], dtype);
            let (got, ran) = kernels_run(gpu, || ops::geglu(gpu, &t).unwrap().to_f32(gpu).unwrap());
            assert!(
                ran.iter().any(|k| k == "geglu4"),
                "geglu {rows}x{d}: {ran:?}"
            );
            let want = elementwise::geglu_reference(&xs, 2 * d);
            assert_close(&format!("geglu4 {rows}x{d}"), &got, &want, dtype, 1);
        }
    }
}

/// The vector kernels over tensors split into windows (each window's
/// offsets decide the kernel, so windows may mix them).
#[test]
fn vec4_kernels_split_tensors_over_the_binding_limit() {
    check_unary(small_binding_gpu(), 4 * 1250, 50);
    check_binary(small_binding_gpu(), &[4000], &[4000], 51);
    check_binary(small_binding_gpu(), &[4, 33, 40], &[33, 1], 52);
    check_binary(small_binding_gpu(), &[4, 25, 40], &[40], 53);
}
