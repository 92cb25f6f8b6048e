//! Batch normalisation (Ioffe & Szegedy 2015, algorithm 1) on plain candle ops, for the DCGAN
//! generator (Radford et al. 2016, sec. 3: batch norm in the generator except at its output).
//!
//! Training normalises each channel by the statistics of the current batch. Sampling uses
//! *standing statistics* (Brock et al. 2019, appendix C.1): the per-layer means and variances of
//! one large reference batch drawn through the same generator, so a sample does not depend on
//! the other samples drawn with it and a batch of one is well defined. No running averages are
//! kept, so the exponential moving average of the weights needs no matching statistics.

use candle_core::Tensor;

use super::ParamInit;
use crate::Result;

/// The statistics of one normalisation layer: mean and variance, each shaped to broadcast
/// against the layer's input (`[1, C]` or `[1, C, 1, 1]`).
#[derive(Clone, Debug)]
pub struct LayerStats {
    /// Per-channel mean.
    pub mean: Tensor,
    /// Per-channel (biased) variance.
    pub var: Tensor,
}

/// Where a normalisation layer takes its statistics from.
pub enum StatsMode<'a> {
    /// The current batch; each layer's statistics are appended (detached) to the vector.
    Batch(&'a mut Vec<LayerStats>),
    /// Fixed statistics, one per layer in order.
    Fixed(&'a [LayerStats]),
}

impl StatsMode<'_> {
    /// The statistics of the `i`-th normalisation layer for input `x`.
    fn stats(&mut self, i: usize, x: &Tensor) -> Result<LayerStats> {
        match self {
            StatsMode::Batch(out) => {
                let s = batch_stats(x)?;
                out.push(LayerStats {
                    mean: s.mean.detach(),
                    var: s.var.detach(),
                });
                Ok(s)
            }
            StatsMode::Fixed(all) => all.get(i).cloned().ok_or_else(|| {
                crate::Error::Config(format!(
                    "batch norm layer {i} has no standing statistics ({} given)",
                    all.len()
                ))
            }),
        }
    }
}

/// Per-channel mean and biased variance of `x: [B, C]` or `[B, C, H, W]` over every axis but
/// the channel axis.
pub fn batch_stats(x: &Tensor) -> Result<LayerStats> {
    let reduce = |t: &Tensor| -> Result<Tensor> {
        let mut t = t.mean_keepdim(0)?;
        for axis in 2..t.rank() {
            t = t.mean_keepdim(axis)?;
        }
        Ok(t) // [1, C] or [1, C, 1, 1]
    };
    let mean = reduce(x)?;
    let var = reduce(&x.broadcast_sub(&mean)?.sqr()?)?;
    Ok(LayerStats { mean, var })
}

/// `y = gamma (x - mean) / sqrt(var + eps) + beta`, per channel.
#[derive(Clone, Debug)]
pub struct BatchNorm {
    gamma: candle_core::Var,
    beta: candle_core::Var,
    /// Position among the network's normalisation layers (indexes the standing statistics).
    index: usize,
}

/// The variance floor `eps` (the paper's and PyTorch's 1e-5).
const EPS: f64 = 1e-5;

impl BatchNorm {
    /// A layer over `channels` channels, the `index`-th of its network; `gamma = 1`, `beta = 0`.
    pub fn new(p: &mut ParamInit, channels: usize, index: usize) -> Result<Self> {
        Ok(Self {
            gamma: p.constant("gamma", &[channels], 1.0)?,
            beta: p.constant("beta", &[channels], 0.0)?,
            index,
        })
    }

    /// Normalise `x: [B, C]` or `[B, C, H, W]` with the statistics `mode` gives.
    pub fn forward(&self, x: &Tensor, mode: &mut StatsMode<'_>) -> Result<Tensor> {
        let s = mode.stats(self.index, x)?;
        let shape = s.mean.dims().to_vec(); // [1, C] or [1, C, 1, 1]
        let gamma = self.gamma.as_tensor().reshape(shape.as_slice())?;
        let beta = self.beta.as_tensor().reshape(shape.as_slice())?;
        let scale = (s.var + EPS)?.sqrt()?.recip()?.mul(&gamma)?; // [1, C, ..]
        Ok(x.broadcast_sub(&s.mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(&beta)?)
    }
}
