//! Noise-contrastive estimation (Gutmann & Hyvärinen 2010; 2012): an unnormalised model
//! trained to tell data from samples of a known noise distribution, its log-normaliser a
//! learned parameter. The noise `p_n` is a full-covariance Gaussian fitted to the first
//! training batch, widened by `noise_scale` ([`GaussianFit`]); with `u = L⁻¹ (x - μ)` its
//! whitened coordinates and `f_θ` an MLP,
//!
//!   log p_θ(x) = -E_θ(x) - c,   E_θ(x) = f_θ(u) - log p_n(x),
//!
//! so the untrained model is the noise and `G(x) = log p_θ(x) - log p_n(x) = -f_θ(u) - c`.
//!
//! - `nce`: with `ν = noise_ratio` noise draws `y` per data point `x` and
//!   `h = σ(G - log ν)`, minimise (Gutmann & Hyvärinen 2012, eq. 8)
//!   `-E_x[log h(x)] - ν E_y[log(1 - h(y))]`; its optimum is `p_θ = p_data` *with* `c` the true
//!   log-normaliser (their theorem 2), so the model self-normalises;
//! - `infonce`: ranking NCE / InfoNCE (Ma & Collins 2018, eq. 4; van den Oord et al. 2018,
//!   eq. 4): each data point against `K = noise_ratio` noise draws, the cross-entropy of
//!   `softmax(G(x), G(y_1), ..., G(y_K))` picking the data point. `c` cancels from the softmax,
//!   so InfoNCE recovers `log p` only up to a constant and leaves `c` untouched: its normaliser
//!   comes afterwards from importance sampling (`likelihood = "is"`).
//!
//! Likelihoods (labelled estimates): `is` (default), `-log p(x) = E(x) + log Ẑ` with
//! `Ẑ = E_{p_n}[exp(-f(u))]` by importance sampling from the noise ([`importance_log_z`],
//! `log_z_samples` draws, delta-method s.e.): the self-normalisation check, the method line
//! giving `c - log Ẑ` (the normalisation gap); `learned`, `E(x) + c`, the unchecked
//! self-normalised figure (NCE only). Samples: Langevin dynamics or MALA on
//! `E(u) = f(u) + |u|²/2` in the whitened coordinates from noise draws
//! ([`crate::continuous::langevin`]).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{Device, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::net::{check_batch, DataScale};
use crate::continuous::gaussian_fit::GaussianFit;
use crate::continuous::langevin::{langevin, Energy};
use crate::eval::importance::{importance_log_z, LogZEstimate};
use crate::latent::observation::{logsumexp_last, softplus};
use crate::model::{
    likelihood_choice, DataInfo, GenerativeModel, ModelCore, StepContext, StepOutput, DEFAULT_GROUP,
};
use crate::models::FamilyConfig;
use crate::nn::{Activation, Mlp, ParamInit};
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The training objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Binary logistic NCE with a learned normaliser (Gutmann & Hyvärinen 2012).
    #[default]
    Nce,
    /// Ranking NCE / InfoNCE, normaliser by importance sampling (van den Oord et al. 2018).
    Infonce,
}

/// How samples are drawn (shared with the energy-based model).
pub use super::ebm::Sampler;

/// The `[model]` table of `nce`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// nce or infonce.
    pub objective: Objective,
    /// ν: noise draws per data point (InfoNCE: the K negatives of each data point).
    pub noise_ratio: usize,
    /// The noise is the data's Gaussian fit with its standard deviations times this (>= 1
    /// keeps the noise's tails heavier than the data's).
    pub noise_scale: f64,
    /// Units of each hidden layer of f_θ.
    pub hidden: usize,
    /// Hidden layers of f_θ.
    pub layers: usize,
    /// The activation.
    pub activation: Activation,
    /// Noise draws M of the importance-sampled log Z (`likelihood = "is"`).
    pub log_z_samples: usize,
    /// Sampling: langevin or mala.
    pub sampler: Sampler,
    /// Sampling: Langevin steps from the noise.
    pub sample_steps: usize,
    /// Sampling: step size η (whitened units).
    pub sample_step_size: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            objective: Objective::Nce,
            noise_ratio: 8,
            noise_scale: 1.25,
            hidden: 128,
            layers: 3,
            activation: Activation::Silu,
            log_z_samples: 1 << 18,
            sampler: Sampler::Mala,
            sample_steps: 500,
            sample_step_size: 0.05,
        }
    }
}

/// Rows per forward pass of the importance sampler.
const LOG_Z_CHUNK: usize = 16384;

impl Config {
    /// f_θ's parameters (hidden layers with biases, a read-out with a bias) plus `c`.
    fn param_count(&self, d: usize) -> usize {
        let h = self.hidden;
        let mlp = match self.layers {
            0 => d + 1,
            n => d * h + h + (n - 1) * (h * h + h) + h + 1,
        };
        mlp + 1
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "noise-contrastive estimation (NCE / InfoNCE) against a Gaussian fit, IS-checked log Z";
    const LIKELIHOODS: &'static [&'static str] = &["is", "learned"];

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden == 0 || self.layers > 16 {
            return bad(format!(
                "model.hidden must be >= 1 and model.layers <= 16 (got {} and {})",
                self.hidden, self.layers
            ));
        }
        if self.noise_ratio == 0 {
            return bad("model.noise_ratio must be >= 1 (noise draws per data point)".into());
        }
        if !(self.noise_scale.is_finite() && self.noise_scale > 0.0) {
            return bad(format!(
                "model.noise_scale must be positive (1.0 to 1.5 is typical), got {}",
                self.noise_scale
            ));
        }
        if self.log_z_samples < 2 || self.sample_steps == 0 {
            return bad(format!(
                "model.log_z_samples must be >= 2 and model.sample_steps >= 1 (got {} and {})",
                self.log_z_samples, self.sample_steps
            ));
        }
        if !(self.sample_step_size.is_finite() && self.sample_step_size > 0.0) {
            return bad(format!(
                "model.sample_step_size must be positive, got {}",
                self.sample_step_size
            ));
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let rows = batch * (1 + self.noise_ratio);
        MemoryEstimate {
            params: self.param_count(data.dim) as u64,
            // forward and backward of each layer over data and noise rows
            activations: estimate::prod(&[rows, self.hidden * (self.layers + 1) + data.dim, 6, 4]),
            fixed: estimate::prod(&[data.dim, data.dim, 16]),
        }
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        let rows = LOG_Z_CHUNK.min(self.log_z_samples).max(eval.batch_size);
        estimate::prod(&[rows, self.hidden * (self.layers + 1) + data.dim, 4, 4])
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Nce::new(self, *data, device, rng)?))
    }
}

/// The binary NCE loss (Gutmann & Hyvärinen 2012, eq. 8) from the log-ratios
/// `G = log p_θ - log p_n` of the data, `g_data: [B]`, and of `ν` noise draws per data point,
/// `g_noise: [B·ν]`: `mean_x softplus(log ν - G(x)) + ν mean_y softplus(G(y) - log ν)`.
pub fn nce_loss(g_data: &Tensor, g_noise: &Tensor, nu: usize) -> Result<Tensor> {
    let log_nu = (nu as f64).ln();
    let pos = softplus(&(g_data.neg()? + log_nu)?)?.mean_all()?;
    let neg = softplus(&(g_noise - log_nu)?)?.mean_all()?;
    Ok((pos + (neg * nu as f64)?)?)
}

/// The ranking / InfoNCE loss (Ma & Collins 2018, eq. 4; van den Oord et al. 2018, eq. 4):
/// `mean_i [log Σ_j exp(G_ij) - G_i0]` for logits `[B, 1 + K]` with the data point first.
pub fn infonce_loss(logits: &Tensor) -> Result<Tensor> {
    let first = logits.narrow(D::Minus1, 0, 1)?.squeeze(D::Minus1)?; // [B]
    Ok((logsumexp_last(logits)? - first)?.mean_all()?)
}

/// `f_θ` with the noise's `|u|²/2`: the energy of the whitened coordinates that Langevin sees.
struct WhiteEnergy<'a>(&'a Mlp);

impl Energy for WhiteEnergy<'_> {
    fn energy(&self, u: &Tensor) -> Result<Tensor> {
        let f = self.0.forward(u)?.squeeze(1)?; // [R]
        Ok((f + (u.sqr()?.sum(1)? * 0.5)?)?)
    }
}

/// The last `log Z` estimate, keyed by `(weights hash, samples)`.
type LogZCache = Option<((u64, usize), LogZEstimate)>;

/// A noise-contrastive model on flat examples.
pub struct Nce {
    core: ModelCore,
    cfg: Config,
    scale: DataScale,
    net: Mlp,
    /// The learned log-normaliser `c`, `[1]`.
    c: Var,
    /// The noise distribution (checkpointed as state).
    noise: GaussianFit,
    log_z: Mutex<LogZCache>,
}

impl Nce {
    /// The model of `cfg` on data shaped like `data`, initial weights from `rng`; the noise is
    /// N(0, I) until [`GenerativeModel::init_from_data`] fits it.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let d = data.dim;
        let core = ModelCore::new(d, device);
        let (net, c) = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let (h, n, act) = (cfg.hidden, cfg.layers, cfg.activation);
            let net = Mlp::with_output_scale(&mut p.push("f"), d, h, n, 1, act, 0.1)?;
            (net, p.constant("log_normaliser", &[1], 0.0)?)
        };
        Ok(Self {
            core,
            cfg: cfg.clone(),
            scale: DataScale::new(data.kind)?,
            net,
            c,
            noise: GaussianFit::standard(d, device)?,
            log_z: Mutex::new(None),
        })
    }

    /// The noise distribution.
    pub fn noise(&self) -> &GaussianFit {
        &self.noise
    }

    /// The learned log-normaliser `c`.
    pub fn learned_c(&self) -> Result<f64> {
        Ok(f64::from(
            self.c.as_tensor().flatten_all()?.to_vec1::<f32>()?[0],
        ))
    }

    /// `f_θ(u)` per row of whitened `u: [R, D]`, `[R]`.
    fn f(&self, u: &Tensor) -> Result<Tensor> {
        Ok(self.net.forward(u)?.squeeze(1)?)
    }

    /// `E_θ(x) = f_θ(u) - log p_n(x)` per row of model-space `x: [B, D]`, so that
    /// `log p_θ(x) = -E_θ(x) - c` and the normalised density is `exp(-E_θ) / Z`.
    pub fn energy_x(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.noise.whiten(x)?;
        Ok((self.f(&u)? - self.noise.log_density_white(&u)?)?)
    }

    /// The training loss of model-space rows `x: [B, D]`, noise drawn from `rng`.
    pub fn objective_loss(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        let nu = self.cfg.noise_ratio;
        let u = self.noise.whiten(x)?; // [B, D]
        let y = rng.normal_tensor(&[b * nu, d], x.device())?; // [B·ν, D], whitened noise
        let g = self.f(&Tensor::cat(&[&u, &y], 0)?)?.neg()?; // [B + B·ν], -f
        let (gx, gy) = (g.narrow(0, 0, b)?, g.narrow(0, b, b * nu)?);
        match self.cfg.objective {
            Objective::Nce => {
                let c = self.c.as_tensor();
                nce_loss(&gx.broadcast_sub(c)?, &gy.broadcast_sub(c)?, nu)
            }
            Objective::Infonce => {
                let logits = Tensor::cat(&[&gx.unsqueeze(1)?, &gy.reshape((b, nu))?], 1)?; // [B, 1 + K]
                infonce_loss(&logits)
            }
        }
    }

    /// A hash of the weights and the noise, for the `log Z` cache.
    fn weights_hash(&self) -> Result<u64> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (name, v) in crate::train::optim::named_vars(&self.core.varmap)? {
            name.hash(&mut h);
            for x in v.as_tensor().flatten_all()?.to_vec1::<f32>()? {
                x.to_bits().hash(&mut h);
            }
        }
        for t in [&self.noise.mean, &self.noise.chol] {
            for x in t.flatten_all()?.to_vec1::<f32>()? {
                x.to_bits().hash(&mut h);
            }
        }
        Ok(h.finish())
    }

    /// `log Ẑ = log E_{p_n}[exp(-f_θ(u))]`, the log-normaliser of `exp(-E_θ)`, by importance
    /// sampling from the noise (`samples` draws), cached for the current weights.
    pub fn log_z(&self, samples: usize, rng: &mut Rng) -> Result<LogZEstimate> {
        let key = (self.weights_hash()?, samples);
        if let Ok(g) = self.log_z.lock() {
            if let Some((k, v)) = *g {
                if k == key {
                    return Ok(v);
                }
            }
        }
        let log_w = |u: &Tensor| -> Result<Tensor> { Ok(self.f(u)?.neg()?) };
        let d = self.core.dim;
        let v = importance_log_z(&log_w, d, samples, LOG_Z_CHUNK, &self.core.device, rng)?;
        if let Ok(mut g) = self.log_z.lock() {
            *g = Some((key, v));
        }
        Ok(v)
    }
}

impl GenerativeModel for Nce {
    fn family(&self) -> &'static str {
        "nce"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// The objective's loss on a dequantized batch with fresh noise.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "nce")?;
        let x = self.scale.dequantize(batch, rng)?;
        self.objective_loss(&x, rng)
    }

    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let batch = ctx.batch()?;
        let loss = self.loss(&batch, ctx.rng())?;
        ctx.minimize(DEFAULT_GROUP, &loss)
    }

    /// Fit the noise Gaussian to the first batch (on the dequantization grid for levels, the
    /// bins' variance added so a constant coordinate stays finite).
    fn init_from_data(&mut self, batch: &Tensor, rng: &mut Rng) -> Result<()> {
        let _ = rng;
        check_batch(batch, self.core.dim, "nce")?;
        let x = self.scale.to_grid(batch)?; // [B, D]
        let floor = match self.scale.levels {
            Some(l) => (2.0 / (l - 1) as f64).powi(2) / 12.0,
            None => 0.0,
        };
        self.noise = GaussianFit::fit(&x, floor + 1e-4, self.cfg.noise_scale)?;
        Ok(())
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        Ok(HashMap::from([
            ("noise_mean".to_string(), self.noise.mean.clone()),
            ("noise_cholesky".to_string(), self.noise.chol.clone()),
        ]))
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            t.get(k).cloned().ok_or_else(|| {
                Error::Config(format!("the nce checkpoint lacks state tensor '{k}'"))
            })
        };
        self.noise = GaussianFit::from_parts(get("noise_mean")?, get("noise_cholesky")?)?;
        Ok(())
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        format!(
            "{} {} steps of size {} (whitened units) from the noise Gaussian",
            self.cfg.sample_steps,
            self.cfg.sampler.describe(),
            self.cfg.sample_step_size
        )
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let u0 = rng.normal_tensor(&[n, self.core.dim], &self.core.device)?;
        let (u, _) = langevin(
            &WhiteEnergy(&self.net),
            &u0,
            self.cfg.sample_step_size,
            self.cfg.sample_steps,
            self.cfg.sampler == Sampler::Mala,
            rng,
        )?;
        self.scale.to_data(&self.noise.colour(&u)?)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        let which = likelihood_choice(opts, "nce", Config::LIKELIHOODS)?;
        check_batch(batch, self.core.dim, "nce")?;
        let (log_z, samples) = match which {
            "learned" if self.cfg.objective == Objective::Infonce => {
                return Err(Error::Config(
                    "InfoNCE does not learn the normaliser (it cancels from the softmax); use \
                     --likelihood is, which estimates it by importance sampling"
                        .into(),
                ))
            }
            "learned" => (self.learned_c()?, 0),
            _ => {
                let est = self.log_z(self.cfg.log_z_samples, rng)?;
                (est.log_z, est.samples)
            }
        };
        let x = self.scale.dequantize(batch, rng)?;
        let e: Vec<f32> = self.energy_x(&x)?.to_vec1()?;
        let off = self.scale.log_jacobian(self.core.dim);
        Ok(Nll {
            nats: e.iter().map(|e| f64::from(*e) + log_z - off).collect(),
            dims: self.core.dim,
            kind: NllKind::Estimate { samples },
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let which = likelihood_choice(opts, "nce", Config::LIKELIHOODS).unwrap_or("is");
        let c = self.learned_c().unwrap_or(f64::NAN);
        let cached = match self.log_z.lock() {
            Ok(g) => g.map(|(_, v)| v),
            Err(_) => None,
        };
        let check = match cached {
            Some(v) => format!(
                "log Z = {:.4} ± {:.4} by importance sampling from the noise ({} draws, \
                 effective sample size {:.0})",
                v.log_z, v.se, v.samples, v.ess
            ),
            None => format!(
                "log Z by importance sampling from the noise ({} draws)",
                self.cfg.log_z_samples
            ),
        };
        let gap = match (cached, self.cfg.objective) {
            (_, Objective::Infonce) => "; InfoNCE leaves c unlearned".to_string(),
            (Some(v), Objective::Nce) => format!(
                "; learned c = {c:.4}, nce_normalisation_gap c - log Z = {:+.4}",
                c - v.log_z
            ),
            (None, Objective::Nce) => format!("; learned c = {c:.4}"),
        };
        let head = match which {
            "learned" => format!(
                "E(x) + c with the learned log-normaliser c = {c:.4} (self-normalised, \
                 unchecked; the check is --likelihood is)"
            ),
            _ => format!(
                "E(x) + log Z, {check} (its s.e. is common to every example and not in the \
                 s.e. over examples){gap}"
            ),
        };
        format!(
            "{} noise-contrastive model, noise N(mean, ({} x fitted sd)^2): {head}{}",
            match self.cfg.objective {
                Objective::Nce => "NCE",
                Objective::Infonce => "InfoNCE",
            },
            self.cfg.noise_scale,
            self.scale.dequantization_note()
        )
    }
}
