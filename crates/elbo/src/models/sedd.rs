//! Score-entropy discrete diffusion (SEDD, Lou, Meng and Ermon 2024) as a [`GenerativeModel`]:
//! a transformer ratio network trained by denoising score entropy, scored by the score-entropy
//! bound of [`crate::discrete::score_entropy`], sampled by [`crate::discrete::ratio_sampler`].
//!
//! The ratio network is the language models' bidirectional transformer over the graph's states
//! with V outputs. Absorbing graph: `log s_theta(x_t, sigma_bar)_{i,y} = f(x_t)_{i,y}
//! - log(e^{sigma_bar} - 1) - log V`, the reference's `scale_by_sigma`: the exact ratio at a
//! masked position is `p(x_0^i = y | x_t) / (e^{sigma_bar} - 1)` (Lou et al. 2024, eq. 19 and
//! app. C.2), so the network needs no time input (as MDLM). Uniform graph: `sigma_bar` enters
//! as a sinusoidal embedding added to every input position, and `f` is the log ratio itself.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::discrete::filter::TokenFilter;
use crate::discrete::graph::{Graph, GraphKind, NoiseKind, NoiseSchedule};
use crate::discrete::ratio_sampler::{self, RatioSampleConfig, RatioSampler};
use crate::discrete::score_entropy::{dse_loss, elbo, stratified_times, RatioModel};
use crate::discrete::{
    check_prompt_len, per_chunk, to_ids, vocab_of, TransformerSettings, EVAL_CHUNK,
};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::embedding::sinusoidal_embedding;
use crate::nn::linear::Linear;
use crate::nn::transformer::Transformer;
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `sedd`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The transformer (`[model.transformer]`).
    pub transformer: TransformerSettings,
    /// "absorbing" (MASK = V) or "uniform".
    pub graph: GraphKind,
    /// Training noise schedule: "log-linear" or "geometric".
    pub noise: NoiseKind,
    /// Geometric schedule: total noise at t = 0.
    pub sigma_min: f64,
    /// Geometric schedule: total noise at t = 1.
    pub sigma_max: f64,
    /// Log-linear schedule: mass left unnoised at t = 1, in (0, 1).
    pub eps: f64,
    /// Smallest training time (the reference's `sampling_eps`).
    pub t_min: f64,
    /// Stratified (antithetic) training times.
    pub antithetic: bool,
    /// The sampler (`[model.sampling]`).
    pub sampling: RatioSampling,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            transformer: TransformerSettings::default(),
            graph: GraphKind::Absorbing,
            noise: NoiseKind::LogLinear,
            sigma_min: 1e-4,
            sigma_max: 20.0,
            eps: 1e-3,
            t_min: 1e-3,
            antithetic: true,
            sampling: RatioSampling::default(),
        }
    }
}

/// The `[model.sampling]` table of `sedd`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RatioSampling {
    /// "analytic" (Tweedie) or "euler" (tau-leaping).
    pub sampler: RatioSampler,
    /// The last time of the grid before the final denoising step, in (0, 1).
    pub eps: f64,
    /// Softmax temperature of where a moving position goes (1: the model's).
    pub temperature: f64,
    /// Keep only the `top_k` most likely moves (0: all).
    pub top_k: usize,
    /// Nucleus mass of the moves (1: all).
    pub top_p: f64,
}

impl Default for RatioSampling {
    fn default() -> Self {
        let f = TokenFilter::default();
        Self {
            sampler: RatioSampler::Analytic,
            eps: 1e-5,
            temperature: f.temperature,
            top_k: f.top_k,
            top_p: f.top_p,
        }
    }
}

impl Config {
    /// The training noise schedule.
    pub fn schedule(&self) -> NoiseSchedule {
        NoiseSchedule {
            kind: self.noise,
            sigma_min: self.sigma_min,
            sigma_max: self.sigma_max,
            eps: self.eps,
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str = "score-entropy discrete diffusion (SEDD; absorbing or uniform)";
    const LIKELIHOODS: &'static [&'static str] = &["elbo"];

    fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        match self.noise {
            NoiseKind::Geometric if !(self.sigma_min > 0.0 && self.sigma_max > self.sigma_min) => {
                return Err(Error::Config(format!(
                    "model.sigma_min ({}) and model.sigma_max ({}) of the geometric schedule \
                     need 0 < sigma_min < sigma_max (e.g. 1e-4 and 20)",
                    self.sigma_min, self.sigma_max
                )))
            }
            NoiseKind::LogLinear if !(self.eps > 0.0 && self.eps < 1.0) => {
                return Err(Error::Config(format!(
                    "model.eps ({}) of the log-linear schedule must be in (0, 1) (e.g. 1e-3)",
                    self.eps
                )))
            }
            _ => {}
        }
        if !(self.t_min >= 0.0 && self.t_min < 1.0) {
            return Err(Error::Config(format!(
                "model.t_min ({}) must be in [0, 1) (e.g. 1e-3)",
                self.t_min
            )));
        }
        let s = &self.sampling;
        if !(s.eps > 0.0 && s.eps < 1.0) {
            return Err(Error::Config(format!(
                "model.sampling.eps ({}) must be in (0, 1) (e.g. 1e-5)",
                s.eps
            )));
        }
        TokenFilter::new(s.temperature, s.top_k, s.top_p).map(|_| ())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let vocab = data.levels().unwrap_or(1);
        let t = &self.transformer;
        let (states, time) = match self.graph {
            GraphKind::Absorbing => (vocab + 1, 0),
            GraphKind::Uniform => (vocab, estimate::prod(&[t.d_model, t.d_model + 1])),
        };
        // the score-entropy weights [B, L, V] twice beside the transformer's activations
        let mut m = estimate::transformer(t, states, vocab, data.dim, time, batch);
        m.activations =
            m.activations
                .saturating_add(estimate::prod(&[batch, data.dim, vocab, 2 * 4]));
        m
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        self.memory_estimate(data, eval.batch_size.min(EVAL_CHUNK))
            .activations
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Sedd::new(self, *data, device, rng)?))
    }
}

/// `log(e^x - 1)` for x > 0, accurate near 0 and for large x.
fn log_expm1(x: f64) -> f64 {
    if x < 30.0 {
        x.exp_m1().ln()
    } else {
        x + (-(-x).exp()).ln_1p()
    }
}

/// SEDD: a bidirectional transformer over the graph's states with V outputs.
pub struct Sedd {
    core: ModelCore,
    net: Transformer,
    /// The time embedding of the uniform graph.
    time: Option<Linear>,
    graph: Graph,
    schedule: NoiseSchedule,
    t_min: f64,
    antithetic: bool,
    sampling: RatioSampling,
    len: usize,
    device: Device,
}

impl Sedd {
    /// A new model for sequences of `data.dim` tokens.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let vocab = vocab_of(&data, "SEDD")?;
        let graph = Graph {
            kind: cfg.graph,
            vocab,
        };
        let core = ModelCore::new(data.dim, device);
        let (net, time) = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let tc = cfg
                .transformer
                .backbone(graph.states(), vocab, data.dim, false);
            let net = Transformer::new(&mut p.push("net"), tc)?;
            let d = cfg.transformer.d_model;
            let time = match cfg.graph {
                GraphKind::Absorbing => None,
                GraphKind::Uniform => Some(Linear::new(&mut p.push("time"), d, d, true)?),
            };
            (net, time)
        };
        Ok(Self {
            core,
            net,
            time,
            graph,
            schedule: cfg.schedule(),
            t_min: cfg.t_min,
            antithetic: cfg.antithetic,
            sampling: cfg.sampling.clone(),
            len: data.dim,
            device: device.clone(),
        })
    }

    /// The sampler configuration with the step count of `opts`.
    pub fn sampler_config(&self, opts: &SampleOptions) -> Result<RatioSampleConfig> {
        let s = &self.sampling;
        Ok(RatioSampleConfig {
            sampler: s.sampler,
            steps: opts.steps.max(1),
            schedule: self.schedule,
            eps: s.eps,
            filter: TokenFilter::new(s.temperature, s.top_k, s.top_p)?,
        })
    }
}

impl RatioModel for Sedd {
    fn graph(&self) -> Graph {
        self.graph
    }

    fn log_ratios(&self, xt: &Tensor, sigma_bar: &[f64]) -> Result<Tensor> {
        let xt = xt.to_device(&self.device)?;
        let (b, l) = xt.dims2()?;
        match &self.time {
            None => {
                let v = self.graph.vocab as f64;
                let shift: Vec<f32> = sigma_bar
                    .iter()
                    .map(|&s| (log_expm1(s) + v.ln()) as f32)
                    .collect();
                let shift = Tensor::from_vec(shift, (b, 1, 1), &self.device)?;
                Ok(self.net.forward(&xt)?.broadcast_sub(&shift)?) // [B, L, V]
            }
            Some(time) => {
                let d = self.net.config().d_model;
                let s: Vec<f32> = sigma_bar.iter().map(|&s| s as f32).collect();
                let s = Tensor::from_vec(s, b, &self.device)?;
                let e = time.forward(&sinusoidal_embedding(&s, d, 10_000.0)?)?; // [B, D]
                let e = e
                    .reshape((b, 1, d))?
                    .broadcast_as((b, l, d))?
                    .contiguous()?;
                self.net.forward_with(&xt, Some(&e)) // [B, L, V]
            }
        }
    }
}

impl GenerativeModel for Sedd {
    fn family(&self) -> &'static str {
        "sedd"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, opts: &SampleOptions) -> String {
        let s = &self.sampling;
        format!(
            "SEDD {} sampler ({:?} graph), {} steps + final denoise, temperature {}",
            s.sampler.name(),
            self.graph.kind,
            opts.steps,
            s.temperature
        )
    }

    /// The denoising score entropy per token (Lou et al. 2024, Alg. 1), one time per example
    /// in `[t_min, 1)` of the training schedule.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let ids = to_ids(batch, self.len, self.graph.vocab)?;
        let n = ids.dim(0)?;
        let u: Vec<f64> = if self.antithetic {
            stratified_times(n, rng)
        } else {
            (0..n).map(|_| rng.uniform()).collect()
        };
        let t: Vec<f64> = u
            .iter()
            .map(|u| self.t_min + (1.0 - self.t_min) * u)
            .collect();
        let terms = dse_loss(self, &ids, &self.schedule, &t, rng)?;
        Ok((terms.mean_all()? / self.len as f64)?)
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        self.sample_conditional(n, &vec![None; self.len], opts, rng)
    }

    fn sample_conditional(
        &self,
        n: usize,
        template: &[Option<u32>],
        opts: &SampleOptions,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let mut t = template.to_vec();
        t.resize(self.len, None);
        let (rows, _stats) = ratio_sampler::sample(self, n, &t, &self.sampler_config(opts)?, rng)?;
        crate::discrete::samples_tensor(&rows, &self.device)
    }

    /// The score-entropy bound (eq. 10) with `opts.lm_samples` stratified times per example.
    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "sedd", Config::LIKELIHOODS)?;
        check_prompt_len(opts, self.len, "the SEDD bound", false)?;
        let ids = to_ids(batch, self.len, self.graph.vocab)?;
        let nats = per_chunk(&ids, |c| {
            elbo(self, c, &self.schedule, opts.lm_samples, rng)
        })?;
        Ok(Nll {
            nats,
            dims: self.len,
            kind: NllKind::Bound,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let range = match self.graph.kind {
            GraphKind::Absorbing => "sigma_bar over (0, inf): all MASK at t = 1, prior term 0",
            GraphKind::Uniform => {
                "sigma_bar over (0, sigma_bar(1)] plus the closed-form prior KL to uniform"
            }
        };
        format!(
            "SEDD score-entropy bound (Lou et al. 2024, eq. 10; {:?} graph, {range}), {} \
             stratified time(s) per example on the log-linear reparameterisation (standard \
             error over examples includes the time and noise sampling)",
            self.graph.kind, opts.lm_samples
        )
    }
}
