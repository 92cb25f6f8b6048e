//! Multi-layer perceptron: `n_hidden` x (Linear + activation), then a linear read-out.
//!
//! With SiLU on CPU `f32`, each hidden layer is one fused op (GEMM, bias, SiLU and their
//! backward pass; see [`super::fused`]).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::fused::FusedAct;
use super::{Linear, ParamInit};
use crate::Result;

/// Hidden-layer non-linearity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// x * sigmoid(x) (Elfwing et al. 2018; "swish").
    #[default]
    Silu,
    /// tanh(x).
    Tanh,
    /// max(x, 0).
    Relu,
}

impl Activation {
    /// Apply the activation (every variant records gradients).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Silu => x.silu()?,
            Activation::Tanh => x.tanh()?,
            Activation::Relu => x.relu()?,
        })
    }

    /// The activation and its derivative at `z` (no autograd graph).
    pub fn value_and_derivative(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Activation::Silu => {
                // silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)
                let s = candle_nn::ops::sigmoid(z)?;
                let d = (&s * ((z * (1.0 - &s)?)? + 1.0)?)?;
                ((z * &s)?, d)
            }
            Activation::Tanh => {
                let y = z.tanh()?;
                let d = (1.0 - y.sqr()?)?;
                (y, d)
            }
            Activation::Relu => (z.relu()?, z.gt(0.0)?.to_dtype(z.dtype())?),
        })
    }
}

/// `d_in -> n_hidden x (Linear(width) + act) -> Linear(d_out)`.
#[derive(Clone, Debug)]
pub struct Mlp {
    hidden: Vec<Linear>,
    out: Linear,
    act: Activation,
}

impl Mlp {
    /// Parameters are named `hidden.{i}.weight`, `hidden.{i}.bias`, `out.weight`, `out.bias`
    /// under the factory's prefix.
    pub fn new(
        p: &mut ParamInit,
        d_in: usize,
        width: usize,
        n_hidden: usize,
        d_out: usize,
        act: Activation,
    ) -> Result<Self> {
        // PyTorch's read-out bound 1/sqrt(width), the same draws in the same order
        Self::with_output_scale(p, d_in, width, n_hidden, d_out, act, 1.0)
    }

    /// As [`Mlp::new`], with the read-out's initial weights scaled by `out_scale` (PyTorch's
    /// bound `1/sqrt(width)` times `out_scale`): a network whose output starts near zero.
    pub fn with_output_scale(
        p: &mut ParamInit,
        d_in: usize,
        width: usize,
        n_hidden: usize,
        d_out: usize,
        act: Activation,
        out_scale: f64,
    ) -> Result<Self> {
        let mut hidden = Vec::with_capacity(n_hidden);
        let mut d = d_in;
        for i in 0..n_hidden {
            hidden.push(Linear::new(
                &mut p.push(&format!("hidden.{i}")),
                d,
                width,
                true,
            )?);
            d = width;
        }
        let bound = out_scale / (d.max(1) as f64).sqrt();
        let out = Linear::with_bound(&mut p.push("out"), d, d_out, bound)?;
        Ok(Self { hidden, out, act })
    }

    /// The hidden layers and the read-out.
    pub fn layers(&self) -> (&[Linear], &Linear) {
        (&self.hidden, &self.out)
    }

    /// The hidden-layer activation.
    pub fn activation(&self) -> Activation {
        self.act
    }

    /// Forward-mode Jacobian-vector products: returns `(f(x), J_f(x) u_k)` for `x: [B, d_in]`
    /// and tangents `u: [K, B, k]` that are non-zero only in the first `k <= d_in` inputs
    /// (e.g. the data coordinates, not the time embedding). Computed on detached weights.
    pub fn jvp(&self, x: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = x.detach();
        let mut dh = u.detach();
        for l in &self.hidden {
            let z = l.forward_detached(&h)?; // [B, H]
            let dz = l.jvp(&dh)?; // [K, B, H]
            let (a, da) = self.act.value_and_derivative(&z)?;
            dh = dz.broadcast_mul(&da)?; // [K, B, H]
            h = a;
        }
        Ok((self.out.forward_detached(&h)?, self.out.jvp(&dh)?))
    }

    /// `x: [B, d_in]` -> `[B, d_out]`, recording gradients.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.hidden {
            h = match self.act {
                Activation::Silu => l.forward_silu(&h)?,
                act => act.apply(&l.forward(&h)?)?,
            };
        }
        self.out.forward(&h)
    }

    /// `x: [B, d_in]` -> `[B, d_out]` with no autograd graph (weights treated as constants,
    /// nothing saved for a backward pass): the path for sampling and evaluation. Same values as
    /// [`Mlp::forward`].
    pub fn forward_inference(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.detach();
        for l in &self.hidden {
            h = match self.act {
                Activation::Silu => l.forward_inference(&h, FusedAct::Silu)?,
                act => act.apply(&l.forward_inference(&h, FusedAct::Identity)?)?,
            };
        }
        self.out.forward_inference(&h, FusedAct::Identity)
    }
}
