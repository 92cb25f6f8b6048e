//! Activation normalisation (Kingma & Dhariwal 2018, sec. 3.1, Table 1): a per-dimension affine
//! map `z = (x + b) ⊙ exp(log σ)` with `log |det J| = Σ_j log σ_j`, whose parameters are
//! initialised from the first batch so that the outputs have zero mean and unit variance per
//! dimension; afterwards they are ordinary trainable parameters. It plays the role of RealNVP's
//! batch normalisation without batch statistics at test time. On channels-last images
//! `[B, H, W, C]` it acts per channel, and the log-determinant counts every pixel:
//! `H W Σ_c log σ_c`.

use candle_core::{Tensor, Var};

use super::{positions, Bijector};
use crate::nn::ParamInit;
use crate::Result;

/// The smallest standard deviation the initialisation divides by (a constant dimension).
const MIN_STD: f64 = 1e-6;

/// `z = (x + bias) ⊙ exp(log_scale)` along the last axis (`[B, D]` rows or `[B, H, W, C]`
/// images).
pub struct ActNorm {
    bias: Var,
    log_scale: Var,
}

impl ActNorm {
    /// The identity on `d` dimensions (or channels) until [`Bijector::init_from_data`] runs. Parameters:
    /// `bias`, `log_scale`.
    pub fn new(p: &mut ParamInit, d: usize) -> Result<Self> {
        Ok(Self {
            bias: p.constant("bias", &[d], 0.0)?,
            log_scale: p.constant("log_scale", &[d], 0.0)?,
        })
    }
}

impl Bijector for ActNorm {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x
            .broadcast_add(self.bias.as_tensor())?
            .broadcast_mul(&self.log_scale.exp()?)?; // shaped as x
        let ld = (self.log_scale.sum_all()? * positions(x)? as f64)?
            .broadcast_as(x.dim(0)?)?
            .contiguous()?; // [B]
        Ok((z, ld))
    }

    fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.broadcast_mul(&self.log_scale.neg()?.exp()?)?
            .broadcast_sub(self.bias.as_tensor())?
            .detach())
    }

    /// `bias = -mean`, `log_scale = -log std` of the batch, per dimension (per channel over
    /// every pixel of an image).
    fn init_from_data(&mut self, x: &Tensor) -> Result<()> {
        let f = x.dim(x.rank() - 1)?;
        let x = x.detach().reshape(((), f))?; // [B H W, C] or [B, D]
        let mean = x.mean(0)?; // [D]
        let var = x.broadcast_sub(&mean)?.sqr()?.mean(0)?; // [D]
        let log_std = var.sqrt()?.clamp(MIN_STD, f64::INFINITY)?.log()?;
        self.bias.set(&mean.neg()?)?;
        self.log_scale.set(&log_std.neg()?)?;
        Ok(())
    }
}
