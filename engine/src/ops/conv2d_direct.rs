//! The direct 3x3 convolution of CPU adapters (`shaders/conv2d_direct.wgsl`
//! says how and why): stride 1, padding 1, rows a multiple of 4 values wide.
//! ops/conv2d.rs routes to it; this module only runs it.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use super::matmul::{Epilogue, Packed, BLOCK_WORDS};
use super::params_bytes;
use crate::error::{EngineError, Result};
use crate::gpu::{Gpu, Kernel};
use crate::tensor::Tensor;

/// conv2d.wgsl first: the direct kernel uses its activation, its `wst`
/// alias and its `bias` and `wt` bindings.
const SOURCE: &str = concat!(
    "alias wst = st;\n",
    include_str!("../../../shaders/conv2d.wgsl"),
    include_str!("../../../shaders/conv2d_direct.wgsl")
);
const SOURCE_F32_WEIGHTS: &str = concat!(
    "alias wst = f32;\n",
    include_str!("../../../shaders/conv2d.wgsl"),
    include_str!("../../../shaders/conv2d_direct.wgsl")
);

/// Output channels per invocation: `conv3x3_direct` takes 8,
/// `conv3x3_direct16` (and `conv3x3_direct16_rows2`, two output rows per
/// invocation) twice that where the output channels come in whole groups of
/// 16 (each input value read then serves twice the products).
const GROUP: usize = 8;
const WIDE_GROUP: usize = 16;
/// Taps of a 3x3 kernel.
const TAPS: usize = 9;
/// Invocations per workgroup of both entry points.
const WORKGROUP: usize = 64;
const MAX_GROUPS: usize = 65535;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct DirectParams {
    cin: u32,
    h: u32,
    w: u32,
    cout: u32,
    x_off: u32,
    x_bstride: u32,
    out_off: u32,
    o_bstride: u32,
    bias_off: u32,
    has_bias: u32,
    res_off: u32,
    has_residual: u32,
    scale: f32,
    residual_scale: f32,
    co0: u32,
    cout_all: u32,
    w_off: u32,
    group: u32,
    _pad1: u32,
    _pad2: u32,
}

/// The convolution's sizes: `x [n, cin, h, w]`, `weight [cout, cin, 3, 3]`,
/// output `[n, cout, h, w]`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DirectDims {
    pub n: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
}

impl DirectDims {
    /// Output channels per invocation: 16 where they come in whole groups of
    /// 16 and a group's weights fit a block, else 8.
    fn group(&self) -> usize {
        if self.cout.is_multiple_of(WIDE_GROUP) && self.cin * TAPS * WIDE_GROUP <= BLOCK_WORDS {
            WIDE_GROUP
        } else {
            GROUP
        }
    }

    /// Output channels per weight block (one dispatch each): whole groups
    /// whose weights fit one 64 KiB uniform block.
    fn block_channels(&self) -> usize {
        let group = self.group();
        BLOCK_WORDS / (self.cin * TAPS * group) * group
    }
}

/// Whether the direct kernel takes these operands at all (the shape rule of
/// where it is the faster one is ops/conv2d.rs's routing): an input item
/// and an output item each fit one binding, whole vec4 rows, and the
/// weights of at least one group of 8 output channels fit a uniform block.
pub(crate) fn direct_fits(gpu: &Gpu, x: &Tensor, d: &DirectDims) -> bool {
    let max = Tensor::max_window_elems(gpu, x.dtype());
    d.w.is_multiple_of(4)
        && d.cin > 0
        && d.block_channels() >= GROUP
        && d.cin * d.h * d.w <= max
        && d.cout * d.h * d.w <= max
        && (d.h * d.w / 4).div_ceil(WORKGROUP) <= MAX_GROUPS
        && gpu.storage_offset_alignment().is_multiple_of(16)
        && gpu.features().contains(wgpu::Features::SUBGROUP)
        && gpu.adapter_info().subgroup_min_size == 8
        && gpu.adapter_info().subgroup_max_size == 8
        && gpu.limits().max_uniform_buffer_binding_size >= (BLOCK_WORDS * 4) as u64
}

/// `out = epilogue(conv3x3(x, weight))` with stride 1 and padding 1; the
/// caller checked [`direct_fits`].
pub(crate) fn run_direct(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    e: &Epilogue,
    d: &DirectDims,
    out: &Tensor,
) -> Result<()> {
    let dtype = x.dtype();
    let (op, source) = if weight.dtype() != dtype {
        ("conv2d_direct_f32_weights", SOURCE_F32_WEIGHTS)
    } else {
        ("conv2d_direct", SOURCE)
    };
    let kernel = |entry| Kernel {
        op,
        source,
        entry,
        dtype,
        constants: vec![("ACT", e.activation.code())],
    };
    let group = d.group();
    let block = d.block_channels();
    let blocks = d.cout.div_ceil(block);
    let pack = || -> Result<Packed> {
        // One 64 KiB block per group of output channels (Packed's blocks,
        // with the direct kernel's layout inside).
        let packed = Packed::alloc(gpu, 1, blocks, 1, BLOCK_WORDS)?;
        let k = Kernel {
            constants: Vec::new(),
            ..kernel("pack_weights_direct")
        };
        for b in 0..blocks {
            let channels = block.min(d.cout - b * block).next_multiple_of(group);
            let p = DirectParams {
                cin: d.cin as u32,
                cout: channels as u32,
                co0: (b * block) as u32,
                cout_all: d.cout as u32,
                group: group as u32,
                ..Default::default()
            };
            let vec4s = channels * d.cin * TAPS / 4;
            gpu.dispatch(
                &k,
                params_bytes(&p),
                &[(2, weight.binding()), (24, packed.blocks(b, 1))],
                [vec4s.div_ceil(WORKGROUP) as u32, 1, 1],
            )?;
        }
        Ok(packed)
    };
    let weights: Arc<Packed> = if weight.is_constant() {
        weight.derived(
            ("conv2d_direct pack_weights", vec![d.cout, d.cin, group]),
            pack,
        )?
    } else {
        Arc::new(pack()?)
    };
    let plane = d.h * d.w;
    let (x_item, o_item) = (d.cin * plane, d.cout * plane);
    let max = Tensor::max_window_elems(gpu, dtype);
    let items = (max / x_item).min(max / o_item).clamp(1, MAX_GROUPS);
    // Output rows per invocation: two where the 16-channel kernel runs on
    // an even height (each input row and weight read serves both) and half
    // the plane still fills a workgroup. Measured against one row (GPU time,
    // 16 frames, three alternating runs, docs/PERFORMANCE.md): 13-32 % less
    // from 32x32 to 128x128, but slower at 16x16, where half a plane leaves
    // half the workgroup idle.
    let rows = if group == WIDE_GROUP && d.h.is_multiple_of(2) && d.h / 2 * (d.w / 4) >= WORKGROUP {
        2
    } else {
        1
    };
    let conv = kernel(match (group, rows) {
        (WIDE_GROUP, 2) => "conv3x3_direct16_rows2",
        (WIDE_GROUP, _) => "conv3x3_direct16",
        _ => "conv3x3_direct",
    });
    for z0 in (0..d.n).step_by(items) {
        // Batch items of this dispatch (z).
        let batch = items.min(d.n - z0);
        let (xb, x_off) = x.window(gpu, z0 * x_item, batch * x_item);
        for b in 0..blocks {
            let co0 = b * block;
            let channels = block.min(d.cout - co0);
            let o_start = z0 * o_item + co0 * plane;
            let o_count = (batch - 1) * o_item + channels * plane;
            let (ob, out_off) = out.window(gpu, o_start, o_count);
            let (bb, bias_off) = match e.bias {
                Some(bias) => bias.window(gpu, co0, channels),
                None => (xb, 0),
            };
            let (rb, res_off) = e.residual_window(gpu, o_start, o_count, xb);
            if [x_off, out_off, res_off].iter().any(|o| o % 4 != 0) {
                return Err(EngineError::Argument {
                    op: "conv2d",
                    message: format!(
                        "the direct kernel needs windows at whole vec4s (offsets {x_off}, \
                         {out_off}, {res_off} values)"
                    ),
                });
            }
            let p = DirectParams {
                cin: d.cin as u32,
                h: d.h as u32,
                w: d.w as u32,
                cout: channels as u32,
                x_off,
                x_bstride: x_item as u32,
                out_off,
                o_bstride: o_item as u32,
                bias_off,
                has_bias: e.bias.is_some() as u32,
                res_off,
                has_residual: e.residual.is_some() as u32,
                scale: e.scale,
                residual_scale: e.residual_scale,
                ..Default::default()
            };
            gpu.dispatch(
                &conv,
                params_bytes(&p),
                &[
                    (20, xb),
                    (21, ob),
                    (22, weights.blocks(b, 1)),
                    (3, bb),
                    (23, rb),
                ],
                [
                    (plane / 4 / rows).div_ceil(WORKGROUP) as u32,
                    channels.div_ceil(group) as u32,
                    batch as u32,
                ],
            )?;
        }
    }
    Ok(())
}
