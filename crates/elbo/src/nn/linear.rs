//! A fully connected layer y = x W^T + b with PyTorch's default initialisation.

use candle_core::{Module, Tensor, Var};

use super::ParamInit;
use crate::Result;

/// y = x W^T + b, W: [out, in], b: [out].
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Var,
    bias: Option<Var>,
}

impl Linear {
    /// A layer initialised as `torch.nn.Linear`: W and b ~ U(-1/sqrt(in), 1/sqrt(in))
    /// (Kaiming-uniform with a = sqrt(5), He et al. 2015).
    pub fn new(p: &mut ParamInit, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        let weight = p.uniform("weight", &[d_out, d_in], bound)?;
        let bias = if bias {
            Some(p.uniform("bias", &[d_out], bound)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// The weight, [out, in].
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// Apply to `x: [..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let y = match x.dims() {
            [b, d] => x.reshape((*b, *d))?.matmul(&w.t()?)?, // [B, out]
            _ => x.broadcast_matmul(&w.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b.as_tensor())?,
            None => y,
        })
    }
}

impl Linear {
    /// The linear part applied to tangents `dx: [K, B, k]` that are non-zero only in the first
    /// `k <= in` inputs: `dx W[:, :k]^T`, `[K, B, out]` (no bias; no autograd graph).
    pub fn jvp(&self, dx: &Tensor) -> Result<Tensor> {
        let (kk, b, k) = dx.dims3()?;
        let w = self.weight.as_tensor().detach();
        let w = if k == w.dim(1)? {
            w
        } else {
            w.narrow(1, 0, k)?
        }; // [out, k]
        let y = dx.reshape((kk * b, k))?.matmul(&w.t()?)?; // [K*B, out]
        Ok(y.reshape((kk, b, ()))?)
    }

    /// The forward pass on detached weights (no autograd graph), `x: [B, in]`.
    pub fn forward_detached(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.as_tensor().detach().t()?)?; // [B, out]
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.as_tensor().detach())?,
            None => y,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
