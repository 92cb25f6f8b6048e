//! Continuous-time Gaussian noise schedules x_t = alpha(t) x_0 + sigma(t) eps as one trait.
//!
//! Every forward SDE of Song et al. 2021b (VP, sub-VP, VE), EDM's sigma(t) = t (Karras et al.
//! 2022) and the CondOT / rectified-flow path (alpha = 1 - t, sigma = t; Lipman et al. 2023,
//! Liu et al. 2023) is such a schedule. From alpha and sigma follow the log-SNR
//! lambda = log(alpha^2 / sigma^2), the EDM noise level sigma / alpha of x_t / alpha, and the
//! linear SDE dx = f(t) x dt + g(t) dW with the same marginals (Kingma et al. 2021, VDM, App. A):
//! f = alpha' / alpha and g^2 = d(sigma^2)/dt - 2 f sigma^2. For VP this gives f = -beta/2,
//! g^2 = beta; for sub-VP g^2 = beta (1 - exp(-2 int beta)) (Song et al. 2021b, eq. 11).

use super::discrete::{interp_table, DiscreteSchedule};
use crate::{Error, Result};

/// A schedule x_t = alpha(t) x_0 + sigma(t) eps on t in [t_min, t_max], noise increasing in t.
pub trait NoiseSchedule {
    /// alpha(t), the signal scale.
    fn alpha(&self, t: f64) -> f64;
    /// sigma(t), the noise scale.
    fn sigma(&self, t: f64) -> f64;
    /// d alpha / dt.
    fn d_alpha(&self, t: f64) -> f64;
    /// d sigma / dt.
    fn d_sigma(&self, t: f64) -> f64;
    /// Smallest time of the domain.
    fn t_min(&self) -> f64;
    /// Largest time of the domain.
    fn t_max(&self) -> f64;

    /// The log signal-to-noise ratio lambda(t) = 2 log(alpha / sigma).
    fn log_snr(&self, t: f64) -> f64 {
        2.0 * (self.alpha(t) / self.sigma(t)).ln()
    }

    /// The EDM noise level of x_t / alpha(t): sigma(t) / alpha(t) = exp(-lambda / 2).
    fn edm_sigma(&self, t: f64) -> f64 {
        self.sigma(t) / self.alpha(t)
    }

    /// The time whose EDM noise level is `s`: the inverse of [`NoiseSchedule::edm_sigma`]
    /// (bisection by default; closed forms where they exist). Fails outside the domain.
    fn t_of_edm_sigma(&self, s: f64) -> Result<f64> {
        bisect_edm_sigma(self, s)
    }

    /// Drift coefficient f(t) of the forward SDE dx = f x dt + g dW: alpha' / alpha.
    fn drift(&self, t: f64) -> f64 {
        self.d_alpha(t) / self.alpha(t)
    }

    /// Squared diffusion coefficient g(t)^2 = 2 sigma sigma' - 2 f sigma^2.
    fn diffusion2(&self, t: f64) -> f64 {
        let s = self.sigma(t);
        2.0 * s * self.d_sigma(t) - 2.0 * self.drift(t) * s * s
    }
}

fn out_of_range(s: f64, lo: f64, hi: f64) -> Error {
    Error::Config(format!(
        "noise level sigma = {s} is outside the schedule's range [{lo}, {hi}]"
    ))
}

/// Inverts a monotone edm_sigma(t) by bisection to ~1e-15 relative.
fn bisect_edm_sigma<S: NoiseSchedule + ?Sized>(sch: &S, s: f64) -> Result<f64> {
    let (mut lo, mut hi) = (sch.t_min(), sch.t_max());
    let (s_lo, s_hi) = (sch.edm_sigma(lo), sch.edm_sigma(hi));
    let tol = 1e-12 * s.abs().max(1e-300);
    if !(s >= s_lo - tol && s <= s_hi + tol) || s.is_nan() {
        return Err(out_of_range(s, s_lo, s_hi));
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if sch.edm_sigma(mid) < s {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= 1e-15 * hi.abs().max(1.0) {
            break;
        }
    }
    Ok(0.5 * (lo + hi))
}

/// The VP SDE (Song et al. 2021b, eq. 11) with linear beta(t) = beta_min + t (beta_max - beta_min)
/// on t in [eps, 1]: alpha = exp(-B(t)/2), sigma = sqrt(1 - exp(-B(t))), B = int_0^t beta.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Vp {
    /// beta(0), 0.1 by default.
    pub beta_min: f64,
    /// beta(1), 20 by default.
    pub beta_max: f64,
    /// Smallest time (1e-3 by default for sampling, 1e-5 for likelihoods in Song et al.).
    pub t_eps: f64,
}

impl Default for Vp {
    fn default() -> Self {
        Self {
            beta_min: 0.1,
            beta_max: 20.0,
            t_eps: 1e-3,
        }
    }
}

impl Vp {
    /// beta(t).
    pub fn beta(&self, t: f64) -> f64 {
        self.beta_min + t * (self.beta_max - self.beta_min)
    }
    /// B(t) = int_0^t beta(s) ds.
    pub fn integral(&self, t: f64) -> f64 {
        self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t
    }
    /// Solves B(t) = b for t >= 0.
    fn t_of_integral(&self, b: f64) -> f64 {
        let a = 0.5 * (self.beta_max - self.beta_min);
        if a.abs() < 1e-300 {
            return b / self.beta_min;
        }
        // stable root of a t^2 + beta_min t - b = 0
        2.0 * b / (self.beta_min + (self.beta_min * self.beta_min + 4.0 * a * b).sqrt())
    }
}

impl NoiseSchedule for Vp {
    fn alpha(&self, t: f64) -> f64 {
        (-0.5 * self.integral(t)).exp()
    }
    fn sigma(&self, t: f64) -> f64 {
        (-(-self.integral(t)).exp_m1()).sqrt()
    }
    fn d_alpha(&self, t: f64) -> f64 {
        -0.5 * self.beta(t) * self.alpha(t)
    }
    fn d_sigma(&self, t: f64) -> f64 {
        // d/dt sqrt(1 - e^-B) = beta e^-B / (2 sigma)
        0.5 * self.beta(t) * (-self.integral(t)).exp() / self.sigma(t)
    }
    fn t_min(&self) -> f64 {
        self.t_eps
    }
    fn t_max(&self) -> f64 {
        1.0
    }
    fn t_of_edm_sigma(&self, s: f64) -> Result<f64> {
        // sigma/alpha = sqrt(e^B - 1)  =>  B = ln(1 + s^2)
        let t = self.t_of_integral((s * s).ln_1p());
        check_domain(self, t, s)
    }
}

/// The sub-VP SDE (Song et al. 2021b, eq. 12): alpha = exp(-B/2), sigma = 1 - exp(-B), with the
/// VP's B(t); its diffusion g^2 = beta (1 - exp(-2B)) follows from [`NoiseSchedule::diffusion2`].
#[derive(Clone, Copy, Debug, PartialEq, Default)]
pub struct SubVp(pub Vp);

impl NoiseSchedule for SubVp {
    fn alpha(&self, t: f64) -> f64 {
        self.0.alpha(t)
    }
    fn sigma(&self, t: f64) -> f64 {
        -(-self.0.integral(t)).exp_m1()
    }
    fn d_alpha(&self, t: f64) -> f64 {
        self.0.d_alpha(t)
    }
    fn d_sigma(&self, t: f64) -> f64 {
        self.0.beta(t) * (-self.0.integral(t)).exp()
    }
    fn t_min(&self) -> f64 {
        self.0.t_eps
    }
    fn t_max(&self) -> f64 {
        1.0
    }
    fn t_of_edm_sigma(&self, s: f64) -> Result<f64> {
        // with r = sqrt(e^-B): s = (1 - r^2) / r  =>  r = (sqrt(s^2 + 4) - s) / 2
        let r = 2.0 / ((s * s + 4.0).sqrt() + s);
        let t = self.0.t_of_integral(-2.0 * r.ln());
        check_domain(self, t, s)
    }
}

/// The VE SDE (Song et al. 2021b, eq. 9): alpha = 1, sigma(t) = sigma_min (sigma_max /
/// sigma_min)^t on t in [0, 1].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ve {
    /// sigma(0), 0.01 by default.
    pub sigma_min: f64,
    /// sigma(1), 50 by default (the largest pairwise data distance, Song & Ermon 2020).
    pub sigma_max: f64,
}

impl Default for Ve {
    fn default() -> Self {
        Self {
            sigma_min: 0.01,
            sigma_max: 50.0,
        }
    }
}

impl NoiseSchedule for Ve {
    fn alpha(&self, _t: f64) -> f64 {
        1.0
    }
    fn sigma(&self, t: f64) -> f64 {
        self.sigma_min * (self.sigma_max / self.sigma_min).powf(t)
    }
    fn d_alpha(&self, _t: f64) -> f64 {
        0.0
    }
    fn d_sigma(&self, t: f64) -> f64 {
        self.sigma(t) * (self.sigma_max / self.sigma_min).ln()
    }
    fn t_min(&self) -> f64 {
        0.0
    }
    fn t_max(&self) -> f64 {
        1.0
    }
    fn t_of_edm_sigma(&self, s: f64) -> Result<f64> {
        let t = (s / self.sigma_min).ln() / (self.sigma_max / self.sigma_min).ln();
        check_domain(self, t, s)
    }
}

/// EDM's schedule (Karras et al. 2022, Table 1): alpha = 1, sigma(t) = t on [sigma_min,
/// sigma_max] (0.002 .. 80 by default).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Edm {
    /// Smallest noise level.
    pub sigma_min: f64,
    /// Largest noise level.
    pub sigma_max: f64,
}

impl Default for Edm {
    fn default() -> Self {
        Self {
            sigma_min: 0.002,
            sigma_max: 80.0,
        }
    }
}

impl NoiseSchedule for Edm {
    fn alpha(&self, _t: f64) -> f64 {
        1.0
    }
    fn sigma(&self, t: f64) -> f64 {
        t
    }
    fn d_alpha(&self, _t: f64) -> f64 {
        0.0
    }
    fn d_sigma(&self, _t: f64) -> f64 {
        1.0
    }
    fn t_min(&self) -> f64 {
        self.sigma_min
    }
    fn t_max(&self) -> f64 {
        self.sigma_max
    }
    fn t_of_edm_sigma(&self, s: f64) -> Result<f64> {
        check_domain(self, s, s)
    }
}

/// The CondOT / rectified-flow path in diffusers' direction (t = 1 is noise): alpha = 1 - t,
/// sigma = t. The velocity dx/dt = eps - x_0. `t_min` / `t_max` keep away from the ends where
/// sigma / alpha is 0 or infinite.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CondOt {
    /// Smallest time (1e-3 by default).
    pub t_min: f64,
    /// Largest time (1 - 1e-3 by default).
    pub t_max: f64,
}

impl Default for CondOt {
    fn default() -> Self {
        Self {
            t_min: 1e-3,
            t_max: 1.0 - 1e-3,
        }
    }
}

impl NoiseSchedule for CondOt {
    fn alpha(&self, t: f64) -> f64 {
        1.0 - t
    }
    fn sigma(&self, t: f64) -> f64 {
        t
    }
    fn d_alpha(&self, _t: f64) -> f64 {
        -1.0
    }
    fn d_sigma(&self, _t: f64) -> f64 {
        1.0
    }
    fn t_min(&self) -> f64 {
        self.t_min
    }
    fn t_max(&self) -> f64 {
        self.t_max
    }
    fn t_of_edm_sigma(&self, s: f64) -> Result<f64> {
        check_domain(self, s / (1.0 + s), s)
    }
}

fn check_domain<S: NoiseSchedule + ?Sized>(sch: &S, t: f64, s: f64) -> Result<f64> {
    let (lo, hi) = (sch.t_min(), sch.t_max());
    let tol = 1e-9 * (hi - lo).abs().max(1e-12);
    if t.is_nan() || t < lo - tol || t > hi + tol {
        return Err(out_of_range(s, sch.edm_sigma(lo), sch.edm_sigma(hi)));
    }
    Ok(t.clamp(lo, hi))
}

/// How a [`DiscreteSchedule`] is read at fractional timesteps (diffusers' `interpolation_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Interpolation {
    /// sigma linear in t (diffusers Euler/Heun `linear`, `np.interp`).
    Linear,
    /// log sigma linear in t (k-diffusion `sigma_to_t`, diffusers' Karras grids).
    LogLinear,
}

/// A [`DiscreteSchedule`] seen as a continuous VP schedule on t in [0, N-1] (timestep units):
/// the EDM sigma is interpolated between timesteps, alpha = 1 / sqrt(1 + sigma^2), and the VP
/// sigma = sigma_edm alpha. At integer t it is exact; the inverse [`NoiseSchedule::t_of_edm_sigma`]
/// returns integer t for the table's own sigmas, as diffusers' schedulers pass them to the model.
#[derive(Clone, Debug)]
pub struct DiscreteVp {
    sigmas: Vec<f64>,
    log_sigmas: Vec<f64>,
    interpolation: Interpolation,
}

impl DiscreteVp {
    /// Wraps a discrete schedule.
    pub fn new(schedule: &DiscreteSchedule, interpolation: Interpolation) -> Self {
        let sigmas = schedule.sigmas();
        let log_sigmas = sigmas.iter().map(|s| s.ln()).collect();
        Self {
            sigmas,
            log_sigmas,
            interpolation,
        }
    }

    /// The per-timestep EDM sigmas.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    /// The interpolation in use.
    pub fn interpolation(&self) -> Interpolation {
        self.interpolation
    }

    fn segment(&self, t: f64) -> usize {
        (t.floor().max(0.0) as usize).min(self.sigmas.len() - 2)
    }
}

impl NoiseSchedule for DiscreteVp {
    fn alpha(&self, t: f64) -> f64 {
        1.0 / (1.0 + self.edm_sigma(t).powi(2)).sqrt()
    }
    fn sigma(&self, t: f64) -> f64 {
        self.edm_sigma(t) * self.alpha(t)
    }
    fn d_alpha(&self, t: f64) -> f64 {
        let (s, ds) = (self.edm_sigma(t), self.d_edm_sigma(t));
        -s * ds * (1.0 + s * s).powf(-1.5)
    }
    fn d_sigma(&self, t: f64) -> f64 {
        let (s, ds) = (self.edm_sigma(t), self.d_edm_sigma(t));
        ds * (1.0 + s * s).powf(-1.5)
    }
    fn t_min(&self) -> f64 {
        0.0
    }
    fn t_max(&self) -> f64 {
        (self.sigmas.len() - 1) as f64
    }
    fn edm_sigma(&self, t: f64) -> f64 {
        match self.interpolation {
            Interpolation::Linear => interp_table(t, &self.sigmas),
            Interpolation::LogLinear => interp_table(t, &self.log_sigmas).exp(),
        }
    }
    fn t_of_edm_sigma(&self, s: f64) -> Result<f64> {
        let n = self.sigmas.len();
        let (lo, hi) = (self.sigmas[0], self.sigmas[n - 1]);
        if s.is_nan() || s < lo * (1.0 - 1e-9) || s > hi * (1.0 + 1e-9) {
            return Err(out_of_range(s, lo, hi));
        }
        // first index with sigma >= s
        let j = self.sigmas.partition_point(|&v| v < s);
        if j == 0 {
            return Ok(0.0);
        }
        if j >= n {
            return Ok((n - 1) as f64);
        }
        let i = j - 1;
        let w = match self.interpolation {
            Interpolation::Linear => (s - self.sigmas[i]) / (self.sigmas[j] - self.sigmas[i]),
            Interpolation::LogLinear => {
                (s.ln() - self.log_sigmas[i]) / (self.log_sigmas[j] - self.log_sigmas[i])
            }
        };
        Ok(i as f64 + w.clamp(0.0, 1.0))
    }
}

impl DiscreteVp {
    /// d sigma_edm / dt of the piecewise interpolation (right derivative at knots).
    fn d_edm_sigma(&self, t: f64) -> f64 {
        let i = self.segment(t);
        match self.interpolation {
            Interpolation::Linear => self.sigmas[i + 1] - self.sigmas[i],
            Interpolation::LogLinear => {
                self.edm_sigma(t) * (self.log_sigmas[i + 1] - self.log_sigmas[i])
            }
        }
    }
}
