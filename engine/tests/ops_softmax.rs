//! Softmax against its CPU reference, f32 and f16, odd sizes, large and
//! peaked logits, and the windowed path.

mod common;

use common::*;
use motif_engine::ops::norm::ReductionKernel;
use motif_engine::ops::softmax;
use motif_engine::{DType, EngineError, Gpu, Tensor};

fn check_softmax(gpu: &Gpu, shape: &[usize], spread: f32, offset: f32) {
    let n: usize = shape.iter().product();
    let len = *shape.last().unwrap();
    for dtype in dtypes() {
        let values: Vec<f32> = random(n, n as u64)
            .iter()
            .map(|v| v * spread + offset)
            .collect();
        let (x, xs) = upload(gpu, &values, shape, dtype);
        let want = softmax::softmax_reference(&xs, len);
        let runs = [
            ("default", softmax::softmax(gpu, &x)),
            (
                "narrow",
                softmax::softmax_with(gpu, &x, Some(ReductionKernel::Narrow)),
            ),
            (
                "wide",
                softmax::softmax_with(gpu, &x, Some(ReductionKernel::Wide)),
            ),
        ];
        for (kernel, got) in runs {
            let got = got.unwrap();
            assert_eq!(got.shape(), shape);
            assert_close(
                &format!("softmax {kernel} {shape:?} spread={spread} offset={offset}"),
                &got.to_f32(gpu).unwrap(),
                &want,
                dtype,
                len,
            );
        }
    }
}

#[test]
fn softmax_matches_reference_on_odd_sizes() {
    let gpu = gpu();
    for &s in &ODD_SIZES {
        check_softmax(gpu, &[s, 33], 4.0, 0.0);
        check_softmax(gpu, &[5, s], 4.0, 0.0);
    }
    check_softmax(gpu, &[2, 3, 4097], 4.0, 0.0);
    check_softmax(gpu, &[7], 4.0, 0.0);
}

#[test]
fn softmax_subtracts_the_max() {
    let gpu = gpu();
    // exp(100) overflows f32 and f16 without the max subtraction.
    check_softmax(gpu, &[7, 77], 1.0, 100.0);
    // Peaked rows: most probabilities underflow to zero.
    check_softmax(gpu, &[7, 129], 60.0, 0.0);
}

#[test]
fn softmax_splits_tensors_over_the_binding_limit() {
    let gpu = small_binding_gpu();
    check_softmax(gpu, &[40, 33], 4.0, 0.0);
    let x = Tensor::zeros(gpu, &[2, 2000], DType::F32).unwrap();
    let e = softmax::softmax(gpu, &x).unwrap_err();
    assert!(
        matches!(e, EngineError::BindingTooLarge { op: "softmax", .. }),
        "{e}"
    );
}

#[test]
fn bad_shapes_are_errors_that_name_the_op_and_shapes() {
    let gpu = gpu();
    for shape in [&[][..], &[3, 0][..]] {
        let x = Tensor::zeros(gpu, shape, DType::F32).unwrap();
        let msg = softmax::softmax(gpu, &x).unwrap_err().to_string();
        assert!(
            msg.contains("softmax") && msg.contains(&format!("{shape:?}")),
            "{msg}"
        );
    }
}

#[test]
fn rows_past_the_cpu_loop_limit_are_whole() {
    // 300k values: 8 invocations per row would loop past llvmpipe's 65535.
    let gpu = gpu();
    let len = 300_001;
    let (x, xs) = upload(gpu, &random(2 * len, 4), &[2, len], DType::F32);
    let got = softmax::softmax(gpu, &x).unwrap().to_f32(gpu).unwrap();
    let want = softmax::softmax_reference(&xs, len);
    assert_close("softmax long rows", &got, &want, DType::F32, len);
}
