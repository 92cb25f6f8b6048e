//! The any-order autoregressive family (sigma-GPT, Pannatier et al. 2024): the Jensen bound over
//! orders of [`crate::discrete::any_order`] as a [`GenerativeModel`].

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::discrete::any_order::{jensen_bound, order_nll, random_orders, OrderConditionals};
use crate::discrete::filter::{TokenFilter, TokenSampling};
use crate::discrete::{
    check_prompt_len, per_chunk, to_ids, vocab_of, TransformerSettings, EVAL_CHUNK,
};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::rotary::RotaryAt;
use crate::nn::transformer::{log_softmax_last_dim, Positions, Transformer};
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `ao-ar`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The transformer (`[model.transformer]`).
    pub transformer: TransformerSettings,
    /// How tokens are drawn (`[model.sampling]`).
    pub sampling: TokenSampling,
}

impl FamilyConfig for Config {
    const ABOUT: &'static str = "any-order autoregressive transformer (Jensen bound over orders)";
    const LIKELIHOODS: &'static [&'static str] = &["bound"];

    fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        self.sampling.filter().map(|_| ())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let vocab = data.levels().unwrap_or(1);
        let t = &self.transformer;
        // the source and target position tables beside the transformer
        let tables = estimate::prod(&[2 * data.dim + 1, t.d_model]);
        estimate::transformer(t, vocab + 1, vocab, data.dim, tables, batch)
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
        Ok(Box::new(AnyOrder::new(self, *data, device, rng)?))
    }
}

/// The sigma-GPT any-order LM.
pub struct AnyOrder {
    core: ModelCore,
    net: Transformer,
    sampling: TokenSampling,
    src_pos: Var,
    tgt_pos: Var,
    len: usize,
    vocab: usize,
    device: Device,
}

impl AnyOrder {
    /// A new model for sequences of `data.dim` tokens.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        let vocab = vocab_of(&data, "the any-order model")?;
        let len = data.dim;
        let core = ModelCore::new(data.dim, device);
        let d_model = cfg.transformer.d_model;
        let (net, src_pos, tgt_pos) = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let tc = cfg.transformer.backbone(vocab + 1, vocab, len, true);
            let net = Transformer::new(&mut p.push("net"), tc)?;
            let src = p
                .push("src_pos")
                .normal("weight", &[len + 1, d_model], 1.0)?;
            let tgt = p.push("tgt_pos").normal("weight", &[len, d_model], 1.0)?;
            (net, src, tgt)
        };
        Ok(Self {
            core,
            net,
            sampling: cfg.sampling.clone(),
            src_pos,
            tgt_pos,
            len,
            vocab,
            device: device.clone(),
        })
    }

    /// `src_pos[src] + tgt_pos[tgt]` for index tensors `[B, T]` -> `[B, T, D]`.
    fn order_embedding(&self, src: &Tensor, tgt: &Tensor) -> Result<Tensor> {
        let (b, t) = src.dims2()?;
        let s = self
            .src_pos
            .as_tensor()
            .index_select(&src.flatten_all()?, 0)?; // [B T, D]
        let g = self
            .tgt_pos
            .as_tensor()
            .index_select(&tgt.flatten_all()?, 0)?; // [B T, D]
        Ok((s + g)?.reshape((b, t, ()))?)
    }

    /// Rotary positions of each step: the query at the position it predicts (`tgt`), the key
    /// at its token's position (`src`; the start token, `src = L`, at 0). Empty with learned
    /// positions.
    fn rotary_rows(&self, tgt: &Tensor, src: &Tensor) -> Result<(Vec<u32>, Vec<u32>)> {
        if self.net.config().positions != Positions::Rotary {
            return Ok((Vec::new(), Vec::new()));
        }
        let q: Vec<u32> = tgt.flatten_all()?.to_vec1()?;
        let k: Vec<u32> = src.flatten_all()?.to_vec1()?;
        let bos = self.len as u32;
        Ok((
            q,
            k.into_iter()
                .map(|p| if p == bos { 0 } else { p })
                .collect(),
        ))
    }

    /// [`RotaryAt::Rows`] over the vectors of [`AnyOrder::rotary_rows`], `None` when empty.
    fn rotary_at<'a>(&self, q: &'a [u32], k: &'a [u32]) -> Option<RotaryAt<'a>> {
        (!q.is_empty()).then_some(RotaryAt::Rows { q, k })
    }

    /// Sample `n` sequences; positions given in `template` are read first (teacher forced, in
    /// position order), the rest are generated in a uniformly random order per sequence.
    pub fn generate(
        &self,
        n: usize,
        template: &[Option<u32>],
        filter: &TokenFilter,
        rng: &mut Rng,
    ) -> Result<Vec<Vec<u32>>> {
        filter.validate()?;
        if template.len() != self.len {
            return Err(Error::Config(format!(
                "template has {} positions, the model {}",
                template.len(),
                self.len
            )));
        }
        let known: Vec<usize> = (0..self.len).filter(|&i| template[i].is_some()).collect();
        let free: Vec<usize> = (0..self.len).filter(|&i| template[i].is_none()).collect();
        let mut rows: Vec<Vec<u32>> = (0..n)
            .map(|_| template.iter().map(|t| t.unwrap_or(0)).collect())
            .collect();
        if free.is_empty() || n == 0 {
            return Ok(rows);
        }
        let orders: Vec<Vec<usize>> = (0..n)
            .map(|_| {
                let perm = rng.permutation(free.len());
                known
                    .iter()
                    .copied()
                    .chain(perm.iter().map(|&j| free[j]))
                    .collect()
            })
            .collect();
        let bos = self.len as u32;
        let mut cache = self.net.new_cache();
        // first call: BOS and the known tokens, predicting up to the first free position
        let k = known.len();
        let mut ids = Vec::new();
        let (mut src, mut tgt) = (Vec::new(), Vec::new());
        for (r, o) in rows.iter().zip(&orders) {
            ids.push(self.vocab as u32);
            src.push(bos);
            for t in 0..=k {
                if t > 0 {
                    ids.push(r[o[t - 1]]);
                    src.push(o[t - 1] as u32);
                }
                tgt.push(o[t] as u32);
            }
        }
        let mut shape = (n, k + 1);
        for t in k..self.len {
            let ids_t = Tensor::from_vec(std::mem::take(&mut ids), shape, &self.device)?;
            let src_t = Tensor::from_vec(std::mem::take(&mut src), shape, &self.device)?;
            let tgt_t = Tensor::from_vec(std::mem::take(&mut tgt), shape, &self.device)?;
            let extra = self.order_embedding(&src_t, &tgt_t)?;
            let (q, k) = self.rotary_rows(&tgt_t, &src_t)?;
            let at = self.rotary_at(&q, &k);
            let logits = self
                .net
                .forward_cached_at(&ids_t, Some(&extra), at, &mut cache)?;
            let last: Vec<Vec<f32>> = logits.narrow(1, shape.1 - 1, 1)?.squeeze(1)?.to_vec2()?;
            for ((r, o), row_logits) in rows.iter_mut().zip(&orders).zip(&last) {
                let tok = filter.sample(row_logits, rng);
                r[o[t]] = tok;
                if t + 1 < self.len {
                    ids.push(tok);
                    src.push(o[t] as u32);
                    tgt.push(o[t + 1] as u32);
                }
            }
            shape = (n, 1);
        }
        Ok(rows)
    }

    fn rows_to_tensor(&self, rows: &[Vec<u32>]) -> Result<Tensor> {
        crate::discrete::samples_tensor(rows, &self.device)
    }
}

impl OrderConditionals for AnyOrder {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn order_log_probs(&self, ids: &Tensor, orders: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let permuted = ids.gather(orders, 1)?; // [B, L]
        let bos = Tensor::full(self.vocab as u32, (b, 1), &self.device)?;
        let input = Tensor::cat(&[&bos, &permuted.narrow(1, 0, l - 1)?], 1)?; // [B, L]
        let none = Tensor::full(self.len as u32, (b, 1), &self.device)?;
        let src = Tensor::cat(&[&none, &orders.narrow(1, 0, l - 1)?], 1)?; // [B, L]
        let extra = self.order_embedding(&src, orders)?; // [B, L, D]
        let (q, k) = self.rotary_rows(orders, &src)?;
        let at = self.rotary_at(&q, &k);
        log_softmax_last_dim(&self.net.forward_at(&input, Some(&extra), at)?)
    }
}

impl GenerativeModel for AnyOrder {
    fn family(&self) -> &'static str {
        "ao-ar"
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
            "one uniformly random order per sample, temperature {}, top-k {}, top-p {}",
            f.temperature, f.top_k, f.top_p
        )
    }

    /// -log p(x | sigma) / L for one uniform order per example: an unbiased estimate of the
    /// Jensen bound per token.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let ids = to_ids(batch, self.len, self.vocab)?;
        let orders = random_orders(ids.dim(0)?, self.len, rng, &self.device)?;
        Ok((order_nll(self, &ids, &orders)?.mean_all()? / self.len as f64)?)
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let template = vec![None; self.len];
        self.sample_conditional(n, &template, opts, rng)
    }

    fn sample_conditional(
        &self,
        n: usize,
        template: &[Option<u32>],
        _opts: &SampleOptions,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let mut t = template.to_vec();
        t.resize(self.len, None);
        let rows = self.generate(n, &t, &self.sampling.filter()?, rng)?;
        self.rows_to_tensor(&rows)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "ao-ar", Config::LIKELIHOODS)?;
        check_prompt_len(opts, self.len, "the ao-ar Jensen bound", false)?;
        let ids = to_ids(batch, self.len, self.vocab)?;
        Ok(Nll {
            nats: per_chunk(&ids, |c| jensen_bound(self, c, opts.lm_samples, rng))?,
            dims: self.len,
            kind: NllKind::Bound,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        format!(
            "Jensen bound E_sigma[-log p(x|sigma)] over uniform orders, {} random order(s) per \
             example (standard error over examples includes the order sampling)",
            opts.lm_samples
        )
    }
}
