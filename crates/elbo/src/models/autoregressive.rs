//! Autoregressive language model: p(x) = prod_i p(x_i | x_<i) (the chain rule; Bengio et al.
//! 2003, Radford et al. 2019), a causal transformer over `[BOS, x_0, ..., x_{L-2}]` predicting `x_0, ..., x_{L-1}`.
//!
//! Training minimises the exact NLL (mean next-token cross-entropy); `log_likelihood` is the
//! exact NLL summed over the L positions. Sampling decodes with a KV cache, one token per
//! network call, with temperature, top-k and top-p filtering; a prompt is a prefix.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::discrete::filter::{TokenFilter, TokenSampling};
use crate::discrete::{
    check_prompt_len, gather_nll, per_chunk, to_ids, vocab_of, TransformerSettings, EVAL_CHUNK,
};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::transformer::{log_softmax_last_dim, Transformer};
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `ar`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The transformer (`[model.transformer]`).
    pub transformer: TransformerSettings,
    /// How tokens are drawn (`[model.sampling]`).
    pub sampling: TokenSampling,
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "autoregressive transformer LM (exact likelihood by the chain rule)";
    const LIKELIHOODS: &'static [&'static str] = &["exact"];

    fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        self.sampling.filter().map(|_| ())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let vocab = data.levels().unwrap_or(1);
        let t = &self.transformer;
        estimate::transformer(t, vocab + 1, vocab, data.dim, 0, batch)
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        // held-out sequences are scored EVAL_CHUNK at a time
        self.memory_estimate(data, eval.batch_size.min(EVAL_CHUNK))
            .activations
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Autoregressive::new(self, *data, device, rng)?))
    }
}

/// A causal transformer LM with a beginning-of-sequence token `BOS = V`.
pub struct Autoregressive {
    core: ModelCore,
    net: Transformer,
    sampling: TokenSampling,
    len: usize,
    vocab: usize,
    device: Device,
}

impl Autoregressive {
    /// A new model for sequences of `data.dim` tokens of `levels` values.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        let vocab = vocab_of(&data, "the autoregressive model")?;
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let tc = cfg.transformer.backbone(vocab + 1, vocab, data.dim, true);
            Transformer::new(&mut p.push("net"), tc)?
        };
        Ok(Self {
            core,
            net,
            sampling: cfg.sampling.clone(),
            len: data.dim,
            vocab,
            device: device.clone(),
        })
    }

    /// The backbone.
    pub fn net(&self) -> &Transformer {
        &self.net
    }

    /// Per-token NLL `[B, L]` (nats) of token ids `ids: [B, L]` (u32).
    pub fn token_nll(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let bos = Tensor::full(self.vocab as u32, (b, 1), &self.device)?;
        let input = Tensor::cat(&[&bos, &ids.narrow(1, 0, l - 1)?], 1)?; // [B, L]
        let logp = log_softmax_last_dim(&self.net.forward(&input)?)?; // [B, L, V]
        gather_nll(&logp, ids)
    }

    /// `n` sequences continuing `prefix` (token ids, at most L), decoded with a KV cache.
    pub fn generate(
        &self,
        n: usize,
        prefix: &[u32],
        filter: &TokenFilter,
        rng: &mut Rng,
    ) -> Result<Vec<Vec<u32>>> {
        filter.validate()?;
        if prefix.len() > self.len {
            return Err(Error::Config(format!(
                "prompt of {} tokens is longer than the model's {} positions",
                prefix.len(),
                self.len
            )));
        }
        if let Some(&bad) = prefix.iter().find(|&&t| t as usize >= self.vocab) {
            return Err(Error::Config(format!(
                "prompt token {bad} >= vocab {}",
                self.vocab
            )));
        }
        let mut rows: Vec<Vec<u32>> = vec![prefix.to_vec(); n];
        if prefix.len() == self.len || n == 0 {
            return Ok(rows);
        }
        let mut cache = self.net.new_cache();
        let mut first: Vec<u32> = Vec::with_capacity(n * (prefix.len() + 1));
        for _ in 0..n {
            first.push(self.vocab as u32);
            first.extend_from_slice(prefix);
        }
        let mut input = Tensor::from_vec(first, (n, prefix.len() + 1), &self.device)?;
        for pos in prefix.len()..self.len {
            let logits = self.net.forward_cached(&input, None, &mut cache)?; // [n, T, V]
            let t = logits.dim(1)?;
            let last: Vec<Vec<f32>> = logits.narrow(1, t - 1, 1)?.squeeze(1)?.to_vec2()?;
            let next: Vec<u32> = last.iter().map(|row| filter.sample(row, rng)).collect();
            for (r, &tok) in rows.iter_mut().zip(&next) {
                r.push(tok);
            }
            if pos + 1 < self.len {
                input = Tensor::from_vec(next, (n, 1), &self.device)?;
            }
        }
        Ok(rows)
    }

    fn rows_to_tensor(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        crate::discrete::samples_tensor(rows, &self.device)
    }
}

impl GenerativeModel for Autoregressive {
    fn family(&self) -> &'static str {
        "ar"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        let f = &self.sampling;
        format!(
            "ancestral with the KV cache, temperature {}, top-k {}, top-p {}",
            f.temperature, f.top_k, f.top_p
        )
    }

    /// Mean next-token cross-entropy (nats per token): the exact NLL divided by L.
    fn loss(&self, batch: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        let ids = to_ids(batch, self.len, self.vocab)?;
        Ok(self.token_nll(&ids)?.mean_all()?)
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let rows = self.generate(n, &[], &self.sampling.filter()?, rng)?;
        self.rows_to_tensor(&rows)
    }

    fn sample_conditional(
        &self,
        n: usize,
        template: &[Option<u32>],
        _opts: &SampleOptions,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let p = template.iter().take_while(|t| t.is_some()).count();
        if template[p..].iter().any(Option::is_some) || template.len() > self.len {
            return Err(Error::Config(
                "the autoregressive model continues a prefix; use ao-ar or mdlm to fill in blanks"
                    .into(),
            ));
        }
        let prefix: Vec<u32> = template.iter().map_while(|t| *t).collect();
        let rows = self.generate(n, &prefix, &self.sampling.filter()?, rng)?;
        self.rows_to_tensor(&rows)
    }

    /// Exact `-log p(x)`, or `-log p(x_{P..} | x_{..P})` with `opts.prompt_len = P`.
    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, _rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "ar", Config::LIKELIHOODS)?;
        check_prompt_len(opts, self.len, "the ar family", true)?;
        let ids = to_ids(batch, self.len, self.vocab)?;
        let p = opts.prompt_len;
        let nats = per_chunk(&ids, |c| {
            let scored = self.token_nll(c)?.narrow(1, p, self.len - p)?; // [B, L - P]
            let v: Vec<f32> = scored.sum(1)?.to_vec1()?;
            Ok(v.into_iter().map(f64::from).collect())
        })?;
        Ok(Nll {
            nats,
            dims: self.len - p,
            kind: NllKind::Exact,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let given = match opts.prompt_len {
            0 => String::new(),
            p => format!(", of the tokens after the first {p} given them"),
        };
        format!("exact NLL by the chain rule (causal transformer, teacher forcing){given}")
    }
}
