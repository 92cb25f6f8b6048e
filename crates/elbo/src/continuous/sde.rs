//! Score-based generative modelling with SDEs (Song et al. 2021b) as a [`GenerativeModel`]:
//! continuous-time VP, sub-VP or VE forward processes, denoising score matching with the
//! λ(t) = σ(t)² weighting (eq. 7: the network predicts ε and the score is -ε̂/σ), predictor-
//! corrector sampling (Alg. 1) by default (any sampler by name), and the probability-flow ODE
//! log-likelihood (eq. 13 and App. D.2) through [`super::cnf`], dequantized on discrete data.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use super::diffusion::net::{check_batch, DataScale, DenoiserNet};
use super::diffusion::pf_ode::{self, PathPoint, PfOde};
use super::diffusion::sampling::{self, GaussianDiffusion};
use super::schedule::{NoiseSchedule, SubVp, Ve, Vp};
use crate::config::{EvalOptions, ModelConfig, SampleOptions};
use crate::model::{DataInfo, GenerativeModel};
use crate::nn::ParamInit;
use crate::{Error, Nll, Result, Rng};

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
    pub fn from_config(cfg: &crate::config::DiffusionConfig) -> Result<Self> {
        let vp = Vp {
            beta_min: cfg.beta_min,
            beta_max: cfg.beta_max,
            t_eps: cfg.t_eps,
        };
        match cfg
            .sde
            .trim()
            .to_ascii_lowercase()
            .replace(['-', '_'], "")
            .as_str()
        {
            "vp" => Ok(Self::Vp(vp)),
            "subvp" => Ok(Self::SubVp(SubVp(vp))),
            "ve" => Ok(Self::Ve(Ve {
                sigma_min: cfg.ve_sigma_min,
                sigma_max: cfg.ve_sigma_max,
            })),
            o => Err(Error::Config(format!(
                "unknown sde '{o}'; use vp, subvp or ve"
            ))),
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
    varmap: VarMap,
    net: DenoiserNet,
    kind: SdeKind,
    scale: DataScale,
    dim: usize,
    device: Device,
}

impl ScoreSde {
    /// A new model for the data.
    pub fn new(cfg: &ModelConfig, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        if data.dim == 0 {
            return Err(Error::Shape(
                "sde needs data with at least 1 dimension".into(),
            ));
        }
        let kind = SdeKind::from_config(&cfg.diffusion)?;
        let varmap = VarMap::new();
        let net = {
            let mut p = ParamInit::new(&varmap, rng, device);
            DenoiserNet::new(&mut p, &data, 1, cfg)?
        };
        Ok(Self {
            varmap,
            net,
            kind,
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

    fn path_point(&self, t: f64) -> PathPoint {
        let s = self.kind.schedule();
        PathPoint {
            alpha: s.alpha(t),
            sigma: s.sigma(t),
            d_alpha: s.d_alpha(t),
            d_sigma: s.d_sigma(t),
        }
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
    fn varmap(&self) -> &VarMap {
        &self.varmap
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn device(&self) -> &Device {
        &self.device
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
        let x = self
            .net
            .with_packed(|| sampling::sample(self, "pc", n, opts, rng, &self.device))?;
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        check_batch(batch, self.dim, "sde")?;
        if super::ddpm::likelihood_choice(opts, "pf-ode")? != "pf-ode" {
            return Err(Error::Config(
                "the sde family has no VLB; use the pf-ode likelihood".into(),
            ));
        }
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
