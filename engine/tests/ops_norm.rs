//! GroupNorm (plain and frames-pooling) and LayerNorm against their CPU
//! references, f32 and f16, odd sizes swept one dimension at a time, affine
//! parameters present and absent, fused SiLU, and the windowed path.

mod common;

use common::*;
use motif_engine::ops::norm::{self, ReductionKernel};
use motif_engine::{DType, EngineError, Gpu, Tensor};

/// Optional affine parameters: uploaded tensors and their stored values.
struct Affine {
    gamma: Option<(Tensor, Vec<f32>)>,
    beta: Option<(Tensor, Vec<f32>)>,
}

impl Affine {
    fn new(gpu: &Gpu, len: usize, gamma: bool, beta: bool, dtype: DType, seed: u64) -> Self {
        let make = |on: bool, s: u64| on.then(|| upload(gpu, &random(len, s), &[len], dtype));
        Affine {
            gamma: make(gamma, seed + 100),
            beta: make(beta, seed + 200),
        }
    }
    fn gamma(&self) -> Option<&Tensor> {
        self.gamma.as_ref().map(|g| &g.0)
    }
    fn beta(&self) -> Option<&Tensor> {
        self.beta.as_ref().map(|b| &b.0)
    }
    fn gamma_values(&self) -> Option<&[f32]> {
        self.gamma.as_ref().map(|g| g.1.as_slice())
    }
    fn beta_values(&self) -> Option<&[f32]> {
        self.beta.as_ref().map(|b| b.1.as_slice())
    }
}

/// Each (gamma, beta, silu, eps) combination the sweeps go through in turn.
const VARIANTS: [(bool, bool, bool, f32); 4] = [
    (true, true, false, 1e-5),
    (true, true, true, 1e-6),
    (false, false, false, 1e-5),
    (true, false, true, 1e-5),
];

/// Runs group norm on `shape` (frames = None: plain; Some(f): frames variant)
/// in every dtype and compares with the reference.
fn check_group_norm(
    gpu: &Gpu,
    shape: &[usize],
    groups: usize,
    frames: Option<usize>,
    variant: usize,
    offset: f32,
) {
    let (gamma_on, beta_on, silu, eps) = VARIANTS[variant % VARIANTS.len()];
    let n: usize = shape.iter().product();
    let c = shape[1];
    let group_len = n / shape[0] / groups * frames.unwrap_or(1);
    for dtype in dtypes() {
        let seed = n as u64 + variant as u64;
        let values: Vec<f32> = random(n, seed).iter().map(|v| v + offset).collect();
        let (x, xs) = upload(gpu, &values, shape, dtype);
        let affine = Affine::new(gpu, c, gamma_on, beta_on, dtype, seed);
        let (gv, bv) = (affine.gamma_values(), affine.beta_values());
        let (g, b) = (affine.gamma(), affine.beta());
        let want = match frames {
            None => norm::group_norm_reference(&xs, shape, groups, gv, bv, eps, silu),
            Some(f) => norm::group_norm_frames_reference(&xs, shape, f, groups, gv, bv, eps, silu),
        };
        // The adapter's kernel through the plain entry points, then each shape.
        let default = match frames {
            None => norm::group_norm(gpu, &x, groups, g, b, eps, silu),
            Some(f) => norm::group_norm_frames(gpu, &x, f, groups, g, b, eps, silu),
        };
        let f = frames.unwrap_or(1);
        let runs = [
            ("default", default),
            (
                "narrow",
                norm::group_norm_with(
                    gpu,
                    &x,
                    f,
                    groups,
                    g,
                    b,
                    eps,
                    silu,
                    Some(ReductionKernel::Narrow),
                ),
            ),
            (
                "wide",
                norm::group_norm_with(
                    gpu,
                    &x,
                    f,
                    groups,
                    g,
                    b,
                    eps,
                    silu,
                    Some(ReductionKernel::Wide),
                ),
            ),
        ];
        for (kernel, got) in runs {
            let got = got.unwrap();
            assert_eq!(got.shape(), shape);
            assert_close(
                &format!("group_norm {kernel} {shape:?} groups={groups} frames={frames:?} variant={variant} offset={offset}"),
                &got.to_f32(gpu).unwrap(),
                &want,
                dtype,
                group_len,
            );
        }
    }
}

#[test]
fn group_norm_matches_reference_on_odd_sizes() {
    let gpu = gpu();
    for (i, &s) in ODD_SIZES.iter().enumerate() {
        check_group_norm(gpu, &[s, 6, 5, 3], 3, None, i, 0.0);
        check_group_norm(gpu, &[2, 4 * s, 3, 5], 4, None, i + 1, 0.0);
        check_group_norm(gpu, &[2, 3 * s, 5, 2], s, None, i + 2, 0.0);
        check_group_norm(gpu, &[2, 6, s, 3], 2, None, i + 3, 0.0);
        check_group_norm(gpu, &[2, 6, 3, s], 3, None, i, 0.0);
    }
}

#[test]
fn group_norm_handles_any_rank_and_long_groups() {
    let gpu = gpu();
    // No spatial dims (S = 1), one spatial dim, and (B, C, F, H, W).
    check_group_norm(gpu, &[3, 8], 4, None, 0, 0.0);
    check_group_norm(gpu, &[3, 8], 8, None, 1, 0.0);
    check_group_norm(gpu, &[2, 6, 7], 3, None, 2, 0.0);
    check_group_norm(gpu, &[2, 4, 3, 5, 7], 2, None, 3, 0.0);
    // Groups of several statistics chunks, and channels of several apply chunks.
    check_group_norm(gpu, &[2, 4, 73, 61], 2, None, 0, 0.0);
    check_group_norm(gpu, &[1, 2, 3001], 1, None, 1, 0.0);
}

#[test]
fn group_norm_statistics_survive_a_large_mean() {
    // A mean 8x the spread: sum-of-squares variance would lose ~6 bits here.
    check_group_norm(gpu(), &[2, 4, 33, 31], 2, None, 0, 8.0);
}

/// [B*F, C, *s] → [B, C, F, *s] on the CPU.
fn frames_to_channels_first(x: &[f32], b: usize, f: usize, c: usize, s: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for bi in 0..b {
        for fi in 0..f {
            for ci in 0..c {
                let src = ((bi * f + fi) * c + ci) * s;
                let dst = ((bi * c + ci) * f + fi) * s;
                out[dst..dst + s].copy_from_slice(&x[src..src + s]);
            }
        }
    }
    out
}

/// [B, C, F, *s] → [B*F, C, *s].
fn channels_first_to_frames(x: &[f32], b: usize, f: usize, c: usize, s: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for bi in 0..b {
        for fi in 0..f {
            for ci in 0..c {
                let dst = ((bi * f + fi) * c + ci) * s;
                let src = ((bi * c + ci) * f + fi) * s;
                out[dst..dst + s].copy_from_slice(&x[src..src + s]);
            }
        }
    }
    out
}

#[test]
fn group_norm_frames_matches_reference_on_odd_sizes() {
    let gpu = gpu();
    for (i, &s) in ODD_SIZES.iter().enumerate() {
        check_group_norm(gpu, &[2 * s, 6, 3, 2], 3, Some(s), i, 0.0);
        check_group_norm(gpu, &[s * 3, 4, 2, 3], 2, Some(3), i + 1, 0.0);
        check_group_norm(gpu, &[2 * 4, 2 * s, 3, 3], s, Some(4), i + 2, 0.0);
        check_group_norm(gpu, &[2 * 3, 4, s, 5], 2, Some(3), i + 3, 0.0);
    }
    // Segments of several statistics chunks.
    check_group_norm(gpu, &[2 * 3, 4, 47, 45], 2, Some(3), 1, 0.0);
}

#[test]
fn group_norm_frames_equals_group_norm_on_the_permuted_tensor() {
    let gpu = gpu();
    let (b, f, c, h, w, groups) = (2, 7, 8, 5, 3, 4);
    let s = h * w;
    for dtype in dtypes() {
        let values = random(b * f * c * s, 77);
        let (x, _) = upload(gpu, &values, &[b * f, c, h, w], dtype);
        let (x5, _) = upload(
            gpu,
            &frames_to_channels_first(&values, b, f, c, s),
            &[b, c, f, h, w],
            dtype,
        );
        let (gamma, _) = upload(gpu, &random(c, 78), &[c], dtype);
        let (beta, _) = upload(gpu, &random(c, 79), &[c], dtype);
        for silu in [false, true] {
            let frames =
                norm::group_norm_frames(gpu, &x, f, groups, Some(&gamma), Some(&beta), 1e-6, silu)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap();
            let plain = norm::group_norm(gpu, &x5, groups, Some(&gamma), Some(&beta), 1e-6, silu)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
            let plain = channels_first_to_frames(&plain, b, f, c, s);
            assert_close(
                &format!("group_norm_frames vs permuted group_norm silu={silu}"),
                &frames,
                &plain,
                dtype,
                f * c / groups * s,
            );
        }
    }
}

#[test]
fn group_norm_splits_tensors_over_the_binding_limit() {
    let gpu = small_binding_gpu();
    check_group_norm(gpu, &[9, 6, 7, 5], 3, None, 0, 0.0);
    check_group_norm(gpu, &[5 * 2, 6, 5, 3], 2, Some(2), 1, 0.0);
    // One item over the limit cannot be split.
    let x = Tensor::zeros(gpu, &[1, 4, 40, 40], DType::F32).unwrap();
    let e = norm::group_norm(gpu, &x, 2, None, None, 1e-5, false).unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::BindingTooLarge {
                op: "group_norm",
                ..
            }
        ),
        "{e}"
    );
}

fn check_layer_norm(gpu: &Gpu, rows: usize, d: usize, variant: usize) {
    let (gamma_on, beta_on, _, eps) = VARIANTS[variant % VARIANTS.len()];
    for dtype in dtypes() {
        let seed = (rows * 1000 + d + variant) as u64;
        let (x, xs) = upload(gpu, &random(rows * d, seed), &[rows, d], dtype);
        let affine = Affine::new(gpu, d, gamma_on, beta_on, dtype, seed);
        let want =
            norm::layer_norm_reference(&xs, d, affine.gamma_values(), affine.beta_values(), eps);
        for kernel in [
            None,
            Some(ReductionKernel::Narrow),
            Some(ReductionKernel::Wide),
        ] {
            let got = norm::layer_norm_with(gpu, &x, affine.gamma(), affine.beta(), eps, kernel)
                .unwrap()
                .to_f32(gpu)
                .unwrap();
            assert_close(
                &format!("layer_norm {kernel:?} {rows}x{d} variant={variant}"),
                &got,
                &want,
                dtype,
                d,
            );
        }
    }
}

#[test]
fn layer_norm_matches_reference_on_odd_sizes() {
    let gpu = gpu();
    for (i, &s) in ODD_SIZES.iter().enumerate() {
        check_layer_norm(gpu, s, 33, i);
        check_layer_norm(gpu, 3, s, i + 1);
    }
    // CLIP's and SD's widths.
    check_layer_norm(gpu, 5, 768, 0);
    check_layer_norm(gpu, 3, 1280, 1);
    // Any leading rank.
    let (x, xs) = upload(gpu, &random(2 * 3 * 7, 5), &[2, 3, 7], DType::F32);
    let got = norm::layer_norm(gpu, &x, None, None, 1e-5).unwrap();
    assert_eq!(got.shape(), &[2, 3, 7]);
    let want = norm::layer_norm_reference(&xs, 7, None, None, 1e-5);
    assert_close(
        "layer_norm rank 3",
        &got.to_f32(gpu).unwrap(),
        &want,
        DType::F32,
        7,
    );
}

#[test]
fn layer_norm_splits_tensors_over_the_binding_limit() {
    let gpu = small_binding_gpu();
    check_layer_norm(gpu, 50, 33, 0);
    check_layer_norm(gpu, 7, 1000, 1);
    let x = Tensor::zeros(gpu, &[2, 2000], DType::F32).unwrap();
    let e = norm::layer_norm(gpu, &x, None, None, 1e-5).unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::BindingTooLarge {
                op: "layer_norm",
                ..
            }
        ),
        "{e}"
    );
}

fn assert_shape_error(e: EngineError, op: &str, parts: &[&str]) {
    assert!(matches!(e, EngineError::Shape { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains(op), "{msg}");
    for part in parts {
        assert!(msg.contains(part), "`{part}` missing from: {msg}");
    }
}

#[test]
fn bad_shapes_are_errors_that_name_the_op_and_shapes() {
    let gpu = gpu();
    let z = |shape: &[usize]| Tensor::zeros(gpu, shape, DType::F32).unwrap();
    let x = z(&[2, 6, 4, 4]);
    let e = norm::group_norm(gpu, &x, 4, None, None, 1e-5, false).unwrap_err();
    assert_shape_error(e, "group_norm", &["[2, 6, 4, 4]", "4 groups"]);
    let e = norm::group_norm(gpu, &z(&[6]), 3, None, None, 1e-5, false).unwrap_err();
    assert_shape_error(e, "group_norm", &["[6]"]);
    let e = norm::group_norm(gpu, &x, 3, Some(&z(&[5])), None, 1e-5, false).unwrap_err();
    assert_shape_error(e, "group_norm", &["[6]", "[5]"]);
    let e = norm::group_norm(gpu, &x, 3, None, Some(&z(&[6, 1])), 1e-5, false).unwrap_err();
    assert_shape_error(e, "group_norm", &["beta", "[6, 1]"]);
    let e = norm::group_norm_frames(gpu, &x, 3, 3, None, None, 1e-5, false).unwrap_err();
    assert_shape_error(e, "group_norm_frames", &["[2, 6, 4, 4]", "3 frames"]);
    let e = norm::group_norm_frames(gpu, &x, 0, 3, None, None, 1e-5, false).unwrap_err();
    assert_shape_error(e, "group_norm_frames", &["0 frames"]);
    let e = norm::layer_norm(gpu, &x, Some(&z(&[6])), None, 1e-5).unwrap_err();
    assert_shape_error(e, "layer_norm", &["[4]", "[6]"]);
    if gpu.has_f16() {
        let h = Tensor::zeros(gpu, &[6], DType::F16).unwrap();
        let e = norm::group_norm(gpu, &x, 3, Some(&h), None, 1e-5, false).unwrap_err();
        assert!(
            matches!(
                e,
                EngineError::DType {
                    op: "group_norm",
                    ..
                }
            ),
            "{e}"
        );
    }
}

/// Layer norm over SD's transformer tokens: [4096 * 2, 320] and [64 * 2, 1280].
#[test]
#[ignore]
fn timing_layer_norm() {
    let gpu = gpu();
    for dtype in dtypes() {
        for (rows, d) in [(8192, 320), (128, 1280)] {
            let (x, _) = upload(gpu, &random(rows * d, 1), &[rows, d], dtype);
            let (gamma, _) = upload(gpu, &random(d, 2), &[d], dtype);
            let (beta, _) = upload(gpu, &random(d, 3), &[d], dtype);
            norm::layer_norm(gpu, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
            gpu.synchronize().unwrap();
            let runs = 5;
            let t = std::time::Instant::now();
            for _ in 0..runs {
                norm::layer_norm(gpu, &x, Some(&gamma), Some(&beta), 1e-5).unwrap();
            }
            gpu.synchronize().unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / runs as f64;
            println!(
                "layer_norm [{rows}, {d}] {dtype} on {}: {ms:.2} ms",
                gpu.adapter().name
            );
        }
    }
}

/// SD 1.5's largest group norm ([2, 320, 64, 64], 32 groups, fused SiLU) and
/// its frames-pooling form over 16 frames, in f32 and f16. Prints ms per call.
/// `cargo test --release -p motif-engine --test ops_norm -- --ignored --nocapture`
#[test]
#[ignore]
fn timing_group_norm() {
    let gpu = gpu();
    for dtype in dtypes() {
        for (shape, frames) in [([2, 320, 64, 64], None), ([32, 320, 64, 64], Some(16))] {
            let n: usize = shape.iter().product();
            let (x, _) = upload(gpu, &random(n, 1), &shape, dtype);
            let (gamma, _) = upload(gpu, &random(320, 2), &[320], dtype);
            let (beta, _) = upload(gpu, &random(320, 3), &[320], dtype);
            let run = || match frames {
                None => norm::group_norm(gpu, &x, 32, Some(&gamma), Some(&beta), 1e-5, true),
                Some(f) => {
                    norm::group_norm_frames(gpu, &x, f, 32, Some(&gamma), Some(&beta), 1e-5, true)
                }
            };
            run().unwrap();
            gpu.synchronize().unwrap();
            let runs = 5;
            let t = std::time::Instant::now();
            for _ in 0..runs {
                run().unwrap();
            }
            gpu.synchronize().unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3 / runs as f64;
            println!(
                "group_norm {shape:?} frames={frames:?} {dtype} on {}: {ms:.1} ms",
                gpu.adapter().name
            );
        }
    }
}

#[test]
fn rows_past_the_cpu_loop_limit_are_whole() {
    // 300k values: 8 invocations per row would loop past llvmpipe's 65535.
    let gpu = gpu();
    let len = 300_001;
    let (x, xs) = upload(gpu, &random(2 * len, 4), &[2, len], DType::F32);
    let got = norm::layer_norm(gpu, &x, None, None, 1e-5)
        .unwrap()
        .to_f32(gpu)
        .unwrap();
    let want = norm::layer_norm_reference(&xs, len, None, None, 1e-5);
    assert_close("layer_norm long rows", &got, &want, DType::F32, len);
    // A group of 16 frames x 40 channels x 128 x 128: 10 million values.
    let shape = [16, 40, 128, 128];
    let n: usize = shape.iter().product();
    let (x, xs) = upload(gpu, &random(n, 5), &shape, DType::F32);
    let got = norm::group_norm_frames(gpu, &x, 16, 1, None, None, 1e-5, false)
        .unwrap()
        .to_f32(gpu)
        .unwrap();
    let want = norm::group_norm_frames_reference(&xs, &shape, 16, 1, None, None, 1e-5, false);
    assert_close("group_norm_frames long group", &got, &want, DType::F32, n);
}

/// RMS norm over odd row lengths, with and without the weight, both kernel
/// shapes, and rows with a large common offset (no mean is subtracted, so
/// the offset is part of the norm: checks the f32 accumulation).
#[test]
fn rms_norm_matches_reference() {
    let gpu = gpu();
    for dtype in dtypes() {
        for (i, &d) in ODD_SIZES.iter().chain(&[512, 4099]).enumerate() {
            for (rows, with_gamma, offset) in [(3, true, 0.0), (5, false, 0.0), (2, true, 30.0)] {
                let seed = 7000 + i as u64 * 10 + rows as u64;
                let x: Vec<f32> = random(rows * d, seed)
                    .iter()
                    .map(|v| v * 3.0 + offset)
                    .collect();
                let (xt, xs) = upload(gpu, &x, &[rows, d], dtype);
                let gamma = with_gamma.then(|| upload(gpu, &random(d, seed + 1), &[d], dtype));
                let want =
                    norm::rms_norm_reference(&xs, d, gamma.as_ref().map(|g| g.1.as_slice()), 1e-6);
                for kernel in [ReductionKernel::Narrow, ReductionKernel::Wide] {
                    let got = norm::rms_norm_with(
                        gpu,
                        &xt,
                        gamma.as_ref().map(|g| &g.0),
                        1e-6,
                        Some(kernel),
                    )
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap();
                    assert_close(
                        &format!("rms_norm d={d} rows={rows} {kernel:?}"),
                        &got,
                        &want,
                        dtype,
                        d,
                    );
                }
            }
        }
    }
}

#[test]
fn rms_norm_windows_and_bad_shapes() {
    // 4 KiB bindings: 40 rows of 100 f32 values run in windows.
    let gpu = small_binding_gpu();
    let (rows, d) = (40, 100);
    let (xt, xs) = upload(gpu, &random(rows * d, 71), &[rows, d], DType::F32);
    let (gt, gs) = upload(gpu, &random(d, 72), &[d], DType::F32);
    let got = norm::rms_norm(gpu, &xt, Some(&gt), 1e-6)
        .unwrap()
        .to_f32(gpu)
        .unwrap();
    assert_close(
        "rms_norm windows",
        &got,
        &norm::rms_norm_reference(&xs, d, Some(&gs), 1e-6),
        DType::F32,
        d,
    );
    let (bad, _) = upload(gpu, &random(7, 73), &[7], DType::F32);
    assert!(matches!(
        norm::rms_norm(gpu, &xt, Some(&bad), 1e-6),
        Err(EngineError::Shape { .. })
    ));
}

/// On the CPU adapter, layer norm over rows of whole vectors takes the
/// row-per-invocation kernel (`layer_norm_rows4`): the UNet's widths, more
/// rows than one workgroup holds, and rows far from zero (a mean of 30
/// against a spread of 1, where a sum-of-squares variance would cancel).
#[test]
fn layer_norm_rows_of_whole_vectors_take_the_row_kernel() {
    let gpu = gpu();
    assert!(gpu.adapter().is_cpu, "the row kernel is the CPU adapter's");
    for dtype in dtypes() {
        for (rows, d, offset, variant) in [
            (200usize, 64usize, 0.0f32, 0usize),
            (65, 96, 0.0, 1),
            (3, 128, 30.0, 2),
            (64, 8, 0.0, 3),
        ] {
            let (gamma_on, beta_on, _, eps) = VARIANTS[variant % VARIANTS.len()];
            let values: Vec<f32> = random(rows * d, 60 + d as u64)
                .iter()
                .map(|v| v + offset)
                .collect();
            let (x, xs) = upload(gpu, &values, &[rows, d], dtype);
            let affine = Affine::new(gpu, d, gamma_on, beta_on, dtype, 61);
            let (got, ran) = kernels_run(gpu, || {
                norm::layer_norm(gpu, &x, affine.gamma(), affine.beta(), eps)
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap()
            });
            assert!(
                ran.iter().any(|k| k == "layer_norm_rows4"),
                "{rows}x{d}: {ran:?}"
            );
            let want = norm::layer_norm_reference(
                &xs,
                d,
                affine.gamma_values(),
                affine.beta_values(),
                eps,
            );
            assert_close(
                &format!("layer_norm_rows4 {rows}x{d} offset {offset}"),
                &got,
                &want,
                dtype,
                d,
            );
        }
    }
}

/// GroupNorm's apply pass moves vec4s where the spatial size holds whole
/// vectors (the VAE's and UNet's 128x128 .. 2x2 maps); with the frames
/// pooled, SiLU fused, the affine on and off, and more than one apply chunk
/// per channel (S = 1024).
#[test]
fn group_norm_on_whole_vectors_takes_the_vec4_apply() {
    let gpu = gpu();
    for (shape, groups, frames, variant) in [
        (&[2usize, 8, 4, 4][..], 4usize, None, 0usize),
        (&[4, 6, 32, 32], 3, Some(2), 1),
        (&[3, 16, 12], 16, None, 2),
        (&[2, 4, 2, 2], 2, None, 3),
    ] {
        let (_, ran) = kernels_run(gpu, || {
            check_group_norm(gpu, shape, groups, frames, variant, 0.0)
        });
        assert!(
            ran.iter().any(|k| k == "group_apply4"),
            "{shape:?}: {ran:?}"
        );
    }
}

#[test]
fn group_norm_statistics_in_one_pass_equal_the_chunked_passes_bit_for_bit() {
    // On the CPU adapter a group norm with at least 32 group rows takes
    // its statistics in one dispatch, a workgroup per row
    // (group_stats_rows), and fewer rows take the chunk pass and the
    // finalize pass. Items are independent, so each item normalised alone
    // (one or a few rows: the two-pass path) must give exactly its slice
    // of the whole batch's result (the one-pass path). Plain and frames
    // variants, several chunks per segment, f32 and f16.
    let gpu = gpu();
    // (items, frames, channels, spatial, groups)
    let cases = [
        (4usize, 1usize, 16usize, 700usize, 8usize),
        (2, 4, 32, 300, 16),
    ];
    for dtype in dtypes() {
        for (i, &(items, frames, c, s, groups)) in cases.iter().enumerate() {
            let item_len = frames * c * s;
            let values: Vec<f32> = random(items * item_len, 900 + i as u64)
                .iter()
                .map(|v| 3.0 * v + 5.0)
                .collect();
            let (gamma, _) = upload(gpu, &random(c, 910 + i as u64), &[c], dtype);
            let (beta, _) = upload(gpu, &random(c, 920 + i as u64), &[c], dtype);
            let norm = |x: &Tensor| {
                norm::group_norm_frames(
                    gpu,
                    x,
                    frames,
                    groups,
                    Some(&gamma),
                    Some(&beta),
                    1e-5,
                    true,
                )
                .unwrap()
                .to_f32(gpu)
                .unwrap()
            };
            let (x, _) = upload(gpu, &values, &[items * frames, c, s], dtype);
            let whole = norm(&x);
            for item in 0..items {
                let part = &values[item * item_len..(item + 1) * item_len];
                let (xi, _) = upload(gpu, part, &[frames, c, s], dtype);
                let alone = norm(&xi);
                let slice = &whole[item * item_len..(item + 1) * item_len];
                assert!(
                    alone.iter().zip(slice).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "case {i} ({dtype}), item {item}: the batch's result differs from the item's alone"
                );
            }
        }
    }
    // And the batch did take the one-pass kernel (a GPU of its own, so
    // that no other test's kernels are in the list).
    let own = Gpu::new(Default::default()).expect("a GPU adapter");
    let (x, _) = upload(&own, &random(4 * 16 * 700, 1), &[4, 16, 700], DType::F32);
    let (out, kernels) = kernels_run(&own, || {
        norm::group_norm(&own, &x, 8, None, None, 1e-5, false)
    });
    out.unwrap();
    assert!(
        kernels.iter().any(|k| k == "group_stats_rows"),
        "{kernels:?}"
    );
    assert!(
        !kernels.iter().any(|k| k == "group_finalize"),
        "{kernels:?}"
    );
}
