//! Preview frames straight into textures (`shaders/preview.wgsl`): the x0
//! latents through a linear latent-to-RGB projection, written as RGBA8 and
//! copied on the GPU into one texture layer per frame. A window on the same
//! device draws the layers as they are: the frames never visit the CPU.
//!
//! The shader writes a storage buffer that a `copy_buffer_to_texture`
//! moves into the texture, rather than a storage texture: every operator
//! dispatch in the engine binds buffers only, and the copy is one command
//! in the same stream.

use std::sync::atomic::{AtomicU64, Ordering};

use bytemuck::{Pod, Zeroable};

use super::{check_rank, params_bytes};
use crate::error::{EngineError, Result};
use crate::gpu::{DType, Gpu, Kernel};
use crate::tensor::{fmt_shape, Tensor};

const SOURCE: &str = include_str!("../../../shaders/preview.wgsl");
/// Must match WG_X and WG_Y in the shader.
const WG: u32 = 8;
const TEXEL_BYTES: u32 = 4;

#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable, Default)]
struct Params {
    channels: u32,
    frames: u32,
    height: u32,
    width: u32,
    row_texels: u32,
    _pad: [u32; 3],
}

/// Preview frames kept on the GPU: one `Rgba8Unorm` texture with a layer
/// per frame (bytes as the CPU preview would have them, which is what egui
/// expects of a texture it draws), and a 2-D view of each layer.
#[derive(Debug, Clone)]
pub struct FrameTextures {
    pub texture: wgpu::Texture,
    /// One view per frame, for drawing.
    pub views: Vec<wgpu::TextureView>,
    pub width: usize,
    pub height: usize,
    /// Different for every allocation: tells a window that it holds new
    /// textures to register (the contents change in place every step).
    pub id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Padded row length: a buffer ↔ texture copy needs rows of a multiple of
/// 256 bytes.
fn row_texels(width: usize) -> u32 {
    let align = wgpu::COPY_BYTES_PER_ROW_ALIGNMENT / TEXEL_BYTES;
    (width as u32).div_ceil(align) * align
}

impl FrameTextures {
    /// Textures for `frames` frames of `width` x `height`.
    pub fn new(gpu: &Gpu, width: usize, height: usize, frames: usize) -> Result<Self> {
        let limits = gpu.limits();
        if width == 0 || height == 0 || frames == 0 {
            return Err(EngineError::Argument {
                op: "preview",
                message: format!("no preview frames for {frames} frames of {width}x{height}"),
            });
        }
        let side = limits.max_texture_dimension_2d as usize;
        let layers = limits.max_texture_array_layers as usize;
        if width > side || height > side || frames > layers {
            return Err(EngineError::Argument {
                op: "preview",
                message: format!(
                    "{frames} preview frames of {width}x{height} exceed the adapter's textures \
                     ({side}x{side}, {layers} layers)"
                ),
            });
        }
        let texture = gpu.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("motif preview frames"),
            size: wgpu::Extent3d {
                width: width as u32,
                height: height as u32,
                depth_or_array_layers: frames as u32,
            },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format: wgpu::TextureFormat::Rgba8Unorm,
            usage: wgpu::TextureUsages::TEXTURE_BINDING
                | wgpu::TextureUsages::COPY_DST
                | wgpu::TextureUsages::COPY_SRC,
            view_formats: &[],
        });
        let views = (0..frames as u32)
            .map(|layer| {
                texture.create_view(&wgpu::TextureViewDescriptor {
                    label: Some("motif preview frame"),
                    dimension: Some(wgpu::TextureViewDimension::D2),
                    base_array_layer: layer,
                    array_layer_count: Some(1),
                    ..Default::default()
                })
            })
            .collect();
        Ok(FrameTextures {
            texture,
            views,
            width,
            height,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    pub fn frames(&self) -> usize {
        self.views.len()
    }

    fn copy_layout(&self) -> (wgpu::TexelCopyBufferLayout, wgpu::Extent3d) {
        (
            wgpu::TexelCopyBufferLayout {
                offset: 0,
                bytes_per_row: Some(row_texels(self.width) * TEXEL_BYTES),
                rows_per_image: Some(self.height as u32),
            },
            self.texture.size(),
        )
    }

    /// Reads the frames back as RGBA8, one `Vec` per frame (waits for the
    /// GPU). For tests: the viewer never reads them.
    pub fn read_rgba(&self, gpu: &Gpu) -> Result<Vec<Vec<u8>>> {
        let row = row_texels(self.width) as usize;
        let staging = Tensor::empty(gpu, &[self.frames() * self.height * row], DType::F32)?;
        let (layout, size) = self.copy_layout();
        gpu.record(|enc| {
            enc.copy_texture_to_buffer(
                self.texture.as_image_copy(),
                wgpu::TexelCopyBufferInfo {
                    buffer: staging.buffer(),
                    layout,
                },
                size,
            )
        });
        let bytes = gpu.read(staging.buffer(), 0, staging.size_bytes())?;
        let row_bytes = row * TEXEL_BYTES as usize;
        Ok(bytes
            .chunks(self.height * row_bytes)
            .map(|frame| {
                frame
                    .chunks(row_bytes)
                    .flat_map(|r| &r[..self.width * TEXEL_BYTES as usize])
                    .copied()
                    .collect()
            })
            .collect())
    }
}

/// x0 `latents` [C, F, h, w] (f32) → RGB through `projection` (C rows of
/// r, g, b weights) plus `bias`, mapped from [-1, 1] to bytes, into
/// `target`'s layers. Submits the work (does not wait).
pub fn latent_rgb_to_textures(
    gpu: &Gpu,
    latents: &Tensor,
    projection: &[[f32; 3]],
    bias: [f32; 3],
    target: &FrameTextures,
) -> Result<()> {
    check_rank("preview", "latents [C, F, h, w]", latents, 4)?;
    let [c, f, h, w] = [0, 1, 2, 3].map(|i| latents.shape()[i]);
    if latents.dtype() != DType::F32 {
        return Err(EngineError::DType {
            op: "preview",
            expected: DType::F32.to_string(),
            found: latents.dtype().to_string(),
        });
    }
    if c != projection.len() || (f, h, w) != (target.frames(), target.height, target.width) {
        return Err(EngineError::Shape {
            op: "preview",
            expected: format!(
                "latents [{}, {}, {}, {}] (projection rows, target frames and size)",
                projection.len(),
                target.frames(),
                target.height,
                target.width
            ),
            found: fmt_shape(latents.shape()),
        });
    }
    if gpu.is_plan() {
        return Ok(());
    }
    let row = row_texels(w);
    let proj: Vec<f32> = projection
        .iter()
        .flatten()
        .chain(bias.iter())
        .copied()
        .collect();
    let proj = Tensor::from_f32(gpu, &proj, &[proj.len()], DType::F32)?;
    let texels = Tensor::empty(gpu, &[f * h * row as usize], DType::F32)?;
    let p = Params {
        channels: c as u32,
        frames: f as u32,
        height: h as u32,
        width: w as u32,
        row_texels: row,
        ..Default::default()
    };
    let k = Kernel {
        op: "preview",
        source: SOURCE,
        entry: "latent_rgb",
        dtype: DType::F32,
        constants: vec![],
    };
    gpu.dispatch(
        &k,
        params_bytes(&p),
        &[
            (1, latents.binding()),
            (2, proj.binding()),
            (3, texels.binding()),
        ],
        [(w as u32).div_ceil(WG), (h as u32).div_ceil(WG), f as u32],
    )?;
    let (layout, size) = target.copy_layout();
    gpu.record(|enc| {
        enc.copy_buffer_to_texture(
            wgpu::TexelCopyBufferInfo {
                buffer: texels.buffer(),
                layout,
            },
            target.texture.as_image_copy(),
            size,
        )
    });
    gpu.flush()
}
