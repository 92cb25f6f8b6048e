//! Energy-based model `p(x) = exp(-E(x)) / Z` with an MLP energy on the standardised data
//! `u = (x - μ) / s` (`μ`, `s`: a diagonal Gaussian fitted to the first training batch),
//!
//!   E(x) = f_θ(u) + |u|² / 2,
//!
//! so the untrained model is that Gaussian and `exp(-E)` stays normalisable. Trained by
//!
//! - `dsm`: denoising score matching (Vincent 2011, eq. 11 for Gaussian noise): with
//!   `ũ = u + σ ε`, minimise `½ |ε - σ ∇_u E(ũ)|²` (the `σ²`-weighted loss of Song & Ermon 2019,
//!   eq. 2), `σ` drawn per example from `sigmas`. The score `-∇_u E` enters the loss, so it is
//!   computed with `backward_create_graph` through a network of plain candle ops
//!   ([`crate::nn::PlainMlp`]);
//! - `pcd`: persistent contrastive divergence with a replay buffer (Du & Mordatch 2019,
//!   algorithm 1): negatives are `train_langevin_steps` Langevin steps from buffer entries (a
//!   share `reinit` restarted from the Gaussian), the loss is
//!   `mean f(u⁺) - mean f(u⁻) + α (mean f(u⁺)² + mean f(u⁻)²)`, and the buffer is checkpointed.
//!
//! Samples: Langevin dynamics from the Gaussian, optionally Metropolis-adjusted (MALA,
//! [`crate::continuous::langevin`]). Likelihood: `ais`, `-log p(x) = E(x) + log Z` with `log Z`
//! estimated by annealed importance sampling from the Gaussian ([`crate::eval::ais`]); the
//! estimate's standard error is given in the method line (it shifts every example alike).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::net::{check_batch, DataScale};
use crate::continuous::langevin::{langevin, Energy};
use crate::eval::ais::{log_partition, AisOptions};
use crate::model::{
    likelihood_choice, DataInfo, GenerativeModel, ModelCore, StepContext, StepOutput, DEFAULT_GROUP,
};
use crate::models::FamilyConfig;
use crate::nn::{Activation, ParamInit, PlainMlp};
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// How the energy is trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Denoising score matching (Vincent 2011).
    #[default]
    Dsm,
    /// Persistent contrastive divergence with a replay buffer (Du & Mordatch 2019).
    Pcd,
}

/// How samples are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Unadjusted Langevin dynamics.
    Langevin,
    /// Metropolis-adjusted Langevin (exact invariance).
    #[default]
    Mala,
}

impl Sampler {
    /// The sampler in words, for the report.
    pub fn describe(&self) -> &'static str {
        match self {
            Sampler::Langevin => "unadjusted Langevin",
            Sampler::Mala => "Metropolis-adjusted Langevin (MALA)",
        }
    }
}

/// The `[model]` table of `ebm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Units of each hidden layer of the energy network.
    pub hidden: usize,
    /// Hidden layers.
    pub layers: usize,
    /// The activation (smooth: silu or tanh; the score's derivative enters the DSM loss).
    pub activation: Activation,
    /// dsm or pcd.
    pub objective: Objective,
    /// DSM noise levels in units of the data's per-dimension standard deviation, one drawn
    /// per example.
    pub sigmas: Vec<f64>,
    /// PCD: replay-buffer entries.
    pub buffer_size: usize,
    /// PCD: share of negatives restarted from the Gaussian each step.
    pub reinit: f64,
    /// PCD: Langevin steps per training step.
    pub train_langevin_steps: usize,
    /// PCD: Langevin step size (standardised units).
    pub train_step_size: f64,
    /// PCD: weight α of the energy-magnitude regulariser.
    pub energy_reg: f64,
    /// Sampling: langevin or mala.
    pub sampler: Sampler,
    /// Sampling: Langevin steps from the Gaussian.
    pub sample_steps: usize,
    /// Sampling: step size η (standardised units).
    pub sample_step_size: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hidden: 128,
            layers: 3,
            activation: Activation::Silu,
            objective: Objective::Dsm,
            sigmas: vec![0.05],
            buffer_size: 8192,
            reinit: 0.05,
            train_langevin_steps: 20,
            train_step_size: 0.05,
            energy_reg: 0.1,
            sampler: Sampler::Mala,
            sample_steps: 500,
            sample_step_size: 0.05,
        }
    }
}

impl Config {
    fn param_count(&self, d: usize) -> usize {
        let h = self.hidden;
        match self.layers {
            0 => d,
            n => d * h + h + (n - 1) * (h * h + h) + h,
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "energy-based model: DSM or PCD training, Langevin/MALA sampling, AIS log Z";
    const LIKELIHOODS: &'static [&'static str] = &["ais"];

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.hidden == 0 || self.layers > 16 {
            return bad(format!(
                "model.hidden must be >= 1 and model.layers <= 16 (got {} and {})",
                self.hidden, self.layers
            ));
        }
        if self.activation == Activation::Relu && self.objective == Objective::Dsm {
            return bad(
                "model.activation = \"relu\" has a zero second derivative, so the DSM score \
                 is piecewise constant; use silu or tanh"
                    .into(),
            );
        }
        if self.sigmas.is_empty() || self.sigmas.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return bad(format!(
                "model.sigmas must be positive numbers, e.g. [0.05], got {:?}",
                self.sigmas
            ));
        }
        if self.buffer_size == 0 || self.sample_steps == 0 || self.train_langevin_steps == 0 {
            return bad(
                "model.buffer_size, sample_steps and train_langevin_steps must be >= 1".into(),
            );
        }
        for (k, v) in [
            ("train_step_size", self.train_step_size),
            ("sample_step_size", self.sample_step_size),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!("model.{k} must be positive, got {v}"));
            }
        }
        let reg_ok = self.energy_reg.is_finite() && self.energy_reg >= 0.0;
        if !(0.0..=1.0).contains(&self.reinit) || !reg_ok {
            return bad(format!(
                "model.reinit must be in [0, 1] and model.energy_reg >= 0 (got {} and {})",
                self.reinit, self.energy_reg
            ));
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        MemoryEstimate {
            params: self.param_count(data.dim) as u64,
            // forward, first and second backward of each layer
            activations: estimate::prod(&[
                batch,
                self.hidden * (self.layers + 1) + data.dim,
                12,
                4,
            ]),
            fixed: estimate::prod(&[self.buffer_size, data.dim, 4]),
        }
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        let rows = (eval.ais_chains + AisOptions::default().adapt_chains).max(eval.batch_size);
        self.memory_estimate(data, rows).activations
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Ebm::new(self, *data, device, rng)?))
    }
}

/// The energy as a function of standardised `u` (what Langevin, AIS and DSM see).
struct StandardEnergy<'a>(&'a PlainMlp);

impl StandardEnergy<'_> {
    /// `(f(u), E(u) = f(u) + |u|²/2)`, each `[R]`.
    fn parts(&self, u: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = self.0.forward(u)?.squeeze(1)?; // [R]
        let e = (&f + (u.sqr()?.sum(1)? * 0.5)?)?;
        Ok((f, e))
    }
}

impl Energy for StandardEnergy<'_> {
    fn energy(&self, u: &Tensor) -> Result<Tensor> {
        Ok(self.parts(u)?.1)
    }
}

/// The last `log Z` estimate: `(weights hash, chains, steps, leapfrog)`, `(log Z_u, s.e., acc)`.
type LogZCache = Option<((u64, usize, usize, usize), (f64, f64, f64))>;

/// An energy-based model on flat examples.
pub struct Ebm {
    core: ModelCore,
    cfg: Config,
    scale: DataScale,
    net: PlainMlp,
    /// The Gaussian fit: mean and standard deviation, `[D]` each.
    mean: Tensor,
    std: Tensor,
    /// PCD's replay buffer in standardised units, row-major `[buffer_size, D]`.
    buffer: Vec<f32>,
    log_z: Mutex<LogZCache>,
}

impl Ebm {
    /// The EBM of `cfg` on data shaped like `data`, initial weights from `rng`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let d = data.dim;
        let core = ModelCore::new(d, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let (h, n, act) = (cfg.hidden, cfg.layers, cfg.activation);
            PlainMlp::new(&mut p.push("energy"), d, h, n, 1, act, 0.1)?
        };
        let buffer = match cfg.objective {
            Objective::Pcd => rng.normal_vec(cfg.buffer_size * d),
            Objective::Dsm => Vec::new(),
        };
        Ok(Self {
            core,
            cfg: cfg.clone(),
            scale: DataScale::new(data.kind)?,
            net,
            mean: Tensor::zeros(d, DType::F32, device)?,
            std: Tensor::ones(d, DType::F32, device)?,
            buffer,
            log_z: Mutex::new(None),
        })
    }

    /// `u = (x - μ) / s` for model-space `x: [B, D]`.
    fn standardise(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_sub(&self.mean)?.broadcast_div(&self.std)?)
    }

    /// `E(x)` per row in the data's model space (continuous values or the dequantized grid),
    /// including `Σ log s` so that `log p(x) = -E(x) - log Z_u`.
    pub fn energy_x(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.standardise(x)?;
        let log_s = self.std.log()?.sum_all()?.to_scalar::<f32>()?;
        Ok((StandardEnergy(&self.net).energy(&u)? + f64::from(log_s))?)
    }

    /// The DSM loss per dimension on a batch in model space.
    pub fn dsm_loss(&self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        let u = self.standardise(x)?;
        let sig: Vec<f32> = (0..b)
            .map(|_| self.cfg.sigmas[rng.below(self.cfg.sigmas.len())] as f32)
            .collect();
        let sig = Tensor::from_vec(sig, (b, 1), x.device())?; // [B, 1]
        let eps = rng.normal_tensor(&[b, d], x.device())?; // [B, D]
        let noisy = Var::from_tensor(&(u + eps.broadcast_mul(&sig)?)?.detach())?;
        let e = StandardEnergy(&self.net).energy(noisy.as_tensor())?;
        let grads = e.sum_all()?.backward_create_graph()?;
        let g = grads
            .get(noisy.as_tensor())
            .ok_or_else(|| Error::Config("the energy does not depend on its input".into()))?; // [B, D]
        let r = (eps - g.broadcast_mul(&sig)?)?; // [B, D]
        Ok((r.sqr()?.sum(1)?.mean_all()? * (0.5 / d as f64))?)
    }

    /// One PCD step's loss: negatives from the buffer, Langevin, write back.
    fn pcd_loss(&mut self, x: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let (b, d) = x.dims2()?;
        let n = self.cfg.buffer_size;
        let idx: Vec<usize> = (0..b).map(|_| rng.below(n)).collect();
        let mut init = Vec::with_capacity(b * d);
        for &i in &idx {
            if rng.uniform() < self.cfg.reinit {
                init.extend(rng.normal_vec(d));
            } else {
                init.extend_from_slice(&self.buffer[i * d..(i + 1) * d]);
            }
        }
        let u0 = Tensor::from_vec(init, (b, d), x.device())?;
        let energy = StandardEnergy(&self.net);
        let (neg, _) = langevin(
            &energy,
            &u0,
            self.cfg.train_step_size,
            self.cfg.train_langevin_steps,
            false,
            rng,
        )?;
        let rows: Vec<Vec<f32>> = neg.to_vec2()?;
        for (row, &i) in rows.iter().zip(&idx) {
            self.buffer[i * d..(i + 1) * d].copy_from_slice(row);
        }
        let (fp, _) = energy.parts(&self.standardise(x)?)?;
        let (fm, _) = energy.parts(&neg)?;
        let reg = ((fp.sqr()?.mean_all()? + fm.sqr()?.mean_all()?)? * self.cfg.energy_reg)?;
        Ok(((fp.mean_all()? - fm.mean_all()?)? + reg)?)
    }

    /// A hash of the weights, for the `log Z` cache.
    fn weights_hash(&self) -> Result<u64> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for v in crate::train::optim::named_vars(&self.core.varmap)? {
            v.0.hash(&mut h);
            for x in v.1.as_tensor().flatten_all()?.to_vec1::<f32>()? {
                x.to_bits().hash(&mut h);
            }
        }
        for t in [&self.mean, &self.std] {
            for x in t.to_vec1::<f32>()? {
                x.to_bits().hash(&mut h);
            }
        }
        Ok(h.finish())
    }

    /// `(log Z_u, s.e., acceptance)` by AIS from `N(0, I)` in standardised units, cached for
    /// the current weights and settings.
    pub fn log_z(&self, opts: &EvalOptions, rng: &mut Rng) -> Result<(f64, f64, f64)> {
        let key = (
            self.weights_hash()?,
            opts.ais_chains,
            opts.ais_steps,
            opts.ais_leapfrog,
        );
        if let Ok(g) = self.log_z.lock() {
            if let Some((k, v)) = *g {
                if k == key {
                    return Ok(v);
                }
            }
        }
        let d = self.core.dim;
        let energy = StandardEnergy(&self.net);
        let log_f = |u: &Tensor| -> Result<Tensor> { Ok(energy.energy(u)?.neg()?) };
        let zero = Tensor::zeros(d, DType::F32, &self.core.device)?;
        let one = Tensor::ones(d, DType::F32, &self.core.device)?;
        let v = log_partition(&log_f, &zero, &one, &AisOptions::from_eval(opts), rng)?;
        if let Ok(mut g) = self.log_z.lock() {
            *g = Some((key, v));
        }
        Ok(v)
    }
}

impl GenerativeModel for Ebm {
    fn family(&self) -> &'static str {
        "ebm"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// The DSM loss (for PCD too: a comparable, parameter-dependent score-matching figure).
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "ebm")?;
        let x = self.scale.dequantize(batch, rng)?;
        self.dsm_loss(&x, rng)
    }

    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let batch = ctx.batch()?;
        check_batch(&batch, self.core.dim, "ebm")?;
        let x = self.scale.dequantize(&batch, ctx.rng())?;
        let loss = match self.cfg.objective {
            Objective::Dsm => self.dsm_loss(&x, ctx.rng())?,
            Objective::Pcd => self.pcd_loss(&x, ctx.rng())?,
        };
        ctx.minimize(DEFAULT_GROUP, &loss)
    }

    fn init_from_data(&mut self, batch: &Tensor, rng: &mut Rng) -> Result<()> {
        let _ = rng;
        let x = self.scale.to_grid(batch)?; // [B, D]
        let mean = x.mean(0)?;
        let var = x.broadcast_sub(&mean)?.sqr()?.mean(0)?;
        self.mean = mean;
        // a constant coordinate (a digit's blank corner) keeps the dequantization noise's
        // variance (bin width² / 12), so the standardised values stay finite
        let floor = match self.scale.levels {
            Some(l) => (2.0 / (l - 1) as f64).powi(2) / 12.0,
            None => 0.0,
        };
        self.std = (var + (floor + 1e-4))?.sqrt()?;
        Ok(())
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut m = HashMap::new();
        m.insert("gaussian_mean".into(), self.mean.clone());
        m.insert("gaussian_std".into(), self.std.clone());
        if !self.buffer.is_empty() {
            let d = self.core.dim;
            let t = Tensor::from_vec(
                self.buffer.clone(),
                (self.buffer.len() / d, d),
                &self.core.device,
            )?;
            m.insert("replay_buffer".into(), t);
        }
        Ok(m)
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let get = |k: &str| {
            t.get(k).cloned().ok_or_else(|| {
                Error::Config(format!("the ebm checkpoint lacks state tensor '{k}'"))
            })
        };
        self.mean = get("gaussian_mean")?.to_dtype(DType::F32)?;
        self.std = get("gaussian_std")?.to_dtype(DType::F32)?;
        if self.cfg.objective == Objective::Pcd {
            self.buffer = get("replay_buffer")?.flatten_all()?.to_vec1()?;
        }
        Ok(())
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        format!(
            "{} {} steps of size {} from the data's Gaussian fit",
            self.cfg.sample_steps,
            self.cfg.sampler.describe(),
            self.cfg.sample_step_size
        )
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let u0 = rng.normal_tensor(&[n, self.core.dim], &self.core.device)?;
        let (u, _) = langevin(
            &StandardEnergy(&self.net),
            &u0,
            self.cfg.sample_step_size,
            self.cfg.sample_steps,
            self.cfg.sampler == Sampler::Mala,
            rng,
        )?;
        let x = u.broadcast_mul(&self.std)?.broadcast_add(&self.mean)?;
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "ebm", Config::LIKELIHOODS)?;
        check_batch(batch, self.core.dim, "ebm")?;
        let (log_z, _, _) = self.log_z(opts, rng)?;
        let x = self.scale.dequantize(batch, rng)?;
        let e: Vec<f32> = self.energy_x(&x)?.to_vec1()?;
        let off = self.scale.log_jacobian(self.core.dim);
        Ok(Nll {
            nats: e.iter().map(|e| f64::from(*e) + log_z - off).collect(),
            dims: self.core.dim,
            kind: NllKind::Estimate {
                samples: opts.ais_chains,
            },
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let est = match self.log_z.lock() {
            Ok(g) => match *g {
                Some((k, (lz, se, acc)))
                    if (k.1, k.2, k.3) == (opts.ais_chains, opts.ais_steps, opts.ais_leapfrog) =>
                {
                    format!(" = {lz:.4} ± {se:.4} (HMC acceptance {acc:.2})")
                }
                _ => String::new(),
            },
            Err(_) => String::new(),
        };
        format!(
            "E(x) + log Z, log Z of the standardised energy{est} by {} from the data's Gaussian \
             fit (a stochastic lower bound on log Z, so the NLL leans low; its s.e. is common to \
             every example and not in the s.e. over examples){}",
            AisOptions::from_eval(opts).describe(),
            self.scale.dequantization_note()
        )
    }
}
