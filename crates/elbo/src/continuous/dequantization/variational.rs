//! Variational dequantization (Ho et al. 2019, sec. 3.1): the offsets u in [0, 1)^D of a
//! discrete example x inside its bins are drawn from a learned conditional density q(u | x)
//! rather than the uniform one, and the bound subtracts log q(u | x) (eq. 12). q is a
//! conditional flow from ε ~ N(0, I): an elementwise affine map whose shift and log-scale are
//! an MLP of x, then the logistic sigmoid onto the unit cube (the sigmoid output layer of
//! Flow++'s dequantizer, sec. 3.1), so
//!
//!   v = μ(x) + exp(s(x)) ⊙ ε,   u = σ(v),
//!   log q(u | x) = log N(ε; 0, I) - Σ_j s_j(x) - Σ_j log σ'(v_j),
//!
//! with log σ'(v) = -softplus(v) - softplus(-v). Flow++ stacks conditional coupling layers
//! before the sigmoid; this is the one-layer member of that family. The network's read-out
//! starts near zero, so q starts as the logit-normal density σ(N(0, I)).

use candle_core::Tensor;

use super::DataScale;
use crate::nn::{Activation, Mlp, ParamInit};
use crate::{Error, Result, Rng};

/// `½ log 2π`.
const HALF_LOG_2PI: f64 = 0.918_938_533_204_672_8;

/// q(u | x) on `[B, D]` rows of levels.
pub struct VariationalDequantizer {
    net: Mlp,
    scale: DataScale,
    dim: usize,
}

impl VariationalDequantizer {
    /// A dequantizer for `dim` discrete values placed by `scale`, its conditioner an MLP of
    /// `depth` hidden layers of `hidden` units on the levels' grid values. Parameters: `net.*`.
    pub fn new(
        p: &mut ParamInit,
        scale: DataScale,
        dim: usize,
        hidden: usize,
        depth: usize,
        act: Activation,
    ) -> Result<Self> {
        if scale.levels.is_none() {
            return Err(Error::Config(
                "variational dequantization needs discrete data (levels); on continuous data \
                 set the dequantization to \"uniform\" (it is then unused)"
                    .into(),
            ));
        }
        let net =
            Mlp::with_output_scale(&mut p.push("net"), dim, hidden, depth, 2 * dim, act, 1e-2)?;
        Ok(Self { net, scale, dim })
    }

    /// `(μ(x), s(x))`, each `[B, D]`.
    fn shift_and_log_scale(&self, batch: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = self.net.forward(&self.scale.to_grid(batch)?)?; // [B, 2D]
        Ok((h.narrow(1, 0, self.dim)?, h.narrow(1, self.dim, self.dim)?))
    }

    /// `log q(u | x)` per example, `[B]`, from `ε`, `s` and `v = μ + exp(s) ε`.
    fn log_q(eps: &Tensor, log_scale: &Tensor, v: &Tensor) -> Result<Tensor> {
        let log_sigmoid_prime = (softplus(v)? + softplus(&v.neg()?)?)?.neg()?; // [B, D]
        let per = ((((eps.sqr()? * -0.5)? - HALF_LOG_2PI)? - log_scale)? - log_sigmoid_prime)?;
        Ok(per.sum(1)?)
    }

    /// A draw u ~ q(· | x) for levels `batch: [B, D]`: the model-space point of x + u (as
    /// [`DataScale::dequantize`] places a uniform draw) and `log q(u | x)`, `[B]`, both
    /// differentiable in the dequantizer's parameters.
    pub fn dequantize(&self, batch: &Tensor, rng: &mut Rng) -> Result<(Tensor, Tensor)> {
        let (mu, log_scale) = self.shift_and_log_scale(batch)?;
        let eps = rng.normal_tensor(mu.dims(), mu.device())?; // [B, D]
        let v = (mu + (log_scale.exp()? * &eps)?)?;
        let log_q = Self::log_q(&eps, &log_scale, &v)?;
        let u = (v.neg()?.exp()? + 1.0)?.recip()?; // σ(v), [B, D]
        Ok((self.scale.dequantize_with(batch, &u)?, log_q))
    }

    /// `log q(u | x)` per example, `[B]`, of given offsets `u` in (0, 1)^D.
    pub fn log_density(&self, batch: &Tensor, u: &Tensor) -> Result<Tensor> {
        let (mu, log_scale) = self.shift_and_log_scale(batch)?;
        let v = (u.log()? - (1.0 - u)?.log()?)?; // logit(u), [B, D]
        let eps = ((&v - mu)? * log_scale.neg()?.exp()?)?;
        Self::log_q(&eps, &log_scale, &v)
    }
}

/// `log(1 + exp(x))`, stable for large |x|: `max(x, 0) + log(1 + exp(-|x|))`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}
