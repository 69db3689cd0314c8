//! conv2d against its CPU reference, f32 and f16, every kernel, odd sizes in
//! each dimension, kernel sizes, strides, symmetric and asymmetric padding,
//! bias, activations, and the windowed path for tensors over the binding limit.

mod common;

use common::*;
use motif_engine::ops::conv2d::{self, Conv2dKernel, Conv2dOptions, Conv2dResidual};
use motif_engine::ops::Activation;
use motif_engine::{DType, EngineError, Gpu, GpuOptions, Tensor};
use std::sync::OnceLock;

/// Every kernel, whatever the adapter would pick (the packed one needs a CPU
/// adapter with 8-lane subgroups, which is what the tests run on).
const KERNELS: [Conv2dKernel; 2] = [Conv2dKernel::Tiled, Conv2dKernel::Packed];

/// The SD VAE encoder's downsample: pad right and bottom by one, then a 3x3
/// stride-2 convolution without padding.
fn vae_downsample() -> Conv2dOptions {
    Conv2dOptions {
        stride: 2,
        padding: [0, 1, 0, 1],
        activation: Activation::None,
    }
}

fn check(
    gpu: &Gpu,
    kernel: Conv2dKernel,
    x_shape: [usize; 4],
    w_shape: [usize; 4],
    bias: bool,
    opts: &Conv2dOptions,
    seed: u64,
) {
    for dtype in dtypes() {
        check_in(gpu, kernel, (x_shape, w_shape), bias, opts, seed, dtype);
    }
}

fn check_in(
    gpu: &Gpu,
    kernel: Conv2dKernel,
    shapes: ([usize; 4], [usize; 4]),
    bias: bool,
    opts: &Conv2dOptions,
    seed: u64,
    dtype: DType,
) {
    check_residual_in(gpu, kernel, shapes, bias, opts, None, seed, dtype);
}

/// One convolution, with a residual of the output's shape and its scale
/// when `residual` is set.
#[allow(clippy::too_many_arguments)]
fn check_residual_in(
    gpu: &Gpu,
    kernel: Conv2dKernel,
    (x_shape, w_shape): ([usize; 4], [usize; 4]),
    bias: bool,
    opts: &Conv2dOptions,
    residual: Option<f32>,
    seed: u64,
    dtype: DType,
) {
    {
        let (x, xv) = upload(
            gpu,
            &random(x_shape.iter().product(), seed),
            &x_shape,
            dtype,
        );
        let (w, wv) = upload(
            gpu,
            &random(w_shape.iter().product(), seed + 1),
            &w_shape,
            dtype,
        );
        let (b, bv) = upload(gpu, &random(w_shape[0], seed + 2), &[w_shape[0]], dtype);
        let want_shape = conv2d::conv2d_output_shape(x_shape, w_shape, opts).unwrap();
        let out_len = want_shape.iter().product();
        let (r, rv) = upload(gpu, &random(out_len, seed + 3), &want_shape, dtype);
        let fused = residual.map(|scale| Conv2dResidual {
            residual: &r,
            scale,
        });
        let got = conv2d::conv2d_residual_with_kernel(
            gpu,
            &x,
            &w,
            bias.then_some(&b),
            opts,
            fused.as_ref(),
            kernel,
        )
        .unwrap();
        assert_eq!(got.shape(), &want_shape[..]);
        let mut want =
            conv2d::conv2d_reference(&xv, x_shape, &wv, w_shape, bias.then_some(&bv[..]), opts);
        if let Some(scale) = residual {
            for (v, r) in want.iter_mut().zip(&rv) {
                *v = ((*v as f64 + *r as f64) * scale as f64) as f32;
            }
        }
        assert_close(
            &format!(
                "{kernel:?} x {x_shape:?} w {w_shape:?} bias={bias} {opts:?} residual={residual:?}"
            ),
            &got.to_f32(gpu).unwrap(),
            &want,
            dtype,
            w_shape[1] * w_shape[2] * w_shape[3] + 2,
        );
    }
}

#[test]
fn conv2d_matches_reference_on_odd_sizes_in_each_dim() {
    let gpu = gpu();
    let same = Conv2dOptions::same(3, 1);
    for kernel in KERNELS {
        for (i, s) in ODD_SIZES.into_iter().enumerate() {
            let seed = 10 * i as u64;
            // N, Cin, Cout, H, W in turn.
            check(gpu, kernel, [s, 3, 7, 7], [5, 3, 3, 3], true, &same, seed);
            check(gpu, kernel, [1, s, 7, 7], [5, s, 3, 3], true, &same, seed);
            check(gpu, kernel, [1, 3, 7, 7], [s, 3, 3, 3], true, &same, seed);
            check(gpu, kernel, [1, 3, s, 7], [5, 3, 3, 3], true, &same, seed);
            check(gpu, kernel, [1, 3, 7, s], [5, 3, 3, 3], true, &same, seed);
        }
    }
}

#[test]
fn conv2d_handles_kernel_sizes_strides_and_padding() {
    let gpu = gpu();
    // 8 input channels: the packed kernel packs its taps 4 words at a time
    // (odd counts, in the other tests, one at a time).
    let x = [2, 8, 13, 12];
    let cases: [([usize; 4], Conv2dOptions); 7] = [
        ([7, 8, 1, 1], Conv2dOptions::same(1, 1)),
        ([7, 8, 1, 1], Conv2dOptions::same(1, 2)),
        ([7, 8, 3, 3], Conv2dOptions::same(3, 1)),
        ([7, 8, 3, 3], Conv2dOptions::same(3, 2)),
        ([7, 8, 3, 3], vae_downsample()),
        ([7, 8, 3, 3], Conv2dOptions::default()),
        (
            [7, 8, 2, 5],
            Conv2dOptions {
                stride: 3,
                padding: [2, 0, 1, 3],
                activation: Activation::None,
            },
        ),
    ];
    for kernel in KERNELS {
        for (i, (w, opts)) in cases.iter().enumerate() {
            check(gpu, kernel, x, *w, i % 2 == 0, opts, 100 + i as u64);
        }
    }
}

#[test]
fn conv2d_sums_many_input_channels_over_several_passes() {
    // 345 x 9 taps is more K than one packed dispatch reads in f32.
    let gpu = gpu();
    let opts = Conv2dOptions {
        activation: Activation::Silu,
        ..Conv2dOptions::same(3, 1)
    };
    for kernel in KERNELS {
        check(
            gpu,
            kernel,
            [1, 345, 5, 6],
            [7, 345, 3, 3],
            true,
            &opts,
            500,
        );
    }
}

#[test]
fn conv2d_fuses_activations() {
    let gpu = gpu();
    // Every activation is a kernel variant to compile (slow on lavapipe), so
    // the dtypes take turns; the other tests cover both.
    let dtypes = dtypes();
    for kernel in KERNELS {
        for (i, activation) in [
            Activation::Silu,
            Activation::GeluErf,
            Activation::GeluTanh,
            Activation::QuickGelu,
        ]
        .into_iter()
        .enumerate()
        {
            let opts = Conv2dOptions {
                activation,
                ..Conv2dOptions::same(3, 1)
            };
            let shapes = ([1, 4, 9, 8], [6, 4, 3, 3]);
            let dtype = dtypes[i % dtypes.len()];
            check_in(gpu, kernel, shapes, true, &opts, 200 + i as u64, dtype);
        }
    }
}

#[test]
fn conv2d_splits_tensors_over_the_binding_limit() {
    // 4 KiB bindings hold about 1000 f32 values.
    let gpu = small_binding_gpu();
    let same = Conv2dOptions::same(3, 1);
    let cases: [([usize; 4], [usize; 4], Conv2dOptions); 6] = [
        // Several whole batch items per window.
        ([5, 3, 9, 9], [4, 3, 3, 3], same),
        // Items over the limit: windows of input channels summed in place.
        ([2, 20, 10, 10], [4, 20, 3, 3], same),
        // A weight over the limit: windows of output channels.
        ([1, 20, 5, 5], [9, 20, 3, 3], same),
        // Planes over the limit: windows of output rows.
        ([1, 2, 40, 37], [3, 2, 3, 3], same),
        ([1, 2, 41, 37], [3, 2, 3, 3], vae_downsample()),
        ([2, 3, 33, 33], [3, 3, 1, 1], Conv2dOptions::same(1, 2)),
    ];
    // The packed kernel's 64 KiB blocks cannot be bound here; Auto falls back.
    for kernel in [Conv2dKernel::Tiled, Conv2dKernel::Auto] {
        for (i, (x, w, opts)) in cases.iter().enumerate() {
            check(gpu, kernel, *x, *w, true, opts, 300 + i as u64);
        }
    }
}

/// A GPU whose bindings hold 1 MiB: the packed kernel still runs (its blocks
/// are 64 KiB) but must window larger tensors.
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
fn packed_kernel_windows_tensors_over_the_binding_limit() {
    let gpu = mib_binding_gpu();
    let opts = Conv2dOptions::same(3, 1);
    // Output channels 128 x 128 values apart: written in groups of rows;
    // then more output channels than one packed block holds: weights
    // packed a block at a time.
    let cases = [
        ([2, 4, 128, 128], [40, 4, 3, 3]),
        ([1, 64, 9, 9], [300, 64, 3, 3]),
    ];
    for (i, shapes) in cases.into_iter().enumerate() {
        let seed = 700 + i as u64;
        check_in(
            gpu,
            Conv2dKernel::Packed,
            shapes,
            true,
            &opts,
            seed,
            DType::F32,
        );
    }
}

#[test]
fn conv2d_fuses_a_residual_and_output_scale() {
    // A resnet's conv2 + shortcut (1 / output_scale_factor = 0.5 or 1):
    // odd sizes, a 1x1 conv (transformer proj_out), several passes over K,
    // an activation before the residual, and small batch items side by side.
    let gpu = gpu();
    let same = Conv2dOptions::same(3, 1);
    let silu = Conv2dOptions {
        activation: Activation::Silu,
        ..same
    };
    let cases: [([usize; 4], [usize; 4], Conv2dOptions); 5] = [
        ([1, 7, 9, 11], [5, 7, 3, 3], same),
        ([2, 3, 7, 7], [33, 3, 1, 1], Conv2dOptions::same(1, 1)),
        ([1, 345, 5, 6], [7, 345, 3, 3], same),
        ([1, 4, 9, 8], [6, 4, 3, 3], silu),
        ([9, 6, 5, 3], [20, 6, 3, 3], same),
    ];
    for kernel in KERNELS {
        for (i, (x, w, opts)) in cases.iter().enumerate() {
            for dtype in dtypes() {
                let scale = [1.0, 0.5][i % 2];
                let seed = 800 + i as u64;
                check_residual_in(gpu, kernel, (*x, *w), true, opts, Some(scale), seed, dtype);
            }
        }
    }
}

#[test]
fn conv2d_windows_a_residual_as_its_output() {
    // Windows of items, input channels, output channels and output rows
    // (4 KiB bindings), and the packed kernel's groups of output rows (1 MiB).
    let small = small_binding_gpu();
    let same = Conv2dOptions::same(3, 1);
    let cases: [([usize; 4], [usize; 4], Conv2dOptions); 4] = [
        ([5, 3, 9, 9], [4, 3, 3, 3], same),
        ([2, 20, 10, 10], [4, 20, 3, 3], same),
        ([1, 20, 5, 5], [9, 20, 3, 3], same),
        ([1, 2, 41, 37], [3, 2, 3, 3], vae_downsample()),
    ];
    for kernel in [Conv2dKernel::Tiled, Conv2dKernel::Auto] {
        for (i, (x, w, opts)) in cases.iter().enumerate() {
            let seed = 900 + i as u64;
            for dtype in dtypes() {
                check_residual_in(small, kernel, (*x, *w), true, opts, Some(0.5), seed, dtype);
            }
        }
    }
    let shapes = ([2, 4, 128, 128], [40, 4, 3, 3]);
    let packed = Conv2dKernel::Packed;
    check_residual_in(
        mib_binding_gpu(),
        packed,
        shapes,
        true,
        &same,
        Some(1.0),
        950,
        DType::F32,
    );
}

#[test]
fn mismatched_operands_are_errors_that_name_the_op_and_shapes() {
    let gpu = gpu();
    let t = |shape: &[usize], dtype| Tensor::zeros(gpu, shape, dtype).unwrap();
    let x = t(&[1, 3, 8, 8], DType::F32);
    let opts = Conv2dOptions::same(3, 1);
    let msg = |r: motif_engine::Result<Tensor>| {
        let e = r.unwrap_err();
        assert!(matches!(e, EngineError::Shape { .. }), "{e}");
        e.to_string()
    };
    let m = msg(conv2d::conv2d(
        gpu,
        &x,
        &t(&[4, 2, 3, 3], DType::F32),
        None,
        &opts,
    ));
    assert!(
        m.contains("conv2d") && m.contains("[1, 3, 8, 8]") && m.contains("[4, 2, 3, 3]"),
        "{m}"
    );
    let m = msg(conv2d::conv2d(
        gpu,
        &t(&[3, 8, 8], DType::F32),
        &t(&[4, 3, 3, 3], DType::F32),
        None,
        &opts,
    ));
    assert!(m.contains("conv2d") && m.contains("[3, 8, 8]"), "{m}");
    let m = msg(conv2d::conv2d(
        gpu,
        &x,
        &t(&[4, 3, 3, 3], DType::F32),
        Some(&t(&[3], DType::F32)),
        &opts,
    ));
    assert!(
        m.contains("conv2d") && m.contains("[4]") && m.contains("[3]"),
        "{m}"
    );
    let m = msg(conv2d::conv2d(
        gpu,
        &t(&[1, 3, 2, 2], DType::F32),
        &t(&[4, 3, 5, 5], DType::F32),
        None,
        &Conv2dOptions::default(),
    ));
    assert!(
        m.contains("conv2d") && m.contains("[1, 3, 2, 2]") && m.contains("[4, 3, 5, 5]"),
        "{m}"
    );
    let wrong = t(&[1, 4, 8, 7], DType::F32);
    let m = msg(conv2d::conv2d_residual(
        gpu,
        &x,
        &t(&[4, 3, 3, 3], DType::F32),
        None,
        &opts,
        &Conv2dResidual {
            residual: &wrong,
            scale: 1.0,
        },
    ));
    assert!(
        m.contains("conv2d")
            && m.contains("residual")
            && m.contains("[1, 4, 8, 8]")
            && m.contains("[1, 4, 8, 7]"),
        "{m}"
    );
    if gpu.has_f16() {
        let e = conv2d::conv2d(gpu, &x, &t(&[4, 3, 3, 3], DType::F16), None, &opts).unwrap_err();
        assert!(matches!(e, EngineError::DType { .. }), "{e}");
        assert!(e.to_string().contains("conv2d"));
    }
}

#[test]
fn a_constant_weight_packed_once_serves_every_later_convolution() {
    // A constant weight is packed on its first convolution and kept: later
    // ones, on inputs of other sizes and batch counts, must still match.
    let gpu = gpu();
    for dtype in dtypes() {
        let w_shape = [24, 10, 3, 3];
        let (w, wv) = upload(gpu, &random(w_shape.iter().product(), 31), &w_shape, dtype);
        let w = w.into_constant();
        let (b, bv) = upload(gpu, &random(24, 32), &[24], dtype);
        let opts = Conv2dOptions::same(3, 1);
        for (i, x_shape) in [[1, 10, 5, 7], [3, 10, 1, 1], [2, 10, 33, 9], [1, 10, 5, 7]]
            .into_iter()
            .enumerate()
        {
            let (x, xv) = upload(
                gpu,
                &random(x_shape.iter().product(), 40 + i as u64),
                &x_shape,
                dtype,
            );
            let got =
                conv2d::conv2d_with_kernel(gpu, &x, &w, Some(&b), &opts, Conv2dKernel::Packed)
                    .unwrap();
            let want = conv2d::conv2d_reference(&xv, x_shape, &wv, w_shape, Some(&bv), &opts);
            assert_close(
                &format!("constant weight, x {x_shape:?}"),
                &got.to_f32(gpu).unwrap(),
                &want,
                dtype,
                91,
            );
        }
    }
}

#[test]
fn packed_kernel_puts_small_batch_items_side_by_side() {
    // Small outputs of many items are multiplied as one product, each item's
    // pixels a group of columns: groups of sizes that are not multiples of
    // the 4 columns a lane stores, and tiles that span several items.
    let gpu = gpu();
    let silu = Conv2dOptions {
        activation: Activation::Silu,
        ..Conv2dOptions::same(3, 1)
    };
    let cases: [([usize; 4], [usize; 4], Conv2dOptions); 4] = [
        ([9, 6, 9, 9], [20, 6, 3, 3], silu),
        ([16, 5, 1, 1], [33, 5, 3, 3], Conv2dOptions::same(3, 1)),
        ([6, 4, 7, 5], [7, 4, 3, 3], Conv2dOptions::same(3, 2)),
        ([40, 3, 5, 5], [17, 3, 1, 1], Conv2dOptions::default()),
    ];
    for (i, (x, w, opts)) in cases.iter().enumerate() {
        check(
            gpu,
            Conv2dKernel::Packed,
            *x,
            *w,
            true,
            opts,
            700 + i as u64,
        );
    }
}

/// f16 input, bias and residual against f32 weights (the Wan VAE's f16
/// mode) in `kernel`: the reference takes the input rounded to f16 and the
/// weights as they are.
#[allow(clippy::too_many_arguments)]
fn check_f32_weights(
    gpu: &Gpu,
    kernel: Conv2dKernel,
    (x_shape, w_shape): ([usize; 4], [usize; 4]),
    opts: &Conv2dOptions,
    residual: Option<f32>,
    seed: u64,
) {
    let (x, xv) = upload(
        gpu,
        &random(x_shape.iter().product(), seed),
        &x_shape,
        DType::F16,
    );
    let (w, wv) = upload(
        gpu,
        &random(w_shape.iter().product(), seed + 1),
        &w_shape,
        DType::F32,
    );
    let (b, bv) = upload(
        gpu,
        &random(w_shape[0], seed + 2),
        &[w_shape[0]],
        DType::F16,
    );
    let want_shape = conv2d::conv2d_output_shape(x_shape, w_shape, opts).unwrap();
    let (r, rv) = upload(
        gpu,
        &random(want_shape.iter().product(), seed + 3),
        &want_shape,
        DType::F16,
    );
    let fused = residual.map(|scale| Conv2dResidual {
        residual: &r,
        scale,
    });
    let case = format!("{kernel:?} f32 weights x {x_shape:?} w {w_shape:?} {opts:?}");
    let got =
        conv2d::conv2d_residual_with_kernel(gpu, &x, &w, Some(&b), opts, fused.as_ref(), kernel)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
    assert_eq!(got.dtype(), DType::F16, "{case}");
    let mut want = conv2d::conv2d_reference(&xv, x_shape, &wv, w_shape, Some(&bv), opts);
    if let Some(scale) = residual {
        for (v, r) in want.iter_mut().zip(&rv) {
            *v = ((*v as f64 + *r as f64) * scale as f64) as f32;
        }
    }
    let k = w_shape[1] * w_shape[2] * w_shape[3] + 2;
    assert_close(&case, &got.to_f32(gpu).unwrap(), &want, DType::F16, k);
}

#[test]
fn f32_weights_against_f16_input_match_the_reference_in_every_kernel() {
    let gpu = gpu();
    if !gpu.has_f16() {
        return;
    }
    let same = Conv2dOptions::same(3, 1);
    // (x and weight shapes, options, residual scale)
    type Case = (([usize; 4], [usize; 4]), Conv2dOptions, Option<f32>);
    let cases: [Case; 4] = [
        // Odd channels: one f32 word per channel in the packed taps.
        (([2, 5, 7, 9], [6, 5, 3, 3]), same, None),
        // Channels in fours: pack_taps4.
        (([1, 8, 9, 6], [5, 8, 3, 3]), same, Some(0.5)),
        (([1, 3, 9, 8], [4, 3, 3, 3]), vae_downsample(), None),
        (
            ([3, 16, 5, 5], [7, 16, 1, 1]),
            Conv2dOptions::default(),
            Some(1.0),
        ),
    ];
    for kernel in KERNELS {
        for (i, (shapes, opts, residual)) in cases.iter().enumerate() {
            check_f32_weights(gpu, kernel, *shapes, opts, *residual, 900 + 4 * i as u64);
        }
    }
    // Windows of every operand, the f32 weights' counted at 4 bytes.
    let small = small_binding_gpu();
    for (i, shapes) in [
        ([1, 4, 20, 20], [8, 4, 3, 3]),
        ([2, 20, 10, 10], [4, 20, 3, 3]),
    ]
    .into_iter()
    .enumerate()
    {
        check_f32_weights(
            small,
            Conv2dKernel::Tiled,
            shapes,
            &same,
            None,
            950 + i as u64,
        );
    }
}

#[test]
fn f32_weights_keep_their_precision_against_f16_input() {
    // 576 taps of 1 · (1/3) sum to 192 with f32 weights; rounded to f16 the
    // weight is 0.33325195 and the sum 191.953. The residual -192 cancels
    // the exact sum, so the f16 output can show what the weights kept.
    let gpu = gpu();
    if !gpu.has_f16() {
        return;
    }
    // Eight output pixels: a binding of the f16 output is at least 16 bytes.
    let x = Tensor::from_f32(gpu, &[1.0; 64 * 30], &[1, 64, 3, 10], DType::F16).unwrap();
    let w = Tensor::from_f32(gpu, &[1.0 / 3.0; 64 * 9], &[1, 64, 3, 3], DType::F32).unwrap();
    let r = Tensor::from_f32(gpu, &[-192.0; 8], &[1, 1, 1, 8], DType::F16).unwrap();
    let residual = Conv2dResidual {
        residual: &r,
        scale: 1.0,
    };
    let opts = Conv2dOptions::default();
    for kernel in [
        Conv2dKernel::Auto,
        Conv2dKernel::Tiled,
        Conv2dKernel::Packed,
    ] {
        let got =
            conv2d::conv2d_residual_with_kernel(gpu, &x, &w, None, &opts, Some(&residual), kernel)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
        let worst = got.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(worst < 1e-3, "{kernel:?}: {got:?} (f16 weights: -0.047)");
    }
    // The tensor-core kernel multiplies f16 matrices only: asked for by
    // name with f32 weights, it is refused and the message says why.
    let err = conv2d::conv2d_with_kernel(gpu, &x, &w, None, &opts, Conv2dKernel::Coop)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conv2d") && err.contains("weight f32"),
        "{err}"
    );
}

#[test]
fn packed_kernel_packs_few_channels_at_full_resolution() {
    // The VAE decoder's shapes in small: 4, 8, 12 and 32 input channels (1,
    // 2, 3 and 8 vectors of taps per column), where pack_taps4's workgroups
    // span several columns and end inside one; stride 2 and one-sided
    // padding; a band of rows whose padded width is not a multiple of 32.
    let gpu = gpu();
    let cases: [([usize; 4], [usize; 4], Conv2dOptions); 4] = [
        ([2, 4, 19, 23], [8, 4, 3, 3], Conv2dOptions::same(3, 1)),
        ([1, 8, 33, 30], [3, 8, 3, 3], Conv2dOptions::same(3, 1)),
        ([3, 12, 17, 13], [5, 12, 3, 3], vae_downsample()),
        ([1, 32, 40, 40], [32, 32, 3, 3], Conv2dOptions::same(3, 1)),
    ];
    for (i, (x, w, opts)) in cases.iter().enumerate() {
        let (_, ran) = kernels_run(gpu, || {
            check(
                gpu,
                Conv2dKernel::Packed,
                *x,
                *w,
                true,
                opts,
                800 + i as u64,
            )
        });
        assert!(ran.iter().any(|k| k == "pack_taps4"), "{x:?}: {ran:?}");
    }
}

#[test]
fn direct_kernel_matches_the_reference() {
    // The direct 3x3 kernel: rows of one vec4 (no neighbour on either side)
    // and of several, one row, odd heights, several batch items, output
    // channels that are not a multiple of its group of 8 (the VAE's conv_out
    // has 3), and 64 input channels, whose weights take four blocks of 16
    // output channels (one dispatch each). 32, 64 and 96 output channels
    // take the 16-channel kernel, 96 with 20 items in one dispatch.
    let gpu = gpu();
    let opts = Conv2dOptions::same(3, 1);
    let cases: [([usize; 4], [usize; 4]); 7] = [
        ([1, 3, 5, 4], [8, 3, 3, 3]),
        // More items in one dispatch than groups of 16 channels: 6 groups.
        ([20, 8, 4, 8], [96, 8, 3, 3]),
        ([2, 5, 1, 12], [3, 5, 3, 3]),
        ([3, 8, 7, 16], [13, 8, 3, 3]),
        ([1, 32, 9, 20], [32, 32, 3, 3]),
        ([2, 64, 6, 8], [64, 64, 3, 3]),
        ([1, 17, 11, 28], [27, 17, 3, 3]),
    ];
    for (i, (x, w)) in cases.into_iter().enumerate() {
        let (_, ran) = kernels_run(gpu, || {
            check(
                gpu,
                Conv2dKernel::Direct,
                x,
                w,
                i % 2 == 0,
                &opts,
                900 + i as u64,
            )
        });
        assert!(
            ran.iter().any(|k| k.starts_with("conv3x3_direct")),
            "{x:?}: {ran:?}"
        );
        assert!(
            !ran.iter().any(|k| k.starts_with("pack_taps")),
            "{x:?}: {ran:?}"
        );
    }
}

#[test]
fn direct_kernels_of_16_and_8_channels_give_the_same_bits() {
    // 32 output channels take conv3x3_direct16 (an odd height) or
    // conv3x3_direct16_rows2 (an even one, with half the plane at least a
    // workgroup's 64 vec4s); the same weights with 8 more
    // channels (40: not whole groups of 16) take conv3x3_direct. Each
    // channel's sum runs in the same order, so the first 32 channels agree
    // bit for bit, with bias, activation and residual.
    let gpu = gpu();
    let opts = Conv2dOptions {
        activation: Activation::Silu,
        ..Conv2dOptions::same(3, 1)
    };
    let (n, cin, w) = (2, 20, 32);
    for (dtype, h) in dtypes().into_iter().flat_map(|d| [(d, 7), (d, 16)]) {
        let plane = h * w;
        let x_shape = [n, cin, h, w];
        let (x, _) = upload(gpu, &random(n * cin * plane, 990), &x_shape, dtype);
        let weights = random(40 * cin * 9, 991);
        let biases = random(40, 992);
        let residual = random(n * 40 * plane, 993);
        let mut outs = Vec::new();
        for cout in [32, 40] {
            let (wt, _) = upload(gpu, &weights[..cout * cin * 9], &[cout, cin, 3, 3], dtype);
            let (b, _) = upload(gpu, &biases[..cout], &[cout], dtype);
            // The residual's first 32 channels are the same in both.
            let r: Vec<f32> = (0..n)
                .flat_map(|z| &residual[z * 40 * plane..(z * 40 + cout) * plane])
                .copied()
                .collect();
            let (r, _) = upload(gpu, &r, &[n, cout, h, w], dtype);
            let res = Conv2dResidual {
                residual: &r,
                scale: 0.5,
            };
            let (got, ran) = kernels_run(gpu, || {
                conv2d::conv2d_residual_with_kernel(
                    gpu,
                    &x,
                    &wt,
                    Some(&b),
                    &opts,
                    Some(&res),
                    Conv2dKernel::Direct,
                )
                .unwrap()
            });
            let entry = match (cout, h % 2) {
                (32, 0) => "conv3x3_direct16_rows2",
                (32, _) => "conv3x3_direct16",
                _ => "conv3x3_direct",
            };
            assert!(ran.iter().any(|k| k == entry), "{cout}, h {h}: {ran:?}");
            outs.push(got.to_f32(gpu).unwrap());
        }
        for z in 0..n {
            let wide = &outs[0][z * 32 * plane..(z + 1) * 32 * plane];
            let narrow = &outs[1][z * 40 * plane..(z * 40 + 32) * plane];
            let same = wide
                .iter()
                .zip(narrow)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype:?} h {h} item {z}: the two kernels differ");
        }
    }
}

#[test]
fn direct_kernel_fuses_activation_and_residual() {
    let gpu = gpu();
    for dtype in dtypes() {
        for activation in [Activation::Silu, Activation::GeluTanh] {
            let opts = Conv2dOptions {
                activation,
                ..Conv2dOptions::same(3, 1)
            };
            check_in(
                gpu,
                Conv2dKernel::Direct,
                ([2, 12, 5, 8], [16, 12, 3, 3]),
                true,
                &opts,
                950,
                dtype,
            );
        }
        check_residual_in(
            gpu,
            Conv2dKernel::Direct,
            ([2, 32, 6, 12], [40, 32, 3, 3]),
            true,
            &Conv2dOptions::same(3, 1),
            Some(0.5),
            960,
            dtype,
        );
    }
    if gpu.has_f16() {
        check_f32_weights(
            gpu,
            Conv2dKernel::Direct,
            ([1, 16, 5, 8], [11, 16, 3, 3]),
            &Conv2dOptions::same(3, 1),
            Some(1.0),
            970,
        );
    }
}

#[test]
fn direct_kernel_reuses_a_constant_weight_and_refuses_other_shapes() {
    let gpu = gpu();
    let opts = Conv2dOptions::same(3, 1);
    let w_shape = [24, 64, 3, 3];
    let (w, wv) = upload(
        gpu,
        &random(w_shape.iter().product(), 980),
        &w_shape,
        DType::F32,
    );
    let w = w.into_constant();
    for (i, x_shape) in [[1, 64, 4, 8], [3, 64, 9, 4], [1, 64, 4, 8]]
        .into_iter()
        .enumerate()
    {
        let (x, xv) = upload(
            gpu,
            &random(x_shape.iter().product(), 981 + i as u64),
            &x_shape,
            DType::F32,
        );
        let got =
            conv2d::conv2d_with_kernel(gpu, &x, &w, None, &opts, Conv2dKernel::Direct).unwrap();
        let want = conv2d::conv2d_reference(&xv, x_shape, &wv, w_shape, None, &opts);
        assert_close(
            &format!("constant weight, x {x_shape:?}"),
            &got.to_f32(gpu).unwrap(),
            &want,
            DType::F32,
            64 * 9,
        );
    }
    // Rows not a multiple of 4 wide, stride 2, a 1x1 kernel: refused by
    // name, with the shapes.
    let refused = [
        ([1, 4, 6, 6], [4, 4, 3, 3], opts),
        ([1, 4, 8, 8], [4, 4, 3, 3], Conv2dOptions::same(3, 2)),
        ([1, 4, 8, 8], [4, 4, 1, 1], Conv2dOptions::same(1, 1)),
    ];
    for (x_shape, w_shape, o) in refused {
        let x = Tensor::from_f32(
            gpu,
            &random(x_shape.iter().product(), 1),
            &x_shape,
            DType::F32,
        )
        .unwrap();
        let w = Tensor::from_f32(
            gpu,
            &random(w_shape.iter().product(), 2),
            &w_shape,
            DType::F32,
        )
        .unwrap();
        let err = conv2d::conv2d_with_kernel(gpu, &x, &w, None, &o, Conv2dKernel::Direct)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("conv2d") && err.contains("direct kernel"),
            "{err}"
        );
    }
}

#[test]
fn the_vae_decoders_full_resolution_convolutions_take_the_direct_kernel() {
    // What routing picks on this (CPU) adapter for the bundled VAE's shapes
    // in small: few channels at full resolution go direct.
    let gpu = gpu();
    if !gpu.adapter().is_cpu {
        return;
    }
    let x_shape = [1, 32, 128, 128];
    let w_shape = [32, 32, 3, 3];
    let x = Tensor::from_f32(
        gpu,
        &random(x_shape.iter().product(), 3),
        &x_shape,
        DType::F32,
    )
    .unwrap();
    let w = Tensor::from_f32(
        gpu,
        &random(w_shape.iter().product(), 4),
        &w_shape,
        DType::F32,
    )
    .unwrap();
    let (_, ran) = kernels_run(gpu, || {
        conv2d::conv2d(gpu, &x, &w, None, &Conv2dOptions::same(3, 1)).unwrap()
    });
    assert!(ran.iter().any(|k| k == "conv3x3_direct16_rows2"), "{ran:?}");
}

/// `cargo test --release --test ops_conv2d -- --ignored --nocapture
/// direct_against_packed_timing`: GPU time of the packed and the direct
/// kernel for the bundled VAE decoder's 3x3 convolutions (16 frames).
#[test]
#[ignore]
fn direct_against_packed_timing() {
    let gpu = gpu();
    let shapes: [(usize, usize, usize); 8] = [
        (4, 64, 16),
        (64, 64, 16),
        (64, 64, 32),
        (64, 64, 64),
        (64, 64, 128),
        (64, 32, 128),
        (32, 32, 128),
        (32, 3, 128),
    ];
    let frames = 16;
    // MOTIF_TIMING_SHAPE=cin,cout,size times that shape alone.
    let only = std::env::var("MOTIF_TIMING_SHAPE").ok();
    for (cin, cout, size) in shapes {
        if only
            .as_ref()
            .is_some_and(|o| *o != format!("{cin},{cout},{size}"))
        {
            continue;
        }
        let x_shape = [frames, cin, size, size];
        let w_shape = [cout, cin, 3, 3];
        let x = Tensor::from_f32(
            gpu,
            &random(x_shape.iter().product(), 5),
            &x_shape,
            DType::F32,
        )
        .unwrap();
        let (w, _) = upload(
            gpu,
            &random(w_shape.iter().product(), 6),
            &w_shape,
            DType::F32,
        );
        let w = w.into_constant();
        let (b, _) = upload(gpu, &random(cout, 7), &[cout], DType::F32);
        let mut line = format!("{cin:>3} -> {cout:>3} at {size:>3}x{size:<3}");
        for kernel in [Conv2dKernel::Packed, Conv2dKernel::Direct] {
            let run = || {
                conv2d::conv2d_with_kernel(
                    gpu,
                    &x,
                    &w,
                    Some(&b),
                    &Conv2dOptions::same(3, 1),
                    kernel,
                )
                .unwrap()
            };
            drop(run());
            gpu.synchronize().unwrap();
            gpu.start_timer();
            drop(run());
            let ms = gpu
                .stop_timer_by_kernel()
                .unwrap()
                .unwrap()
                .iter()
                .map(|k| k.seconds * 1e3)
                .sum::<f64>();
            line += &format!("  {kernel:?} {ms:8.1} ms");
        }
        println!("{line}");
    }
}

#[test]
fn convolutions_with_fewer_than_four_values_bind_on_every_kernel() {
    // A tensor of 1-3 f32 (1-7 f16) values is narrower than one vec4, the
    // least a shader's vec4 array binds: bias, output and input of these.
    let gpu = gpu();
    let opts = Conv2dOptions::default();
    for kernel in [
        Conv2dKernel::Auto,
        Conv2dKernel::Tiled,
        Conv2dKernel::Packed,
    ] {
        for (x, w) in [
            ([1, 1, 1, 1], [1, 1, 1, 1]),
            ([1, 3, 1, 2], [2, 3, 1, 1]),
            ([1, 4, 2, 2], [1, 4, 1, 1]),
            ([1, 2, 1, 3], [1, 2, 1, 1]),
            ([2, 1, 1, 1], [3, 1, 1, 1]),
        ] {
            for dtype in dtypes() {
                check_in(gpu, kernel, (x, w), true, &opts, 3, dtype);
            }
        }
    }
}
