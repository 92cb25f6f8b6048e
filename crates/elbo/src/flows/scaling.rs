//! NICE's diagonal scaling layer (Dinh et al. 2015, sec. 3.3): `z = x ⊙ exp(s)`, the only
//! layer of a NICE flow that changes volume, `log |det J| = Σ_j s_j`. Additive couplings alone
//! preserve volume, so without it the flow could not concentrate mass.

use candle_core::{Tensor, Var};

use super::{positions, Bijector};
use crate::nn::ParamInit;
use crate::Result;

/// `z = x ⊙ exp(log_scale)` along the last axis (`[B, D]` rows, or per channel of
/// `[B, H, W, C]` images).
pub struct Scaling {
    log_scale: Var,
}

impl Scaling {
    /// The identity on `d` dimensions. Parameter: `log_scale`.
    pub fn new(p: &mut ParamInit, d: usize) -> Result<Self> {
        Ok(Self {
            log_scale: p.constant("log_scale", &[d], 0.0)?,
        })
    }
}

impl Bijector for Scaling {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x.broadcast_mul(&self.log_scale.exp()?)?; // shaped as x
        let ld = (self.log_scale.sum_all()? * positions(x)? as f64)?
            .broadcast_as(x.dim(0)?)?
            .contiguous()?; // [B]
        Ok((z, ld))
    }

    fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        Ok(z.broadcast_mul(&self.log_scale.neg()?.exp()?)?.detach())
    }
}
