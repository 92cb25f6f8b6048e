//! Ancestral DDPM sampling (Ho et al. 2020, Alg. 2), on the full chain or a strided one.
//!
//! Each step samples the Gaussian posterior q(x_prev | x_t, x_0) with x_0 replaced by the
//! network's estimate (Ho et al. 2020, eq. 6-7): with alpha = abar_t / abar_prev and
//! beta = 1 - alpha,
//! mean = sqrt(abar_prev) beta / (1 - abar_t) x_0 + sqrt(alpha) (1 - abar_prev) / (1 - abar_t) x_t,
//! and variance beta~ = (1 - abar_prev) / (1 - abar_t) beta (fixed_small) or beta (fixed_large).

use candle_core::Tensor;

use super::adapters::vp_predict;
use super::{lin, noise_like, Denoiser};
use crate::continuous::diffusion::chain::VarianceKind;
use crate::continuous::schedule::Transition;
use crate::{Error, Result, Rng};

/// Ancestral sampling through `transitions` from `x` (VP-scaled, x_T ~ N(0, I) for a full chain),
/// with the reverse-step variance `variance` (Ho et al. 2020, Sec. 3.2: both give similar
/// samples). Unlike [`Chain::model_variance`](crate::continuous::diffusion::Chain::model_variance)
/// nothing is clipped: the last step to clean data adds no noise.
/// No noise is added on a step to clean data (alpha_bar_prev = 1), as in Alg. 2 (z = 0 at t = 1).
pub fn ddpm(
    den: &dyn Denoiser,
    transitions: &[Transition],
    variance: VarianceKind,
    x: &Tensor,
    rng: &mut Rng,
) -> Result<Tensor> {
    if transitions.is_empty() {
        return Err(Error::Config("DDPM needs at least one transition".into()));
    }
    let mut x = x.clone();
    for tr in transitions {
        let (a, ap) = (tr.alpha_bar, tr.alpha_bar_prev);
        if !(a > 0.0 && a < 1.0 && ap >= a && ap <= 1.0) {
            return Err(Error::Config(format!(
                "bad transition {tr:?}: need 0 < alpha_bar < 1 and alpha_bar <= alpha_bar_prev <= 1"
            )));
        }
        let (x0, _eps) = vp_predict(den, &x, a)?;
        let alpha = a / ap;
        let beta = 1.0 - alpha;
        let c0 = ap.sqrt() * beta / (1.0 - a);
        let ct = alpha.sqrt() * (1.0 - ap) / (1.0 - a);
        x = lin(&x0, c0, &x, ct)?;
        if ap < 1.0 {
            let var = match variance {
                VarianceKind::FixedSmall => (1.0 - ap) / (1.0 - a) * beta,
                VarianceKind::FixedLarge => beta,
            };
            x = (&x + noise_like(&x, rng)?.affine(var.max(0.0).sqrt(), 0.0)?)?;
        }
    }
    Ok(x)
}
