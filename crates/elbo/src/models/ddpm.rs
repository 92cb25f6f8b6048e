//! DDPM (Ho et al. 2020) and DDIM (Song et al. 2021a) as a [`GenerativeModel`]: a discrete
//! chain of T steps, a network predicting eps, x0, v or (on discrete data) the levels, trained
//! on L_simple, the VLB-weighted loss or their hybrid, sampled ancestrally (Algorithm 2) or by
//! any sampler, and scored by the full VLB in nats (a bound on the discrete NLL through the
//! discretized decoder) or by the probability-flow ODE (an estimate through dequantization).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::chain::{Chain, VarianceKind};
use crate::continuous::diffusion::net::{check_batch, DataScale, DenoiserNet, NetConfig};
use crate::continuous::diffusion::param::{
    level_cross_entropy, simple_target, x0_from_output, ParameterizationChoice,
};
use crate::continuous::diffusion::pf_ode::{self, PfOde};
use crate::continuous::diffusion::sampling::{
    self, DiffusionSampling, GaussianDiffusion, SamplerName,
};
use crate::continuous::diffusion::vlb::{vlb, Decoder};
use crate::continuous::parameterization::{Coeffs, Parameterization};
use crate::continuous::schedule::{BetaSchedule, NoiseSchedule};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `ddpm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The denoiser network (`[model.net]`).
    pub net: NetConfig,
    /// Number of steps T.
    pub timesteps: usize,
    /// Beta schedule (diffusers' names: linear, scaled_linear, squaredcos_cap_v2 or cosine).
    pub beta_schedule: BetaSchedule,
    /// What the network predicts: eps, x0, v, levels (softmax over the levels of discrete
    /// data, with the exact likelihood of x_t as a skip term) or auto (levels on discrete data
    /// when D·L <= 65536, else eps).
    pub parameterization: ParameterizationChoice,
    /// simple (L_simple), vlb (the bound's own weights) or hybrid (simple + 0.001 vlb, Nichol &
    /// Dhariwal 2021).
    pub objective: Objective,
    /// Reverse variances: fixed_small (β̃) or fixed_large (β).
    pub variance: VarianceKind,
    /// Clip x̂_0 to [-1, 1] on discrete data.
    pub clip_x0: bool,
    /// Probability-flow likelihood: data end of the path in t = i/T (0: automatic, the time
    /// where σ/α equals the dequantization noise's std on discrete data, else 1/T).
    pub ode_t_min: f64,
    /// The sampler (`[model.sampling]`; auto: ancestral).
    pub sampling: DiffusionSampling,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            net: NetConfig::default(),
            timesteps: 1000,
            beta_schedule: BetaSchedule::Linear,
            parameterization: ParameterizationChoice::Auto,
            objective: Objective::Simple,
            variance: VarianceKind::FixedSmall,
            clip_x0: true,
            ode_t_min: 0.0,
            sampling: DiffusionSampling::default(),
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "DDPM (Ho et al. 2020) on T steps; DDIM and every other sampler by model.sampling";
    const LIKELIHOODS: &'static [&'static str] = &["vlb", "pf-ode"];

    fn validate(&self) -> Result<()> {
        self.net.validate()?;
        self.sampling.validate()?;
        if self.timesteps < 2 {
            return Err(Error::Config(format!(
                "model.timesteps must be at least 2, got {}",
                self.timesteps
            )));
        }
        if !(0.0..1.0).contains(&self.ode_t_min) {
            return Err(Error::Config("model.ode_t_min must be in [0, 1)".into()));
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        MemoryEstimate {
            // the chain's per-step coefficients and their temporaries, in f64
            fixed: estimate::prod(&[self.timesteps, 8, 8]),
            ..estimate::denoiser(&self.net, data, self.outputs_per_dim(data), batch)
        }
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        let opd = self.outputs_per_dim(data);
        // the probability-flow likelihood, or the VLB's forward passes over the batch
        let vlb = estimate::denoiser(&self.net, data, opd, eval.batch_size).activations / 3;
        estimate::denoiser_eval(&self.net, data, opd, eval).max(vlb)
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Ddpm::new(self, *data, device, rng)?))
    }
}

impl Config {
    /// Network outputs per data dimension (the levels of the `levels` parameterization).
    fn outputs_per_dim(&self, data: &DataInfo) -> usize {
        self.parameterization
            .resolve(data.dim, data.levels())
            .map(|p| p.outputs_per_dim())
            .unwrap_or(1)
    }
}

/// Training objective of DDPM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// L_simple (Ho et al. 2020, eq. 14): unweighted MSE of the prediction over uniform t
    /// (for levels: the cross-entropy of the true level).
    Simple,
    /// The bound's own weights: T · w_i ||x_0 - x̂_0||² with i uniform (an unbiased estimate of
    /// Σ_i L_{i-1} up to constants), per dimension.
    Vlb,
    /// Simple + 0.001 · Vlb (Nichol & Dhariwal 2021, sec. 3.1).
    Hybrid,
}

/// DDPM (DDIM is its `ddim` sampler).
pub struct Ddpm {
    core: ModelCore,
    net: DenoiserNet,
    chain: Chain,
    param: Parameterization,
    objective: Objective,
    variance: VarianceKind,
    scale: DataScale,
    clip: bool,
    ode_t_min: f64,
    sampling: DiffusionSampling,
    dim: usize,
    device: Device,
}

impl Ddpm {
    /// A new model for the data, weights drawn from `rng`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        if data.dim == 0 {
            return Err(Error::Shape(
                "ddpm needs data with at least 1 dimension".into(),
            ));
        }
        let dc = cfg;
        let scale = DataScale::new(data.kind)?;
        let param = dc.parameterization.resolve(data.dim, scale.levels)?;
        let chain = Chain::from_schedule(dc.beta_schedule.name(), dc.timesteps)?;
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            DenoiserNet::new(&mut p, &data, param.outputs_per_dim(), &cfg.net)?
        };
        let t = chain.steps() as f64;
        let ode_t_min = if dc.ode_t_min > 0.0 {
            dc.ode_t_min.max(1.0 / t)
        } else {
            auto_ode_t_min(&chain, scale.levels)
        };
        Ok(Self {
            core,
            net,
            param,
            objective: dc.objective,
            variance: dc.variance,
            clip: dc.clip_x0 && scale.levels.is_some(),
            chain,
            scale,
            ode_t_min,
            sampling: dc.sampling.clone(),
            dim: data.dim,
            device: device.clone(),
        })
    }

    /// The forward chain.
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// The parameterization in use.
    pub fn parameterization(&self) -> Parameterization {
        self.param
    }

    /// The data <-> model-space map.
    pub fn data_scale(&self) -> DataScale {
        self.scale
    }

    /// α, σ and derivatives in u = t / T.
    pub fn path_point(&self, u: f64) -> Coeffs {
        self.chain.path_point(u)
    }

    /// x̂_0(x, u) at continuous u = t/T in (0, 1] for the whole batch `x: [B, D]` (clipped to
    /// [-1, 1] on discrete data when configured).
    pub fn predict_x0(&self, x: &Tensor, u: f64, grad: bool) -> Result<Tensor> {
        let b = x.dim(0)?;
        let p = self.path_point(u);
        let tau = Tensor::full((u * self.chain.steps() as f64) as f32, b, x.device())?;
        let alpha = Tensor::full(p.alpha as f32, (b, 1), x.device())?;
        let sigma = Tensor::full(p.sigma as f32, (b, 1), x.device())?;
        let out = self.net.forward(x, &tau, grad)?;
        let x0 = x0_from_output(self.param, &out, x, &alpha, &sigma)?.x0;
        if self.clip && !matches!(self.param, Parameterization::Levels { .. }) {
            return Ok(x0.clamp(-1f32, 1f32)?);
        }
        Ok(x0)
    }

    /// The probability-flow likelihood's data end u_min.
    pub fn ode_t_min(&self) -> f64 {
        self.ode_t_min
    }

    fn pf_field<'a>(
        &'a self,
        path: &'a dyn Fn(f64) -> Coeffs,
        pred: &'a dyn Fn(&Tensor, f64) -> Result<Tensor>,
    ) -> PfOde<'a> {
        PfOde {
            path,
            predict_x0: pred,
            u_min: self.ode_t_min,
            u_max: 1.0,
        }
    }
}

/// Data end of the DDPM probability-flow likelihood: on discrete data the first grid time at
/// which σ/α reaches the std of the dequantization noise, (2/(L-1))/√12, so the model's density
/// is smooth on the scale of a bin rather than a spike at its centre; else 1/T.
fn auto_ode_t_min(chain: &Chain, levels: Option<usize>) -> f64 {
    let t = chain.steps();
    let Some(l) = levels else {
        return 1.0 / t as f64;
    };
    let target = 2.0 / (l - 1) as f64 / 12f64.sqrt();
    let i = (1..=t)
        .find(|&i| {
            let (a, s) = chain.scales(i);
            s / a >= target
        })
        .unwrap_or(1);
    i as f64 / t as f64
}

impl GaussianDiffusion for Ddpm {
    fn schedule(&self) -> &dyn NoiseSchedule {
        &self.chain
    }
    fn predict_x0(&self, x_t: &Tensor, t: f64, grad: bool) -> Result<Tensor> {
        Ddpm::predict_x0(self, x_t, t, grad)
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn ddpm_variance(&self) -> VarianceKind {
        self.variance
    }
}

impl GenerativeModel for Ddpm {
    fn family(&self) -> &'static str {
        "ddpm"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, opts: &SampleOptions) -> String {
        sampling::describe(&self.sampling, SamplerName::Ddpm, opts)
    }

    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.dim, "ddpm")?;
        let x0 = self.scale.to_grid(batch)?; // [B, D]
        let (b, d) = x0.dims2()?;
        let t = self.chain.steps();
        let steps: Vec<usize> = (0..b).map(|_| 1 + rng.below(t)).collect();
        let (mut av, mut sv, mut wv) = (Vec::new(), Vec::new(), Vec::new());
        for &i in &steps {
            let (a, s) = self.chain.scales(i);
            av.push(a as f32);
            sv.push(s as f32);
            wv.push((t as f64 * self.chain.vlb_weight(i, self.variance)) as f32);
        }
        let alpha = Tensor::from_vec(av, (b, 1), &self.device)?;
        let sigma = Tensor::from_vec(sv, (b, 1), &self.device)?;
        let tau = Tensor::from_vec(
            steps.iter().map(|&i| i as f32).collect::<Vec<_>>(),
            b,
            &self.device,
        )?;
        let eps = rng.normal_tensor(&[b, d], &self.device)?;
        let xt = (x0.broadcast_mul(&alpha)? + eps.broadcast_mul(&sigma)?)?; // [B, D]
        let out = self.net.forward(&xt, &tau, true)?;
        let pred = x0_from_output(self.param, &out, &xt, &alpha, &sigma)?;
        let simple = match (&pred.log_probs, self.scale.levels) {
            (Some(lp), Some(l)) => {
                let k = ((&x0 + 1.0)? * ((l - 1) as f64 / 2.0))?.round()?;
                level_cross_entropy(lp, &k)?
            }
            _ => {
                let target = simple_target(self.param, &x0, &eps, &alpha, &sigma)?
                    .ok_or_else(|| Error::Config("no regression target".into()))?;
                (out - target)?.sqr()?.mean_all()?
            }
        };
        let vlb_term = || -> Result<Tensor> {
            let w = Tensor::from_vec(wv.clone(), (b, 1), &self.device)?;
            let sq = (&x0 - &pred.x0)?.sqr()?; // [B, D]
            Ok((sq.broadcast_mul(&w)?.sum_all()? / (b * d) as f64)?)
        };
        match self.objective {
            Objective::Simple => Ok(simple),
            Objective::Vlb => vlb_term(),
            Objective::Hybrid => Ok((simple + (vlb_term()? * 1e-3)?)?),
        }
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        // frozen weights: the MLP is packed once for all the sampler's calls
        let x = self.net.with_packed(|| {
            sampling::sample(
                self,
                SamplerName::Ddpm,
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
        check_batch(batch, self.dim, "ddpm")?;
        match likelihood_choice(opts, "ddpm", Config::LIKELIHOODS)? {
            "vlb" => {
                let x0 = self.scale.to_grid(batch)?;
                let decoder = match self.scale.levels {
                    Some(levels) => Decoder::Discretized { levels },
                    None => Decoder::Gaussian,
                };
                let t = self.chain.steps() as f64;
                let terms = self.net.with_packed(|| {
                    vlb(
                        &self.chain,
                        self.variance,
                        decoder,
                        &x0,
                        |x, i| self.predict_x0(x, i as f64 / t, false),
                        rng,
                    )
                })?;
                Ok(Nll {
                    nats: terms.total(),
                    dims: self.dim,
                    kind: NllKind::Bound,
                })
            }
            _ => {
                let path = |u: f64| self.path_point(u);
                let pred = |x: &Tensor, u: f64| self.predict_x0(x, u, true);
                let field = self.pf_field(&path, &pred);
                pf_ode::dequantized_nll(&field, self.scale, batch, opts, rng)
            }
        }
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let head = format!(
            "{} prediction, {} steps, {:?} variances",
            self.param.name(),
            self.chain.steps(),
            self.variance
        );
        match likelihood_choice(opts, "ddpm", Config::LIKELIHOODS) {
            Ok("vlb") => format!(
                "DDPM VLB L_T + sum L_(t-1) + L_0 over all {} steps ({head}; {} decoder)",
                self.chain.steps(),
                match self.scale.levels {
                    Some(l) => format!("discretized Gaussian, {l} levels"),
                    None => "Gaussian".into(),
                }
            ),
            Ok(_) => {
                pf_ode::method(
                    opts,
                    self.dim,
                    &format!("t in [{:.4}, 1], {head}", self.ode_t_min),
                ) + &self.scale.dequantization_note()
            }
            Err(e) => format!("invalid options: {e}"),
        }
    }
}

/// Convenience for tests: the f64 value of a scalar tensor.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
