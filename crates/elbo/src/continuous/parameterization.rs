//! What a diffusion network predicts, and how to convert between the choices.
//!
//! On x_t = alpha x_0 + sigma eps every prediction is an affine function of (x_0, eps), so any
//! one of them, together with x_t, determines the others:
//! - eps (Ho et al. 2020), x_0 (the "sample" prediction),
//! - v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4; with alpha^2 + sigma^2 = 1 as VP
//!   schedules have, x_0 = alpha x_t - sigma v and eps = sigma x_t + alpha v),
//! - the score grad log p(x_t) = -eps / sigma (Song et al. 2021b; Vincent 2011),
//! - the velocity dx_t/dt = alpha' x_0 + sigma' eps (flow matching; Lipman et al. 2023),
//! - on discrete data, logits over the levels (DDPM's levels prediction; its x_0 estimate is
//!   the posterior mean over the level grid, [`crate::continuous::diffusion::param`]), which is
//!   not one of these affine maps and is rejected by the conversions here.
//!
//! [`EdmPrecond`] is the preconditioning of Karras et al. 2022, Table 1: D(x; sigma) = c_skip x +
//! c_out F(c_in x; c_noise) for x = x_0 + sigma n.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The quantity a network outputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parameterization {
    /// The noise eps (Ho et al. 2020, eq. 11).
    Eps,
    /// The clean sample x_0.
    X0,
    /// v = alpha eps - sigma x_0 (Salimans & Ho 2022, Sec. 4).
    V,
    /// The score grad_x log p_t(x) = -eps / sigma.
    Score,
    /// The velocity dx_t/dt = alpha' x_0 + sigma' eps (needs the schedule's derivatives).
    Velocity,
    /// Logits over the L levels of discrete data, with the exact likelihood of x_t as a skip
    /// term (see [`crate::continuous::diffusion::param`]): `levels` outputs per dimension, so
    /// not a per-dimension affine function of (x_0, eps).
    Levels {
        /// L.
        levels: usize,
    },
}

impl Parameterization {
    /// From a name: `eps` / `epsilon`, `x0` / `sample`, `v` / `v_prediction`, `score`,
    /// `velocity` / `flow` (diffusers' `prediction_type` names are accepted). `levels` needs the
    /// number of levels of the data: build [`Parameterization::Levels`] directly, or resolve a
    /// [`ParameterizationChoice`](crate::continuous::diffusion::param::ParameterizationChoice).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "eps" | "epsilon" => Ok(Self::Eps),
            "x0" | "sample" => Ok(Self::X0),
            "v" | "v_prediction" => Ok(Self::V),
            "score" => Ok(Self::Score),
            "velocity" | "flow" | "flow_prediction" => Ok(Self::Velocity),
            "levels" => Err(Error::Config(
                "the levels parameterization needs the number of levels of discrete data".into(),
            )),
            other => Err(Error::Config(format!(
                "unknown parameterization '{other}'; known: eps, x0, v, score, velocity"
            ))),
        }
    }

    /// A short name: eps, x0, v, score, velocity or levels.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Eps => "eps",
            Self::X0 => "x0",
            Self::V => "v",
            Self::Score => "score",
            Self::Velocity => "velocity",
            Self::Levels { .. } => "levels",
        }
    }

    /// Network outputs per data dimension (L for levels, else 1).
    pub fn outputs_per_dim(&self) -> usize {
        match self {
            Self::Levels { levels } => *levels,
            _ => 1,
        }
    }
}

/// The schedule's coefficients at one time (or path parameter) t: x_t = alpha x_0 + sigma eps,
/// and their derivatives in t (only [`Parameterization::Velocity`] and the probability-flow ODE
/// use the derivatives).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Coeffs {
    /// alpha(t).
    pub alpha: f64,
    /// sigma(t).
    pub sigma: f64,
    /// d alpha / dt.
    pub d_alpha: f64,
    /// d sigma / dt.
    pub d_sigma: f64,
}

impl Coeffs {
    /// Coefficients of `schedule` at time `t`.
    pub fn at(schedule: &dyn crate::continuous::schedule::NoiseSchedule, t: f64) -> Self {
        Self {
            alpha: schedule.alpha(t),
            sigma: schedule.sigma(t),
            d_alpha: schedule.d_alpha(t),
            d_sigma: schedule.d_sigma(t),
        }
    }

    /// VP coefficients for an EDM noise level: alpha = 1/sqrt(1+s^2), sigma = s alpha
    /// (derivatives w.r.t. s).
    pub fn vp_from_edm_sigma(s: f64) -> Self {
        let a = 1.0 / (1.0 + s * s).sqrt();
        Self {
            alpha: a,
            sigma: s * a,
            d_alpha: -s * a * a * a,
            d_sigma: a * a * a,
        }
    }
}

fn lin(a: &Tensor, ca: f64, b: &Tensor, cb: f64) -> Result<Tensor> {
    Ok((a.affine(ca, 0.0)? + b.affine(cb, 0.0)?)?)
}

fn nonzero(v: f64, what: &str) -> Result<f64> {
    if v == 0.0 || !v.is_finite() {
        return Err(Error::Numerical(format!(
            "cannot convert the prediction: {what} is {v}"
        )));
    }
    Ok(v)
}

/// The error for a conversion that the levels parameterization has no per-dimension form of.
fn no_levels(what: &str) -> Error {
    Error::Config(format!(
        "the levels parameterization outputs logits over the levels, not one value per \
         dimension; it has no {what} (use diffusion::param::x0_from_output)"
    ))
}

impl Parameterization {
    /// The (x_0, eps) pair implied by a network output `out` at `x_t`.
    pub fn to_x0_eps(&self, out: &Tensor, x_t: &Tensor, c: &Coeffs) -> Result<(Tensor, Tensor)> {
        let (a, s) = (c.alpha, c.sigma);
        match self {
            Self::Eps => {
                let x0 = lin(x_t, 1.0 / nonzero(a, "alpha")?, out, -s / a)?;
                Ok((x0, out.clone()))
            }
            Self::X0 => {
                let eps = lin(x_t, 1.0 / nonzero(s, "sigma")?, out, -a / s)?;
                Ok((out.clone(), eps))
            }
            Self::V => {
                let n = nonzero(a * a + s * s, "alpha^2 + sigma^2")?;
                Ok((lin(x_t, a / n, out, -s / n)?, lin(x_t, s / n, out, a / n)?))
            }
            Self::Score => {
                // eps = -sigma score
                let eps = out.affine(-s, 0.0)?;
                let x0 = lin(x_t, 1.0 / nonzero(a, "alpha")?, out, s * s / a)?;
                Ok((x0, eps))
            }
            Self::Velocity => {
                let det = nonzero(c.d_sigma * a - s * c.d_alpha, "sigma' alpha - sigma alpha'")?;
                let x0 = lin(x_t, c.d_sigma / det, out, -s / det)?;
                let eps = lin(out, a / det, x_t, -c.d_alpha / det)?;
                Ok((x0, eps))
            }
            Self::Levels { .. } => Err(no_levels("(x_0, eps) conversion")),
        }
    }

    /// The prediction of this kind implied by (x_0, eps).
    pub fn from_x0_eps(&self, x0: &Tensor, eps: &Tensor, c: &Coeffs) -> Result<Tensor> {
        let (a, s) = (c.alpha, c.sigma);
        match self {
            Self::Eps => Ok(eps.clone()),
            Self::X0 => Ok(x0.clone()),
            Self::V => lin(eps, a, x0, -s),
            Self::Score => Ok(eps.affine(-1.0 / nonzero(s, "sigma")?, 0.0)?),
            Self::Velocity => lin(x0, c.d_alpha, eps, c.d_sigma),
            Self::Levels { .. } => Err(no_levels("prediction from (x_0, eps)")),
        }
    }

    /// Converts an output of this kind into an output of kind `to` (an error for levels, unless
    /// `to` is the same kind).
    pub fn convert(
        &self,
        to: Parameterization,
        out: &Tensor,
        x_t: &Tensor,
        c: &Coeffs,
    ) -> Result<Tensor> {
        if *self == to {
            return Ok(out.clone());
        }
        let (x0, eps) = self.to_x0_eps(out, x_t, c)?;
        to.from_x0_eps(&x0, &eps, c)
    }
}

/// EDM preconditioning (Karras et al. 2022, Table 1 and eq. 7): D(x; sigma) = c_skip x +
/// c_out F(c_in x; c_noise), trained with weight lambda(sigma) = 1 / c_out^2.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EdmPrecond {
    /// Standard deviation of the data, 0.5 by default.
    pub sigma_data: f64,
}

impl Default for EdmPrecond {
    fn default() -> Self {
        Self { sigma_data: 0.5 }
    }
}

impl EdmPrecond {
    /// c_skip = sigma_data^2 / (sigma^2 + sigma_data^2).
    pub fn c_skip(&self, sigma: f64) -> f64 {
        let sd2 = self.sigma_data * self.sigma_data;
        sd2 / (sigma * sigma + sd2)
    }
    /// c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2).
    pub fn c_out(&self, sigma: f64) -> f64 {
        sigma * self.sigma_data / (sigma * sigma + self.sigma_data * self.sigma_data).sqrt()
    }
    /// c_in = 1 / sqrt(sigma^2 + sigma_data^2).
    pub fn c_in(&self, sigma: f64) -> f64 {
        1.0 / (sigma * sigma + self.sigma_data * self.sigma_data).sqrt()
    }
    /// c_noise = ln(sigma) / 4.
    pub fn c_noise(&self, sigma: f64) -> f64 {
        0.25 * sigma.ln()
    }
    /// The loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    pub fn loss_weight(&self, sigma: f64) -> f64 {
        let c = self.c_out(sigma);
        1.0 / (c * c)
    }
    /// D = c_skip x + c_out f, from the raw network output `f = F(c_in x; c_noise)`.
    pub fn denoised(&self, x: &Tensor, f: &Tensor, sigma: f64) -> Result<Tensor> {
        lin(x, self.c_skip(sigma), f, self.c_out(sigma))
    }
    /// The raw-network target F* = (x_0 - c_skip x) / c_out for a clean x_0 and noisy x.
    pub fn target(&self, x0: &Tensor, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let co = nonzero(self.c_out(sigma), "c_out")?;
        lin(x0, 1.0 / co, x, -self.c_skip(sigma) / co)
    }
}
