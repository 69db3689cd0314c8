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
