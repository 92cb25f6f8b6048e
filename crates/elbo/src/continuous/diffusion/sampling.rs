//! Every sampler on every Gaussian-diffusion family: a family exposes its noise schedule and an
//! x̂_0 prediction in its native variable ([`GaussianDiffusion`]); [`AsDenoiser`] turns that into
//! the samplers' EDM-form [`Denoiser`] (x = x_t / α at σ = σ(t)/α(t); Karras et al. 2022,
//! eq. 4), and [`sample`] runs the sampler named in the family's [`DiffusionSampling`]:
//!
//! | name | sampler |
//! |---|---|
//! | `ddpm` | ancestral (Ho et al. 2020, Alg. 2) on `steps` transitions of the schedule |
//! | `ddim` | DDIM with `eta` (Song et al. 2021a, eq. 12) on the same transitions |
//! | `euler`, `heun` / `edm` | Euler / Heun on the PF-ODE in σ over Karras' grid with `churn`, `s_noise` (Karras et al. 2022, Alg. 2) |
//! | `dpm++2m` | DPM-Solver++(2M) over Karras' grid (Lu et al. 2022) |
//! | `euler-maruyama` / `em`, `pc` | reverse SDE, and with a Langevin corrector at `snr` (Song et al. 2021b, Alg. 1) |
//! | `ode` / `pf-ode` | the probability-flow ODE with `solver` (eq. 13) |

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::SampleOptions;
use crate::continuous::diffusion::chain::VarianceKind;
use crate::continuous::ode::Solver;
use crate::continuous::sampler::{self, Churn, Denoiser};
use crate::continuous::schedule::{
    karras_sigmas, uniform_times, with_final_zero, NoiseSchedule, Transition,
};
use crate::{Error, Result, Rng};

/// The sampler names [`sample`] accepts.
pub const SAMPLER_NAMES: &str =
    "auto, ddpm, ddim, euler, heun (edm), dpm++2m, euler-maruyama (em), pc, ode";

/// Which sampler draws from a Gaussian-diffusion (or flow-matching) family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerName {
    /// The family's own sampler.
    #[default]
    Auto,
    /// Ancestral sampling (Ho et al. 2020, Alg. 2).
    #[serde(alias = "ancestral")]
    Ddpm,
    /// DDIM with `eta` (Song et al. 2021a, eq. 12).
    Ddim,
    /// Euler on the PF-ODE over Karras' grid, with churn.
    Euler,
    /// Heun on the PF-ODE over Karras' grid (Karras et al. 2022, Alg. 2).
    #[serde(alias = "edm")]
    Heun,
    /// DPM-Solver++(2M) (Lu et al. 2022).
    #[serde(rename = "dpm++2m", alias = "dpmpp_2m", alias = "dpm-solver++")]
    DpmPp2m,
    /// Euler-Maruyama on the reverse SDE (Song et al. 2021b).
    #[serde(alias = "em")]
    EulerMaruyama,
    /// Predictor-corrector with a Langevin corrector (Song et al. 2021b, Alg. 1).
    Pc,
    /// The probability-flow ODE with `[sample] solver` (Song et al. 2021b, eq. 13).
    #[serde(alias = "pf-ode")]
    Ode,
}

impl SamplerName {
    /// The name as configs spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::Heun => "heun",
            Self::DpmPp2m => "dpm++2m",
            Self::EulerMaruyama => "euler-maruyama",
            Self::Pc => "pc",
            Self::Ode => "ode",
        }
    }
}

/// The `[model.sampling]` table of the continuous families: the sampler and its knobs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionSampling {
    /// Which sampler ("auto": the family's own).
    pub sampler: SamplerName,
    /// DDIM: η in [0, 1] (0 deterministic, 1 ancestral-like).
    pub eta: f64,
    /// Euler / Heun: S_churn (0: deterministic).
    pub churn: f64,
    /// Euler / Heun: S_noise.
    pub s_noise: f64,
    /// Predictor-corrector: signal-to-noise ratio of the Langevin corrector.
    pub snr: f64,
}

impl Default for DiffusionSampling {
    fn default() -> Self {
        Self {
            sampler: SamplerName::Auto,
            eta: 0.0,
            churn: 0.0,
            s_noise: 1.0,
            snr: 0.16,
        }
    }
}

impl DiffusionSampling {
    /// Check the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.eta) {
            return Err(Error::Config(format!(
                "model.sampling.eta must be in [0, 1], got {}",
                self.eta
            )));
        }
        if !(self.churn >= 0.0 && self.s_noise >= 0.0 && self.snr > 0.0) {
            return Err(Error::Config(
                "model.sampling.churn and s_noise must be >= 0 and snr > 0".into(),
            ));
        }
        Ok(())
    }

    /// The sampler, with `Auto` replaced by `default`.
    pub fn resolve(&self, default: SamplerName) -> SamplerName {
        match self.sampler {
            SamplerName::Auto => default,
            s => s,
        }
    }
}

/// A Gaussian diffusion x_t = α(t) x_0 + σ(t) ε with an x̂_0 prediction.
pub trait GaussianDiffusion {
    /// The path.
    fn schedule(&self) -> &dyn NoiseSchedule;
    /// x̂_0(x_t, t) for `x_t: [B, D]` in the native variable (no autograd graph when `grad` is
    /// false).
    fn predict_x0(&self, x_t: &Tensor, t: f64, grad: bool) -> Result<Tensor>;
    /// Dimensions of one example.
    fn dim(&self) -> usize;
    /// The ancestral sampler's variance.
    fn ddpm_variance(&self) -> VarianceKind {
        VarianceKind::FixedSmall
    }
}

/// A [`GaussianDiffusion`] as an EDM [`Denoiser`]: noise levels outside the schedule's range are
/// clamped to it.
pub struct AsDenoiser<'a>(pub &'a dyn GaussianDiffusion);

impl Denoiser for AsDenoiser<'_> {
    fn denoise(&self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let sch = self.0.schedule();
        let (lo, hi) = (sch.edm_sigma(sch.t_min()), sch.edm_sigma(sch.t_max()));
        let t = sch.t_of_edm_sigma(sigma.clamp(lo, hi))?;
        let x_t = (x * sch.alpha(t))?;
        let x0 = self.0.predict_x0(&x_t, t, false)?;
        Ok(x0.to_dtype(x.dtype())?)
    }
}

/// One line naming the sampler and its settings (for reports).
pub fn describe(knobs: &DiffusionSampling, default: SamplerName, opts: &SampleOptions) -> String {
    let name = knobs.resolve(default);
    let extra = match name {
        SamplerName::Ddim => format!(", eta {}", knobs.eta),
        SamplerName::Euler | SamplerName::Heun if knobs.churn > 0.0 => {
            format!(", churn {}, s_noise {}", knobs.churn, knobs.s_noise)
        }
        SamplerName::Pc => format!(", snr {}", knobs.snr),
        SamplerName::Ode => format!(", solver {}", opts.solver),
        _ => String::new(),
    };
    format!("sampler {}, {} steps{extra}", name.name(), opts.steps)
}

/// `n` model-space samples from the sampler of `knobs` (`default` for "auto"), with the step
/// count and ODE solver of `opts`.
pub fn sample(
    model: &dyn GaussianDiffusion,
    default: SamplerName,
    n: usize,
    knobs: &DiffusionSampling,
    opts: &SampleOptions,
    rng: &mut Rng,
    device: &Device,
) -> Result<Tensor> {
    use SamplerName as S;
    let name = knobs.resolve(default);
    let sch = model.schedule();
    let den = AsDenoiser(model);
    let d = model.dim();
    let steps = opts.steps.max(1);
    let (t_lo, t_hi) = (sch.t_min(), sch.t_max());
    let (s_lo, s_hi) = (sch.edm_sigma(t_lo), sch.edm_sigma(t_hi));
    let churn = Churn {
        s_churn: knobs.churn,
        s_noise: knobs.s_noise,
        ..Churn::default()
    };
    let karras = || -> Result<Vec<f64>> {
        Ok(with_final_zero(karras_sigmas(
            s_lo,
            s_hi,
            steps.max(2),
            7.0,
        )?))
    };
    match name {
        S::Ddpm | S::Ddim => {
            // transitions at `steps` times uniform in t, the last to clean data
            let times: Vec<f64> = (0..steps)
                .map(|k| t_hi - (t_hi - t_lo) * k as f64 / steps as f64)
                .collect();
            let ab = |t: f64| 1.0 / (1.0 + sch.edm_sigma(t).powi(2));
            let tr: Vec<Transition> = times
                .iter()
                .enumerate()
                .map(|(k, &t)| Transition {
                    alpha_bar: ab(t),
                    alpha_bar_prev: times.get(k + 1).map(|&p| ab(p)).unwrap_or(1.0),
                })
                .collect();
            let x = rng.normal_tensor(&[n, d], device)?; // x_T ~ N(0, I), VP-scaled
            if name == S::Ddim {
                sampler::ddim(&den, &tr, knobs.eta, &x, rng)
            } else {
                sampler::ddpm(&den, &tr, model.ddpm_variance(), &x, rng)
            }
        }
        S::Euler | S::Heun | S::DpmPp2m => {
            let sigmas = karras()?;
            let x = (rng.normal_tensor(&[n, d], device)? * s_hi)?; // x = σ_max n
            match name {
                S::Euler => sampler::euler(&den, &sigmas, &churn, &x, rng),
                S::Heun => sampler::heun(&den, &sigmas, &churn, &x, rng),
                _ => sampler::dpmpp_2m(&den, &sigmas, true, &x),
            }
        }
        S::EulerMaruyama | S::Pc | S::Ode => {
            let (a, s) = (sch.alpha(t_hi), sch.sigma(t_hi));
            let x = (rng.normal_tensor(&[n, d], device)? * (a * a + s * s).sqrt())?;
            let times = uniform_times(sch, steps.max(1) + 1);
            match name {
                S::Pc => {
                    sampler::predictor_corrector(&den, sch, &times, 1, knobs.snr, true, &x, rng)
                }
                S::Ode => {
                    let solver =
                        Solver::parse(opts.solver.as_str(), opts.steps, opts.rtol, opts.atol)?;
                    Ok(sampler::pf_ode(&den, sch, &solver, true, &x)?.0)
                }
                _ => sampler::euler_maruyama(&den, sch, &times, true, &x, rng),
            }
        }
        S::Auto => Err(Error::Config(format!(
            "the family named no default sampler; choose one of {SAMPLER_NAMES}"
        ))),
    }
}

/// A flow-matching velocity field in this crate's convention (x_t = (1 - t) ε + t x_1, data at
/// t = 1) seen as a Gaussian diffusion on the CondOT path in noise time s = 1 - t: α = 1 - s,
/// σ = s, and x̂_0 = x + s v(x, 1 - s) (the velocity is E[x_1 - ε | x]). With it every sampler
/// above, the SDE ones included, runs a flow-matching network (the diffusion / flow-matching
/// equivalence; Kingma & Gao 2023, sec. 2).
pub struct FlowAsDiffusion<'a> {
    field: &'a dyn crate::continuous::VelocityField,
    schedule: crate::continuous::schedule::CondOt,
    dim: usize,
}

impl<'a> FlowAsDiffusion<'a> {
    /// Wraps `field` for data of `dim` dimensions (s in [1e-3, 1 - 1e-3]).
    pub fn new(field: &'a dyn crate::continuous::VelocityField, dim: usize) -> Self {
        Self {
            field,
            schedule: crate::continuous::schedule::CondOt::default(),
            dim,
        }
    }
}

impl GaussianDiffusion for FlowAsDiffusion<'_> {
    fn schedule(&self) -> &dyn NoiseSchedule {
        &self.schedule
    }
    fn predict_x0(&self, x_t: &Tensor, s: f64, _grad: bool) -> Result<Tensor> {
        let v = self.field.velocity(x_t, 1.0 - s)?;
        Ok((x_t + (v * s)?)?)
    }
    fn dim(&self) -> usize {
        self.dim
    }
}
