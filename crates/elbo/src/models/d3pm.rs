//! D3PM (Austin et al. 2021) as a [`GenerativeModel`]: the uniform or absorbing transition
//! matrix, the discrete-time variational bound and hybrid loss of [`crate::discrete::d3pm`], and
//! ancestral sampling.
//!
//! The network is the MDLM transformer predicting p~(x_0 | x_t) over the V data tokens from x_t
//! (K = V + 1 input ids with the absorbing MASK, V with the uniform matrix). With the uniform
//! matrix it also sees the time: a fixed sinusoidal embedding of `1000 t/T` (Vaswani et al. 2017,
//! sec. 3.5) added to every input embedding; with the absorbing matrix the masked fraction
//! carries the time, as in MDLM, and none is given.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::discrete::d3pm::ancestral::{self, time_grid, AncestralConfig};
use crate::discrete::d3pm::transition::{MatrixKind, Schedule, StructuredTransition, Transition};
use crate::discrete::d3pm::vlb::{sample_steps, vlb, vlb_estimate_terms, X0Denoiser};
use crate::discrete::filter::{TokenFilter, TokenSampling};
use crate::discrete::{
    check_prompt_len, per_chunk, to_ids, vocab_of, TransformerSettings, EVAL_CHUNK,
};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::transformer::{log_softmax_last_dim, Transformer};
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `d3pm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The transformer (`[model.transformer]`).
    pub transformer: TransformerSettings,
    /// "absorbing" (to MASK) or "uniform".
    pub matrix: MatrixKind,
    /// "mutual-information" (alpha_bar_t = 1 - t/T) or "cosine".
    pub schedule: Schedule,
    /// Number of diffusion steps T.
    pub diffusion_steps: usize,
    /// Weight lambda of the auxiliary cross-entropy -log p~(x_0 | x_t) (D3PM eq. 5; 0: the
    /// bound alone).
    pub hybrid_lambda: f64,
    /// The token filter of the sampler (`[model.sampling]`).
    pub sampling: TokenSampling,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            transformer: TransformerSettings::default(),
            matrix: MatrixKind::Absorbing,
            schedule: Schedule::MutualInformation,
            diffusion_steps: 1000,
            hybrid_lambda: 0.01,
            sampling: TokenSampling::default(),
        }
    }
}

impl Config {
    /// Input ids of the network: V, plus MASK for the absorbing matrix.
    fn vocab_in(&self, vocab: usize) -> usize {
        match self.matrix {
            MatrixKind::Absorbing => vocab + 1,
            MatrixKind::Uniform => vocab,
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "discrete diffusion with uniform or absorbing transition matrices (D3PM VLB)";
    const LIKELIHOODS: &'static [&'static str] = &["vlb"];

    fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        if self.diffusion_steps == 0 {
            return Err(Error::Config(
                "model.diffusion_steps must be >= 1 (D3PM uses 1000)".into(),
            ));
        }
        if !(self.hybrid_lambda.is_finite() && self.hybrid_lambda >= 0.0) {
            return Err(Error::Config(format!(
                "model.hybrid_lambda must be a finite number >= 0 (D3PM uses 0.01), got {}",
                self.hybrid_lambda
            )));
        }
        self.sampling.filter().map(|_| ())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let vocab = data.levels().unwrap_or(1);
        let t = &self.transformer;
        estimate::transformer(t, self.vocab_in(vocab), vocab, data.dim, 0, batch)
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        let rows = eval.batch_size.min(EVAL_CHUNK);
        self.memory_estimate(data, rows).activations
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(D3pm::new(self, *data, device, rng)?))
    }
}

/// D3PM: a bidirectional transformer predicting x_0 from x_t.
pub struct D3pm {
    core: ModelCore,
    net: Transformer,
    transition: StructuredTransition,
    cfg: Config,
    len: usize,
    vocab: usize,
    device: Device,
}

impl D3pm {
    /// A new model for sequences of `data.dim` tokens.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let vocab = vocab_of(&data, "D3PM")?;
        let transition =
            StructuredTransition::new(cfg.matrix, cfg.schedule, vocab, cfg.diffusion_steps)?;
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let tc = cfg
                .transformer
                .backbone(cfg.vocab_in(vocab), vocab, data.dim, false);
            Transformer::new(&mut p.push("net"), tc)?
        };
        Ok(Self {
            core,
            net,
            transition,
            cfg: cfg.clone(),
            len: data.dim,
            vocab,
            device: device.clone(),
        })
    }

    /// The forward process.
    pub fn transition(&self) -> &StructuredTransition {
        &self.transition
    }

    /// Sinusoidal embeddings of `1000 t` per row, broadcast to `[B, L, D]`.
    fn time_embedding(&self, time: &[f64], l: usize) -> Result<Tensor> {
        let d = self.cfg.transformer.d_model;
        let half = (d / 2).max(1);
        let v: Vec<f32> = time
            .iter()
            .flat_map(|&t| {
                (0..d).map(move |j| {
                    let f = (-(10_000f64).ln() * (j % half) as f64 / half as f64).exp();
                    let a = 1000.0 * t * f;
                    (if j < half { a.sin() } else { a.cos() }) as f32
                })
            })
            .collect();
        let e = Tensor::from_vec(v, (time.len(), 1, d), &self.device)?;
        Ok(e.broadcast_as((time.len(), l, d))?.contiguous()?) // [B, L, D]
    }
}

impl X0Denoiser for D3pm {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn log_probs(&self, xt: &Tensor, time: &[f64]) -> Result<Tensor> {
        let xt = xt.to_device(&self.device)?;
        let logits = match self.cfg.matrix {
            MatrixKind::Absorbing => self.net.forward(&xt)?,
            MatrixKind::Uniform => {
                let extra = self.time_embedding(time, xt.dim(1)?)?;
                self.net.forward_with(&xt, Some(&extra))?
            }
        };
        log_softmax_last_dim(&logits) // [B, L, V]
    }
}

impl GenerativeModel for D3pm {
    fn family(&self) -> &'static str {
        "d3pm"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, opts: &SampleOptions) -> String {
        let n = time_grid(opts.steps, self.transition.steps()).len() - 1;
        format!(
            "ancestral sampling, {n} of T = {} steps, temperature {}",
            self.transition.steps(),
            self.cfg.sampling.temperature
        )
    }

    /// The hybrid loss per token (D3PM eq. 5): `T L_{t-1} + L_T + lambda (-log p~(x_0|x_t))` at
    /// one stratified step per example.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let ids = to_ids(batch, self.len, self.vocab)?;
        let t = sample_steps(ids.dim(0)?, self.transition.steps(), rng);
        let (bound, ce) = vlb_estimate_terms(&self.transition, self, &ids, &t, rng)?;
        let total = (bound + (ce * self.cfg.hybrid_lambda)?)?;
        Ok((total.mean_all()? / self.len as f64)?)
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        self.sample_conditional(n, &vec![None; self.len], opts, rng)
    }

    /// Given positions stay fixed at every step (with the uniform matrix the network then sees
    /// clean tokens where it was trained on noised ones: a heuristic, as in D3PM's infilling).
    fn sample_conditional(
        &self,
        n: usize,
        template: &[Option<u32>],
        opts: &SampleOptions,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let mut t = template.to_vec();
        t.resize(self.len, None);
        let cfg = AncestralConfig {
            steps: opts.steps.max(1),
            filter: TokenFilter::new(
                self.cfg.sampling.temperature,
                self.cfg.sampling.top_k,
                self.cfg.sampling.top_p,
            )?,
        };
        let rows = ancestral::sample(&self.transition, self, &t, n, &cfg, rng, &self.device)?;
        crate::discrete::samples_tensor(&rows, &self.device)
    }

    /// The Monte-Carlo bound: `opts.lm_samples` stratified steps per example.
    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "d3pm", Config::LIKELIHOODS)?;
        check_prompt_len(opts, self.len, "the D3PM bound", false)?;
        let ids = to_ids(batch, self.len, self.vocab)?;
        let nats = per_chunk(&ids, |c| {
            vlb(&self.transition, self, c, opts.lm_samples, rng)
        })?;
        Ok(Nll {
            nats,
            dims: self.len,
            kind: NllKind::Bound,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let matrix = match self.cfg.matrix {
            MatrixKind::Absorbing => "absorbing",
            MatrixKind::Uniform => "uniform",
        };
        let schedule = match self.cfg.schedule {
            Schedule::MutualInformation => "mutual-information",
            Schedule::Cosine => "cosine",
        };
        format!(
            "D3PM variational bound ({matrix} matrix, {schedule} schedule, T = {}): prior KL in \
             closed form plus T L_(t-1) at {} stratified step(s) t ~ U{{1..T}} per example \
             (standard error over examples includes the step and x_t sampling)",
            self.transition.steps(),
            opts.lm_samples
        )
    }
}
