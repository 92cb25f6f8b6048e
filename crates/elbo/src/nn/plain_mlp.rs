//! A multi-layer perceptron composed of plain candle ops only (matmul, broadcast add, the
//! activation's unary op), so that its input gradient can be differentiated again through
//! `Tensor::backward_create_graph`: the score `-∇_x E(x)` of an energy network enters the
//! denoising score-matching loss (Vincent 2011) and the gradient penalty of a critic. The fused
//! [`super::Mlp`] computes its backward pass as constants and would drop those second-order
//! terms silently.

use candle_core::{Tensor, Var};

use super::{Activation, ParamInit};
use crate::{Error, Result};

/// `d_in -> layers x (Linear(hidden) + act) -> Linear(d_out)`, twice differentiable for
/// smooth activations (SiLU, tanh; ReLU has a zero second derivative).
#[derive(Clone, Debug)]
pub struct PlainMlp {
    weights: Vec<Var>,
    biases: Vec<Var>,
    act: Activation,
}

impl PlainMlp {
    /// Weights `U(-1/√fan_in, 1/√fan_in)` (PyTorch's default) under `p`'s prefix as
    /// `l{i}.weight` / `l{i}.bias`; the read-out scaled by `out_scale` and without a bias (an
    /// energy's constant offset has no gradient under score matching).
    pub fn new(
        p: &mut ParamInit,
        d_in: usize,
        hidden: usize,
        layers: usize,
        d_out: usize,
        act: Activation,
        out_scale: f64,
    ) -> Result<Self> {
        if d_in == 0 || d_out == 0 || (layers > 0 && hidden == 0) {
            return Err(Error::Config(format!(
                "an MLP needs positive widths (in {d_in}, hidden {hidden}, out {d_out})"
            )));
        }
        let mut dims = vec![d_in];
        dims.extend(std::iter::repeat_n(hidden, layers));
        dims.push(d_out);
        let (mut weights, mut biases) = (Vec::new(), Vec::new());
        for (i, w) in dims.windows(2).enumerate() {
            let scale = if i == layers { out_scale } else { 1.0 };
            let bound = scale / (w[0] as f64).sqrt();
            weights.push(p.uniform(&format!("l{i}.weight"), &[w[1], w[0]], bound)?);
            if i < layers {
                biases.push(p.uniform(&format!("l{i}.bias"), &[w[1]], bound)?);
            }
        }
        Ok(Self {
            weights,
            biases,
            act,
        })
    }

    /// The output `[B, d_out]` for `x: [B, d_in]`, recording every op.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let last = self.weights.len() - 1;
        let mut h = x.clone();
        for (i, w) in self.weights.iter().enumerate() {
            h = h.matmul(&w.as_tensor().t()?)?; // [B, out_i]
            if i < last {
                h = self
                    .act
                    .apply(&h.broadcast_add(self.biases[i].as_tensor())?)?;
            }
        }
        Ok(h)
    }
}
