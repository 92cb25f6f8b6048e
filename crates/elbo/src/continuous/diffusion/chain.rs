//! The discrete forward chain of DDPM (Ho et al. 2020, sec. 2) and its Gaussian posterior.
//!
//! Steps are numbered i = 1..T with q(x_i | x_{i-1}) = N(sqrt(1 - β_i) x_{i-1}, β_i I), so
//! q(x_i | x_0) = N(sqrt(ᾱ_i) x_0, (1 - ᾱ_i) I) with ᾱ_i = Π_{j<=i} (1 - β_j) and ᾱ_0 = 1
//! (eq. 4), and the posterior is q(x_{i-1} | x_i, x_0) = N(μ̃_i, β̃_i I) with (eq. 6-7)
//!
//! ```text
//! μ̃_i = sqrt(ᾱ_{i-1}) β_i / (1 - ᾱ_i) · x_0 + sqrt(α_i) (1 - ᾱ_{i-1}) / (1 - ᾱ_i) · x_i,
//! β̃_i = (1 - ᾱ_{i-1}) / (1 - ᾱ_i) · β_i.
//! ```
//!
//! For the probability-flow ODE the chain is read as a continuous path on t = i/T in [0, 1]:
//! log ᾱ(t) is interpolated linearly between the grid points, so the path passes exactly
//! through every discrete marginal.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::continuous::parameterization::Coeffs;
use crate::continuous::schedule::{BetaSchedule, DiscreteSchedule, NoiseSchedule, Precision};
use crate::{Error, Result};

/// Variance of the reverse step p_θ(x_{i-1} | x_i) (Ho et al. 2020, sec. 3.2): the chain's
/// [`Chain::model_variance`] (VLB, training weights) and the ancestral sampler
/// [`sampler::ddpm`](fn@crate::continuous::sampler::ddpm) both take it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum VarianceKind {
    /// σ_i² = β̃_i, the posterior variance (optimal for a point mass x_0); in
    /// [`Chain::model_variance`] i = 1 is clipped to β̃_2 as in Nichol & Dhariwal 2021
    /// (β̃_1 = 0).
    #[default]
    #[serde(alias = "small", alias = "fixed-small")]
    FixedSmall,
    /// σ_i² = β_i (optimal for x_0 ~ N(0, I)); [`Chain::model_variance`] uses β̃_2 at i = 1
    /// as above.
    #[serde(alias = "large", alias = "fixed-large")]
    FixedLarge,
}

impl VarianceKind {
    /// From "fixed_small" / "fixed_large".
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "fixed_small" | "small" => Ok(Self::FixedSmall),
            "fixed_large" | "large" => Ok(Self::FixedLarge),
            _ => Err(Error::Config(format!(
                "unknown variance '{s}'; use fixed_small or fixed_large"
            ))),
        }
    }
}

/// Coefficients of q(x_{i-1} | x_i, x_0): mean = `coef_x0` x_0 + `coef_xt` x_i, variance `var`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Posterior {
    /// sqrt(ᾱ_{i-1}) β_i / (1 - ᾱ_i).
    pub coef_x0: f64,
    /// sqrt(α_i) (1 - ᾱ_{i-1}) / (1 - ᾱ_i).
    pub coef_xt: f64,
    /// β̃_i.
    pub var: f64,
}

/// A discrete diffusion chain defined by its betas.
#[derive(Clone, Debug, PartialEq)]
pub struct Chain {
    betas: Vec<f64>,
    /// ᾱ_0 = 1, ᾱ_1, ..., ᾱ_T.
    alpha_bar: Vec<f64>,
}

impl Chain {
    /// A chain from β_1..β_T, each in (0, 1).
    pub fn new(betas: Vec<f64>) -> Result<Self> {
        if betas.is_empty() {
            return Err(Error::Config(
                "a diffusion chain needs at least one step".into(),
            ));
        }
        if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
            return Err(Error::Config(format!(
                "every beta must be in (0, 1), got {b}"
            )));
        }
        let mut alpha_bar = Vec::with_capacity(betas.len() + 1);
        alpha_bar.push(1.0);
        let mut acc = 1.0;
        for b in &betas {
            acc *= 1.0 - b;
            alpha_bar.push(acc);
        }
        Ok(Self { betas, alpha_bar })
    }

    /// A chain of `steps` steps from a named beta schedule: `linear` (Ho et al. 2020: 1e-4 to
    /// 0.02 at T = 1000, both scaled by 1000/T as in Nichol & Dhariwal 2021), `scaled_linear`
    /// or `cosine` / `squaredcos_cap_v2` (Nichol & Dhariwal 2021, eq. 17, β capped at 0.999).
    pub fn from_schedule(name: &str, steps: usize) -> Result<Self> {
        if steps < 2 {
            return Err(Error::Config(format!(
                "a diffusion chain needs at least 2 timesteps, got {steps}"
            )));
        }
        let scale = 1000.0 / steps as f64;
        let kind = BetaSchedule::parse(name.trim())?;
        let (b0, b1) = ((1e-4 * scale).min(0.5), (0.02 * scale).min(0.999));
        let sched = DiscreteSchedule::new(kind, steps, b0, b1, Precision::F64)?;
        Self::new(sched.betas().to_vec())
    }

    /// Number of steps T.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    /// β_i for i in 1..=T.
    pub fn beta(&self, i: usize) -> f64 {
        self.betas[i - 1]
    }

    /// ᾱ_i for i in 0..=T.
    pub fn alpha_bar(&self, i: usize) -> f64 {
        self.alpha_bar[i]
    }

    /// (sqrt(ᾱ_i), sqrt(1 - ᾱ_i)): the signal and noise scales of q(x_i | x_0).
    pub fn scales(&self, i: usize) -> (f64, f64) {
        let a = self.alpha_bar[i];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// x_i = sqrt(ᾱ_i) x_0 + sqrt(1 - ᾱ_i) ε (Ho et al. 2020, eq. 4) for a given noise `eps`.
    pub fn q_sample(&self, x0: &Tensor, i: usize, eps: &Tensor) -> Result<Tensor> {
        let (a, s) = self.scales(i);
        Ok(((x0 * a)? + (eps * s)?)?)
    }

    /// The posterior q(x_{i-1} | x_i, x_0) for i in 1..=T (eq. 6-7).
    pub fn posterior(&self, i: usize) -> Posterior {
        let b = self.beta(i);
        let ab = self.alpha_bar[i];
        let ab_prev = self.alpha_bar[i - 1];
        Posterior {
            coef_x0: ab_prev.sqrt() * b / (1.0 - ab),
            coef_xt: (1.0 - b).sqrt() * (1.0 - ab_prev) / (1.0 - ab),
            var: (1.0 - ab_prev) / (1.0 - ab) * b,
        }
    }

    /// σ_i² of the reverse step. Step 1 uses β̃_2 (or β_1 for a one-step chain) for both
    /// kinds: β̃_1 is zero and the decoder needs a positive width.
    pub fn model_variance(&self, i: usize, kind: VarianceKind) -> f64 {
        if i == 1 {
            return if self.steps() >= 2 {
                self.posterior(2).var
            } else {
                self.beta(1)
            };
        }
        match kind {
            VarianceKind::FixedSmall => self.posterior(i).var,
            VarianceKind::FixedLarge => self.beta(i),
        }
    }

    /// The per-step weight of ||x_0 - x̂_0||² in L_{i-1} (Ho et al. 2020, eq. 8 written in
    /// x_0): coef_x0² / (2 σ_i²); for i = 1 the Gaussian decoder's 1 / (2 σ_1²).
    pub fn vlb_weight(&self, i: usize, kind: VarianceKind) -> f64 {
        let v = self.model_variance(i, kind);
        if i == 1 {
            0.5 / v
        } else {
            self.posterior(i).coef_x0.powi(2) / (2.0 * v)
        }
    }

    /// log ᾱ(t) and its derivative at continuous t in [0, 1] (t = i/T on the grid), linear
    /// between grid points; the derivative is the right-hand slope (left-hand at t = 1).
    pub fn log_alpha_bar_at(&self, t: f64) -> (f64, f64) {
        let n = self.steps();
        let u = (t.clamp(0.0, 1.0) * n as f64).min(n as f64);
        let k = (u.floor() as usize).min(n - 1);
        let lo = self.alpha_bar[k].ln();
        let hi = self.alpha_bar[k + 1].ln();
        let slope = (hi - lo) * n as f64;
        (lo + (u - k as f64) * (hi - lo), slope)
    }
}

impl Chain {
    /// α, σ and their derivatives at u = t/T (log ᾱ linear between grid points).
    pub fn path_point(&self, u: f64) -> Coeffs {
        let (la, dla) = self.log_alpha_bar_at(u);
        let ab = la.exp();
        let alpha = ab.sqrt();
        let sigma = (1.0 - ab).max(0.0).sqrt();
        Coeffs {
            alpha,
            sigma,
            d_alpha: 0.5 * alpha * dla,
            d_sigma: if sigma > 0.0 {
                -0.5 * ab * dla / sigma
            } else {
                0.0
            },
        }
    }
}

/// The chain as a continuous schedule on u = t/T in [1/T, 1] (for the samplers).
impl NoiseSchedule for Chain {
    fn alpha(&self, t: f64) -> f64 {
        self.path_point(t).alpha
    }
    fn sigma(&self, t: f64) -> f64 {
        self.path_point(t).sigma
    }
    fn d_alpha(&self, t: f64) -> f64 {
        self.path_point(t).d_alpha
    }
    fn d_sigma(&self, t: f64) -> f64 {
        self.path_point(t).d_sigma
    }
    fn t_min(&self) -> f64 {
        1.0 / self.steps() as f64
    }
    fn t_max(&self) -> f64 {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_hits_the_grid() {
        let c = Chain::from_schedule("linear", 50).unwrap();
        for i in [0usize, 1, 7, 50] {
            let (la, _) = c.log_alpha_bar_at(i as f64 / 50.0);
            assert!((la - c.alpha_bar(i).ln()).abs() < 1e-12);
        }
    }
}
