//! The small building blocks every model shares (PyTorch's `nn.Linear`,
//! `nn.LayerNorm`, ...), each loaded from its key path.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::ops::{self, Activation};
use crate::tensor::Tensor;
use crate::weights::Weights;

/// `nn.Linear(in, out, bias)`: weight [out, in], bias [out].
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.tensor(gpu, "weight", &[out_features, in_features])?;
        let bias = if bias {
            Some(w.tensor(gpu, "bias", &[out_features])?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        self.forward_act(gpu, x, Activation::None)
    }

    /// The linear layer with an activation fused into its epilogue.
    pub fn forward_act(&self, gpu: &Gpu, x: &Tensor, act: Activation) -> Result<Tensor> {
        ops::matmul::linear(gpu, x, &self.weight, self.bias.as_ref(), act)
    }

    /// GEGLU of the layer's output halves, `value * gelu(gate)`, fused into
    /// the product where the adapter's kernel allows it
    /// ([`ops::matmul::linear_geglu`]).
    pub fn forward_geglu(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        ops::matmul::linear_geglu(gpu, x, &self.weight, self.bias.as_ref())
    }

    /// `self(x) · scale + residual` in one pass: the layer that ends a
    /// residual block, the skip connection added in its epilogue.
    pub fn forward_residual(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        residual: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        let act = Activation::None;
        ops::matmul::linear_residual(gpu, x, &self.weight, bias, act, Some(residual), scale)
    }

    /// `self(x) · scale`, the scale applied in the epilogue.
    pub fn forward_scaled(&self, gpu: &Gpu, x: &Tensor, scale: f32) -> Result<Tensor> {
        let bias = self.bias.as_ref();
        let act = Activation::None;
        ops::matmul::linear_residual(gpu, x, &self.weight, bias, act, None, scale)
    }
}

/// `nn.LayerNorm(dim, eps)` with affine weight and bias.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f32,
}

impl LayerNorm {
    pub fn new(gpu: &Gpu, w: &Weights, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: w.tensor(gpu, "weight", &[dim])?,
            bias: w.tensor(gpu, "bias", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        ops::norm::layer_norm(gpu, x, Some(&self.weight), Some(&self.bias), self.eps)
    }
}

/// `nn.Embedding(num, dim)`.
pub struct Embedding {
    pub weight: Tensor,
}

impl Embedding {
    pub fn new(gpu: &Gpu, w: &Weights, num: usize, dim: usize) -> Result<Self> {
        Ok(Embedding {
            weight: w.tensor(gpu, "weight", &[num, dim])?,
        })
    }

    pub fn forward(&self, gpu: &Gpu, ids: &[u32]) -> Result<Tensor> {
        ops::embedding::embedding(gpu, &self.weight, ids)
    }
}

/// `nn.Conv2d(in, out, k, stride, padding)` with bias: weight [out, in, k, k].
/// Every Conv2d of the models here has a bias in diffusers (`bias=True`,
/// PyTorch's default), so a file without one is refused, not run without.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub opts: ops::conv2d::Conv2dOptions,
}

impl Conv2d {
    pub fn new(
        gpu: &Gpu,
        w: &Weights,
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            weight: w.tensor(gpu, "weight", &[cout, cin, kernel, kernel])?,
            bias: w.tensor(gpu, "bias", &[cout])?,
            opts: ops::conv2d::Conv2dOptions {
                stride,
                padding: [padding; 4],
                activation: Activation::None,
            },
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        ops::conv2d::conv2d(gpu, x, &self.weight, Some(&self.bias), &self.opts)
    }

    /// `(self(x) + residual) · scale` in one pass (see
    /// [`ops::conv2d::Conv2dResidual`]).
    pub fn forward_residual(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        residual: &Tensor,
        scale: f32,
    ) -> Result<Tensor> {
        let r = ops::conv2d::Conv2dResidual { residual, scale };
        ops::conv2d::conv2d_residual(gpu, x, &self.weight, Some(&self.bias), &self.opts, &r)
    }
}

/// `nn.GroupNorm(groups, channels, eps)` with affine weight and bias.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn new(gpu: &Gpu, w: &Weights, groups: usize, channels: usize, eps: f32) -> Result<Self> {
        Ok(GroupNorm {
            weight: w.tensor(gpu, "weight", &[channels])?,
            bias: w.tensor(gpu, "bias", &[channels])?,
            groups,
            eps,
        })
    }

    /// Normalises x [N, C, ...], with SiLU fused when `silu`.
    pub fn forward(&self, gpu: &Gpu, x: &Tensor, silu: bool) -> Result<Tensor> {
        ops::norm::group_norm(
            gpu,
            x,
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            silu,
        )
    }
}

/// RMSNorm with a weight and no bias (T5's `T5LayerNorm`, `torch.nn.RMSNorm`
/// with elementwise_affine): `x / sqrt(mean(x²) + eps) · weight`.
pub struct RmsNorm {
    pub weight: Tensor,
    pub eps: f32,
}

impl RmsNorm {
    pub fn new(gpu: &Gpu, w: &Weights, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: w.tensor(gpu, "weight", &[dim])?,
            eps,
        })
    }

    pub fn forward(&self, gpu: &Gpu, x: &Tensor) -> Result<Tensor> {
        ops::norm::rms_norm(gpu, x, Some(&self.weight), self.eps)
    }
}
