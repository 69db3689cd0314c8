//! diffusers `ResnetBlock2D` (models/resnet.py), shared by the VAE and the UNet:
//! norm1 → SiLU → conv1 → (+ time embedding) → norm2 → SiLU → conv2, plus the
//! shortcut (1x1 `conv_shortcut` when the channel count changes).

use super::nn::{Conv2d, GroupNorm, Linear};
use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops;
use crate::tensor::Tensor;
use crate::weights::Weights;

pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f32,
}

/// How a resnet block is built (diffusers' constructor arguments).
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `temb_channels`: the time embedding width, or `None` (the VAE).
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f32,
    pub output_scale_factor: f32,
}

impl ResnetBlock2D {
    pub fn new(gpu: &Gpu, w: &Weights, c: &ResnetConfig) -> Result<Self> {
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(Conv2d::new(
                gpu,
                &w.pp("conv_shortcut"),
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
            )?)
        } else {
            None
        };
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(Linear::new(
                gpu,
                &w.pp("time_emb_proj"),
                t,
                c.out_channels,
                true,
            )?),
            None => None,
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::new(gpu, &w.pp("norm1"), c.groups, c.in_channels, c.eps)?,
            conv1: Conv2d::new(gpu, &w.pp("conv1"), c.in_channels, c.out_channels, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::new(gpu, &w.pp("norm2"), c.groups, c.out_channels, c.eps)?,
            conv2: Conv2d::new(gpu, &w.pp("conv2"), c.out_channels, c.out_channels, 3, 1, 1)?,
            conv_shortcut,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// x [N, C, H, W]; `temb` [N, T] (already SiLU'd, as diffusers applies
    /// SiLU to the embedding before `time_emb_proj`) when the block has one.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.norm1.forward(gpu, x, true)?;
        let mut h = self.conv1.forward(gpu, &h)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(gpu, t)?;
            let (n, c) = (t.shape()[0], t.shape()[1]);
            h = ops::add(gpu, &h, &t.reshape(&[n, c, 1, 1])?)?;
        }
        let h = self.norm2.forward(gpu, &h, true)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(gpu, x)?,
            None => x.clone(),
        };
        // diffusers' (shortcut + conv2(h)) / output_scale_factor, in conv2's epilogue.
        self.conv2
            .forward_residual(gpu, &h, &shortcut, 1.0 / self.output_scale_factor)
    }
}
