//! The masked diffusion language model (MDLM, Sahoo et al. 2024) as a [`GenerativeModel`], with
//! the NELBO of [`crate::discrete::masked_diffusion`] and LLaDA's estimator (Nie et al. 2025).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::discrete::filter::TokenFilter;
use crate::discrete::masked_diffusion::{
    llada_conditional_nll, nelbo, nelbo_terms, sample_times, MaskDenoiser,
};
use crate::discrete::sampler::{self, MaskedSampleConfig, MaskedSampler};
use crate::discrete::{
    check_prompt_len, per_chunk, to_ids, vocab_of, TransformerSettings, EVAL_CHUNK,
};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::transformer::{log_softmax_last_dim, Transformer};
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Nll, NllKind, Result, Rng};

/// The `[model]` table of `mdlm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The transformer (`[model.transformer]`).
    pub transformer: TransformerSettings,
    /// Number of discrete time steps of the training ELBO (0: continuous time).
    pub diffusion_steps: usize,
    /// Antithetic (stratified) sampling of the training times (Kingma et al. 2021).
    pub antithetic: bool,
    /// The sampler (`[model.sampling]`).
    pub sampling: MaskedSampling,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            transformer: TransformerSettings::default(),
            diffusion_steps: 0,
            antithetic: true,
            sampling: MaskedSampling::default(),
        }
    }
}

/// The `[model.sampling]` table of `mdlm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MaskedSampling {
    /// ancestral, cached, low-confidence or random (LLaDA remasking).
    pub sampler: MaskedSampler,
    /// Semi-autoregressive block length (0: one block, the whole sequence).
    pub block_len: usize,
    /// Softmax temperature (1: the model's distribution).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus sampling mass (1: all).
    pub top_p: f64,
}

impl Default for MaskedSampling {
    fn default() -> Self {
        let f = TokenFilter::default();
        Self {
            sampler: MaskedSampler::Cached,
            block_len: 0,
            temperature: f.temperature,
            top_k: f.top_k,
            top_p: f.top_p,
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str = "masked diffusion LM (MDLM NELBO; LLaDA's estimator and samplers)";
    const LIKELIHOODS: &'static [&'static str] = &["nelbo", "llada"];

    fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        let s = &self.sampling;
        TokenFilter::new(s.temperature, s.top_k, s.top_p).map(|_| ())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let vocab = data.levels().unwrap_or(1);
        let t = &self.transformer;
        estimate::transformer(t, vocab + 1, vocab, data.dim, 0, batch)
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        // held-out sequences are scored EVAL_CHUNK at a time
        let rows = eval.batch_size.min(EVAL_CHUNK);
        let net = self.memory_estimate(data, rows).activations;
        // and each sequence's Monte-Carlo times, in f64
        net.saturating_add(estimate::prod(&[rows, eval.lm_samples, 8]))
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Mdlm::new(self, *data, device, rng)?))
    }
}

/// MDLM: a bidirectional transformer over V + 1 input ids (MASK = V) and V outputs.
pub struct Mdlm {
    core: ModelCore,
    net: Transformer,
    sampling: MaskedSampling,
    len: usize,
    vocab: usize,
    steps: usize,
    antithetic: bool,
    device: Device,
}

impl Mdlm {
    /// A new model for sequences of `data.dim` tokens; `cfg.diffusion_steps` = 0 trains the
    /// continuous-time ELBO, T > 0 the T-step one.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        let vocab = vocab_of(&data, "MDLM")?;
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let tc = cfg.transformer.backbone(vocab + 1, vocab, data.dim, false);
            Transformer::new(&mut p.push("net"), tc)?
        };
        Ok(Self {
            core,
            net,
            sampling: cfg.sampling.clone(),
            len: data.dim,
            vocab,
            steps: cfg.diffusion_steps,
            antithetic: cfg.antithetic,
            device: device.clone(),
        })
    }

    /// The sampler configuration: the family's sampler with the step count of `opts`.
    pub fn sampler_config(&self, opts: &SampleOptions) -> Result<MaskedSampleConfig> {
        let s = &self.sampling;
        Ok(MaskedSampleConfig {
            sampler: s.sampler,
            steps: opts.steps.max(1),
            block_len: s.block_len,
            filter: TokenFilter::new(s.temperature, s.top_k, s.top_p)?,
        })
    }
}

impl MaskDenoiser for Mdlm {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn log_probs(&self, xt: &Tensor) -> Result<Tensor> {
        log_softmax_last_dim(&self.net.forward(&xt.to_device(&self.device)?)?)
    }
}

impl GenerativeModel for Mdlm {
    fn family(&self) -> &'static str {
        "mdlm"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, opts: &SampleOptions) -> String {
        let s = &self.sampling;
        let blocks = match s.block_len {
            0 => String::new(),
            b => format!(", blocks of {b}"),
        };
        format!(
            "sampler {}, {} steps{blocks}, temperature {}",
            s.sampler.name(),
            opts.steps,
            s.temperature
        )
    }

    /// The NELBO per token, one (antithetic) time per example; training times are kept in
    /// [1e-3, 1] as MDLM's `sampling_eps` (the 1/t weight is unbounded near 0).
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let ids = to_ids(batch, self.len, self.vocab)?;
        let t: Vec<f64> = sample_times(ids.dim(0)?, self.antithetic, self.steps, rng)
            .into_iter()
            .map(|t| t.max(1e-3))
            .collect();
        Ok((nelbo_terms(self, &ids, &t, rng)?.mean_all()? / self.len as f64)?)
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
        let init: Vec<Vec<u32>> = (0..n)
            .map(|_| t.iter().map(|x| x.unwrap_or(self.vocab as u32)).collect())
            .collect();
        let (rows, _stats) = sampler::sample(self, init, &self.sampler_config(opts)?, rng)?;
        crate::discrete::samples_tensor(&rows, &self.device)
    }

    /// The NELBO (`likelihood = "nelbo"`, the default) or LLaDA's estimator of it
    /// (`"llada"`), which with `opts.prompt_len = P` bounds `-log p(x_{P..} | x_{..P})`.
    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        let choice = likelihood_choice(opts, "mdlm", Config::LIKELIHOODS)?;
        check_prompt_len(opts, self.len, "the MDLM NELBO", choice == "llada")?;
        let ids = to_ids(batch, self.len, self.vocab)?;
        let p = opts.prompt_len;
        let nats = if choice == "llada" {
            let answer: Vec<bool> = (0..self.len).map(|i| i >= p).collect();
            per_chunk(&ids, |c| {
                let draws = llada_conditional_nll(self, c, &answer, opts.lm_samples, rng)?;
                Ok(draws.into_iter().map(|(mean, _)| mean).collect())
            })?
        } else {
            per_chunk(&ids, |c| nelbo(self, c, opts.lm_samples, self.steps, rng))?
        };
        Ok(Nll {
            nats,
            dims: self.len - p,
            kind: NllKind::Bound,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        if matches!(
            likelihood_choice(opts, "mdlm", Config::LIKELIHOODS),
            Ok("llada")
        ) {
            let given = match opts.prompt_len {
                0 => String::new(),
                p => format!(" of the tokens after the first {p} given them"),
            };
            return format!(
                "LLaDA Monte-Carlo bound{given}: l ~ U{{1..A}} of the A scored tokens masked, \
                 (A / l)-weighted cross-entropy, {} draw(s) per example (standard error over \
                 examples includes the draws)",
                opts.lm_samples
            );
        }
        let time = if self.steps == 0 {
            "continuous time".to_string()
        } else {
            format!("{} discrete steps", self.steps)
        };
        format!(
            "MDLM NELBO (SUBS, log-linear schedule, {time}), {} antithetic time(s) per example \
             in (0, 1] (standard error over examples includes the time and mask sampling)",
            opts.lm_samples
        )
    }
}
