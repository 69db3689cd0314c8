//! Permutes, concat, nearest upsample, embedding gather and the timestep
//! embedding against their CPU references, f32 and f16, odd sizes and the
//! windowed path for tensors over the binding limit.

mod common;

/// Data movement is exact: equal values, reported at the first difference.
fn assert_exact(case: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{case}: length");
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
    {
        panic!(
            "{case}: first difference at {i}: got {}, want {}",
            got[i], want[i]
        );
    }
}

use common::*;
use motif_engine::ops::{embedding, layout};
use motif_engine::{DType, EngineError, Gpu, Tensor};

fn check_permute(gpu: &Gpu, shape: &[usize], perm: &[usize], seed: u64) {
    for dtype in dtypes() {
        let n: usize = shape.iter().product();
        let (x, xs) = upload(gpu, &random(n, seed), shape, dtype);
        let y = layout::permute(gpu, &x, perm).unwrap();
        let want_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        assert_eq!(y.shape(), &want_shape[..]);
        // Data movement is exact.
        assert_exact(
            &format!("permute {shape:?} {perm:?}"),
            &y.to_f32(gpu).unwrap(),
            &layout::permute_reference(&xs, shape, perm),
        );
    }
}

#[test]
fn permute_matches_reference() {
    for (i, &n) in ODD_SIZES.iter().enumerate() {
        check_permute(gpu(), &[n, 3], &[1, 0], i as u64);
        check_permute(gpu(), &[2, n, 5, 3], &[0, 2, 3, 1], i as u64);
        check_permute(gpu(), &[1, 3, n, 2, 7], &[0, 3, 4, 1, 2], i as u64);
    }
    check_permute(
        gpu(),
        &[2, 3, 4, 5, 2, 3, 2, 2, 3],
        &[8, 6, 4, 2, 0, 1, 3, 5, 7],
        9,
    );
    check_permute(gpu(), &[4, 5], &[0, 1], 10);
    // Innermost output dims in fours (permute4): strided in the input, and
    // contiguous (read as vec4s).
    check_permute(gpu(), &[3, 8, 5], &[2, 0, 1], 11);
    check_permute(gpu(), &[2, 6, 3, 8], &[0, 2, 1, 3], 12);
    check_permute(gpu(), &[2, 3, 5, 4], &[0, 2, 1, 3], 13);
    check_permute(gpu(), &[1, 7, 2, 12], &[0, 2, 1, 3], 14);
}

#[test]
fn permute_splits_over_the_first_dim() {
    check_permute(small_binding_gpu(), &[9, 33, 7], &[0, 2, 1], 3);
    // permute4 over windows: strided and contiguous innermost dims.
    check_permute(small_binding_gpu(), &[9, 12, 8], &[0, 2, 1], 4);
    check_permute(small_binding_gpu(), &[9, 5, 3, 8], &[0, 2, 1, 3], 5);
}

#[test]
fn video_layouts_round_trip_and_match_diffusers_order() {
    let gpu = gpu();
    let (b, c, f, h, w) = (2, 3, 4, 5, 7);
    let v: Vec<f32> = (0..b * c * f * h * w).map(|i| i as f32).collect();
    let x = Tensor::from_f32(gpu, &v, &[b, c, f, h, w], DType::F32).unwrap();
    let frames = layout::video_to_frames(gpu, &x).unwrap();
    assert_eq!(frames.shape(), &[b * f, c, h, w]);
    let fv = frames.to_f32(gpu).unwrap();
    // row = b·F + f holds sample[b, :, f]
    let at = |bb: usize, cc: usize, ff: usize, yy: usize, xx: usize| {
        v[(((bb * c + cc) * f + ff) * h + yy) * w + xx]
    };
    assert_eq!(fv[(((f + 2) * c + 1) * h + 3) * w + 4], at(1, 1, 2, 3, 4));
    let tokens = layout::frames_to_tokens(gpu, &frames, f).unwrap();
    assert_eq!(tokens.shape(), &[b * h * w, f, c]);
    let tv = tokens.to_f32(gpu).unwrap();
    // token row = (b·H + y)·W + x, then frame, then channel
    assert_eq!(tv[((((h + 3) * w) + 4) * f + 2) * c + 1], at(1, 1, 2, 3, 4));
    let back = layout::tokens_to_frames(gpu, &tokens, b, h, w).unwrap();
    let video = layout::frames_to_video(gpu, &back, f).unwrap();
    assert_exact("video round trip", &video.to_f32(gpu).unwrap(), &v);
}

#[test]
fn concat_matches_reference() {
    for (gpu, sizes) in [
        (gpu(), ODD_SIZES.to_vec()),
        (small_binding_gpu(), vec![7, 33]),
    ] {
        for dtype in dtypes() {
            for &n in &sizes {
                let (a, av) = upload(gpu, &random(2 * n * 15, 1), &[2, n, 3, 5], dtype);
                let (b, bv) = upload(gpu, &random(2 * 7 * 15, 2), &[2, 7, 3, 5], dtype);
                let y = layout::concat(gpu, &[&a, &b], 1).unwrap();
                assert_eq!(y.shape(), &[2, n + 7, 3, 5]);
                let mut want = Vec::new();
                for i in 0..2 {
                    want.extend_from_slice(&av[i * n * 15..(i + 1) * n * 15]);
                    want.extend_from_slice(&bv[i * 7 * 15..(i + 1) * 7 * 15]);
                }
                assert_exact(&format!("concat n={n}"), &y.to_f32(gpu).unwrap(), &want);
            }
        }
    }
}

#[test]
fn concat_rejects_mismatched_shapes() {
    let gpu = gpu();
    let a = Tensor::zeros(gpu, &[2, 3, 4], DType::F32).unwrap();
    let b = Tensor::zeros(gpu, &[2, 3, 5], DType::F32).unwrap();
    let e = layout::concat(gpu, &[&a, &b], 1).unwrap_err();
    assert!(matches!(e, EngineError::Shape { .. }));
    // A single row over the binding limit cannot be split: an error, not a panic.
    let big = Tensor::zeros(small_binding_gpu(), &[2, 40, 40], DType::F32).unwrap();
    let too_big = layout::concat(small_binding_gpu(), &[&big, &big], 1).unwrap_err();
    assert!(
        matches!(too_big, EngineError::BindingTooLarge { bytes: 12800, .. }),
        "{too_big}"
    );
    assert!(
        e.to_string().contains("concat") && e.to_string().contains("[2, 3, 5]"),
        "{e}"
    );
}

#[test]
fn upsample_nearest_matches_reference_at_exact_sizes() {
    for (gpu, cases) in [
        (
            gpu(),
            vec![
                (1, 1, 2, 2),
                (7, 33, 14, 66),
                (5, 3, 9, 5),
                (4, 4, 8, 8),
                (129, 7, 258, 13),
            ],
        ),
        (small_binding_gpu(), vec![(9, 9, 18, 17)]),
    ] {
        for dtype in dtypes() {
            for &(h, w, oh, ow) in &cases {
                let planes = 2 * 3;
                let (x, xs) = upload(gpu, &random(planes * h * w, 4), &[2, 3, h, w], dtype);
                let y = layout::upsample_nearest(gpu, &x, oh, ow).unwrap();
                assert_eq!(y.shape(), &[2, 3, oh, ow]);
                let want = layout::upsample_nearest_reference(&xs, planes, h, w, oh, ow);
                assert_exact(
                    &format!("upsample {h}x{w} -> {oh}x{ow}"),
                    &y.to_f32(gpu).unwrap(),
                    &want,
                );
            }
        }
    }
}

#[test]
fn embedding_gathers_rows_and_splits_large_tables() {
    for (gpu, v, d) in [
        (gpu(), 129, 33),
        (gpu(), 7, 1),
        (small_binding_gpu(), 300, 7),
    ] {
        for dtype in dtypes() {
            let (table, tv) = upload(gpu, &random(v * d, 6), &[v, d], dtype);
            let ids: Vec<u32> = (0..77).map(|i| ((i * 37 + 5) % v) as u32).collect();
            let y = embedding::embedding(gpu, &table, &ids).unwrap();
            assert_eq!(y.shape(), &[77, d]);
            let want: Vec<f32> = ids
                .iter()
                .flat_map(|&id| tv[id as usize * d..(id as usize + 1) * d].to_vec())
                .collect();
            assert_exact(
                &format!("embedding {v}x{d}"),
                &y.to_f32(gpu).unwrap(),
                &want,
            );
        }
    }
    let table = Tensor::zeros(gpu(), &[10, 4], DType::F32).unwrap();
    let e = embedding::embedding(gpu(), &table, &[3, 10]).unwrap_err();
    assert!(
        e.to_string().contains("id 10") && e.to_string().contains("10 rows"),
        "{e}"
    );
}

#[test]
fn timestep_embedding_matches_diffusers_formula() {
    let gpu = gpu();
    let ts = [0.0f32, 1.0, 499.5, 999.0, 261.0, 17.25];
    for (dim, flip, shift) in [
        (320, true, 0.0),
        (33, false, 1.0),
        (8, true, 1.0),
        (1280, false, 0.0),
    ] {
        let cfg = embedding::TimestepEmbedding::new(dim, flip, shift);
        for dtype in dtypes() {
            let y = embedding::timestep_embedding(gpu, &ts, &cfg, dtype).unwrap();
            assert_eq!(y.shape(), &[ts.len(), dim]);
            let want = embedding::timestep_embedding_reference(&ts, &cfg);
            let want = stored(&want, dtype);
            assert_close(
                &format!("timestep dim={dim} flip={flip}"),
                &y.to_f32(gpu).unwrap(),
                &want,
                dtype,
                1,
            );
        }
    }
    // diffusers' SD layout: [cos | sin]; at t = 0 cos = 1, sin = 0.
    let cfg = embedding::TimestepEmbedding::new(4, true, 0.0);
    assert_eq!(
        embedding::timestep_embedding_reference(&[0.0], &cfg),
        vec![1.0, 1.0, 0.0, 0.0]
    );
}

#[test]
fn narrow_copies_a_slice_of_one_dim() {
    for (gpu, outer) in [(gpu(), 3usize), (small_binding_gpu(), 9)] {
        for dtype in dtypes() {
            let (c, inner) = (8, 33);
            let (x, xs) = upload(
                gpu,
                &random(outer * c * inner, 8),
                &[outer, c, inner],
                dtype,
            );
            for (start, len) in [(0, 4), (4, 4), (3, 1), (0, 8)] {
                let y = layout::narrow(gpu, &x, 1, start, len).unwrap();
                assert_eq!(y.shape(), &[outer, len, inner]);
                let want: Vec<f32> = (0..outer)
                    .flat_map(|o| {
                        xs[(o * c + start) * inner..(o * c + start + len) * inner].to_vec()
                    })
                    .collect();
                assert_exact(
                    &format!("narrow {start}+{len}"),
                    &y.to_f32(gpu).unwrap(),
                    &want,
                );
            }
        }
    }
    let x = Tensor::zeros(gpu(), &[2, 4], DType::F32).unwrap();
    let e = layout::narrow(gpu(), &x, 1, 3, 2).unwrap_err().to_string();
    assert!(
        e.contains("narrow") && e.contains("3..5") && e.contains("[2, 4]"),
        "{e}"
    );
}

#[test]
fn narrow_rows_and_concat_rows_equal_narrow_and_concat_past_the_binding_limit() {
    // 4 KiB bindings: the shader copies refuse rows of 33 x 40 f32 values
    // (5280 bytes), the buffer copies take them; odd f16 rows (not 4-byte
    // aligned) fall back to the shader copies.
    for (gpu, rows_shape) in [
        (small_binding_gpu(), [33usize, 8, 5]),
        (gpu(), [3, 5, 3]),
        (gpu(), [7, 2, 3]),
    ] {
        for dtype in dtypes() {
            let shape = [5, rows_shape[0], rows_shape[1], rows_shape[2]];
            let n: usize = shape.iter().product();
            let (x, xs) = upload(gpu, &random(n, n as u64), &shape, dtype);
            let row = n / 5;
            let got = layout::narrow_rows(gpu, &x, 1, 3).unwrap();
            assert_eq!(got.shape(), [3, shape[1], shape[2], shape[3]]);
            assert_exact("narrow_rows", &got.to_f32(gpu).unwrap(), &xs[row..4 * row]);
            let head = layout::narrow_rows(gpu, &x, 0, 1).unwrap();
            let joined = layout::concat_rows(gpu, &[&got, &head, &x]).unwrap();
            assert_eq!(joined.shape()[0], 9);
            let want: Vec<f32> = [&xs[row..4 * row], &xs[..row], &xs[..]]
                .into_iter()
                .flatten()
                .copied()
                .collect();
            assert_exact("concat_rows", &joined.to_f32(gpu).unwrap(), &want);
        }
    }
}
