//! `motif bench --plan --wan-i2v` (docs/PERFORMANCE.md): Wan2.1-I2V-14B with
//! CLIP ViT-H walks its whole generation at 832x480x81 through a plan-mode
//! allocator — the 36-channel input, the image tokens and the conditioning
//! video's encode included — on an adapter planned with 4 GiB bindings.
//! Only what is counted is checked, never a budget.

use motif_engine::gpu::{Gpu, GpuOptions};
use motif_engine::DType;

fn plan_gpu(max_binding_bytes: Option<u64>) -> Gpu {
    Gpu::new(GpuOptions {
        precision: Some(DType::F16),
        plan: true,
        max_binding_bytes,
        ..Default::default()
    })
    .expect("a plan-mode GPU")
}

#[test]
fn wan_i2v_14b_with_its_image_encoder_plans_every_phase() {
    let gpu = plan_gpu(Some(4_294_967_292));
    let r = motif_engine::bench::plan_wan_i2v(&gpu, 832, 480, 81).expect("plans");
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!(
        "weights {:.2} GiB; peaks: text encoding {:.2}, conditioning {:.2}, denoising {:.2}, \
         decoding {:.2} GiB",
        gib(r.wan.weight_bytes),
        gib(r.wan.text_encoding_peak),
        gib(r.conditioning_peak),
        gib(r.wan.denoising_peak),
        gib(r.wan.decoding_peak)
    );
    // 14B parameters in f16 and CLIP ViT-H's 0.63B.
    assert!(
        r.wan.weight_bytes > 28 << 30,
        "the 14B transformer is counted"
    );
    for (phase, bytes) in [
        ("text encoding", r.wan.text_encoding_peak),
        ("conditioning", r.conditioning_peak),
        ("denoising", r.wan.denoising_peak),
        ("decoding", r.wan.decoding_peak),
    ] {
        assert!(bytes > r.wan.weight_bytes, "{phase}: above the weights");
    }
    assert_eq!(r.peak(), r.conditioning_peak.max(r.wan.peak()));
}

#[test]
fn the_plan_takes_wan_sizes_only() {
    let gpu = plan_gpu(None);
    let Err(e) = motif_engine::bench::plan_wan_i2v(&gpu, 830, 480, 81) else {
        panic!("830 wide was planned")
    };
    let e = e.to_string();
    assert!(e.contains("multiples of 16"), "{e}");
}
