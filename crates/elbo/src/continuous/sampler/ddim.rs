//! DDIM (Song et al. 2021a): the non-Markovian reverse process of eq. 12 on any sub-sequence of
//! noise levels, stochastic with eta in [0, 1] (eta = 1 is DDPM's fixed_small sampler, eta = 0
//! the deterministic probability-flow discretisation), and its deterministic inversion.
//!
//! From x_t at abar_t to abar_prev, with (x_0, eps) predicted at x_t,
//! sigma_t(eta) = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev) and
//! x_prev = sqrt(abar_prev) x_0 + sqrt(1 - abar_prev - sigma_t^2) eps + sigma_t z.

use candle_core::Tensor;

use super::adapters::vp_predict;
use super::{lin, noise_like, Denoiser};
use crate::continuous::schedule::Transition;
use crate::{Error, Result, Rng};

fn check(transitions: &[Transition], eta: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&eta) {
        return Err(Error::Config(format!(
            "DDIM eta must lie in [0, 1], got {eta}"
        )));
    }
    if transitions.is_empty() {
        return Err(Error::Config("DDIM needs at least one transition".into()));
    }
    for tr in transitions {
        if !(tr.alpha_bar > 0.0 && tr.alpha_bar < 1.0 && tr.alpha_bar_prev <= 1.0)
            || tr.alpha_bar_prev < tr.alpha_bar
        {
            return Err(Error::Config(format!(
                "bad transition {tr:?}: need 0 < alpha_bar < 1 and alpha_bar <= alpha_bar_prev <= 1"
            )));
        }
    }
    Ok(())
}

/// DDIM sampling: applies `transitions` in order to `x` (VP-scaled, at the first transition's
/// level; x_T ~ N(0, I) for a full chain) and returns the last level's sample (x_0 when the last
/// transition goes to alpha_bar_prev = 1). Build transitions with
/// [`DiscreteSchedule::transitions`](crate::continuous::schedule::DiscreteSchedule::transitions)
/// (the chain through the listed timesteps) or
/// [`DiscreteSchedule::diffusers_transitions`](crate::continuous::schedule::DiscreteSchedule::diffusers_transitions)
/// (diffusers' `t - N/n` rule). `rng` is only drawn from when eta > 0.
pub fn ddim(
    den: &dyn Denoiser,
    transitions: &[Transition],
    eta: f64,
    x: &Tensor,
    rng: &mut Rng,
) -> Result<Tensor> {
    check(transitions, eta)?;
    let mut x = x.clone();
    for tr in transitions {
        let (x0, eps) = vp_predict(den, &x, tr.alpha_bar)?;
        let (a, ap) = (tr.alpha_bar, tr.alpha_bar_prev);
        let std = eta * ((1.0 - ap) / (1.0 - a) * (1.0 - a / ap)).max(0.0).sqrt();
        let dir = (1.0 - ap - std * std).max(0.0).sqrt();
        x = lin(&x0, ap.sqrt(), &eps, dir)?;
        if std > 0.0 {
            x = (x + noise_like(&x0, rng)?.affine(std, 0.0)?)?;
        }
    }
    Ok(x)
}

/// Deterministic DDIM inversion (Song et al. 2021a, Sec. 4.3; Dhariwal & Nichol 2021, App. F):
/// runs `transitions` backwards, mapping a sample at the last transition's `alpha_bar_prev` up to
/// the first transition's `alpha_bar` with x_next = sqrt(abar_next) x_0 + sqrt(1 - abar_next) eps,
/// (x_0, eps) predicted at the current, less noisy level. The start level must be noisy
/// (alpha_bar_prev < 1): eps is undefined on clean data, so end the list at a small timestep such
/// as 0. Then `ddim(den, transitions, 0.0, ddim_invert(den, transitions, x))` returns x up to the
/// discretisation error.
pub fn ddim_invert(den: &dyn Denoiser, transitions: &[Transition], x: &Tensor) -> Result<Tensor> {
    check(transitions, 0.0)?;
    let mut x = x.clone();
    for tr in transitions.iter().rev() {
        if tr.alpha_bar_prev >= 1.0 {
            return Err(Error::Config(
                "DDIM inversion cannot start from clean data (alpha_bar = 1): end the timestep \
                 list at a noisy level (e.g. timestep 0) and drop the final step to x_0"
                    .into(),
            ));
        }
        let (x0, eps) = vp_predict(den, &x, tr.alpha_bar_prev)?;
        let a = tr.alpha_bar;
        x = lin(&x0, a.sqrt(), &eps, (1.0 - a).sqrt())?;
    }
    Ok(x)
}
