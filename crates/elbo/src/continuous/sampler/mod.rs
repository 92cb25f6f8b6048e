//! Diffusion and flow samplers: free functions over one narrow contract, noise injected from
//! [`crate::Rng`].
//!
//! The contract is the EDM denoiser (Karras et al. 2022, Sec. 2; k-diffusion's form):
//! [`Denoiser::denoise`]`(x, sigma)` returns the estimate of x_0 given x = x_0 + sigma n. Every
//! Gaussian diffusion network becomes one through [`adapters`]: an eps-, x0-, v-, score- or
//! velocity-predicting network on the scaled input x_t = alpha(t) x_0 + sigma(t) eps of any
//! [`NoiseSchedule`](super::schedule::NoiseSchedule) (a discrete DDPM schedule included, called
//! at the timesteps diffusers would pass), an EDM-preconditioned network, or a flow-matching
//! [`VelocityField`](super::VelocityField). So any network runs under any sampler:
//!
//! - [`ddpm`]: ancestral DDPM (fixed_small / fixed_large variances; Ho et al. 2020, Alg. 2),
//! - [`ddim`]: DDIM with eta in [0, 1] on any timestep subset, and its deterministic inversion
//!   (Song et al. 2021a, eq. 12),
//! - [`karras`]: Euler and Heun on the probability-flow ODE in sigma, with EDM's stochastic churn
//!   (Karras et al. 2022, Alg. 1-2),
//! - [`dpm_solver`]: DPM-Solver++(2M) (Lu et al. 2022, Alg. 2),
//! - [`sde`]: Euler-Maruyama on the reverse SDE and predictor-corrector with a Langevin corrector
//!   (Song et al. 2021b, Alg. 1-3 and App. G), plus the probability-flow ODE through
//!   [`super::ode`] (eq. 13),
//! - [`flow`]: rectified-flow Euler with diffusers' `shift` over a
//!   [`VelocityField`](super::VelocityField) in noise time (s = 1 pure noise; a field in this
//!   crate's flow-matching time, data at t = 1, goes through the [`TimeFlip`] adapter).
//!
//! The VP-native samplers (DDPM, DDIM) work on VP-scaled x_t and convert to and from the
//! denoiser with [`adapters::vp_predict`]; [`adapters::DenoiserNetwork`] is the reverse adapter
//! that presents any denoiser as a network of a chosen parameterization and schedule.

use candle_core::Tensor;

use crate::{Result, Rng};

pub mod adapters;
pub mod ddim;
pub mod ddpm;
pub mod dpm_solver;
pub mod flow;
pub mod karras;
pub mod sde;

pub use adapters::{
    vp_predict, DenoiserFlow, DenoiserNetwork, EdmDenoiser, Network, ScheduledDenoiser, TimeFlip,
    VelocityFieldDenoiser,
};
pub use ddim::{ddim, ddim_invert};
pub use ddpm::ddpm;
pub use dpm_solver::dpmpp_2m;
pub use flow::flow_euler;
pub use karras::{euler, heun, Churn};
pub use sde::{euler_maruyama, pf_ode, predictor_corrector, ProbabilityFlow};

/// An EDM denoiser: D(x; sigma) ~ E[x_0 | x_0 + sigma n = x] (Karras et al. 2022, eq. 2-3).
pub trait Denoiser {
    /// The x_0 estimate for a batch `x` (any shape) at noise level `sigma > 0`; same shape as `x`.
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor>;
}

impl<F> Denoiser for F
where
    F: Fn(&Tensor, f64) -> Result<Tensor>,
{
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        self(x, sigma)
    }
}

/// `a * ca + b * cb`, in the dtype of the inputs.
pub(crate) fn lin(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
    Ok((a.affine(ca, 0.0)? + b.affine(cb, 0.0)?)?)
}

/// Standard normal noise shaped and typed like `x`.
pub(crate) fn noise_like(x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
    Ok(rng
        .normal_tensor(x.dims(), x.device())?
        .to_dtype(x.dtype())?)
}

/// Checks a decreasing sigma grid with at least two entries, all finite and >= 0.
pub(crate) fn check_sigmas(sigmas: &[f64]) -> Result<()> {
    if sigmas.len() < 2 {
        return Err(crate::Error::Config(format!(
            "a sigma grid needs at least 2 entries, got {}",
            sigmas.len()
        )));
    }
    if sigmas.iter().any(|s| !s.is_finite() || *s < 0.0) || sigmas.windows(2).any(|w| w[1] >= w[0])
    {
        return Err(crate::Error::Config(format!(
            "sigmas must be finite, non-negative and strictly decreasing, got {sigmas:?}"
        )));
    }
    Ok(())
}
