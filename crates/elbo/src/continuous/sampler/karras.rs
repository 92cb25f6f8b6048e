//! Euler and Heun on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma, with EDM's
//! stochastic "churn" (Karras et al. 2022, Alg. 1 and 2).
//!
//! At each step with sigma_i in [S_tmin, S_tmax], gamma = min(S_churn / n, sqrt(2) - 1) (n = the
//! number of steps) raises the noise level to sigma^ = (1 + gamma) sigma_i by adding fresh noise
//! of variance sigma^2 - sigma_i^2 (scaled by S_noise), then one Euler (first order) or Heun
//! (second order, with Euler on the last step to sigma = 0) step goes to sigma_{i+1}.
//! With S_churn = 0 both are deterministic, and match diffusers' `EulerDiscreteScheduler` and
//! `HeunDiscreteScheduler`.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{check_sigmas, lin, noise_like, Denoiser};
use crate::{Error, Result, Rng};

/// EDM's stochasticity settings (Karras et al. 2022, Alg. 2; Table 5 for tuned values).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Churn {
    /// Total amount of added noise (0 = deterministic).
    pub s_churn: f64,
    /// Lowest sigma that gets churn.
    pub s_tmin: f64,
    /// Highest sigma that gets churn.
    pub s_tmax: f64,
    /// Scale of the added noise (slightly above 1 offsets the denoiser's loss of detail).
    pub s_noise: f64,
}

impl Default for Churn {
    /// No churn: the deterministic sampler.
    fn default() -> Self {
        Self {
            s_churn: 0.0,
            s_tmin: 0.0,
            s_tmax: f64::INFINITY,
            s_noise: 1.0,
        }
    }
}

impl Churn {
    fn validate(&self) -> Result<()> {
        if !(self.s_churn >= 0.0 && self.s_noise >= 0.0 && self.s_tmin <= self.s_tmax) {
            return Err(Error::Config(format!(
                "churn needs S_churn >= 0, S_noise >= 0 and S_tmin <= S_tmax, got {self:?}"
            )));
        }
        Ok(())
    }

    /// The increased noise level sigma^ for step i of n and the sample moved there.
    fn apply(&self, x: &Tensor, sigma: f64, n: usize, rng: &mut Rng) -> Result<(Tensor, f64)> {
        let gamma = if self.s_churn > 0.0 && sigma >= self.s_tmin && sigma <= self.s_tmax {
            (self.s_churn / n as f64).min(std::f64::consts::SQRT_2 - 1.0)
        } else {
            0.0
        };
        if gamma == 0.0 {
            return Ok((x.clone(), sigma));
        }
        let hat = sigma * (1.0 + gamma);
        let std = self.s_noise * (hat * hat - sigma * sigma).sqrt();
        Ok(((x + noise_like(x, rng)?.affine(std, 0.0)?)?, hat))
    }
}

/// The ODE slope d = (x - D(x; sigma)) / sigma.
fn slope(den: &dyn Denoiser, x: &Tensor, sigma: f64) -> Result<Tensor> {
    let x0 = den.denoise(x, sigma)?;
    lin(x, 1.0 / sigma, &x0, -1.0 / sigma)
}

/// Euler sampling over the decreasing grid `sigmas` (end it with 0 to return the denoised
/// sample) from `x` at sigmas[0] (x = sigma_0 n for pure noise). `rng` is used by churn only.
pub fn euler(
    den: &dyn Denoiser,
    sigmas: &[f64],
    churn: &Churn,
    x: &Tensor,
    rng: &mut Rng,
) -> Result<Tensor> {
    check_sigmas(sigmas)?;
    churn.validate()?;
    let n = sigmas.len() - 1;
    let mut x = x.clone();
    for w in sigmas.windows(2) {
        let (xh, sh) = churn.apply(&x, w[0], n, rng)?;
        let d = slope(den, &xh, sh)?;
        x = lin(&xh, 1.0, &d, w[1] - sh)?;
    }
    Ok(x)
}

/// EDM's Heun sampler (Karras et al. 2022, Alg. 2): Euler predictor, trapezoidal corrector with
/// a second denoiser call at sigma_{i+1}, except on a final step to sigma = 0 (Euler). 2n - 1
/// denoiser calls for n steps ending at 0.
pub fn heun(
    den: &dyn Denoiser,
    sigmas: &[f64],
    churn: &Churn,
    x: &Tensor,
    rng: &mut Rng,
) -> Result<Tensor> {
    check_sigmas(sigmas)?;
    churn.validate()?;
    let n = sigmas.len() - 1;
    let mut x = x.clone();
    for w in sigmas.windows(2) {
        let (xh, sh) = churn.apply(&x, w[0], n, rng)?;
        let d = slope(den, &xh, sh)?;
        let h = w[1] - sh;
        let pred = lin(&xh, 1.0, &d, h)?;
        x = if w[1] > 0.0 {
            let d2 = slope(den, &pred, w[1])?;
            lin(&xh, 1.0, &(d + d2)?, 0.5 * h)?
        } else {
            pred
        };
    }
    Ok(x)
}
