//! The cooperative-matrix kernels (shaders/matmul_coop.wgsl: matmul and
//! conv2d; shaders/attention_coop.wgsl). No adapter here
//! has cooperative matrices (lavapipe has none), so the shader is checked as
//! far as the CPU can: naga parses and validates it with the capability on
//! and writes SPIR-V for every variant ops/matmul_coop.rs compiles. Its
//! numbers are checked on a GPU by `motif bench --coop`.

mod common;

use motif_engine::ops::conv2d::{
    conv2d_reference, conv2d_with_kernel, Conv2dKernel, Conv2dOptions,
};
use motif_engine::ops::matmul::{matmul, matmul_reference, MatmulOptions};
use motif_engine::ops::matmul_coop::{variant_constants, Variant, ATTENTION_SOURCE, SOURCE};
use motif_engine::ops::Activation;
use motif_engine::wgpu::naga;

fn validate(name: &str, source: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| {
        panic!("{name}: {}", e.emit_to_string(source));
    });
    let caps =
        naga::valid::Capabilities::COOPERATIVE_MATRIX | naga::valid::Capabilities::SHADER_FLOAT16;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    (module, info)
}

/// SPIR-V of one variant, as wgpu-hal's Vulkan backend (30.0) asks naga for
/// it on a Vulkan 1.3 GPU with SHADER_F16, SUBGROUP and the
/// cooperative-matrix feature: its capability list (a capability outside it
/// fails the write, as it would fail the pipeline) and its strictest bounds
/// checks. Checks that the module really uses the tensor-core instructions
/// (OpCooperativeMatrixMulAddKHR is opcode 4459); MOTIF_DUMP_SPIRV=<dir>
/// writes it as `file` for spirv-val (not in CI).
fn spirv(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    constants: &naga::back::PipelineConstants,
    file: &str,
) {
    let stage = Some((naga::ShaderStage::Compute, entry));
    let (resolved, resolved_info) =
        naga::back::pipeline_constants::process_overrides(module, info, stage, constants)
            .unwrap_or_else(|e| panic!("overrides {constants:?}: {e}"));
    use naga::back::spv::Capability as C;
    let capabilities = [
        C::Shader,
        C::Matrix,
        C::Float16,
        C::GroupNonUniform,
        C::GroupNonUniformVote,
        C::GroupNonUniformArithmetic,
        C::GroupNonUniformBallot,
        C::GroupNonUniformShuffle,
        C::GroupNonUniformShuffleRelative,
        C::GroupNonUniformQuad,
        C::CooperativeMatrixKHR,
        C::VulkanMemoryModel,
    ];
    let restrict = naga::proc::BoundsCheckPolicy::Restrict;
    let options = naga::back::spv::Options {
        lang_version: (1, 6),
        capabilities: Some(capabilities.into_iter().collect()),
        bounds_check_policies: naga::proc::BoundsCheckPolicies {
            index: restrict,
            buffer: restrict,
            image_load: restrict,
            binding_array: naga::proc::BoundsCheckPolicy::Unchecked,
        },
        force_loop_bounding: true,
        ..Default::default()
    };
    let pipeline = naga::back::spv::PipelineOptions {
        shader_stage: naga::ShaderStage::Compute,
        entry_point: entry.into(),
    };
    let words = naga::back::spv::write_vec(&resolved, &resolved_info, &options, Some(&pipeline))
        .unwrap_or_else(|e| panic!("SPIR-V for {constants:?}: {e}"));
    assert_eq!(words[0], 0x0723_0203, "SPIR-V magic number");
    if let Ok(dir) = std::env::var("MOTIF_DUMP_SPIRV") {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(std::path::Path::new(&dir).join(file), bytes).unwrap();
    }
    let has_muladd = words.iter().any(|w| w & 0xffff == 4459);
    assert!(
        has_muladd,
        "no OpCooperativeMatrixMulAddKHR for {constants:?}"
    );
}

fn named(constants: Vec<(&'static str, f64)>) -> naga::back::PipelineConstants {
    constants
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

#[test]
fn shader_validates_and_writes_spirv_for_every_variant() {
    let (module, info) = validate("matmul_coop.wgsl", SOURCE);
    for variant in [
        Variant::Matmul { transpose_b: false },
        Variant::Matmul { transpose_b: true },
        Variant::Conv,
    ] {
        for act in [
            Activation::None,
            Activation::Silu,
            Activation::GeluErf,
            Activation::GeluTanh,
            Activation::QuickGelu,
        ] {
            for fast_staging in [0.0, 1.0] {
                let mut constants = named(variant_constants(variant, act));
                assert!(constants.contains_key("FAST_STAGING"));
                constants.insert("FAST_STAGING".to_string(), fast_staging);
                let kind = match variant {
                    Variant::Matmul { transpose_b } => format!("t{}", transpose_b as u8),
                    Variant::Conv => "conv".to_string(),
                    Variant::Attention { .. } => unreachable!("not in this list"),
                };
                let file = format!("matmul_coop_{kind}_act{}_fast{fast_staging}.spv", act as u8);
                spirv(&module, &info, "matmul_coop", &constants, &file);
            }
        }
    }
}

/// The tensor-core attention, for SD's and CLIP's head dims and odd ones
/// (the padding to whole fragments).
#[test]
fn attention_shader_validates_and_writes_spirv_for_every_head_dim() {
    let (module, info) = validate("attention_coop.wgsl", ATTENTION_SOURCE);
    for head_dim in [8, 40, 64, 72, 80] {
        let constants = named(variant_constants(
            Variant::Attention { head_dim },
            Activation::None,
        ));
        let file = format!("attention_coop_d{head_dim}.spv");
        spirv(&module, &info, "attention_coop", &constants, &file);
    }
}

/// Without cooperative matrices the dispatcher keeps the portable kernels:
/// the product is still right (lavapipe, or MOTIF_NO_COOP=1 on a GPU).
#[test]
fn matmul_routes_around_missing_coop_matrices() {
    let gpu = common::gpu();
    if gpu.coop_matrix().is_some() {
        // On a tensor-core adapter the routing is taken; the GPU check covers it.
        return;
    }
    for dtype in common::dtypes() {
        let (m, k, n) = (33, 77, 45);
        let (a, av) = common::upload(gpu, &common::random(m * k, 1), &[m, k], dtype);
        let (b, bv) = common::upload(gpu, &common::random(n * k, 2), &[n, k], dtype);
        let opts = MatmulOptions {
            transpose_b: true,
            ..Default::default()
        };
        let got = matmul(gpu, &a, &b, &opts).unwrap().to_f32(gpu).unwrap();
        let want = matmul_reference(&av, &[m, k], &bv, &[n, k], None, None, &opts);
        common::assert_close("matmul without coop", &got, &want, dtype, k);
    }
}

/// A convolution asked for on tensor cores where there are none is refused
/// with an error naming the op; `Auto` keeps the portable kernels.
#[test]
fn conv2d_routes_around_missing_coop_matrices() {
    let gpu = common::gpu();
    if gpu.coop_matrix().is_some() {
        return;
    }
    let dtype = common::dtypes()[common::dtypes().len() - 1];
    let (xs, ws) = ([1, 3, 5, 6], [4, 3, 3, 3]);
    let (x, xv) = common::upload(gpu, &common::random(90, 3), &xs, dtype);
    let (w, wv) = common::upload(gpu, &common::random(108, 4), &ws, dtype);
    let opts = Conv2dOptions::same(3, 1);
    let err = conv2d_with_kernel(gpu, &x, &w, None, &opts, Conv2dKernel::Coop).unwrap_err();
    assert!(err.to_string().contains("conv2d"), "{err}");
    let got = conv2d_with_kernel(gpu, &x, &w, None, &opts, Conv2dKernel::Auto)
        .unwrap()
        .to_f32(gpu)
        .unwrap();
    let want = conv2d_reference(&xv, xs, &wv, ws, None, &opts);
    common::assert_close("conv2d without coop", &got, &want, dtype, 27);
}

/// Attention asked for on tensor cores where there are none is refused with
/// an error naming the op; the default keeps the portable kernels.
#[test]
fn attention_routes_around_missing_coop_matrices() {
    use motif_engine::ops::attention::{
        attention, attention_reference, AttentionKernel, AttentionOptions,
    };
    let gpu = common::gpu();
    if gpu.coop_matrix().is_some() {
        return;
    }
    let dtype = common::dtypes()[common::dtypes().len() - 1];
    let (batch, lq, lk, heads, d) = (1, 9, 7, 2, 8);
    let (q, qv) = common::upload(
        gpu,
        &common::random(batch * lq * heads * d, 5),
        &[batch, lq, heads * d],
        dtype,
    );
    let (k, kv) = common::upload(
        gpu,
        &common::random(batch * lk * heads * d, 6),
        &[batch, lk, heads * d],
        dtype,
    );
    let (v, vv) = common::upload(
        gpu,
        &common::random(batch * lk * heads * d, 7),
        &[batch, lk, heads * d],
        dtype,
    );
    let coop = AttentionOptions {
        kernel: Some(AttentionKernel::Coop),
        ..Default::default()
    };
    let err = attention(gpu, &q, &k, &v, heads, &coop).unwrap_err();
    assert!(err.to_string().contains("attention"), "{err}");
    let opts = AttentionOptions::default();
    let got = attention(gpu, &q, &k, &v, heads, &opts)
        .unwrap()
        .to_f32(gpu)
        .unwrap();
    let want = attention_reference(&qv, &kv, &vv, batch, lq, lk, heads, &opts);
    common::assert_close("attention without coop", &got, &want, dtype, d);
}
