//! Multi-layer perceptron: `n_hidden` x (Linear + activation), then a linear read-out.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

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
        let out = Linear::new(&mut p.push("out"), d, d_out, true)?;
        Ok(Self { hidden, out, act })
    }

    /// `x: [B, d_in]` -> `[B, d_out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.hidden {
            h = self.act.apply(&l.forward(&h)?)?;
        }
        self.out.forward(&h)
    }
}
