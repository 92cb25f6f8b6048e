//! A fully connected layer y = x W^T + b with PyTorch's default initialisation.
//!
//! On the CPU with `f32` tensors the affine map (and an optional SiLU) runs as one fused custom
//! op ([`super::fused::linear_act`]); elsewhere it is composed from candle ops.

use candle_core::{Module, Tensor, Var};

use super::fused::{self, FusedAct};
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

    /// A layer whose weight and bias are drawn from U(-bound, bound): a small `bound` makes a
    /// read-out that starts near zero, as the last layer of a flow's coupling network (Kingma &
    /// Dhariwal 2018, sec. 3.3, start each coupling near the identity) while every weight still
    /// receives a gradient.
    pub fn with_bound(p: &mut ParamInit, d_in: usize, d_out: usize, bound: f64) -> Result<Self> {
        Ok(Self {
            weight: p.uniform("weight", &[d_out, d_in], bound)?,
            bias: Some(p.uniform("bias", &[d_out], bound)?),
        })
    }

    /// The weight, [out, in].
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The bias, [out], if the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref().map(|b| b.as_tensor())
    }

    /// Apply to `x: [..., in]`, giving `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, FusedAct::Identity, true)
    }

    /// `silu(x W^T + b)` for `x: [..., in]`, fused into one op (with its backward pass) on CPU
    /// `f32`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, FusedAct::Silu, true)
    }

    /// `act(x W^T + b)` for `x: [..., in]` without an autograd graph (for sampling and
    /// evaluation; the weights are treated as constants).
    pub fn forward_inference(&self, x: &Tensor, act: FusedAct) -> Result<Tensor> {
        self.forward_act(x, act, false)
    }

    /// `act(x W^T + b)`; `graph` says whether to record gradients. Inputs of rank > 2 are
    /// flattened to `[N, in]` when contiguous (free) so they take the fused path too.
    fn forward_act(&self, x: &Tensor, act: FusedAct, graph: bool) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let flat = match (&self.bias, x.rank()) {
            (Some(_), 2) => Some(x.clone()),
            (Some(_), r) if r > 2 && x.is_contiguous() => Some(x.flatten_to(r - 2)?),
            _ => None,
        };
        if let (Some(b), Some(x2)) = (&self.bias, flat) {
            let y = if graph {
                fused::linear_act(&x2, w, b.as_tensor(), act)?
            } else {
                fused::linear_act_inference(&x2, w, b.as_tensor(), act)?
            };
            return Ok(if x.rank() == 2 {
                y
            } else {
                let mut dims = x.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = w.dim(0)?;
                }
                y.reshape(dims)?
            });
        }
        // No bias, or a non-contiguous input of rank > 2: compose candle ops.
        let (x, w) = if graph {
            (x.clone(), w.clone())
        } else {
            (x.detach(), w.detach())
        };
        let y = match x.dims() {
            [_, _] => x.matmul(&w.t()?)?, // [B, out]
            _ => x.broadcast_matmul(&w.t()?)?,
        };
        let y = match &self.bias {
            Some(b) if graph => y.broadcast_add(b.as_tensor())?,
            Some(b) => y.broadcast_add(&b.as_tensor().detach())?,
            None => y,
        };
        Ok(match act {
            FusedAct::Identity => y,
            FusedAct::Silu => y.silu()?,
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
        self.forward_inference(x, FusedAct::Identity)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        Linear::forward(self, x).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}
