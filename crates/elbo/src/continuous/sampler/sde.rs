//! Samplers of the reverse-time SDE and the probability-flow ODE of a continuous schedule
//! (Song et al. 2021b).
//!
//! In the schedule's native variable x_t = alpha(t) x_0 + sigma(t) eps the forward SDE is
//! dx = f x dt + g dW ([`NoiseSchedule::drift`], [`NoiseSchedule::diffusion2`]); the reverse SDE
//! is dx = [f x - g^2 score] dt + g dW_bar (eq. 6) and the probability-flow ODE
//! dx/dt = f x - g^2 score / 2 (eq. 13), with score(x_t) = -(x_t - alpha D(x_t / alpha;
//! sigma / alpha)) / sigma^2 from the denoiser (Tweedie's formula).
//!
//! - [`euler_maruyama`]: the EM predictor alone (Alg. 2-3's predictor with the SDE step),
//! - [`predictor_corrector`]: EM predictor + Langevin corrector (Alg. 1-3, App. G, Alg. 4-5),
//! - [`pf_ode`]: the probability-flow ODE through [`crate::continuous::ode`].

use candle_core::{DType, Tensor};

use super::{lin, noise_like, Denoiser};
use crate::continuous::ode::{integrate, OdeStats, Solver};
use crate::continuous::schedule::NoiseSchedule;
use crate::continuous::VelocityField;
use crate::{Error, Result, Rng};

/// score(x_t) at time t: -(x_t - alpha x_0) / sigma^2.
pub fn score(
    den: &dyn Denoiser,
    schedule: &dyn NoiseSchedule,
    x: &Tensor,
    t: f64,
) -> Result<Tensor> {
    let (a, s) = (schedule.alpha(t), schedule.sigma(t));
    let x0 = den.denoise(&x.affine(1.0 / a, 0.0)?, s / a)?;
    lin(x, -1.0 / (s * s), &x0, a / (s * s))
}

fn check_times(schedule: &dyn NoiseSchedule, times: &[f64]) -> Result<()> {
    let (lo, hi) = (schedule.t_min(), schedule.t_max());
    if times.len() < 2
        || times.windows(2).any(|w| w[1] >= w[0])
        || times.iter().any(|t| !(*t >= lo && *t <= hi))
    {
        return Err(Error::Config(format!(
            "SDE times must be at least 2, strictly decreasing and inside [{lo}, {hi}]; \
             got {times:?}"
        )));
    }
    Ok(())
}

/// Tweedie's denoising of the final sample: D(x / alpha; sigma / alpha) at t.
fn final_denoise(
    den: &dyn Denoiser,
    schedule: &dyn NoiseSchedule,
    x: &Tensor,
    t: f64,
) -> Result<Tensor> {
    let (a, s) = (schedule.alpha(t), schedule.sigma(t));
    den.denoise(&x.affine(1.0 / a, 0.0)?, s / a)
}

/// One Euler-Maruyama step of the reverse SDE from t to t_next < t (noise skipped if `last`).
fn em_step(
    den: &dyn Denoiser,
    schedule: &dyn NoiseSchedule,
    x: &Tensor,
    t: f64,
    t_next: f64,
    last: bool,
    rng: &mut Rng,
) -> Result<Tensor> {
    let dt = t - t_next;
    let (f, g2) = (schedule.drift(t), schedule.diffusion2(t));
    let sc = score(den, schedule, x, t)?;
    // x - (f x - g^2 score) dt
    let mean = lin(x, 1.0 - f * dt, &sc, g2 * dt)?;
    if last {
        return Ok(mean);
    }
    Ok((mean + noise_like(x, rng)?.affine((g2 * dt).max(0.0).sqrt(), 0.0)?)?)
}

/// Euler-Maruyama on the reverse SDE over the decreasing `times` of `schedule`, from `x` at
/// times[0] in the native variable (x ~ N(0, (alpha^2 s_data^2 + sigma^2) I); for VP at t = 1
/// N(0, I) is the usual prior). The last step adds no noise (Song et al.'s x_mean); with
/// `denoise_final` the result is then denoised at the last time (Tweedie), else divided by
/// alpha, so it is in data units either way.
pub fn euler_maruyama(
    den: &dyn Denoiser,
    schedule: &dyn NoiseSchedule,
    times: &[f64],
    denoise_final: bool,
    x: &Tensor,
    rng: &mut Rng,
) -> Result<Tensor> {
    predictor_corrector(den, schedule, times, 0, 0.0, denoise_final, x, rng)
}

/// Predictor-corrector sampling (Song et al. 2021b, Alg. 1): at each time, `corrector_steps`
/// Langevin steps x += e score + sqrt(2 e) z with e = 2 r_i (snr ||z|| / ||score||)^2 (Alg. 4-5;
/// norms averaged over the batch; r_i = (alpha(t_{i+1}) / alpha(t_i))^2 is Alg. 5's
/// alpha_i = 1 - beta_i for VP and 1 for VE), then one Euler-Maruyama predictor step, ordered as
/// in the paper's code. `snr` is 0.16 in Song et al. for CIFAR-10 VE.
#[allow(clippy::too_many_arguments)]
pub fn predictor_corrector(
    den: &dyn Denoiser,
    schedule: &dyn NoiseSchedule,
    times: &[f64],
    corrector_steps: usize,
    snr: f64,
    denoise_final: bool,
    x: &Tensor,
    rng: &mut Rng,
) -> Result<Tensor> {
    check_times(schedule, times)?;
    if corrector_steps > 0 && !(snr > 0.0 && snr.is_finite()) {
        return Err(Error::Config(format!(
            "the Langevin corrector needs snr > 0, got {snr}"
        )));
    }
    let n = times.len() - 1;
    let mut x = x.clone();
    for i in 0..n {
        let (t, t_next) = (times[i], times[i + 1]);
        let ratio = (schedule.alpha(t_next) / schedule.alpha(t)).powi(2);
        for _ in 0..corrector_steps {
            let g = score(den, schedule, &x, t)?;
            let z = noise_like(&x, rng)?;
            let (gn, zn) = (mean_norm(&g)?, mean_norm(&z)?);
            if gn == 0.0 {
                continue;
            }
            let e = 2.0 * ratio * (snr * zn / gn).powi(2);
            x = (lin(&x, 1.0, &g, e)? + z.affine((2.0 * e).sqrt(), 0.0)?)?;
        }
        x = em_step(den, schedule, &x, t, t_next, i == n - 1, rng)?;
    }
    let t_end = times[n];
    if denoise_final {
        final_denoise(den, schedule, &x, t_end)
    } else {
        Ok(x.affine(1.0 / schedule.alpha(t_end), 0.0)?)
    }
}

/// The mean over the batch (dim 0) of per-example L2 norms.
fn mean_norm(x: &Tensor) -> Result<f64> {
    let b = x.dim(0)?;
    let v = x
        .to_dtype(DType::F64)?
        .reshape((b, ()))?
        .sqr()?
        .sum(1)?
        .sqrt()?
        .mean_all()?
        .to_scalar::<f64>()?;
    Ok(v)
}

/// The probability-flow ODE drift dx/dt = f x - g^2 score / 2 of `schedule` as a
/// [`VelocityField`] in the schedule's own time (Song et al. 2021b, eq. 13). Its divergence gives
/// the PF-ODE likelihood through [`crate::continuous::cnf`] after a change of time.
pub struct ProbabilityFlow<'a> {
    /// The denoiser.
    pub den: &'a dyn Denoiser,
    /// The schedule.
    pub schedule: &'a dyn NoiseSchedule,
}

impl VelocityField for ProbabilityFlow<'_> {
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let (f, g2) = (self.schedule.drift(t), self.schedule.diffusion2(t));
        let sc = score(self.den, self.schedule, x, t)?;
        lin(x, f, &sc, -0.5 * g2)
    }
}

/// Probability-flow ODE sampling: integrates eq. 13 from t_max to t_min of `schedule` with
/// `solver` (reusing [`crate::continuous::ode`]), from `x` at t_max in the native variable, and
/// returns the sample in data units (denoised at t_min with `denoise_final`, else divided by
/// alpha(t_min)) with the solver's cost.
pub fn pf_ode(
    den: &dyn Denoiser,
    schedule: &dyn NoiseSchedule,
    solver: &Solver,
    denoise_final: bool,
    x: &Tensor,
) -> Result<(Tensor, OdeStats)> {
    let field = ProbabilityFlow { den, schedule };
    let mut rhs = |y: &Tensor, t: f64| field.velocity(y, t);
    let (t0, t1) = (schedule.t_max(), schedule.t_min());
    let (y, stats) = integrate(&mut rhs, x, t0, t1, solver)?;
    let out = if denoise_final {
        final_denoise(den, schedule, &y, t1)?
    } else {
        y.affine(1.0 / schedule.alpha(t1), 0.0)?
    };
    Ok((out, stats))
}
