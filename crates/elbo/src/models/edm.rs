//! EDM (Karras et al. 2022) as a [`GenerativeModel`]: x = x_0 + σ n, the preconditioned
//! denoiser D(x; σ) = c_skip x + c_out F(c_in x; c_noise) (eq. 7, Table 1), training with
//! ln σ ~ N(P_mean, P_std²) and weight λ(σ) = 1/c_out² (eq. 8; equivalently an unweighted MSE on
//! F's effective target (x_0 - c_skip x)/c_out), the Heun sampler with S_churn / S_noise
//! (Alg. 2) by default, and the probability-flow ODE likelihood (dx/dσ = (x - D)/σ) integrated
//! in u = ln σ, dequantized on discrete data.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::net::{check_batch, DataScale, DenoiserNet, NetConfig};
use crate::continuous::diffusion::pf_ode::{self, PfOde};
use crate::continuous::diffusion::sampling::{
    self, DiffusionSampling, GaussianDiffusion, SamplerName,
};
use crate::continuous::parameterization::{Coeffs, EdmPrecond};
use crate::continuous::schedule::{Edm as EdmSchedule, NoiseSchedule};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, Result, Rng};

/// The `[model]` table of `edm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The network F (`[model.net]`).
    pub net: NetConfig,
    /// ln σ ~ N(p_mean, p_std²) in training (Karras et al. 2022, Table 1).
    pub p_mean: f64,
    /// See `p_mean`.
    pub p_std: f64,
    /// σ_data of the preconditioning.
    pub sigma_data: f64,
    /// Smallest σ of sampling and the likelihood.
    pub sigma_min: f64,
    /// Largest σ.
    pub sigma_max: f64,
    /// ρ of the Karras σ grid.
    pub rho: f64,
    /// The sampler (`[model.sampling]`; auto: Heun).
    pub sampling: DiffusionSampling,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            net: NetConfig::default(),
            p_mean: -1.2,
            p_std: 1.2,
            sigma_data: 0.5,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
            sampling: DiffusionSampling::default(),
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "EDM (Karras et al. 2022): preconditioned denoiser, Heun sampler, probability-flow likelihood";
    const LIKELIHOODS: &'static [&'static str] = &["pf-ode"];

    fn validate(&self) -> Result<()> {
        self.net.validate()?;
        self.sampling.validate()?;
        for (key, v) in [
            ("p_mean", self.p_mean),
            ("p_std", self.p_std),
            ("sigma_data", self.sigma_data),
            ("sigma_min", self.sigma_min),
            ("sigma_max", self.sigma_max),
            ("rho", self.rho),
        ] {
            if !v.is_finite() {
                return Err(Error::Config(format!(
                    "model.{key} must be a finite number, got {v}"
                )));
            }
        }
        if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min && self.sigma_data > 0.0) {
            return Err(Error::Config(
                "model needs 0 < sigma_min < sigma_max and sigma_data > 0".into(),
            ));
        }
        if !(self.p_std > 0.0 && self.rho > 0.0) {
            return Err(Error::Config(
                "model.p_std and model.rho must be positive".into(),
            ));
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        estimate::denoiser(&self.net, data, 1, batch)
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        estimate::denoiser_eval(&self.net, data, 1, eval)
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Edm::new(self, *data, device, rng)?))
    }
}

/// EDM with an MLP / U-Net F.
pub struct Edm {
    core: ModelCore,
    net: DenoiserNet,
    sampling: DiffusionSampling,
    precond: EdmPrecond,
    schedule: EdmSchedule,
    p_mean: f64,
    p_std: f64,
    scale: DataScale,
    dim: usize,
    device: Device,
}

impl Edm {
    /// A new model for the data.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        if data.dim == 0 {
            return Err(Error::Shape(
                "edm needs data with at least 1 dimension".into(),
            ));
        }
        let dc = cfg;
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            DenoiserNet::new(&mut p, &data, 1, &cfg.net)?
        };
        Ok(Self {
            core,
            net,
            sampling: cfg.sampling.clone(),
            precond: EdmPrecond {
                sigma_data: dc.sigma_data,
            },
            schedule: EdmSchedule {
                sigma_min: dc.sigma_min,
                sigma_max: dc.sigma_max,
            },
            p_mean: dc.p_mean,
            p_std: dc.p_std,
            scale: DataScale::new(data.kind)?,
            dim: data.dim,
            device: device.clone(),
        })
    }

    /// F's raw output for per-example σ `[B, 1]` (c_in applied, time 1000 c_noise).
    fn f(&self, x: &Tensor, sigma: &[f64], grad: bool) -> Result<Tensor> {
        let b = sigma.len();
        let p = &self.precond;
        let cin: Vec<f32> = sigma.iter().map(|&s| p.c_in(s) as f32).collect();
        let tau: Vec<f32> = sigma
            .iter()
            .map(|&s| (1000.0 * p.c_noise(s)) as f32)
            .collect();
        let cin = Tensor::from_vec(cin, (b, 1), x.device())?;
        let tau = Tensor::from_vec(tau, b, x.device())?;
        self.net.forward(&x.broadcast_mul(&cin)?, &tau, grad)
    }

    /// D(x; σ) for one σ.
    pub fn denoise(&self, x: &Tensor, sigma: f64, grad: bool) -> Result<Tensor> {
        let b = x.dim(0)?;
        let x = x.to_dtype(DType::F32)?;
        let f = self.f(&x, &vec![sigma; b], grad)?;
        let p = &self.precond;
        Ok(((&x * p.c_skip(sigma))? + (f * p.c_out(sigma))?)?)
    }
}

impl GaussianDiffusion for Edm {
    fn schedule(&self) -> &dyn NoiseSchedule {
        &self.schedule
    }
    fn predict_x0(&self, x_t: &Tensor, t: f64, grad: bool) -> Result<Tensor> {
        self.denoise(x_t, t, grad)
    }
    fn dim(&self) -> usize {
        self.dim
    }
}

impl GenerativeModel for Edm {
    fn family(&self) -> &'static str {
        "edm"
    }
    fn core(&self) -> &ModelCore {
        &self.core
    }
    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }
    fn sampling(&self, opts: &SampleOptions) -> String {
        sampling::describe(&self.sampling, SamplerName::Heun, opts)
    }

    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.dim, "edm")?;
        let x0 = self.scale.dequantize(batch, rng)?; // [B, D]
        let (b, d) = x0.dims2()?;
        let sigmas: Vec<f64> = (0..b)
            .map(|_| (self.p_mean + self.p_std * rng.normal()).exp())
            .collect();
        let p = &self.precond;
        let col = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = sigmas.iter().map(|&s| f(s) as f32).collect();
            Ok(Tensor::from_vec(v, (b, 1), &self.device)?)
        };
        let n = rng.normal_tensor(&[b, d], &self.device)?;
        let x = (&x0 + n.broadcast_mul(&col(&|s| s)?)?)?; // [B, D]
        let target = (x0 - x.broadcast_mul(&col(&|s| p.c_skip(s))?)?)?
            .broadcast_div(&col(&|s| p.c_out(s))?)?; // effective target of F
        let f = self.f(&x, &sigmas, true)?;
        Ok((f - target)?.sqr()?.mean_all()?)
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let x = self.net.with_packed(|| {
            sampling::sample(
                self,
                SamplerName::Heun,
                n,
                &self.sampling,
                opts,
                rng,
                &self.device,
            )
        })?;
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        check_batch(batch, self.dim, "edm")?;
        likelihood_choice(opts, "edm", Config::LIKELIHOODS)?;
        // path in u = ln σ: α = 1, σ = e^u
        let path = |u: f64| Coeffs {
            alpha: 1.0,
            sigma: u.exp(),
            d_alpha: 0.0,
            d_sigma: u.exp(),
        };
        let pred = |x: &Tensor, u: f64| self.denoise(x, u.exp(), true);
        let field = PfOde {
            path: &path,
            predict_x0: &pred,
            u_min: self.schedule.sigma_min.ln(),
            u_max: self.schedule.sigma_max.ln(),
        };
        pf_ode::dequantized_nll(&field, self.scale, batch, opts, rng)
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        pf_ode::method(
            opts,
            self.dim,
            &format!(
                "EDM, sigma in [{}, {}], integrated in ln sigma",
                self.schedule.sigma_min, self.schedule.sigma_max
            ),
        ) + &self.scale.dequantization_note()
    }
}
