//! Matmul and linear against their CPU reference, f32 and f16, every kernel,
//! odd sizes in each dimension, transposed and plain `b`, bias, activations,
//! shared and batched weights, and the windowed path for operands over the
//! binding limit.

mod common;

use common::*;
use motif_engine::ops::matmul::{self, MatmulKernel, MatmulOptions};
use motif_engine::ops::Activation;
use motif_engine::{DType, EngineError, Gpu, GpuOptions, Tensor};
use std::sync::OnceLock;

/// Every kernel, whatever the adapter would pick (the packed one needs a CPU
/// adapter with 8-lane subgroups, which is what the tests run on).
const KERNELS: [MatmulKernel; 2] = [MatmulKernel::Tiled, MatmulKernel::Packed];

/// One product: `a_shape` x `b_shape` (b's layout per `transpose_b`).
struct Case<'a> {
    a: &'a [usize],
    b: &'a [usize],
    transpose_b: bool,
    bias: bool,
    activation: Activation,
    alpha: f32,
    /// A residual of the output's shape, with (scale, residual_scale).
    residual: Option<(f32, f32)>,
}

impl Case<'_> {
    fn plain<'a>(a: &'a [usize], b: &'a [usize], transpose_b: bool) -> Case<'a> {
        Case {
            a,
            b,
            transpose_b,
            bias: false,
            activation: Activation::None,
            alpha: 1.0,
            residual: None,
        }
    }

    /// The same product ending in a plain residual add.
    fn with_residual(mut self) -> Self {
        self.residual = Some((1.0, 1.0));
        self
    }
}

/// Checks one product in every dtype.
fn check(gpu: &Gpu, kernel: MatmulKernel, c: &Case, seed: u64) {
    for dtype in dtypes() {
        check_in(gpu, kernel, c, seed, dtype);
    }
}

fn check_in(gpu: &Gpu, kernel: MatmulKernel, c: &Case, seed: u64, dtype: DType) {
    let k = c.a[c.a.len() - 1];
    let n = if c.transpose_b {
        c.b[c.b.len() - 2]
    } else {
        c.b[c.b.len() - 1]
    };
    {
        let na: usize = c.a.iter().product();
        let nb: usize = c.b.iter().product();
        let (a, av) = upload(gpu, &random(na, seed), c.a, dtype);
        let (b, bv) = upload(gpu, &random(nb, seed + 1), c.b, dtype);
        let (bias, biasv) = upload(gpu, &random(n, seed + 2), &[n], dtype);
        let mut want_shape = c.a.to_vec();
        *want_shape.last_mut().unwrap() = n;
        let out_len = want_shape.iter().product();
        let (residual, residualv) = upload(gpu, &random(out_len, seed + 3), &want_shape, dtype);
        let (scale, residual_scale) = c.residual.unwrap_or((1.0, 1.0));
        let opts = MatmulOptions {
            transpose_b: c.transpose_b,
            bias: c.bias.then_some(&bias),
            activation: c.activation,
            alpha: c.alpha,
            scale,
            residual: c.residual.is_some().then_some(&residual),
            residual_scale,
        };
        let got = matmul::matmul_with_kernel(gpu, &a, &b, &opts, kernel).unwrap();
        assert_eq!(got.shape(), &want_shape[..]);
        let want = matmul::matmul_reference(
            &av,
            c.a,
            &bv,
            c.b,
            c.bias.then_some(&biasv[..]),
            c.residual.is_some().then_some(&residualv[..]),
            &opts,
        );
        assert_close(
            &format!(
                "{kernel:?} a {:?} b {:?} transpose_b={} bias={} {:?} alpha={} residual={:?}",
                c.a, c.b, c.transpose_b, c.bias, c.activation, c.alpha, c.residual
            ),
            &got.to_f32(gpu).unwrap(),
            &want,
            dtype,
            k + 2,
        );
    }
}

#[test]
fn matmul_matches_reference_on_odd_sizes_in_each_dim() {
    let gpu = gpu();
    for kernel in KERNELS {
        for (i, s) in ODD_SIZES.into_iter().enumerate() {
            let seed = 10 * i as u64;
            for transpose_b in [false, true] {
                let b_of = |k: usize, n: usize| if transpose_b { [n, k] } else { [k, n] };
                // M, N, K, and the batch of a batched b.
                check(
                    gpu,
                    kernel,
                    &Case::plain(&[s, 9], &b_of(9, 7), transpose_b).with_residual(),
                    seed,
                );
                check(
                    gpu,
                    kernel,
                    &Case::plain(&[7, 9], &b_of(9, s), transpose_b).with_residual(),
                    seed,
                );
                check(
                    gpu,
                    kernel,
                    &Case::plain(&[7, s], &b_of(s, 5), transpose_b),
                    seed,
                );
                let b_batched = if transpose_b { [s, 5, 9] } else { [s, 9, 5] };
                check(
                    gpu,
                    kernel,
                    &Case::plain(&[s, 7, 9], &b_batched, transpose_b),
                    seed,
                );
            }
        }
    }
}

#[test]
fn matmul_fuses_alpha_bias_and_activation() {
    let gpu = gpu();
    // Every activation is a kernel variant to compile (slow on lavapipe), so
    // the dtypes take turns; the other tests cover both with ACT = none.
    let dtypes = dtypes();
    for kernel in KERNELS {
        for (i, activation) in [
            Activation::None,
            Activation::Silu,
            Activation::GeluErf,
            Activation::GeluTanh,
            Activation::QuickGelu,
        ]
        .into_iter()
        .enumerate()
        {
            for transpose_b in [false, true] {
                let b = if transpose_b { [35, 33] } else { [33, 35] };
                let case = Case {
                    a: &[13, 33],
                    b: &b,
                    transpose_b,
                    bias: true,
                    activation,
                    alpha: 0.7,
                    // The residual with and without scales, on every activation.
                    residual: [None, Some((1.0, 1.0)), Some((0.5, 0.25))][i % 3],
                };
                check_in(gpu, kernel, &case, 100 + i as u64, dtypes[i % dtypes.len()]);
            }
        }
    }
}

#[test]
fn matmul_broadcasts_a_shared_weight_over_batch_dims() {
    let gpu = gpu();
    for kernel in KERNELS {
        for transpose_b in [false, true] {
            let (shared, batched) = if transpose_b {
                ([11, 33], [2, 3, 11, 33])
            } else {
                ([33, 11], [2, 3, 33, 11])
            };
            let mut case = Case::plain(&[2, 3, 7, 33], &shared, transpose_b);
            case.bias = true;
            case.residual = Some((1.0, 1.0));
            check(gpu, kernel, &case, 200);
            case.b = &batched;
            check(gpu, kernel, &case, 201);
        }
    }
}

#[test]
fn matmul_sums_long_k_over_several_passes() {
    // The packed kernel reads at most 6 chunks of K per dispatch (3072 f32
    // or 6144 f16 values); longer products run in passes.
    let gpu = gpu();
    for kernel in KERNELS {
        for (i, k) in [3333usize, 6500].into_iter().enumerate() {
            let case = Case {
                a: &[5, k],
                b: &[33, k],
                transpose_b: true,
                bias: true,
                activation: Activation::GeluTanh,
                alpha: 0.5,
                // Added once, by the last pass.
                residual: Some((1.0, 1.0)),
            };
            check(gpu, kernel, &case, 400 + i as u64);
        }
    }
}

#[test]
fn matmul_splits_operands_over_the_binding_limit() {
    // 4 KiB bindings hold about 1000 f32 values.
    let gpu = small_binding_gpu();
    let cases: [(&[usize], &[usize], bool); 8] = [
        // A weight like a token embedding, used transposed: windows of its rows.
        (&[2, 5, 40], &[300, 40], true),
        // Many small batched products: several items per window.
        (&[9, 7, 11], &[9, 11, 13], false),
        // Batched items each over the limit.
        (&[3, 40, 33], &[3, 33, 50], false),
        (&[3, 40, 33], &[3, 50, 33], true),
        // Rows longer than a binding: chunks of K summed in place.
        (&[3, 1500], &[1500, 5], false),
        (&[3, 1500], &[5, 1500], true),
        // A plain weight over the limit: windows of its columns.
        (&[7, 60], &[60, 100], false),
        // A tall activation times a small weight.
        (&[1000, 8], &[8, 9], false),
    ];
    // The packed kernel's 64 KiB blocks cannot be bound here; Auto falls back.
    for kernel in [MatmulKernel::Tiled, MatmulKernel::Auto] {
        for (i, (a, b, transpose_b)) in cases.into_iter().enumerate() {
            let case = Case {
                a,
                b,
                transpose_b,
                bias: true,
                activation: Activation::Silu,
                alpha: 1.0,
                // Windowed as the output.
                residual: [None, Some((0.5, 2.0))][i % 2],
            };
            check(gpu, kernel, &case, 300 + i as u64);
        }
    }
}

/// A GPU whose bindings hold 1 MiB: the packed kernel still runs (its blocks
/// are 64 KiB) but must window larger operands.
fn mib_binding_gpu() -> &'static Gpu {
    static GPU: OnceLock<Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        Gpu::new(GpuOptions {
            max_binding_bytes: Some(1 << 20),
            ..Default::default()
        })
        .expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

#[test]
fn packed_kernel_windows_operands_over_the_binding_limit() {
    let gpu = mib_binding_gpu();
    let cases: [(&[usize], &[usize], bool); 3] = [
        // a and a transposed b over 1 MiB: packed one row block at a time.
        (&[2, 150, 1000], &[300, 1000], true),
        // Batched plain b over 1 MiB, packed by columns, an item at a time.
        (&[3, 40, 200], &[3, 200, 500], false),
        // An output over 1 MiB.
        (&[700, 8], &[8, 500], false),
    ];
    for (i, (a, b, transpose_b)) in cases.into_iter().enumerate() {
        let case = Case {
            a,
            b,
            transpose_b,
            bias: true,
            activation: Activation::None,
            alpha: 1.0,
            residual: Some((1.0, 1.0)),
        };
        check_in(gpu, MatmulKernel::Packed, &case, 600 + i as u64, DType::F32);
    }
}

#[test]
fn linear_matches_reference() {
    let gpu = gpu();
    for dtype in dtypes() {
        let (x, xv) = upload(gpu, &random(2 * 3 * 33, 1), &[2, 3, 33], dtype);
        let (w, wv) = upload(gpu, &random(7 * 33, 2), &[7, 33], dtype);
        let (b, bv) = upload(gpu, &random(7, 3), &[7], dtype);
        let got = matmul::linear(gpu, &x, &w, Some(&b), Activation::GeluErf).unwrap();
        assert_eq!(got.shape(), &[2, 3, 7]);
        let opts = MatmulOptions {
            transpose_b: true,
            activation: Activation::GeluErf,
            ..Default::default()
        };
        let want = matmul::matmul_reference(&xv, &[6, 33], &wv, &[7, 33], Some(&bv), None, &opts);
        assert_close("linear", &got.to_f32(gpu).unwrap(), &want, dtype, 34);

        let (r, rv) = upload(gpu, &random(2 * 3 * 7, 4), &[2, 3, 7], dtype);
        let got = matmul::linear_residual(gpu, &x, &w, Some(&b), Activation::Silu, Some(&r), 0.5)
            .unwrap();
        assert_eq!(got.shape(), &[2, 3, 7]);
        let opts = MatmulOptions {
            transpose_b: true,
            activation: Activation::Silu,
            scale: 0.5,
            ..Default::default()
        };
        let want =
            matmul::matmul_reference(&xv, &[6, 33], &wv, &[7, 33], Some(&bv), Some(&rv), &opts);
        assert_close(
            "linear_residual",
            &got.to_f32(gpu).unwrap(),
            &want,
            dtype,
            35,
        );
    }
}

#[test]
fn mismatched_operands_are_errors_that_name_the_op_and_shapes() {
    let gpu = gpu();
    let t = |shape: &[usize], dtype| Tensor::zeros(gpu, shape, dtype).unwrap();
    let a = t(&[2, 3, 4], DType::F32);
    let expect_shape_error = |r: motif_engine::Result<Tensor>, words: &[&str]| {
        let e = r.unwrap_err();
        assert!(matches!(e, EngineError::Shape { .. }), "{e}");
        let msg = e.to_string();
        for w in words {
            assert!(msg.contains(w), "`{msg}` lacks `{w}`");
        }
    };
    let opts = MatmulOptions::default();
    expect_shape_error(
        matmul::matmul(gpu, &a, &t(&[5, 6], DType::F32), &opts),
        &["matmul", "[2, 3, 4]", "[5, 6]"],
    );
    expect_shape_error(
        matmul::matmul(gpu, &a, &t(&[3, 4, 6], DType::F32), &opts),
        &["matmul", "[2, 3, 4]", "[3, 4, 6]"],
    );
    expect_shape_error(
        matmul::matmul(gpu, &t(&[4], DType::F32), &t(&[4, 6], DType::F32), &opts),
        &["matmul", "[4]"],
    );
    let bias = t(&[5], DType::F32);
    let with_bias = MatmulOptions {
        bias: Some(&bias),
        ..Default::default()
    };
    expect_shape_error(
        matmul::matmul(gpu, &a, &t(&[4, 6], DType::F32), &with_bias),
        &["matmul", "[6]", "[5]"],
    );
    expect_shape_error(
        matmul::linear(gpu, &a, &t(&[6, 5], DType::F32), None, Activation::None),
        &["linear", "[2, 3, 4]", "[6, 5]"],
    );
    let residual = t(&[2, 3, 5], DType::F32);
    let with_residual = MatmulOptions {
        residual: Some(&residual),
        ..Default::default()
    };
    expect_shape_error(
        matmul::matmul(gpu, &a, &t(&[4, 6], DType::F32), &with_residual),
        &["matmul", "residual", "[2, 3, 6]", "[2, 3, 5]"],
    );
    expect_shape_error(
        matmul::linear_residual(
            gpu,
            &a,
            &t(&[6, 4], DType::F32),
            None,
            Activation::None,
            Some(&residual),
            1.0,
        ),
        &["linear", "residual", "[2, 3, 6]", "[2, 3, 5]"],
    );
    if gpu.has_f16() {
        let e = matmul::matmul(gpu, &a, &t(&[4, 6], DType::F16), &opts).unwrap_err();
        assert!(matches!(e, EngineError::DType { .. }), "{e}");
        assert!(e.to_string().contains("matmul") && e.to_string().contains("f16"));
    }
}

#[test]
fn packing_a_short_k_never_spills_into_the_next_row_block() {
    // With K = 16 values the packed rows are shorter than one packing
    // workgroup: its spare invocations once wrote zeros into the next row
    // block, racing with that block's writer (right or wrong from run to
    // run). 2100 rows span three row blocks; repeat to catch the race.
    let gpu = gpu();
    for rep in 0..12 {
        check_in(
            gpu,
            MatmulKernel::Packed,
            &Case::plain(&[2100, 16], &[40, 16], true),
            300 + rep,
            DType::F32,
        );
    }
}

#[test]
fn a_constant_weight_packed_once_serves_every_later_product() {
    // A weight (a constant tensor) is packed on its first product and the
    // packed form kept: later products, with other row counts (other block
    // shapes) and through a reshape of the same storage, must still match.
    let gpu = gpu();
    for dtype in dtypes() {
        let (w, wv) = upload(gpu, &random(40 * 65, 71), &[40, 65], dtype);
        let w = w.into_constant();
        let (b, bv) = upload(gpu, &random(40, 72), &[40], dtype);
        for (i, rows) in [7usize, 1, 300, 7, 2100, 1].into_iter().enumerate() {
            let (x, xv) = upload(gpu, &random(rows * 65, 80 + i as u64), &[rows, 65], dtype);
            let got = matmul::linear(gpu, &x, &w, Some(&b), Activation::Silu).unwrap();
            let opts = MatmulOptions {
                transpose_b: true,
                activation: Activation::Silu,
                ..Default::default()
            };
            let want =
                matmul::matmul_reference(&xv, &[rows, 65], &wv, &[40, 65], Some(&bv), None, &opts);
            assert_close(
                &format!("linear, constant weight, {rows} rows"),
                &got.to_f32(gpu).unwrap(),
                &want,
                dtype,
                66,
            );
        }
        // The same storage as a plain b of [65, 40]: another packing.
        let wt = w.reshape(&[65, 40]).unwrap();
        assert!(wt.is_constant());
        for rows in [9usize, 9] {
            let (x, xv) = upload(gpu, &random(rows * 65, 90), &[rows, 65], dtype);
            let got = matmul::matmul_with_kernel(
                gpu,
                &x,
                &wt,
                &MatmulOptions::default(),
                MatmulKernel::Packed,
            )
            .unwrap();
            let want = matmul::matmul_reference(
                &xv,
                &[rows, 65],
                &wv,
                &[65, 40],
                None,
                None,
                &MatmulOptions::default(),
            );
            assert_close(
                "matmul, constant plain b",
                &got.to_f32(gpu).unwrap(),
                &want,
                dtype,
                66,
            );
        }
    }
}

/// `linear` then `geglu`, the unfused pair `linear_geglu` must equal.
fn linear_then_geglu(gpu: &Gpu, x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Vec<f32> {
    let h = matmul::linear(gpu, x, w, b, Activation::None).unwrap();
    motif_engine::ops::geglu(gpu, &h)
        .unwrap()
        .to_f32(gpu)
        .unwrap()
}

#[test]
fn linear_geglu_equals_linear_then_geglu_bit_for_bit() {
    // On the CPU adapter the GEGLU runs in gemm_packed's store over
    // interleaved weight rows; it must give the unfused pair's values
    // exactly (so recorded clips replay unchanged). Cases: several row
    // tiles, two passes over a long K, the product's columns over two
    // tiles (2·D above a block's 1,024 rows), no bias, and D not a multiple
    // of 4 (the unfused path); constant weights packed once and reused.
    let gpu = gpu();
    // (rows, K, D, bias)
    let cases = [
        (300usize, 65usize, 24usize, true),
        (2100, 40, 128, true),
        (70, 4000, 32, true),
        (33, 40, 520, true),
        (9, 33, 16, false),
        (5, 12, 6, true),
    ];
    for dtype in dtypes() {
        for (i, &(rows, k, d, with_bias)) in cases.iter().enumerate() {
            let seed = 700 + 10 * i as u64;
            let (x, xv) = upload(gpu, &random(rows * k, seed), &[1, rows, k], dtype);
            let (w, wv) = upload(gpu, &random(2 * d * k, seed + 1), &[2 * d, k], dtype);
            let (b, bv) = upload(gpu, &random(2 * d, seed + 2), &[2 * d], dtype);
            let b = with_bias.then_some(b);
            let want = linear_then_geglu(gpu, &x, &w, b.as_ref());
            let case = format!("{rows} x {k} -> 2 x {d}, bias {with_bias}, {dtype}");
            let got = matmul::linear_geglu(gpu, &x, &w, b.as_ref()).unwrap();
            assert_eq!(got.shape(), &[1, rows, d], "{case}");
            let got = got.to_f32(gpu).unwrap();
            let differ = got
                .iter()
                .zip(&want)
                .filter(|(g, w)| g.to_bits() != w.to_bits());
            assert_eq!(
                differ.count(),
                0,
                "{case}: values differ from linear then geglu"
            );

            // Against the reference as well: the pair itself is right.
            let opts = MatmulOptions {
                transpose_b: true,
                ..Default::default()
            };
            let bias_v = with_bias.then_some(bv.as_slice());
            let h =
                matmul::matmul_reference(&xv, &[rows, k], &wv, &[2 * d, k], bias_v, None, &opts);
            let h = stored(&h, dtype);
            let reference = motif_engine::ops::elementwise::geglu_reference(&h, 2 * d);
            assert_close(&case, &got, &reference, dtype, k + 1);

            // Constant weights: packed and interleaved once, then reused by
            // products of other row counts.
            let wc = w.clone().into_constant();
            let bc = b.clone().map(Tensor::into_constant);
            for r in [rows, 1, rows + 3] {
                let (x, _) = upload(gpu, &random(r * k, seed + 3), &[r, k], dtype);
                let got = matmul::linear_geglu(gpu, &x, &wc, bc.as_ref()).unwrap();
                let want = linear_then_geglu(gpu, &x, &w, b.as_ref());
                let got = got.to_f32(gpu).unwrap();
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{case}, constant weight, {r} rows: values differ"
                );
            }
        }
    }
}

#[test]
fn linear_geglu_runs_no_separate_geglu_pass_on_the_cpu_adapter() {
    // A GPU of its own: kernels_run on the shared one may also see other
    // tests' kernels, and this checks that one is absent.
    let gpu = Gpu::new(GpuOptions::default()).expect("a GPU adapter");
    let (x, _) = upload(&gpu, &random(64 * 40, 1), &[64, 40], DType::F32);
    let (w, _) = upload(&gpu, &random(64 * 40, 2), &[64, 40], DType::F32);
    let (b, _) = upload(&gpu, &random(64, 3), &[64], DType::F32);
    let (out, kernels) = kernels_run(&gpu, || matmul::linear_geglu(&gpu, &x, &w, Some(&b)));
    assert_eq!(out.unwrap().shape(), &[64, 32]);
    assert!(kernels.iter().any(|k| k == "gemm_packed"), "{kernels:?}");
    assert!(
        !kernels.iter().any(|k| k.starts_with("geglu")),
        "a separate GEGLU pass ran: {kernels:?}"
    );
}

#[test]
fn linear_geglu_refuses_an_odd_weight() {
    let gpu = gpu();
    let (x, _) = upload(gpu, &random(3 * 8, 1), &[3, 8], DType::F32);
    let (w, _) = upload(gpu, &random(7 * 8, 2), &[7, 8], DType::F32);
    let err = matmul::linear_geglu(gpu, &x, &w, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("linear_geglu") && err.contains("[7, 8]"),
        "{err}"
    );
}

#[test]
fn linear_each_packs_its_input_once_and_equals_separate_linears_bit_for_bit() {
    let gpu = gpu();
    for dtype in dtypes() {
        // (rows, K, the layers' N): layers of one shape (attention's q, k,
        // v), and of other shapes (possibly other block shapes).
        for (i, (rows, k, ns)) in [
            (300usize, 64usize, vec![48usize, 48, 48]),
            (77, 40, vec![40, 40]),
            (129, 33, vec![8, 1040, 7]),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 800 + 10 * i as u64;
            let (x, _) = upload(gpu, &random(2 * rows * k, seed), &[2, rows, k], dtype);
            let layers: Vec<(Tensor, Tensor)> = ns
                .iter()
                .enumerate()
                .map(|(j, &n)| {
                    let s = seed + 1 + 2 * j as u64;
                    let w = upload(gpu, &random(n * k, s), &[n, k], dtype).0;
                    let b = upload(gpu, &random(n, s + 1), &[n], dtype).0;
                    (w.into_constant(), b.into_constant())
                })
                .collect();
            let refs: Vec<(&Tensor, Option<&Tensor>)> =
                layers.iter().map(|(w, b)| (w, Some(b))).collect();
            let got = matmul::linear_each(gpu, &x, &refs).unwrap();
            assert_eq!(got.len(), ns.len());
            for ((g, (w, b)), &n) in got.iter().zip(&layers).zip(&ns) {
                assert_eq!(g.shape(), &[2, rows, n]);
                let want = matmul::linear(gpu, &x, w, Some(b), Activation::None)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap();
                let g = g.to_f32(gpu).unwrap();
                assert!(
                    g.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "case {i} ({dtype}), N = {n}: differs from its own linear"
                );
            }
        }
    }

    // One packing of the input where three separate linears make three (a
    // GPU of its own, so that the dispatch count is this test's alone).
    let own = Gpu::new(GpuOptions::default()).expect("a GPU adapter");
    let (x, _) = upload(&own, &random(256 * 64, 1), &[256, 64], DType::F32);
    let layers: Vec<Tensor> = (0..3)
        .map(|j| {
            upload(&own, &random(64 * 64, 2 + j), &[64, 64], DType::F32)
                .0
                .into_constant()
        })
        .collect();
    let refs: Vec<(&Tensor, Option<&Tensor>)> = layers.iter().map(|w| (w, None)).collect();
    // The weights' packings are made on first use and kept: warm them.
    matmul::linear_each(&own, &x, &refs).unwrap();
    let packs = |work: &dyn Fn()| {
        own.synchronize().unwrap();
        assert!(own.start_timer(), "the adapter has timestamp queries");
        work();
        let kernels = own
            .stop_timer_by_kernel()
            .unwrap()
            .expect("every dispatch timed");
        kernels
            .iter()
            .filter(|k| k.kernel.starts_with("pack_"))
            .map(|k| k.dispatches)
            .sum::<u32>()
    };
    let together = packs(&|| drop(matmul::linear_each(&own, &x, &refs).unwrap()));
    let apart = packs(&|| {
        for w in &layers {
            drop(matmul::linear(&own, &x, w, None, Activation::None).unwrap());
        }
    });
    assert_eq!(
        (together, apart),
        (1, 3),
        "packing dispatches, together and apart"
    );
}
