//! Noise-level grids for the samplers: decreasing EDM sigmas sigma_0 > ... > sigma_{n-1}
//! (optionally followed by 0).
//!
//! - [`karras_sigmas`]: Karras et al. 2022, eq. 5 (rho = 7).
//! - [`uniform_t_sigmas`]: uniform in the time of a continuous schedule (Song et al. 2021b).
//! - [`diffusers_sigmas`]: a discrete schedule's sigmas at (fractional) timesteps, as diffusers'
//!   Euler / Heun / DPM-Solver schedulers compute them.
//! - [`flow_match_sigmas`]: diffusers' `FlowMatchEulerDiscreteScheduler` grid with `shift`.

use super::continuous::{DiscreteVp, NoiseSchedule};
use super::discrete::np_linspace;
use super::spacing::TimestepSpacing;
use crate::{Error, Result};

/// Karras et al. 2022, eq. 5: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
/// sigma_max^(1/rho)))^rho for i = 0..n-1 (no trailing zero). `n >= 2`, 0 < sigma_min < sigma_max.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize, rho: f64) -> Result<Vec<f64>> {
    if n < 2 || !(sigma_min > 0.0 && sigma_min < sigma_max) || rho <= 0.0 {
        return Err(Error::Config(format!(
            "Karras grid needs n >= 2, 0 < sigma_min < sigma_max and rho > 0 \
             (got n {n}, sigma_min {sigma_min}, sigma_max {sigma_max}, rho {rho})"
        )));
    }
    let (a, b) = (sigma_max.powf(1.0 / rho), sigma_min.powf(1.0 / rho));
    Ok(np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (a + r * (b - a)).powf(rho))
        .collect())
}

/// n EDM sigmas at times uniformly spaced from t_max down to t_min of `schedule` (n >= 2).
pub fn uniform_t_sigmas(schedule: &dyn NoiseSchedule, n: usize) -> Result<Vec<f64>> {
    if n < 2 {
        return Err(Error::Config(format!(
            "a sigma grid needs at least 2 points, got {n}"
        )));
    }
    Ok(uniform_times(schedule, n)
        .into_iter()
        .map(|t| schedule.edm_sigma(t))
        .collect())
}

/// n times uniformly spaced from t_max down to t_min of `schedule`.
pub fn uniform_times(schedule: &dyn NoiseSchedule, n: usize) -> Vec<f64> {
    np_linspace(schedule.t_max(), schedule.t_min(), n)
}

/// Appends the final sigma = 0 (sample the clean data at the last step).
pub fn with_final_zero(mut sigmas: Vec<f64>) -> Vec<f64> {
    sigmas.push(0.0);
    sigmas
}

/// The EDM sigmas of a discrete schedule at `timesteps`, interpolated as the schedule says
/// (diffusers: `np.interp(timesteps, arange(N), sigmas)`), followed by 0.
pub fn diffusers_sigmas(schedule: &DiscreteVp, timesteps: &[f64]) -> Vec<f64> {
    with_final_zero(timesteps.iter().map(|&t| schedule.edm_sigma(t)).collect())
}

/// diffusers' `init_noise_sigma` for Euler-type schedulers: the start sample is x_init times this.
/// `leading` spacing scales by sqrt(sigma_max^2 + 1) (a VP-style unit variance on top of the
/// sigma), the others by sigma_max.
pub fn init_noise_sigma(sigma_max: f64, spacing: TimestepSpacing) -> f64 {
    match spacing {
        TimestepSpacing::Leading => (sigma_max * sigma_max + 1.0).sqrt(),
        TimestepSpacing::Linspace | TimestepSpacing::Trailing => sigma_max,
    }
}

/// The `shift` map of rectified-flow samplers (Esser et al. 2024, eq. 23):
/// s -> shift s / (1 + (shift - 1) s).
pub fn shift_sigma(s: f64, shift: f64) -> f64 {
    shift * s / (1.0 + (shift - 1.0) * s)
}

/// diffusers' `FlowMatchEulerDiscreteScheduler` (no dynamic shifting): n flow times (t = 1 is
/// noise) followed by 0. The constructor shifts the training grid 1/N .. 1, so its sigma_min is
/// shift(1/N); `set_timesteps` lays n points from 1 to that sigma_min and shifts them again, so
/// the last flow time is shift(shift(1/N)) (a diffusers quirk, reproduced).
/// The model is called at timestep = 1000 * sigma.
pub fn flow_match_sigmas(n: usize, shift: f64, n_train: usize) -> Result<Vec<f64>> {
    if n == 0 || n_train == 0 || shift <= 0.0 {
        return Err(Error::Config(format!(
            "flow-matching grid needs n >= 1, N >= 1 and shift > 0 (got {n}, {n_train}, {shift})"
        )));
    }
    let sigma_max = shift_sigma(1.0, shift);
    let sigma_min = shift_sigma(1.0 / n_train as f64, shift);
    let n_train = n_train as f64;
    let mut v: Vec<f64> = np_linspace(sigma_max * n_train, sigma_min * n_train, n)
        .into_iter()
        .map(|t| shift_sigma(t / n_train, shift))
        .collect();
    v.push(0.0);
    Ok(v)
}
