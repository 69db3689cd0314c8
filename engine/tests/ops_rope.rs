//! The rotary embedding against its CPU reference: f32 and f16, odd token
//! counts and head dims, batches (positions repeat per batch item), the
//! windowed path, and the tables diffusers' Wan model builds.

mod common;

use common::*;
use motif_engine::models::wan_transformer::rope_tables;
use motif_engine::ops::rope;
use motif_engine::{DType, EngineError, Gpu, Tensor};

fn check(
    gpu: &Gpu,
    dtypes: Vec<DType>,
    batch: usize,
    seq: usize,
    heads: usize,
    half: usize,
    seed: u64,
) {
    let channels = heads * half * 2;
    // Angles over a few turns, as positions × frequencies give.
    let angles: Vec<f32> = random(seq * half, seed).iter().map(|v| v * 20.0).collect();
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let ct = Tensor::from_f32(gpu, &cos, &[seq, half], DType::F32).unwrap();
    let st = Tensor::from_f32(gpu, &sin, &[seq, half], DType::F32).unwrap();
    for dtype in dtypes {
        let (x, xs) = upload(
            gpu,
            &random(batch * seq * channels, seed + 1),
            &[batch, seq, channels],
            dtype,
        );
        let got = rope::rotary_embedding(gpu, &x, &ct, &st, heads)
            .unwrap()
            .to_f32(gpu)
            .unwrap();
        let want = rope::rotary_embedding_reference(&xs, seq, heads, &cos, &sin);
        assert_close(
            &format!("rope b={batch} s={seq} h={heads} half={half}"),
            &got,
            &want,
            dtype,
            2,
        );
    }
}

#[test]
fn rotary_embedding_matches_reference() {
    for (i, &n) in ODD_SIZES.iter().enumerate() {
        check(gpu(), dtypes(), 2, n, 3, 6, 10 + i as u64);
        check(gpu(), dtypes(), 1, 5, 2, n, 20 + i as u64);
    }
    // Head dim 128 (Wan 2.1), 12 heads.
    check(gpu(), dtypes(), 1, 40, 12, 64, 30);
    // 4 KiB bindings: 2·37 rows of 24 f32 values run in windows.
    check(small_binding_gpu(), vec![DType::F32], 2, 37, 2, 6, 40);
}

#[test]
fn rotary_embedding_refuses_bad_tables() {
    let gpu = gpu();
    let (x, _) = upload(gpu, &random(2 * 3 * 8, 1), &[2, 3, 8], DType::F32);
    let t = Tensor::from_f32(gpu, &random(3 * 2, 2), &[3, 2], DType::F32).unwrap();
    // 2 heads of dim 4 need tables [3, 2]; 1 head of dim 8 needs [3, 4].
    assert!(rope::rotary_embedding(gpu, &x, &t, &t, 2).is_ok());
    assert!(matches!(
        rope::rotary_embedding(gpu, &x, &t, &t, 1),
        Err(EngineError::Shape { .. })
    ));
    assert!(matches!(
        rope::rotary_embedding(gpu, &x, &t, &t, 3),
        Err(EngineError::Shape { .. })
    ));
}

/// diffusers' Wan tables: head dim 12 → parts (t, h, w) = (4, 4, 4); the
/// token at (f, h, w) takes the t part's angles at f, then h's, then w's,
/// each part with frequencies 1 / 10000^(2k/part).
#[test]
fn wan_rope_tables_split_the_head_dim_by_axis() {
    let (cos, sin) = rope_tables([4, 4, 4], [2, 2, 3], 10000.0);
    assert_eq!(cos.len(), 12 * 6);
    let token = |f: usize, h: usize, w: usize| (f * 2 + h) * 3 + w;
    let angle = |pos: usize, k: usize| pos as f64 / 10000f64.powf(2.0 * k as f64 / 4.0);
    let s = token(1, 1, 2);
    let want = [
        angle(1, 0),
        angle(1, 1),
        angle(1, 0),
        angle(1, 1),
        angle(2, 0),
        angle(2, 1),
    ];
    for (i, a) in want.iter().enumerate() {
        assert_eq!(cos[s * 6 + i], a.cos() as f32);
        assert_eq!(sin[s * 6 + i], a.sin() as f32);
    }
}
