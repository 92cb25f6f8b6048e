//! Score-based generative modelling with SDEs (Song et al. 2021b) as a [`GenerativeModel`]:
//! continuous-time VP, sub-VP or VE forward processes, denoising score matching with the
//! λ(t) = σ(t)² weighting (eq. 7: the network predicts ε and the score is -ε̂/σ), predictor-
//! corrector sampling (Alg. 1) by default (any sampler by name), and the probability-flow ODE
//! log-likelihood (eq. 13 and App. D.2) through [`crate::continuous::cnf`], dequantized on
//! discrete data.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::net::{check_batch, DataScale, DenoiserNet, NetConfig};
use crate::continuous::diffusion::pf_ode::{self, PfOde};
use crate::continuous::diffusion::sampling::{
    self, DiffusionSampling, GaussianDiffusion, SamplerName,
};
use crate::continuous::parameterization::Coeffs;
use crate::continuous::schedule::{NoiseSchedule, SubVp, Ve, Vp};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, Result, Rng};

/// The `[model]` table of `sde`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The ε network (`[model.net]`).
    pub net: NetConfig,
    /// The forward SDE: vp, subvp or ve (Song et al. 2021b).
    pub sde: SdeType,
    /// VP / sub-VP: β(t) = beta_min + t (beta_max - beta_min).
    pub beta_min: f64,
    /// VP / sub-VP: see `beta_min`.
    pub beta_max: f64,
    /// VE: σ(t) = ve_sigma_min (ve_sigma_max / ve_sigma_min)^t.
    pub ve_sigma_min: f64,
    /// VE: see `ve_sigma_min`.
    pub ve_sigma_max: f64,
    /// Smallest training / likelihood time.
    pub t_eps: f64,
    /// The sampler (`[model.sampling]`; auto: predictor-corrector).
    pub sampling: DiffusionSampling,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            net: NetConfig::default(),
            sde: SdeType::Vp,
            beta_min: 0.1,
            beta_max: 20.0,
            ve_sigma_min: 0.01,
            ve_sigma_max: 50.0,
            t_eps: 1e-5,
            sampling: DiffusionSampling::default(),
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "score SDE (VP, sub-VP, VE; Song et al. 2021) with the probability-flow likelihood";
    const LIKELIHOODS: &'static [&'static str] = &["pf-ode"];

    fn validate(&self) -> Result<()> {
        self.net.validate()?;
        self.sampling.validate()?;
        for (key, v) in [
            ("beta_min", self.beta_min),
            ("beta_max", self.beta_max),
            ("ve_sigma_min", self.ve_sigma_min),
            ("ve_sigma_max", self.ve_sigma_max),
        ] {
            if !v.is_finite() {
                return Err(Error::Config(format!(
                    "model.{key} must be a finite number, got {v}"
                )));
            }
        }
        if !(self.beta_min > 0.0 && self.beta_max > self.beta_min) {
            return Err(Error::Config("model needs 0 < beta_min < beta_max".into()));
        }
        if !(self.ve_sigma_min > 0.0 && self.ve_sigma_max > self.ve_sigma_min) {
            return Err(Error::Config(
                "model needs 0 < ve_sigma_min < ve_sigma_max".into(),
            ));
        }
        if !(self.t_eps > 0.0 && self.t_eps < 1.0) {
            return Err(Error::Config("model.t_eps must be in (0, 1)".into()));
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
        Ok(Box::new(ScoreSde::new(self, *data, device, rng)?))
    }
}

/// Which forward SDE a config asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdeType {
    /// Variance preserving.
    Vp,
    /// Sub-variance preserving.
    #[serde(alias = "sub-vp", alias = "sub_vp")]
    Subvp,
    /// Variance exploding.
    Ve,
}

/// The forward SDE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SdeKind {
    /// Variance preserving (eq. 11).
    Vp(Vp),
    /// Sub-variance preserving (eq. 12).
    SubVp(SubVp),
    /// Variance exploding (eq. 9).
    Ve(Ve),
}

impl SdeKind {
    /// From the config's `sde`, `beta_min/max`, `ve_sigma_min/max` and `t_eps`.
    pub fn from_config(cfg: &Config) -> Self {
        let vp = Vp {
            beta_min: cfg.beta_min,
            beta_max: cfg.beta_max,
            t_eps: cfg.t_eps,
        };
        match cfg.sde {
            SdeType::Vp => Self::Vp(vp),
            SdeType::Subvp => Self::SubVp(SubVp(vp)),
            SdeType::Ve => Self::Ve(Ve {
                sigma_min: cfg.ve_sigma_min,
                sigma_max: cfg.ve_sigma_max,
            }),
        }
    }

    /// The schedule.
    pub fn schedule(&self) -> &dyn NoiseSchedule {
        match self {
            Self::Vp(s) => s,
            Self::SubVp(s) => s,
            Self::Ve(s) => s,
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Vp(_) => "VP",
            Self::SubVp(_) => "sub-VP",
            Self::Ve(_) => "VE",
        }
    }
}

/// A score SDE with an ε-predicting network on input x_t / sqrt(α² + σ²) and time 1000 t.
pub struct ScoreSde {
    core: ModelCore,
    net: DenoiserNet,
    kind: SdeKind,
    sampling: DiffusionSampling,
    scale: DataScale,
    dim: usize,
    device: Device,
}

impl ScoreSde {
    /// A new model for the data.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        if data.dim == 0 {
            return Err(Error::Shape(
                "sde needs data with at least 1 dimension".into(),
            ));
        }
        let kind = SdeKind::from_config(cfg);
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            DenoiserNet::new(&mut p, &data, 1, &cfg.net)?
        };
        Ok(Self {
            core,
            net,
            kind,
            sampling: cfg.sampling.clone(),
            scale: DataScale::new(data.kind)?,
            dim: data.dim,
            device: device.clone(),
        })
    }

    /// ε̂(x_t, t) for per-example times `t: [B]` with scales `alpha, sigma: [B, 1]`.
    fn eps(
        &self,
        x_t: &Tensor,
        t: &Tensor,
        alpha: &Tensor,
        sigma: &Tensor,
        grad: bool,
    ) -> Result<Tensor> {
        let c_in = (alpha.sqr()? + sigma.sqr()?)?.sqrt()?.recip()?; // [B, 1]
        let tau = (t * 1000.0)?;
        self.net.forward(&x_t.broadcast_mul(&c_in)?, &tau, grad)
    }

    fn path_point(&self, t: f64) -> Coeffs {
        Coeffs::at(self.kind.schedule(), t)
    }
}

impl GaussianDiffusion for ScoreSde {
    fn schedule(&self) -> &dyn NoiseSchedule {
        self.kind.schedule()
    }
    fn predict_x0(&self, x_t: &Tensor, t: f64, grad: bool) -> Result<Tensor> {
        let b = x_t.dim(0)?;
        let p = self.path_point(t);
        let dev = x_t.device();
        let alpha = Tensor::full(p.alpha as f32, (b, 1), dev)?;
        let sigma = Tensor::full(p.sigma as f32, (b, 1), dev)?;
        let tt = Tensor::full(t as f32, b, dev)?;
        let x_t = x_t.to_dtype(candle_core::DType::F32)?;
        let eps = self.eps(&x_t, &tt, &alpha, &sigma, grad)?;
        Ok(((x_t - (eps * p.sigma)?)? / p.alpha)?)
    }
    fn dim(&self) -> usize {
        self.dim
    }
}

impl GenerativeModel for ScoreSde {
    fn family(&self) -> &'static str {
        "sde"
    }
    fn core(&self) -> &ModelCore {
        &self.core
    }
    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }
    fn sampling(&self, opts: &SampleOptions) -> String {
        sampling::describe(&self.sampling, SamplerName::Pc, opts)
    }

    /// Denoising score matching with λ(t) = σ², t ~ U[t_min, 1] (Song et al. 2021b, eq. 7).
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.dim, "sde")?;
        let x0 = self.scale.dequantize(batch, rng)?; // [B, D]
        let (b, d) = x0.dims2()?;
        let sch = self.kind.schedule();
        let (lo, hi) = (sch.t_min(), sch.t_max());
        let ts: Vec<f64> = (0..b).map(|_| lo + (hi - lo) * rng.uniform()).collect();
        let col = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = ts.iter().map(|&t| f(t) as f32).collect();
            Ok(Tensor::from_vec(v, (b, 1), &self.device)?)
        };
        let alpha = col(&|t| sch.alpha(t))?;
        let sigma = col(&|t| sch.sigma(t))?;
        let t = col(&|t| t)?.reshape(b)?;
        let eps = rng.normal_tensor(&[b, d], &self.device)?;
        let xt = (x0.broadcast_mul(&alpha)? + eps.broadcast_mul(&sigma)?)?;
        let pred = self.eps(&xt, &t, &alpha, &sigma, true)?;
        Ok((pred - eps)?.sqr()?.mean_all()?)
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let x = self.net.with_packed(|| {
            sampling::sample(
                self,
                SamplerName::Pc,
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
        check_batch(batch, self.dim, "sde")?;
        likelihood_choice(opts, "sde", Config::LIKELIHOODS)?;
        let sch = self.kind.schedule();
        let path = |u: f64| self.path_point(u);
        let pred = |x: &Tensor, u: f64| GaussianDiffusion::predict_x0(self, x, u, true);
        let field = PfOde {
            path: &path,
            predict_x0: &pred,
            u_min: sch.t_min(),
            u_max: sch.t_max(),
        };
        pf_ode::dequantized_nll(&field, self.scale, batch, opts, rng)
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let sch = self.kind.schedule();
        pf_ode::method(
            opts,
            self.dim,
            &format!(
                "{} SDE, t in [{:e}, {}]",
                self.kind.name(),
                sch.t_min(),
                sch.t_max()
            ),
        ) + &self.scale.dequantization_note()
    }
}
