//! The diffusion graphs and noise schedules of score-entropy discrete diffusion (SEDD, Lou, Meng
//! and Ermon 2024, sec. 3.3 and app. C.1).
//!
//! Each token follows an independent continuous-time Markov chain with rates `sigma(t) Q`:
//! `d p_t / dt = sigma(t) Q^T p_t` (Lou et al. 2024, eq. 1 and 13). With the total noise
//! `sigma_bar(t) = int_0^t sigma(s) ds` the forward marginal is the matrix exponential
//! `p_{t|0}(y | x) = exp(sigma_bar(t) Q)(x, y)` (eq. 14), which for both graphs is in closed form:
//!
//! - absorbing (`Q_absorb`): every token jumps to MASK (id V) at rate 1, so
//!   `p(x | x) = e^{-sigma_bar}` and `p(MASK | x) = 1 - e^{-sigma_bar}`; the base distribution is
//!   all MASK.
//! - uniform (`Q_uniform = 11^T / V - I`): every token jumps to each other token at rate 1/V, so
//!   `exp(s Q) = e^{-s} I + (1 - e^{-s}) 11^T / V`; the base distribution is uniform.
//!
//! Noise schedules (Lou et al. 2024, sec. 5.1): geometric
//! `sigma_bar(t) = sigma_min^{1-t} sigma_max^t` and log-linear `sigma_bar(t) = -log(1 - (1-eps) t)`
//! (the masked fraction of the absorbing graph is then `(1 - eps) t`).

use serde::{Deserialize, Serialize};

use crate::discrete::filter::sample_categorical;
use crate::Rng;

/// Which transition graph (`model.graph`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GraphKind {
    /// Tokens jump to MASK (id V); the base distribution is all MASK.
    #[default]
    #[serde(alias = "absorb")]
    Absorbing,
    /// Tokens jump to any other token; the base distribution is uniform.
    Uniform,
}

/// A graph over the V tokens (plus MASK for the absorbing graph).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Graph {
    /// Absorbing or uniform.
    pub kind: GraphKind,
    /// Number of data tokens V.
    pub vocab: usize,
}

impl Graph {
    /// Number of states of one position: V + 1 (absorbing) or V (uniform).
    pub fn states(&self) -> usize {
        match self.kind {
            GraphKind::Absorbing => self.vocab + 1,
            GraphKind::Uniform => self.vocab,
        }
    }

    /// The MASK id V of the absorbing graph.
    pub fn mask(&self) -> Option<u32> {
        match self.kind {
            GraphKind::Absorbing => Some(self.vocab as u32),
            GraphKind::Uniform => None,
        }
    }

    /// The off-diagonal rate `Q(from, to)` of a jump `from -> to` (0 when `from == to`).
    pub fn rate(&self, from: u32, to: u32) -> f64 {
        if from == to {
            return 0.0;
        }
        match self.kind {
            GraphKind::Absorbing if to == self.vocab as u32 => 1.0,
            GraphKind::Absorbing => 0.0,
            GraphKind::Uniform => 1.0 / self.vocab as f64,
        }
    }

    /// `p_{t|0}(y | from) = exp(sigma_bar Q)(from, y)` for every state y, in closed form
    /// (Lou et al. 2024, eq. 14). `sigma_bar = inf` gives the base distribution.
    pub fn transition(&self, from: u32, sigma_bar: f64) -> Vec<f64> {
        let stay = (-sigma_bar).exp();
        let moved = -(-sigma_bar).exp_m1(); // 1 - e^{-sigma_bar}, accurate near 0
        let mut p = vec![0.0; self.states()];
        match self.kind {
            GraphKind::Absorbing => {
                let m = self.vocab;
                if from as usize == m {
                    p[m] = 1.0;
                } else {
                    p[from as usize] = stay;
                    p[m] = moved;
                }
            }
            GraphKind::Uniform => {
                p.iter_mut().for_each(|x| *x = moved / self.vocab as f64);
                p[from as usize] += stay;
            }
        }
        p
    }

    /// `p(x | y) = exp(delta Q)(y, x)` for every state y: the chance of reaching `x` from each
    /// state after total noise `delta` (a column of [`Graph::transition`]).
    pub fn transition_into(&self, x: u32, delta: f64) -> Vec<f64> {
        let stay = (-delta).exp();
        let moved = -(-delta).exp_m1();
        let mut p = vec![0.0; self.states()];
        match self.kind {
            GraphKind::Absorbing if x as usize == self.vocab => {
                p.iter_mut().for_each(|q| *q = moved);
                p[self.vocab] = 1.0;
            }
            GraphKind::Absorbing => p[x as usize] = stay,
            GraphKind::Uniform => {
                p.iter_mut().for_each(|q| *q = moved / self.vocab as f64);
                p[x as usize] += stay;
            }
        }
        p
    }

    /// A draw from `p_{t|0}(. | from)`.
    pub fn sample_transition(&self, from: u32, sigma_bar: f64, rng: &mut Rng) -> u32 {
        sample_categorical(&self.transition(from, sigma_bar), rng)
    }

    /// A draw from the base distribution p_base (MASK, or a uniform token).
    pub fn sample_base(&self, rng: &mut Rng) -> u32 {
        match self.kind {
            GraphKind::Absorbing => self.vocab as u32,
            GraphKind::Uniform => rng.below(self.vocab) as u32,
        }
    }

    /// `KL(p_{T|0}(. | x0) || p_base)` of one token at total noise `sigma_bar` (the prior term
    /// of Lou et al. 2024, eq. 10). Infinite for the absorbing graph at any finite
    /// `sigma_bar` (mass `e^{-sigma_bar}` is never masked), 0 at `sigma_bar = inf`.
    pub fn prior_kl(&self, x0: u32, sigma_bar: f64) -> f64 {
        if sigma_bar == f64::INFINITY {
            return 0.0;
        }
        let p = self.transition(x0, sigma_bar);
        match self.kind {
            GraphKind::Absorbing => f64::INFINITY,
            GraphKind::Uniform => p
                .iter()
                .filter(|&&q| q > 0.0)
                .map(|&q| q * (q * self.vocab as f64).ln())
                .sum::<f64>()
                .max(0.0),
        }
    }

    /// The ratios `p_s(y) / p_t(x)` of one position, `Delta = sigma_bar(t) - sigma_bar(s) >= 0`
    /// earlier, from the concrete score `ratios[y] = p_t(y) / p_t(x)` at time t (one entry per
    /// state, `ratios[x] = 1`): `p_s = exp(-Delta Q)^T p_t`, so
    /// `p_s(y) / p_t(x) = sum_z exp(-Delta Q)(z, y) ratios[z]` (Lou et al. 2024, Theorem 4.2).
    pub fn staggered(&self, ratios: &[f64], delta: f64) -> Vec<f64> {
        let up = delta.exp(); // e^{Delta}
        let sum: f64 = ratios[..self.vocab].iter().sum();
        match self.kind {
            // exp(-Delta Q)(y, y) = e^Delta, exp(-Delta Q)(y, MASK) = 1 - e^Delta
            GraphKind::Absorbing => {
                let mut out: Vec<f64> = ratios[..self.vocab].iter().map(|s| up * s).collect();
                out.push(ratios[self.vocab] + (1.0 - up) * sum);
                out
            }
            // exp(-Delta Q) = e^Delta I + (1 - e^Delta) 11^T / V
            GraphKind::Uniform => ratios
                .iter()
                .map(|s| up * s + (1.0 - up) * sum / self.vocab as f64)
                .collect(),
        }
    }
}

/// Which noise schedule (`model.noise`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoiseKind {
    /// `sigma_bar(t) = sigma_min^{1-t} sigma_max^t`.
    Geometric,
    /// `sigma_bar(t) = -log(1 - (1 - eps) t)`.
    #[default]
    #[serde(alias = "loglinear", alias = "log_linear")]
    LogLinear,
}

/// A noise schedule with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NoiseSchedule {
    /// Geometric or log-linear.
    pub kind: NoiseKind,
    /// Geometric: total noise at t = 0.
    pub sigma_min: f64,
    /// Geometric: total noise at t = 1.
    pub sigma_max: f64,
    /// Log-linear: the mass `e^{-sigma_bar(1)}` left unnoised at t = 1 (0: none).
    pub eps: f64,
}

impl NoiseSchedule {
    /// The log-linear schedule with `eps` (0: `sigma_bar(1) = inf`).
    pub fn log_linear(eps: f64) -> Self {
        Self {
            kind: NoiseKind::LogLinear,
            sigma_min: 0.0,
            sigma_max: 0.0,
            eps,
        }
    }

    /// The total noise `sigma_bar(t)`, t in [0, 1].
    pub fn total(&self, t: f64) -> f64 {
        match self.kind {
            NoiseKind::Geometric => self.sigma_min.powf(1.0 - t) * self.sigma_max.powf(t),
            NoiseKind::LogLinear => -(-(1.0 - self.eps) * t).ln_1p(),
        }
    }

    /// The rate `sigma(t) = d sigma_bar / dt`.
    pub fn rate(&self, t: f64) -> f64 {
        match self.kind {
            NoiseKind::Geometric => self.total(t) * (self.sigma_max / self.sigma_min).ln(),
            NoiseKind::LogLinear => (1.0 - self.eps) / (1.0 - (1.0 - self.eps) * t),
        }
    }

    /// The total noise at t = 1.
    pub fn total_max(&self) -> f64 {
        self.total(1.0)
    }
}
