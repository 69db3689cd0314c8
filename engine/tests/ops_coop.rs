//! The tensor-core (cooperative-matrix) kernels and their portable twins.
//!
//! Every variant has a numeric test against the CPU reference that runs
//! wherever the adapter supports it, and prints why it is skipped where it
//! does not (lavapipe has no cooperative matrices); its portable twin (the
//! same case on the portable kernel) runs everywhere. Every variant's WGSL
//! is also parsed and validated by naga with the cooperative-matrix
//! capability on, written to SPIR-V as wgpu's Vulkan backend asks for it,
//! and the SPIR-V walked instruction by instruction for the tensor-core
//! multiply-add.

mod common;

use motif_engine::ops::attention::{
    self, attention, attention_flash, attention_reference, AttentionKernel, AttentionOptions,
};
use motif_engine::ops::attention_coop::{
    self, FlashVariant, Flavour, FRAGMENTS, NVIDIA_WORKGROUP_BYTES,
};
use motif_engine::ops::conv2d::conv2d_coop_variant;
use motif_engine::ops::conv2d::{
    conv2d_reference, conv2d_with_kernel, Conv2dKernel, Conv2dOptions, Conv2dResidual,
};
use motif_engine::ops::matmul::{
    self, matmul, matmul_coop_variant, matmul_reference, matmul_with_kernel, MatmulKernel,
    MatmulOptions,
};
use motif_engine::ops::matmul_coop::{self, variant_space, CoopProduct, CoopTiling, FragmentMath};
use motif_engine::ops::Activation;
use motif_engine::wgpu::naga;
use motif_engine::DType;

const ACTIVATIONS: [Activation; 5] = [
    Activation::None,
    Activation::Silu,
    Activation::GeluErf,
    Activation::GeluTanh,
    Activation::QuickGelu,
];

/// The head dims the models use (SD's 40/80/160, CLIP's 64, Wan's 128) and
/// odd ones (padding to whole fragments).
const HEAD_DIMS: [usize; 7] = [8, 40, 64, 72, 80, 128, 160];

// ---------------------------------------------------------------------------
// WGSL and SPIR-V of every variant (no GPU needed).

fn validate(name: &str, source: &str) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(source).unwrap_or_else(|e| {
        panic!("{name}: {}", e.emit_to_string(source));
    });
    // Subgroups too: the flash attention reduces its rows with shuffles.
    let caps = naga::valid::Capabilities::COOPERATIVE_MATRIX
        | naga::valid::Capabilities::SHADER_FLOAT16
        | naga::valid::Capabilities::SUBGROUP;
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps)
        .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
        .subgroup_operations(naga::valid::SubgroupOperationSet::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{name}: {}", e.emit_to_string(source)));
    (module, info)
}

/// OpCooperativeMatrixMulAddKHR (SPV_KHR_cooperative_matrix).
const OP_COOP_MULADD: u16 = 4459;

/// The opcodes of a SPIR-V module, walked instruction by instruction: the
/// five header words, then each instruction's first word holds its word
/// count (high half) and opcode (low half). Fails on a wrong magic number,
/// a zero word count, or an instruction running past the end.
fn spirv_opcodes(words: &[u32]) -> Result<Vec<u16>, String> {
    if words.len() < 5 || words[0] != 0x0723_0203 {
        return Err("no SPIR-V header".into());
    }
    let mut opcodes = Vec::new();
    let mut at = 5;
    while at < words.len() {
        let count = (words[at] >> 16) as usize;
        if count == 0 || at + count > words.len() {
            return Err(format!(
                "instruction at word {at} has word count {count} ({} words left)",
                words.len() - at
            ));
        }
        opcodes.push((words[at] & 0xffff) as u16);
        at += count;
    }
    Ok(opcodes)
}

/// The walk finds an opcode only where an instruction starts: 4459 as an
/// operand (a constant's value) is not a multiply-add, which a scan of
/// arbitrary words took for one; and a torn module is refused.
#[test]
fn spirv_walk_sees_instructions_not_operands() {
    let header = [0x0723_0203, 0x0001_0600, 0, 100, 0];
    // OpConstant %uint %id 4459: four words, opcode 43.
    let constant = [(4 << 16) | 43, 1, 2, OP_COOP_MULADD as u32];
    let mut words = header.to_vec();
    words.extend(constant);
    let ops = spirv_opcodes(&words).unwrap();
    assert_eq!(ops, vec![43]);
    assert!(!ops.contains(&OP_COOP_MULADD));
    // OpCooperativeMatrixMulAddKHR %type %result %a %b %c: six words.
    words.extend([(6 << 16) | OP_COOP_MULADD as u32, 3, 4, 5, 6, 7]);
    assert!(spirv_opcodes(&words).unwrap().contains(&OP_COOP_MULADD));
    words.pop();
    assert!(spirv_opcodes(&words).is_err(), "a torn last instruction");
}

/// SPIR-V of one variant, as wgpu-hal's Vulkan backend (30.0) asks naga for
/// it on a Vulkan 1.3 GPU with SHADER_F16, SUBGROUP and the
/// cooperative-matrix feature: its capability list (a capability outside it
/// fails the write, as it would fail the pipeline) and its strictest bounds
/// checks. MOTIF_DUMP_SPIRV=<dir> writes it as `file` for spirv-val.
fn spirv(
    module: &naga::Module,
    info: &naga::valid::ModuleInfo,
    entry: &str,
    constants: &[(&'static str, f64)],
    file: &str,
) {
    let constants: naga::back::PipelineConstants =
        constants.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let stage = Some((naga::ShaderStage::Compute, entry));
    let (resolved, resolved_info) =
        naga::back::pipeline_constants::process_overrides(module, info, stage, &constants)
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
    if let Ok(dir) = std::env::var("MOTIF_DUMP_SPIRV") {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        std::fs::write(std::path::Path::new(&dir).join(file), bytes).unwrap();
    }
    let opcodes = spirv_opcodes(&words).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert!(
        opcodes.contains(&OP_COOP_MULADD),
        "{file}: no OpCooperativeMatrixMulAddKHR instruction"
    );
}

/// The tilings under test: the tuner's space, and one over every
/// adapter's workgroup-memory budget (refused, never run).
fn tilings() -> Vec<CoopTiling> {
    variant_space()
}

/// Twice the staging of the default at steps of 64: 79,872 bytes of
/// workgroup memory, over NVIDIA's 48 KiB and lavapipe's limit.
const OVER_BUDGET: CoopTiling = CoopTiling {
    tile_k: 64,
    load: 8,
    stages: 2,
    ..CoopTiling::DEFAULT
};

/// Bytes of workgroup memory a module declares, as naga lays them out.
fn workgroup_bytes(module: &naga::Module) -> u32 {
    module
        .global_variables
        .iter()
        .filter(|(_, g)| g.space == naga::AddressSpace::WorkGroup)
        .map(|(_, g)| module.types[g.ty].inner.size(module.to_ctx()))
        .sum()
}

/// Every generated variant — each tiling of the tuner's space, each
/// product, tensor cores and portable twin — parses and validates; its
/// workgroup memory is what routing checks against the adapter's limit;
/// and the tensor-core ones write SPIR-V holding the tensor-core multiply-add.
#[test]
fn every_matmul_coop_variant_validates_and_writes_spirv() {
    let mut checked = 0;
    for t in tilings() {
        for product in CoopProduct::ALL {
            for math in [FragmentMath::Coop, FragmentMath::Twin] {
                let name = format!("{} {product:?} {math:?}", t.name());
                let source = matmul_coop::source(&t, product, 32, math)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
                let (module, info) = validate(&name, &source);
                assert_eq!(workgroup_bytes(&module), t.workgroup_bytes(), "{name}");
                if math == FragmentMath::Coop {
                    let file = format!("matmul_coop_{}_{product:?}.spv", t.name())
                        .replace([' ', '{', '}', ':'], "");
                    spirv(&module, &info, "matmul_coop", &[("ACT", 2.0)], &file);
                }
                checked += 1;
            }
        }
    }
    assert_eq!(checked, tilings().len() * 6);
    // A tiling the template cannot fill is refused with its reason.
    let odd = CoopTiling {
        tile_k: 24,
        ..CoopTiling::DEFAULT
    };
    let err = matmul_coop::source(&odd, CoopProduct::Conv, 32, FragmentMath::Coop).unwrap_err();
    assert!(err.contains("TILE_K 24"), "{err}");
    assert!(OVER_BUDGET.workgroup_bytes() > 48 * 1024);
}

/// Every variant of the flash-attention template at every head dim, on
/// NVIDIA's 32-lane subgroups (and 64-lane ones, AMD's), within NVIDIA's
/// 48 KiB of workgroup memory: the tensor-core flavour validates and its
/// SPIR-V has the multiply-add; the twin validates. Every head dim has
/// variants of both fragment shapes, and the variants above 48 KiB are
/// refused, not generated.
#[test]
fn attention_coop_validates_and_writes_spirv_for_every_variant() {
    let mut count = 0;
    for head_dim in HEAD_DIMS {
        for subgroup in [32, 64] {
            let coop = attention_coop::variants(
                head_dim,
                subgroup,
                &FRAGMENTS,
                NVIDIA_WORKGROUP_BYTES,
                Flavour::Coop,
            );
            for fragment in FRAGMENTS {
                assert!(
                    coop.iter().any(|v| v.fragment == fragment),
                    "no {fragment}x{fragment} variant at head dim {head_dim}"
                );
            }
            for v in &coop {
                assert!(v.workgroup_bytes(head_dim, Flavour::Coop) <= NVIDIA_WORKGROUP_BYTES);
                for flavour in [Flavour::Coop, Flavour::Twin] {
                    let (family, source) = attention_coop::expand(*v, head_dim, subgroup, flavour);
                    let (module, info) = validate(family, source);
                    if flavour == Flavour::Coop {
                        spirv(
                            &module,
                            &info,
                            attention_coop::ENTRY,
                            &[],
                            &format!("{family}.spv"),
                        );
                    }
                    count += 1;
                }
            }
        }
        // Larger head dims leave some combinations out: each is refused
        // with its size, never generated.
        let big = FlashVariant {
            fragment: 16,
            subgroups: 8,
            key_tile: 64,
        };
        let why = big
            .unfit(head_dim, 32, NVIDIA_WORKGROUP_BYTES, Flavour::Coop)
            .unwrap_or_else(|| panic!("{big:?} fits 48 KiB at head dim {head_dim}?"));
        assert!(why.contains("workgroup memory"), "{why}");
    }
    eprintln!("{count} generated kernels validated");
}

// ---------------------------------------------------------------------------
// Numbers: each variant where the adapter runs it, its portable twin always.

/// Prints why a tensor-core variant is not run here (cargo test shows it
/// with --nocapture), so that a skip is visible and never a silent pass.
fn skip(case: &str, why: &str) {
    eprintln!("skipped on {}: {case}: {why}", common::gpu().adapter().name);
}

/// Whether `gpu` must run `t` with `math`, from its limits alone: the twin
/// wherever f16 storage, the invocations and the workgroup memory suffice;
/// the tensor cores where, besides, the adapter has cooperative matrices
/// with the tiling's fragment shape. Where this is true the variant's
/// numbers are checked and any error fails the test.
fn must_run(gpu: &motif_engine::Gpu, t: &CoopTiling, math: FragmentMath) -> bool {
    let limits = gpu.limits();
    let subgroup = match (math, gpu.coop_matrix()) {
        (FragmentMath::Twin, _) => 32,
        (FragmentMath::Coop, Some(c)) if c.fragments.contains(&t.frag) => c.subgroup_size,
        (FragmentMath::Coop, _) => return false,
    };
    gpu.has_f16()
        && t.subgroups() * subgroup <= limits.max_compute_invocations_per_workgroup
        && t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
}

/// The tiling the portable twin runs for `t` on `gpu`: `t` itself where
/// its workgroup memory fits the adapter's limit, else `t` with the
/// fragments per subgroup halved (along the longer tile side, M on a
/// square; the same
/// subgroups, fragment shape, K step, load width and staging) until it
/// does: lavapipe gives 32 KiB where NVIDIA's driver gives 48.
fn twin_tiling(gpu: &motif_engine::Gpu, t: &CoopTiling, product: CoopProduct) -> CoopTiling {
    let limit = gpu.limits().max_compute_workgroup_storage_size;
    let mut s = *t;
    while s.workgroup_bytes() > limit && (s.frags_m > 1 || s.frags_n > 1) {
        if s.tile_n() > s.tile_m() && s.frags_n > 1 || s.frags_m == 1 {
            s.frags_n /= 2;
        } else {
            s.frags_m /= 2;
        }
    }
    s.check(product, 32)
        .unwrap_or_else(|e| panic!("the twin of {}: {e}", t.name()));
    s
}

/// A variant this adapter cannot run is refused with what it needs, never
/// run; the skip is printed.
fn assert_refused(case: &str, result: motif_engine::Result<motif_engine::Tensor>) {
    match result {
        Ok(_) => panic!("{case}: ran where the adapter cannot run it"),
        Err(e) => {
            let message = e.to_string();
            let op = case.split(' ').next().unwrap_or_default();
            assert!(
                message.contains("workgroup memory") && message.contains(op),
                "{case}: {message}"
            );
            skip(case, &message);
        }
    }
}

/// Whether tiling `ti` of the space runs every case. Each case that
/// changes the load width is a pipeline of its own, which the software
/// driver takes seconds to compile: the others run the cases with chunked
/// loads (batched b for transposed products, shared b for plain ones, the
/// convolution whose K = 72), and the default (scalar loads) and the first
/// double-buffered 128-bit tiling run all, the fallback to scalar loads of
/// misaligned dispatches included.
fn full_cases(ti: usize) -> bool {
    ti == 0 || ti == 2
}

/// The maths every variant is checked with.
const MATHS: [FragmentMath; 2] = [FragmentMath::Coop, FragmentMath::Twin];

/// Every tiling of the variant space on plain and transposed products,
/// tensor cores where the adapter has them and the portable twin (the
/// same staging, tiling and epilogue) wherever f16 runs: odd sizes off
/// every tile, K off the staging step, batches with shared and batched b,
/// sizes whose loads go in chunks and sizes that need scalar loads, with
/// bias, alpha, an activation, scale and residual fused in the epilogue.
#[test]
fn every_matmul_coop_variant_matches_the_reference() {
    let gpu = common::gpu();
    let dtype = DType::F16;
    // (batch, m, k, n, b batched): K = 77 needs scalar loads, 80 and 96
    // take chunks of 8; rows 2 x 37 = 74 and 19, columns 45, 72, 136 are
    // off every tile.
    let cases = [
        (1, 37, 77, 45, false),
        (2, 37, 80, 72, false),
        (2, 19, 96, 136, true),
    ];
    let mut ran = 0;
    for (ti, t) in tilings().iter().enumerate() {
        for transpose_b in [false, true] {
            for (ci, &(batch, m, k, n, b_batched)) in cases.iter().enumerate() {
                if !full_cases(ti) && ci != (1 + transpose_b as usize) {
                    continue;
                }
                // One activation per tiling: each is an override constant,
                // a pipeline of its own on the software driver.
                let act = ACTIVATIONS[ti % ACTIVATIONS.len()];
                let seed = 1000 * ti as u64 + 10 * ci as u64 + transpose_b as u64;
                let a_shape = [batch, m, k];
                let b_mat = if transpose_b { [n, k] } else { [k, n] };
                let b_shape: Vec<usize> = if b_batched {
                    vec![batch, b_mat[0], b_mat[1]]
                } else {
                    b_mat.to_vec()
                };
                let (a, av) =
                    common::upload(gpu, &common::random(batch * m * k, seed), &a_shape, dtype);
                let (b, bv) = common::upload(
                    gpu,
                    &common::random(b_shape.iter().product(), seed + 1),
                    &b_shape,
                    dtype,
                );
                let (bias, biasv) = common::upload(gpu, &common::random(n, seed + 2), &[n], dtype);
                let (res, resv) = common::upload(
                    gpu,
                    &common::random(batch * m * n, seed + 3),
                    &[batch, m, n],
                    dtype,
                );
                let opts = MatmulOptions {
                    transpose_b,
                    bias: Some(&bias),
                    activation: act,
                    alpha: 0.5,
                    scale: 0.75,
                    residual: Some(&res),
                    residual_scale: 0.25,
                };
                let want = matmul_reference(
                    &av,
                    &a_shape,
                    &bv,
                    &b_shape,
                    Some(&biasv),
                    Some(&resv),
                    &opts,
                );
                for math in MATHS {
                    let t = &match math {
                        FragmentMath::Coop => *t,
                        FragmentMath::Twin => {
                            twin_tiling(gpu, t, CoopProduct::Matmul { transpose_b })
                        }
                    };
                    let case = format!(
                        "matmul {} {math:?} bT={transpose_b} case {ci} {act:?}",
                        t.name()
                    );
                    let started = std::time::Instant::now();
                    let got = matmul_coop_variant(gpu, &a, &b, &opts, t, math);
                    if !must_run(gpu, t, math) {
                        assert_refused(&case, got);
                        continue;
                    }
                    let got = got
                        .unwrap_or_else(|e| panic!("{case}: {e}"))
                        .to_f32(gpu)
                        .unwrap();
                    common::assert_close(&case, &got, &want, dtype, k);
                    eprintln!("{case}: {:.1} s", started.elapsed().as_secs_f64());
                    ran += 1;
                }
            }
        }
    }
    assert!(ran > 0 || !gpu.has_f16(), "no variant ran");
}

/// Every tiling of the variant space as an implicit-GEMM convolution, the
/// tensor cores where the adapter has them and the portable twin always:
/// 3x3 with stride and asymmetric padding (K = 45, scalar weight loads),
/// 1x1 with a fused residual (K = 20), and a batched 3x3 with a residual
/// whose K = 72 takes chunked weight loads.
#[test]
fn every_conv2d_coop_variant_matches_the_reference() {
    let gpu = common::gpu();
    let dtype = DType::F16;
    let cases = [
        (
            [2, 5, 9, 11],
            [7, 5, 3, 3],
            Conv2dOptions {
                stride: 2,
                padding: [0, 1, 0, 1],
                activation: Activation::Silu,
            },
            None,
        ),
        (
            [1, 20, 6, 7],
            [9, 20, 1, 1],
            Conv2dOptions::default(),
            Some(0.5),
        ),
        (
            [2, 8, 13, 10],
            [70, 8, 3, 3],
            Conv2dOptions {
                activation: Activation::GeluErf,
                ..Conv2dOptions::same(3, 1)
            },
            Some(0.75),
        ),
    ];
    let mut ran = 0;
    for (ti, t) in tilings().iter().enumerate() {
        for (i, (xs, ws, opts, residual_scale)) in cases.iter().enumerate() {
            if !full_cases(ti) && i != 2 {
                continue;
            }
            // One activation per tiling, as for the products.
            let opts = &Conv2dOptions {
                activation: ACTIVATIONS[ti % ACTIVATIONS.len()],
                ..*opts
            };
            let seed = 100 + 1000 * ti as u64 + 10 * i as u64;
            let (x, xv) =
                common::upload(gpu, &common::random(xs.iter().product(), seed), xs, dtype);
            let (w, wv) = common::upload(
                gpu,
                &common::random(ws.iter().product(), seed + 1),
                ws,
                dtype,
            );
            let (bias, biasv) =
                common::upload(gpu, &common::random(ws[0], seed + 2), &[ws[0]], dtype);
            let mut want = conv2d_reference(&xv, *xs, &wv, *ws, Some(&biasv), opts);
            let out_shape = motif_engine::ops::conv2d::conv2d_output_shape(*xs, *ws, opts).unwrap();
            let (res, resv) = common::upload(
                gpu,
                &common::random(out_shape.iter().product(), seed + 3),
                &out_shape,
                dtype,
            );
            if let Some(scale) = residual_scale {
                for (v, r) in want.iter_mut().zip(&resv) {
                    *v = (*v + r) * scale;
                }
            }
            let fused = residual_scale.map(|scale| Conv2dResidual {
                residual: &res,
                scale,
            });
            for math in MATHS {
                let t = &match math {
                    FragmentMath::Coop => *t,
                    FragmentMath::Twin => twin_tiling(gpu, t, CoopProduct::Conv),
                };
                let case = format!("conv2d {} {math:?} case {i}", t.name());
                let got =
                    conv2d_coop_variant(gpu, &x, &w, Some(&bias), opts, fused.as_ref(), t, math);
                if !must_run(gpu, t, math) {
                    assert_refused(&case, got);
                    continue;
                }
                let got = got
                    .unwrap_or_else(|e| panic!("{case}: {e}"))
                    .to_f32(gpu)
                    .unwrap();
                common::assert_close(&case, &got, &want, dtype, ws[1] * ws[2] * ws[3]);
                ran += 1;
            }
        }
    }
    assert!(ran > 0 || !gpu.has_f16(), "no variant ran");
}

/// Routed by name to the tensor cores (the tuned or default tiling), a
/// product runs and matches where the adapter has them, and is refused
/// with the op named where it has not.
#[test]
fn matmul_routed_to_the_tensor_cores_matches_or_is_refused() {
    let gpu = common::gpu();
    let dtype = DType::F16;
    let (m, k, n) = (37, 77, 45);
    let (a, av) = common::upload(gpu, &common::random(m * k, 7), &[m, k], dtype);
    let (b, bv) = common::upload(gpu, &common::random(n * k, 8), &[n, k], dtype);
    let opts = MatmulOptions {
        transpose_b: true,
        activation: Activation::GeluTanh,
        ..Default::default()
    };
    let got = matmul_with_kernel(gpu, &a, &b, &opts, MatmulKernel::Coop);
    if matmul::coop_supported(gpu, dtype) {
        let got = got.unwrap().to_f32(gpu).unwrap();
        let want = matmul_reference(&av, &[m, k], &bv, &[n, k], None, None, &opts);
        common::assert_close("matmul routed to coop", &got, &want, dtype, k);
    } else {
        let err = got.expect_err("refused without tensor cores").to_string();
        assert!(
            err.contains("matmul") && err.contains("cooperative"),
            "{err}"
        );
        skip("matmul routed to coop", &err);
    }
}

/// A variant whose workgroup memory exceeds the adapter's limit (NVIDIA's
/// Vulkan driver gives 48 KiB) is refused before anything runs, with the
/// bytes it needs and the adapter's limit in the error.
#[test]
fn a_variant_over_the_workgroup_budget_is_refused() {
    let gpu = common::gpu();
    let limit = gpu.limits().max_compute_workgroup_storage_size;
    assert!(
        OVER_BUDGET.workgroup_bytes() > limit,
        "lavapipe's limit is {limit}"
    );
    let (a, _) = common::upload(gpu, &common::random(64 * 64, 1), &[64, 64], DType::F16);
    let opts = MatmulOptions::default();
    for math in MATHS {
        let err = matmul_coop_variant(gpu, &a, &a, &opts, &OVER_BUDGET, math)
            .err()
            .unwrap_or_else(|| panic!("{math:?}: a variant over the budget ran"))
            .to_string();
        let needs = OVER_BUDGET.workgroup_bytes().to_string();
        assert!(
            err.contains(&needs) && err.contains(&limit.to_string()),
            "{math:?}: {err}"
        );
    }
}

/// The tensor-core attention at every head dim it holds, causal and not,
/// with key counts off the 32-key tile; the portable twin at every head
/// dim the models use.
#[test]
fn attention_coop_matches_the_reference_at_every_head_dim() {
    let gpu = common::gpu();
    let dtype = DType::F16;
    if !gpu.has_f16() {
        skip("attention_coop", "no f16 storage");
        return;
    }
    let (batch, lq, lk, heads) = (1, 70, 45, 2);
    for head_dim in HEAD_DIMS {
        for causal in [false, true] {
            let seed = 1000 + head_dim as u64 + causal as u64;
            let channels = heads * head_dim;
            let mk = |len: usize, s: u64| {
                common::upload(
                    gpu,
                    &common::random(batch * len * channels, s),
                    &[batch, len, channels],
                    dtype,
                )
            };
            let (q, qv) = mk(lq, seed);
            let (k, kv) = mk(lk, seed + 1);
            let (v, vv) = mk(lk, seed + 2);
            let opts = |kernel| AttentionOptions {
                causal,
                kernel: Some(kernel),
                ..Default::default()
            };
            let want = attention_reference(
                &qv,
                &kv,
                &vv,
                batch,
                lq,
                lk,
                heads,
                &opts(AttentionKernel::Tiled),
            );
            let mut kernels = vec![AttentionKernel::Tiled];
            if attention::coop_supported(gpu, dtype, head_dim) {
                kernels.push(AttentionKernel::Coop);
            } else {
                skip(
                    &format!("attention_coop d{head_dim} causal={causal} (portable twin only)"),
                    "no cooperative matrices here, or no tensor-core variant for this head dim",
                );
            }
            for kernel in kernels {
                let got = attention(gpu, &q, &k, &v, heads, &opts(kernel))
                    .unwrap()
                    .to_f32(gpu)
                    .unwrap();
                let case = format!("attention {kernel:?} d{head_dim} causal={causal}");
                common::assert_close(&case, &got, &want, dtype, head_dim);
            }
        }
    }
}

/// The head dims the flash attention serves: SD's 40/80/160, CLIP's 64,
/// Wan's 128.
const FLASH_HEAD_DIMS: [usize; 5] = [40, 64, 80, 128, 160];

/// q, k, v of one attention case (f16, random), uploaded, with their stored
/// values.
struct AttentionCase {
    q: motif_engine::Tensor,
    k: motif_engine::Tensor,
    v: motif_engine::Tensor,
    lq: usize,
    lk: usize,
    heads: usize,
    want: Vec<f32>,
}

/// Keys grow along the sequence (key j scaled by 1 + 24 j / lk), so that
/// the row maxima keep rising tile after tile by more than the lazy
/// rescale's threshold: every case runs the rescale of O, which random keys
/// of one scale would almost never do.
fn attention_case(
    lq: usize,
    lk: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
) -> AttentionCase {
    let gpu = common::gpu();
    let channels = heads * head_dim;
    let seed = (lq * 31 + lk * 7 + head_dim) as u64 + causal as u64;
    let mk = |len: usize, s: u64, grow: f32| {
        let mut x = common::random(len * channels, s);
        for (j, row) in x.chunks_mut(channels).enumerate() {
            let scale = 1.0 + grow * j as f32 / len as f32;
            row.iter_mut().for_each(|e| *e *= scale);
        }
        common::upload(gpu, &x, &[1, len, channels], DType::F16)
    };
    let (q, qv) = mk(lq, seed, 0.0);
    let (k, kv) = mk(lk, seed + 1, 24.0);
    let (v, vv) = mk(lk, seed + 2, 0.0);
    let opts = AttentionOptions {
        causal,
        ..Default::default()
    };
    let want = attention_reference(&qv, &kv, &vv, 1, lq, lk, heads, &opts);
    AttentionCase {
        q,
        k,
        v,
        lq,
        lk,
        heads,
        want,
    }
}

/// Runs one variant of one flavour on `c` and compares it with the CPU
/// reference.
fn check_flash(c: &AttentionCase, causal: bool, variant: FlashVariant, flavour: Flavour) {
    let gpu = common::gpu();
    let opts = AttentionOptions {
        causal,
        ..Default::default()
    };
    let head_dim = c.q.shape()[2] / c.heads;
    let case = format!(
        "attention {flavour:?} {} d{head_dim} lq{} lk{} causal={causal}",
        variant.describe(),
        c.lq,
        c.lk
    );
    let got = attention_flash(gpu, &c.q, &c.k, &c.v, c.heads, &opts, variant, flavour)
        .unwrap_or_else(|e| panic!("{case}: {e}"))
        .to_f32(gpu)
        .unwrap();
    common::assert_close(&case, &got, &c.want, DType::F16, head_dim);
}

/// The twins this adapter runs at `head_dim` (within its workgroup memory).
fn twin_variants(head_dim: usize) -> Vec<FlashVariant> {
    let limit = common::gpu().limits().max_compute_workgroup_storage_size;
    attention_coop::variants(
        head_dim,
        attention_coop::TWIN_SUBGROUP,
        &FRAGMENTS,
        limit,
        Flavour::Twin,
    )
}

/// The algorithm of the tensor-core flash attention, on its portable twin
/// (same tiles, staging, masking, online softmax and lazy rescale, scalar
/// products) at every head dim the models use, causal and not, with key
/// counts off every tile (77, 333) and queries off the query block: the
/// first (default) variant that fits this adapter.
#[test]
fn attention_flash_twin_matches_the_reference() {
    let gpu = common::gpu();
    if !gpu.has_f16()
        || !gpu
            .features()
            .contains(motif_engine::wgpu::Features::SUBGROUP)
    {
        panic!(
            "the twin needs f16 and subgroups, which lavapipe has: {}",
            gpu.adapter().name
        );
    }
    for head_dim in FLASH_HEAD_DIMS {
        let variant = *twin_variants(head_dim)
            .first()
            .unwrap_or_else(|| panic!("no twin fits this adapter at head dim {head_dim}"));
        for lk in [77, 333] {
            for causal in [false, true] {
                let lq = if causal { lk } else { 70 };
                let c = attention_case(lq, lk, 2, head_dim, causal);
                check_flash(&c, causal, variant, Flavour::Twin);
            }
        }
    }
}

/// A few thousand keys on the twin (many tiles, so the lazy rescale and
/// the running sums carry across them), causal and not.
#[test]
fn attention_flash_twin_matches_the_reference_over_thousands_of_keys() {
    for head_dim in [40, 128] {
        let variant = twin_variants(head_dim)[0];
        for causal in [false, true] {
            let (lq, lk) = if causal { (2100, 2100) } else { (40, 3000) };
            let c = attention_case(lq, lk, 1, head_dim, causal);
            check_flash(&c, causal, variant, Flavour::Twin);
        }
    }
}

/// Every twin variant (fragment shape, subgroups, key tile) that fits this
/// adapter, on one ragged causal case per fragment shape's padding (40 pads
/// to 48 with 16-wide fragments, not with 8-wide ones).
#[test]
fn attention_flash_twin_variants_match_the_reference() {
    for head_dim in [40, 64] {
        let c = attention_case(45, 45, 2, head_dim, true);
        let n = c.q.shape()[1];
        assert_eq!(n, 45);
        for variant in twin_variants(head_dim) {
            check_flash(&c, true, variant, Flavour::Twin);
        }
    }
}

/// Every tensor-core variant this adapter runs, at every head dim, causal
/// and not, ragged key counts, and thousands of keys on the default
/// variant: the same cases as the twin's. Where the adapter has no
/// cooperative matrices each skip is printed; the twins above run instead.
#[test]
fn attention_flash_coop_variants_match_the_reference() {
    let gpu = common::gpu();
    for head_dim in FLASH_HEAD_DIMS {
        let variants = attention_coop::coop_variants(gpu, DType::F16, head_dim);
        if variants.is_empty() {
            skip(
                &format!("attention_coop d{head_dim} (every variant)"),
                "no f16 cooperative matrices with subgroup shuffles here",
            );
        }
        for (i, &variant) in variants.iter().enumerate() {
            for (lq, lk, causal) in [(70, 77, false), (333, 333, true)] {
                let c = attention_case(lq, lk, 2, head_dim, causal);
                check_flash(&c, causal, variant, Flavour::Coop);
            }
            if i == 0 {
                for causal in [false, true] {
                    let c = attention_case(600, 4000, 1, head_dim, causal);
                    check_flash(&c, causal, variant, Flavour::Coop);
                }
                // Past 40,000 keys, the ragged last tile included.
                let c = attention_case(64, 40_077, 1, head_dim, false);
                check_flash(&c, false, variant, Flavour::Coop);
            }
        }
    }
}

/// What a variant cannot run is refused with an error that says why, never
/// run on another kernel: the tensor cores where there are none, a variant
/// above the adapter's workgroup memory, and on a CPU adapter the twin past
/// the keys its loop limit allows.
#[test]
fn attention_flash_refuses_what_it_cannot_run() {
    let gpu = common::gpu();
    let c = attention_case(20, 77, 2, 64, false);
    let opts = AttentionOptions::default();
    let run = |gpu, c: &AttentionCase, variant, flavour| {
        attention_flash(gpu, &c.q, &c.k, &c.v, c.heads, &opts, variant, flavour)
    };
    let default = twin_variants(64)[0];
    let err = run(no_coop_gpu(), &c, default, Flavour::Coop)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("attention") && err.contains("cooperative"),
        "{err}"
    );
    let big = FlashVariant {
        fragment: 16,
        subgroups: 8,
        key_tile: 64,
    };
    let c160 = attention_case(20, 77, 1, 160, false);
    let err = run(gpu, &c160, big, Flavour::Twin).unwrap_err().to_string();
    assert!(err.contains("workgroup memory"), "{err}");
    let long = attention_case(8, 40_077, 1, 64, false);
    match run(gpu, &long, default, Flavour::Twin) {
        Err(e) => {
            assert!(gpu.adapter().is_cpu, "refused on a GPU: {e}");
            assert!(e.to_string().contains("loop limit"), "{e}");
        }
        Ok(got) => {
            assert!(
                !gpu.adapter().is_cpu,
                "a CPU adapter ran past its loop limit"
            );
            let got = got.to_f32(gpu).unwrap();
            common::assert_close("twin, 40,077 keys", &got, &long.want, DType::F16, 64);
        }
    }
}

// ---------------------------------------------------------------------------
// Routing around missing tensor cores.

/// A GPU opened with the tensor cores off (`GpuOptions::no_coop`, what
/// MOTIF_NO_COOP=1 sets), so that these run on every adapter.
fn no_coop_gpu() -> &'static motif_engine::Gpu {
    static GPU: std::sync::OnceLock<motif_engine::Gpu> = std::sync::OnceLock::new();
    GPU.get_or_init(|| {
        motif_engine::Gpu::new(motif_engine::GpuOptions {
            no_coop: true,
            ..Default::default()
        })
        .expect("a GPU adapter (install mesa-vulkan-drivers)")
    })
}

/// With the tensor cores off (MOTIF_NO_COOP's option), whatever the adapter,
/// the default route keeps the portable kernels and the product is right.
#[test]
fn matmul_routes_around_missing_coop_matrices() {
    let gpu = no_coop_gpu();
    assert!(gpu.coop_matrix().is_none());
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
/// with one error naming the op and what the kernel needs; `Auto` keeps the
/// portable kernels.
#[test]
fn conv2d_routes_around_missing_coop_matrices() {
    let gpu = no_coop_gpu();
    let dtype = common::dtypes()[common::dtypes().len() - 1];
    let (xs, ws) = ([1, 3, 5, 6], [4, 3, 3, 3]);
    let (x, xv) = common::upload(gpu, &common::random(90, 3), &xs, dtype);
    let (w, wv) = common::upload(gpu, &common::random(108, 4), &ws, dtype);
    let opts = Conv2dOptions::same(3, 1);
    let err = conv2d_with_kernel(gpu, &x, &w, None, &opts, Conv2dKernel::Coop).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("conv2d") && message.contains("cooperative"),
        "{message}"
    );
    let got = conv2d_with_kernel(gpu, &x, &w, None, &opts, Conv2dKernel::Auto)
        .unwrap()
        .to_f32(gpu)
        .unwrap();
    let want = conv2d_reference(&xv, xs, &wv, ws, None, &opts);
    common::assert_close("conv2d without coop", &got, &want, dtype, 27);
}

/// Attention asked for on tensor cores where there are none, or at a head
/// dim they do not hold, is refused with an error naming the op; the
/// default keeps the portable kernels.
#[test]
fn attention_routes_around_missing_coop_matrices() {
    let gpu = no_coop_gpu();
    let dtype = common::dtypes()[common::dtypes().len() - 1];
    let (batch, lq, lk, heads, d) = (1, 9, 7, 2, 8);
    let mk = |len: usize, s: u64| {
        common::upload(
            gpu,
            &common::random(batch * len * heads * d, s),
            &[batch, len, heads * d],
            dtype,
        )
    };
    let (q, qv) = mk(lq, 5);
    let (k, kv) = mk(lk, 6);
    let (v, vv) = mk(lk, 7);
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
