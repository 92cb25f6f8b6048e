//! Adapters between networks and the sampler contracts ([`Denoiser`], and a [`VelocityField`]
//! in noise time for [`flow_euler`](super::flow_euler); [`TimeFlip`] converts between the two
//! time directions of a velocity field).
//!
//! With x = x_0 + sigma n the EDM variable and x_t = alpha(t) x_0 + sigma(t) eps a schedule's
//! native variable, the two are related by x_t = alpha(t) x at the time where sigma(t) / alpha(t)
//! = sigma (Karras et al. 2022, eq. 4 and Table 1; for VP this is diffusers'
//! `scale_model_input`: x_t = x / sqrt(sigma^2 + 1)). Each adapter applies that map, calls the
//! network and converts its output with [`Parameterization`].

use candle_core::Tensor;

use super::{lin, Denoiser};
use crate::continuous::parameterization::{Coeffs, EdmPrecond, Parameterization};
use crate::continuous::schedule::NoiseSchedule;
use crate::continuous::VelocityField;
use crate::{Error, Result};

/// A network called as `forward(x_t, time)`: the raw callable that adapters wrap.
pub trait Network {
    /// The network output for a batch `x_t` at one time value.
    fn forward(&self, x_t: &Tensor, time: f64) -> Result<Tensor>;
}

impl<F> Network for F
where
    F: Fn(&Tensor, f64) -> Result<Tensor>,
{
    fn forward(&self, x_t: &Tensor, time: f64) -> Result<Tensor> {
        self(x_t, time)
    }
}

/// Any network of a given [`Parameterization`] trained on x_t = alpha(t) x_0 + sigma(t) eps of
/// `schedule`, called at `time = time_scale * t`, seen as a [`Denoiser`].
///
/// Examples: a DDPM eps-network on a discrete schedule is
/// `ScheduledDenoiser::new(&net, &DiscreteVp::new(&sched, Interpolation::Linear), Eps, 1.0)` (it
/// receives the timestep value, fractional between training timesteps); a VP-SDE score network
/// uses `&Vp::default()` and `Score`; a diffusers rectified-flow network uses `&CondOt` with
/// `Velocity` and `time_scale = 1000`.
pub struct ScheduledDenoiser<'a, N: Network + ?Sized> {
    net: &'a N,
    schedule: &'a dyn NoiseSchedule,
    param: Parameterization,
    time_scale: f64,
}

impl<'a, N: Network + ?Sized> ScheduledDenoiser<'a, N> {
    /// Wraps `net`.
    pub fn new(
        net: &'a N,
        schedule: &'a dyn NoiseSchedule,
        param: Parameterization,
        time_scale: f64,
    ) -> Self {
        Self {
            net,
            schedule,
            param,
            time_scale,
        }
    }

    /// The network output converted to (x_0, eps) at EDM noise level `sigma` for EDM input `x`,
    /// with the native x_t and coefficients.
    pub fn predict(&self, x: &Tensor, sigma: f64) -> Result<(Tensor, Tensor)> {
        let t = self.schedule.t_of_edm_sigma(sigma)?;
        let c = Coeffs::at(self.schedule, t);
        let x_t = x.affine(c.alpha, 0.0)?;
        let out = self.net.forward(&x_t, self.time_scale * t)?;
        self.param.to_x0_eps(&out, &x_t, &c)
    }
}

impl<N: Network + ?Sized> Denoiser for ScheduledDenoiser<'_, N> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok(self.predict(x, sigma)?.0)
    }
}

/// The reverse adapter: a [`Denoiser`] presented as a network of parameterization `param` on
/// `schedule`, called at `time = time_scale * t` (so e.g. an EDM or flow-matching model can stand
/// in for an eps-network in code written for DDPM).
pub struct DenoiserNetwork<'a, D: Denoiser + ?Sized> {
    den: &'a D,
    schedule: &'a dyn NoiseSchedule,
    param: Parameterization,
    time_scale: f64,
}

impl<'a, D: Denoiser + ?Sized> DenoiserNetwork<'a, D> {
    /// Wraps `den`.
    pub fn new(
        den: &'a D,
        schedule: &'a dyn NoiseSchedule,
        param: Parameterization,
        time_scale: f64,
    ) -> Self {
        Self {
            den,
            schedule,
            param,
            time_scale,
        }
    }
}

impl<D: Denoiser + ?Sized> Network for DenoiserNetwork<'_, D> {
    fn forward(&self, x_t: &Tensor, time: f64) -> Result<Tensor> {
        let t = time / self.time_scale;
        let c = Coeffs::at(self.schedule, t);
        let x0 = self
            .den
            .denoise(&x_t.affine(1.0 / c.alpha, 0.0)?, c.sigma / c.alpha)?;
        let eps = lin(x_t, 1.0 / c.sigma, &x0, -c.alpha / c.sigma)?;
        self.param.from_x0_eps(&x0, &eps, &c)
    }
}

/// The VP view of a denoiser: (x_0, eps) predicted from x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps,
/// 0 < abar < 1 (EDM sigma = sqrt((1 - abar) / abar), x = x_t / sqrt(abar)).
pub fn vp_predict(den: &dyn Denoiser, x_t: &Tensor, alpha_bar: f64) -> Result<(Tensor, Tensor)> {
    if !(alpha_bar > 0.0 && alpha_bar < 1.0) {
        return Err(Error::Config(format!(
            "a VP prediction needs 0 < alpha_bar < 1, got {alpha_bar}"
        )));
    }
    let (a, s) = (alpha_bar.sqrt(), (1.0 - alpha_bar).sqrt());
    let x0 = den.denoise(&x_t.affine(1.0 / a, 0.0)?, s / a)?;
    let eps = lin(x_t, 1.0 / s, &x0, -a / s)?;
    Ok((x0, eps))
}

/// An EDM-preconditioned network F (Karras et al. 2022, eq. 7): D(x; sigma) = c_skip x + c_out
/// F(c_in x; c_noise(sigma)), F called as `forward(c_in x, c_noise)`.
pub struct EdmDenoiser<'a, N: Network + ?Sized> {
    net: &'a N,
    precond: EdmPrecond,
}

impl<'a, N: Network + ?Sized> EdmDenoiser<'a, N> {
    /// Wraps the raw network `net`.
    pub fn new(net: &'a N, precond: EdmPrecond) -> Self {
        Self { net, precond }
    }
}

impl<N: Network + ?Sized> Denoiser for EdmDenoiser<'_, N> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let p = &self.precond;
        let f = self
            .net
            .forward(&x.affine(p.c_in(sigma), 0.0)?, p.c_noise(sigma))?;
        p.denoised(x, &f, sigma)
    }
}

/// A flow-matching [`VelocityField`] in this crate's convention (x_t = (1 - t) eps + t x_1,
/// t = 1 data, v = x_1 - eps; see [`crate::models::flow_matching`]) as a [`Denoiser`]: with
/// s = sigma / (1 + sigma) the noise fraction, x_t = x / (1 + sigma) at t = 1 - s and
/// x_0 = x_t + s v.
pub struct VelocityFieldDenoiser<'a, V: VelocityField + ?Sized>(pub &'a V);

impl<V: VelocityField + ?Sized> Denoiser for VelocityFieldDenoiser<'_, V> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let s = sigma / (1.0 + sigma);
        let x_t = x.affine(1.0 / (1.0 + sigma), 0.0)?;
        let v = self.0.velocity(&x_t, 1.0 - s)?;
        lin(&x_t, 1.0, &v, s)
    }
}

/// A [`VelocityField`] with its time reversed: s = 1 - t and dx/ds = -v(x, 1 - s).
///
/// The crate has two time conventions for velocity fields. Flow matching and the CNF likelihood
/// ([`crate::continuous::cnf`]) put the noise at t = 0 and the data at t = 1
/// (x_t = (1 - t) eps + t x_1, v = x_1 - eps; Lipman et al. 2023), while diffusion and
/// diffusers' rectified-flow sampler put the noise at s = 1 (x_s = (1 - s) x_0 + s eps,
/// dx_s/ds = eps - x_0; Esser et al. 2024). `TimeFlip(&field)` presents a field of either convention in the other one (e.g.
/// a flow-matching network to [`flow_euler`](super::flow_euler)). Forward-mode JVPs of the
/// wrapped field are passed through, negated.
pub struct TimeFlip<'a, V: VelocityField + ?Sized>(pub &'a V);

impl<V: VelocityField + ?Sized> VelocityField for TimeFlip<'_, V> {
    fn velocity(&self, x: &Tensor, s: f64) -> Result<Tensor> {
        Ok(self.0.velocity(x, 1.0 - s)?.neg()?)
    }

    fn jvp(&self, x: &Tensor, s: f64, tangents: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        match self.0.jvp(x, 1.0 - s, tangents)? {
            Some((v, jv)) => Ok(Some((v.neg()?, jv.neg()?))),
            None => Ok(None),
        }
    }
}

/// A [`Denoiser`] as a [`VelocityField`] in noise time (for [`flow_euler`](super::flow_euler))
/// for 0 < s < 1: x = x_s / (1 - s) at sigma = s / (1 - s), velocity (x_s - x_0) / s. (A
/// denoiser cannot be queried at pure noise, s = 1: start the flow grid below 1.)
pub struct DenoiserFlow<'a, D: Denoiser + ?Sized>(pub &'a D);

impl<D: Denoiser + ?Sized> VelocityField for DenoiserFlow<'_, D> {
    fn velocity(&self, x: &Tensor, s: f64) -> Result<Tensor> {
        if !(s > 0.0 && s < 1.0) {
            return Err(Error::Config(format!(
                "a denoiser gives a flow velocity only for 0 < s < 1, got s = {s}"
            )));
        }
        let x0 = self
            .0
            .denoise(&x.affine(1.0 / (1.0 - s), 0.0)?, s / (1.0 - s))?;
        lin(x, 1.0 / s, &x0, -1.0 / s)
    }
}
