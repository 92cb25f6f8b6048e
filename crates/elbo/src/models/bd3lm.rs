//! Block diffusion, BD3-LM (Arriola et al. 2025), as a [`GenerativeModel`]: the per-block NELBO
//! of [`crate::discrete::block_diffusion`] trained in one pass over `[x_t ; x_0]` under the
//! two-copy attention mask (sec. 3.2), and block-by-block sampling with a KV cache (Alg. 2).

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::discrete::block_diffusion::{
    nelbo, nelbo_terms, sample_block_times, sample_blocks, BlockDecoder, BlockDenoiser,
};
use crate::discrete::filter::TokenFilter;
use crate::discrete::sampler::MaskedSampleConfig;
use crate::discrete::{
    check_prompt_len, per_chunk, to_ids, vocab_of, TransformerSettings, EVAL_CHUNK,
};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::mdlm::MaskedSampling;
use crate::models::FamilyConfig;
use crate::nn::transformer::{log_softmax_last_dim, AttentionMask, KvCache, Transformer};
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `bd3lm`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The transformer (`[model.transformer]`).
    pub transformer: TransformerSettings,
    /// Block length `L'`; must divide the sequence length (1: autoregressive, L: MDLM).
    pub block_size: usize,
    /// Training times `t ~ U[clip_low, clip_high]`, the clipped schedule of Arriola et al.
    /// 2025, sec. 5 ([0, 1]: the plain NELBO). Reported likelihoods always use all of (0, 1].
    pub clip_low: f64,
    /// Upper end of the training times.
    pub clip_high: f64,
    /// Antithetic (stratified) sampling of the training times over the batch's blocks.
    pub antithetic: bool,
    /// The sampler of each block (`[model.sampling]`; `block_len` is ignored).
    pub sampling: MaskedSampling,
    /// Tokens `elbo sample` generates (0: the training length). Past the training length the
    /// KV cache slides: when the next block would not fit, the cache is rebuilt, block by
    /// block, from the last `L - L'` tokens at positions `0..L - L'`, so every block sees at
    /// most `L - L'` tokens of context (Arriola et al. 2025, sec. 6.2, arbitrary-length
    /// generation).
    pub sample_length: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            transformer: TransformerSettings::default(),
            block_size: 4,
            clip_low: 0.0,
            clip_high: 1.0,
            antithetic: true,
            sampling: MaskedSampling::default(),
            sample_length: 0,
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "block diffusion LM (BD3-LM: autoregressive over blocks, MDLM within; KV-cache sampling)";
    const LIKELIHOODS: &'static [&'static str] = &["nelbo"];

    fn validate(&self) -> Result<()> {
        self.transformer.validate()?;
        if self.block_size == 0 {
            return Err(Error::Config(
                "model.block_size must be >= 1 (1: autoregressive; the sequence length: MDLM)"
                    .into(),
            ));
        }
        if !(0.0 <= self.clip_low && self.clip_low < self.clip_high && self.clip_high <= 1.0) {
            return Err(Error::Config(format!(
                "model.clip_low ({}) and model.clip_high ({}) must satisfy 0 <= low < high <= 1",
                self.clip_low, self.clip_high
            )));
        }
        let s = &self.sampling;
        TokenFilter::new(s.temperature, s.top_k, s.top_p).map(|_| ())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let vocab = data.levels().unwrap_or(1);
        let t = &self.transformer;
        // parameters for L positions; activations of one pass over the copies [x_t ; x_0]
        let params = estimate::transformer(t, vocab + 1, vocab, data.dim, 0, batch).params;
        MemoryEstimate {
            params,
            ..estimate::transformer(t, vocab + 1, vocab, 2 * data.dim, 0, batch)
        }
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        let rows = eval.batch_size.min(EVAL_CHUNK);
        let net = self.memory_estimate(data, rows).activations;
        net.saturating_add(estimate::prod(&[rows, eval.lm_samples, data.dim, 8]))
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Bd3lm::new(self, *data, device, rng)?))
    }
}

/// BD3-LM: one transformer over V + 1 input ids (MASK = V) and V outputs, run on `[x_t ; x_0]`
/// (length 2L, positions `0..L` twice) under [`AttentionMask::BlockDiffusion`].
pub struct Bd3lm {
    core: ModelCore,
    net: Transformer,
    cfg: Config,
    len: usize,
    vocab: usize,
    device: Device,
}

impl Bd3lm {
    /// A new model for sequences of `data.dim` tokens in blocks of `cfg.block_size`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let vocab = vocab_of(&data, "BD3-LM")?;
        if !data.dim.is_multiple_of(cfg.block_size) {
            return Err(Error::Config(format!(
                "model.block_size ({}) must divide the sequence length ({}); pick a divisor",
                cfg.block_size, data.dim
            )));
        }
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let mask = AttentionMask::BlockDiffusion {
                block: cfg.block_size,
                len: data.dim,
            };
            let tc = cfg.transformer.backbone(vocab + 1, vocab, data.dim, mask);
            Transformer::new(&mut p.push("net"), tc)?
        };
        Ok(Self {
            core,
            net,
            cfg: cfg.clone(),
            len: data.dim,
            vocab,
            device: device.clone(),
        })
    }

    /// The logits `[B, 2L, V]` of the two-copy pass over `[x_t ; x_0]` (rows `0..L`: the noisy
    /// copy, rows `L..2L`: the clean one).
    pub fn two_copy_logits(&self, xt: &Tensor, x0: &Tensor) -> Result<Tensor> {
        let l = self.len;
        let ids = Tensor::cat(&[xt, x0], 1)?.to_device(&self.device)?; // [B, 2L]
        let pos: Vec<u32> = (0..2 * l).map(|i| (i % l) as u32).collect();
        let mask = AttentionMask::BlockDiffusion {
            block: self.cfg.block_size,
            len: l,
        };
        self.net.forward_masked(&ids, &pos, mask)
    }

    /// The backbone (for the cache-equivalence tests).
    pub fn net(&self) -> &Transformer {
        &self.net
    }

    /// The inner sampler with `steps` denoising steps per block.
    fn sampler_config(&self, steps: usize) -> Result<MaskedSampleConfig> {
        let s = &self.cfg.sampling;
        Ok(MaskedSampleConfig {
            sampler: s.sampler,
            steps: steps.max(1),
            block_len: 0,
            filter: TokenFilter::new(s.temperature, s.top_k, s.top_p)?,
        })
    }

    /// Steps per block for `opts.steps` in all (the same network calls per token as MDLM with
    /// `opts.steps` over the whole sequence).
    fn steps_per_block(&self, opts: &SampleOptions) -> usize {
        let blocks = self.len / self.cfg.block_size;
        opts.steps.div_ceil(blocks).max(1)
    }

    /// Block-by-block generation of `n` rows of `max(template.len(), L)` tokens, or of its
    /// first `max_blocks` blocks, the given tokens of `template` kept; past the trained length
    /// `L` the KV cache slides (see [`Config::sample_length`]). Returns the rows and the
    /// network calls spent denoising.
    pub fn generate(
        &self,
        n: usize,
        template: &[Option<u32>],
        max_blocks: usize,
        steps_per_block: usize,
        rng: &mut Rng,
    ) -> Result<(Vec<Vec<u32>>, usize)> {
        let mut t = template.to_vec();
        t.resize(template.len().max(self.len), None);
        let init: Vec<Vec<u32>> = (0..n)
            .map(|_| t.iter().map(|x| x.unwrap_or(self.vocab as u32)).collect())
            .collect();
        let mut dec = CachedDecoder {
            net: &self.net,
            cache: RefCell::new(self.net.new_cache()),
            vocab: self.vocab,
            device: &self.device,
            history: vec![Vec::new(); n],
            window: self.len,
            block: self.cfg.block_size,
        };
        let cfg = self.sampler_config(steps_per_block)?;
        let block = self.cfg.block_size;
        let (rows, stats) = sample_blocks(&mut dec, init, block, Some(max_blocks), &cfg, rng)?;
        Ok((rows, stats.nfe))
    }
}

impl BlockDenoiser for Bd3lm {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn block(&self) -> usize {
        self.cfg.block_size
    }

    fn log_probs(&self, xt: &Tensor, x0: &Tensor) -> Result<Tensor> {
        let logits = self.two_copy_logits(xt, x0)?.narrow(1, 0, self.len)?; // [B, L, V]
        log_softmax_last_dim(&logits)
    }
}

/// The network with a KV cache over the finished blocks (Arriola et al. 2025, Alg. 2), sliding
/// once the cache and the next block would exceed `window` positions.
struct CachedDecoder<'a> {
    net: &'a Transformer,
    /// Written by every call (a noisy block's keys go past the committed positions), hence a
    /// cell: [`BlockDecoder::block_log_probs`] takes `&self`.
    cache: RefCell<KvCache>,
    vocab: usize,
    device: &'a Device,
    /// Every row's committed tokens.
    history: Vec<Vec<u32>>,
    /// The trained length: the most positions the network has.
    window: usize,
    block: usize,
}

impl CachedDecoder<'_> {
    /// Rebuilds the cache from the last `window - block` committed tokens, one block at a
    /// time as in training (a clean block sees the clean blocks up to itself), at positions
    /// `0..window - block`.
    fn slide(&mut self) -> Result<()> {
        let keep = self.window - self.block;
        let cache = self.cache.get_mut();
        *cache = self.net.new_cache();
        let total = self.history.first().map_or(0, Vec::len);
        let start = total - keep;
        for b in (0..keep).step_by(self.block) {
            let end = (b + self.block).min(keep);
            let rows: Vec<Vec<u32>> = self
                .history
                .iter()
                .map(|h| h[start + b..start + end].to_vec())
                .collect();
            let ids = crate::discrete::ids_tensor(&rows, self.device)?; // [n, block]
            self.net.commit_block(&ids, cache)?;
        }
        Ok(())
    }
}

impl BlockDecoder for CachedDecoder<'_> {
    fn vocab(&self) -> usize {
        self.vocab
    }

    fn block_log_probs(&self, xt: &Tensor) -> Result<Tensor> {
        let logits = self
            .net
            .forward_block_cached(&xt.to_device(self.device)?, &mut self.cache.borrow_mut())?; // [n, T, V]
        log_softmax_last_dim(&logits)
    }

    fn commit(&mut self, x0: &Tensor) -> Result<()> {
        let rows = x0.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        for (h, r) in self.history.iter_mut().zip(rows) {
            h.extend(r);
        }
        let cache = self.cache.get_mut();
        if cache.len() + x0.dim(1)? <= self.window {
            self.net.commit_block(&x0.to_device(self.device)?, cache)?;
        }
        if cache.len() + self.block > self.window {
            self.slide()?;
        }
        Ok(())
    }
}

impl GenerativeModel for Bd3lm {
    fn family(&self) -> &'static str {
        "bd3lm"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, opts: &SampleOptions) -> String {
        let s = &self.cfg.sampling;
        format!(
            "blocks of {}, sampler {} with {} steps per block, KV cache, temperature {}",
            self.cfg.block_size,
            s.sampler.name(),
            self.steps_per_block(opts),
            s.temperature
        )
    }

    /// The per-block NELBO per token with the block times drawn from the clipped interval
    /// `[clip_low, clip_high]` (kept >= 1e-3: the 1/t weight is unbounded near 0).
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let ids = to_ids(batch, self.len, self.vocab)?;
        let blocks = self.len / self.cfg.block_size;
        let clip = (self.cfg.clip_low.max(1e-3), self.cfg.clip_high);
        let t = sample_block_times(ids.dim(0)?, blocks, self.cfg.antithetic, clip, rng);
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
        let len = template.len().max(self.len).max(self.cfg.sample_length);
        let mut t = template.to_vec();
        t.resize(len, None);
        let blocks = len.div_ceil(self.cfg.block_size);
        let (rows, _) = self.generate(n, &t, blocks, self.steps_per_block(opts), rng)?;
        debug_assert!(rows.len() == n && rows.iter().all(|r| r.len() == len));
        crate::discrete::samples_tensor(&rows, &self.device)
    }

    /// The per-block NELBO on the full interval `t in (0, 1]` (a bound on -log p(x)).
    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "bd3lm", Config::LIKELIHOODS)?;
        check_prompt_len(opts, self.len, "the BD3-LM NELBO", false)?;
        let ids = to_ids(batch, self.len, self.vocab)?;
        let nats = per_chunk(&ids, |c| nelbo(self, c, opts.lm_samples, rng))?;
        Ok(Nll {
            nats,
            dims: self.len,
            kind: NllKind::Bound,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        format!(
            "BD3-LM NELBO (blocks of {}, SUBS, linear schedule, continuous time, full interval \
             t in (0, 1]), {} stratified time(s) per block and example (standard error over \
             examples includes the time and mask sampling)",
            self.cfg.block_size, opts.lm_samples
        )
    }
}
