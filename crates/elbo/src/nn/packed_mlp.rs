//! An [`Mlp`] frozen and packed for sampling: no autograd graph, no per-call repacking of the
//! weights, bias and activation fused into the GEMM, and a shared-condition shortcut.
//!
//! Samplers call a time-conditioned network `f(concat(x, e(t)))` hundreds of times with one `t`
//! for every row. The first layer's product then splits as `x W_x^T + (W_t e(t) + b)`: the
//! second term is one matrix-vector product per call, folded into the bias, instead of
//! `rows` copies of it (for DDPM's digits MLP, 128 of the first layer's 192 input columns, 5%
//! of the network's arithmetic). The values are those of [`Mlp::forward`] up to float rounding.

use std::sync::Mutex;

use candle_core::{DType, Device, Tensor};

use super::fused::{FusedAct, PackedLinear};
use super::{sinusoidal_embedding, Activation, Linear, Mlp};
use crate::{Error, Result};

/// A snapshot of an [`Mlp`]'s weights packed for [`PackedMlp::forward`] (CPU, `f32`).
#[derive(Debug)]
pub struct PackedMlp {
    /// Hidden layers then the read-out; the first takes only the per-row inputs.
    layers: Vec<PackedLinear>,
    /// The first layer's weights on the shared inputs, `[out, shared]` row-major.
    w_shared: Vec<f32>,
    shared: usize,
    /// Two activation buffers reused across calls.
    scratch: Mutex<(Vec<f32>, Vec<f32>)>,
}

/// `W: [out, in]` and `b: [out]` of a layer as row-major vectors.
fn weights(l: &Linear) -> Result<(Vec<f32>, Vec<f32>, usize, usize)> {
    let w = l.weight().to_dtype(DType::F32)?;
    let (o, i) = w.dims2()?;
    let b = match l.bias() {
        Some(b) => b.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        None => vec![0.0; o],
    };
    Ok((w.flatten_all()?.to_vec1::<f32>()?, b, o, i))
}

impl PackedMlp {
    /// Pack the current weights of `mlp`, whose last `shared` inputs will be given once per
    /// call for all rows. `None` when the activation has no fused kernel (tanh, ReLU): use
    /// [`Mlp::forward_inference`] then.
    pub fn new(mlp: &Mlp, shared: usize) -> Result<Option<Self>> {
        if mlp.activation() != Activation::Silu {
            return Ok(None);
        }
        let (hidden, out) = mlp.layers();
        let mut layers = Vec::with_capacity(hidden.len() + 1);
        let mut w_shared = Vec::new();
        for (i, l) in hidden.iter().chain(std::iter::once(out)).enumerate() {
            let (w, b, o, d_in) = weights(l)?;
            if i > 0 || shared == 0 {
                layers.push(PackedLinear::new(&w, &b, o, d_in)?);
                continue;
            }
            if shared > d_in {
                return Err(Error::Shape(format!(
                    "packed MLP: {shared} shared inputs but the first layer takes {d_in}"
                )));
            }
            let own = d_in - shared;
            let mut w_own = Vec::with_capacity(o * own);
            w_shared.reserve(o * shared);
            for row in w.chunks_exact(d_in) {
                w_own.extend_from_slice(&row[..own]);
                w_shared.extend_from_slice(&row[own..]);
            }
            layers.push(PackedLinear::new(&w_own, &b, o, own)?);
        }
        Ok(Some(Self {
            layers,
            w_shared,
            shared,
            scratch: Mutex::new((Vec::new(), Vec::new())),
        }))
    }

    /// Per-row input width (the inputs not shared).
    pub fn d_in(&self) -> usize {
        self.layers.first().map_or(0, |l| l.d_in())
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.layers.last().map_or(0, |l| l.d_out())
    }

    /// `f(concat(x_r, s))` for every row `x_r` of row-major `x: [rows, d_in]` and the shared
    /// inputs `s` -> `[rows, d_out]` row-major.
    pub fn forward(&self, x: &[f32], s: &[f32]) -> Result<Vec<f32>> {
        let d_in = self.d_in();
        if s.len() != self.shared || d_in == 0 || !x.len().is_multiple_of(d_in) {
            return Err(Error::Shape(format!(
                "packed MLP takes rows of {d_in} and {} shared inputs, got {} values and {}",
                self.shared,
                x.len(),
                s.len()
            )));
        }
        let rows = x.len() / d_in;
        let first = &self.layers[0];
        // b + W_t s, once for all rows
        let mut bias0 = first.bias().to_vec();
        if self.shared > 0 {
            for (bv, wr) in bias0
                .iter_mut()
                .zip(self.w_shared.chunks_exact(self.shared))
            {
                *bv += wr.iter().zip(s).map(|(w, v)| w * v).sum::<f32>();
            }
        }
        // two activation buffers, reused across calls (fresh ones for a concurrent call)
        let (mut cur, mut nxt) = match self.scratch.try_lock() {
            Ok(mut g) => std::mem::take(&mut *g),
            Err(_) => (Vec::new(), Vec::new()),
        };
        let last = self.layers.len() - 1;
        let mut out = vec![0f32; rows * self.d_out()];
        for (i, l) in self.layers.iter().enumerate() {
            let bias = (i == 0).then_some(bias0.as_slice());
            let input: &[f32] = if i == 0 { x } else { &cur };
            if i == last {
                l.forward(input, &mut out, FusedAct::Identity.into(), bias);
                break;
            }
            nxt.resize(rows * l.d_out(), 0.0);
            l.forward(input, &mut nxt, FusedAct::Silu.into(), bias);
            std::mem::swap(&mut cur, &mut nxt);
        }
        if let Ok(mut g) = self.scratch.try_lock() {
            *g = (cur, nxt);
        }
        Ok(out)
    }

    /// [`PackedMlp::forward`] on a `[rows, d_in]` tensor, giving a CPU `f32` `[rows, d_out]`.
    pub fn forward_tensor(&self, x: &Tensor, s: &[f32]) -> Result<Tensor> {
        let rows = x.dim(0)?;
        let xv = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let y = self.forward(&xv, s)?;
        Ok(Tensor::from_vec(y, (rows, self.d_out()), &Device::Cpu)?)
    }
}

/// The sinusoidal embedding of one time `t` (as [`sinusoidal_embedding`] gives each row).
pub fn sinusoidal_row(t: f64, dim: usize, max_period: f64) -> Result<Vec<f32>> {
    let tt = Tensor::new(&[t as f32], &Device::Cpu)?;
    Ok(sinusoidal_embedding(&tt, dim, max_period)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}
