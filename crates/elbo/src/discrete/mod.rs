//! Models of discrete sequences x in {0..V-1}^L, all fit by maximum likelihood (seeds 000, 001,
//! 004): an autoregressive transformer (exact NLL), an any-order autoregressive transformer
//! (Jensen bound over orders) and a masked diffusion LM (MDLM ELBO, a 1/t-weighted
//! cross-entropy on masked tokens), with their samplers.
//!
//! Text windows and digit images are both `[B, L]` batches of levels stored as f32; every family
//! here reports the NLL of the discrete data in nats per example (bits/char for text).

use candle_core::{DType, Device, Tensor};

use crate::config::{EvalOptions, ModelConfig};
use crate::data::DataKind;
use crate::model::DataInfo;
use crate::nn::transformer::{Positions, TransformerConfig};
use crate::{Error, Result};

pub mod any_order;
pub mod autoregressive;
pub mod filter;
pub mod masked_diffusion;
pub mod sampler;

/// Vocabulary size of discrete data; an error for continuous data.
pub fn vocab_of(data: &DataInfo, family: &str) -> Result<usize> {
    match data.kind {
        DataKind::Discrete { levels } if levels >= 2 && data.dim >= 1 => Ok(levels),
        DataKind::Discrete { levels } => Err(Error::Config(format!(
            "{family} needs at least 2 levels and 1 position, got {levels} levels and {} positions",
            data.dim
        ))),
        DataKind::Continuous => Err(Error::Config(format!(
            "{family} models discrete data (text, digits); this data set is continuous"
        ))),
    }
}

/// The backbone of a language model from the run's model config.
pub fn backbone_config(
    cfg: &ModelConfig,
    vocab_in: usize,
    vocab_out: usize,
    max_len: usize,
    causal: bool,
) -> Result<TransformerConfig> {
    Ok(TransformerConfig {
        vocab_in,
        vocab_out,
        max_len,
        d_model: cfg.d_model,
        n_layers: cfg.n_layers,
        n_heads: cfg.n_heads,
        causal,
        positions: Positions::parse(&cfg.positions)?,
    })
}

/// A batch `[B, L]` of levels (f32 or integer) as u32 token ids, checking the shape and that
/// every value is an integer in `0..vocab`.
pub fn to_ids(batch: &Tensor, len: usize, vocab: usize) -> Result<Tensor> {
    match batch.dims() {
        [_, l] if *l == len => {}
        dims => {
            return Err(Error::Shape(format!(
                "expected token batches of shape [B, {len}], got {dims:?}"
            )))
        }
    }
    let v: Vec<f32> = batch.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if let Some(bad) = v
        .iter()
        .find(|&&x| !(x >= 0.0 && x < vocab as f32 && x.fract() == 0.0))
    {
        return Err(Error::Shape(format!(
            "token value {bad} is not an integer in 0..{vocab}"
        )));
    }
    Ok(batch.to_dtype(DType::U32)?)
}

/// Token ids `[n, L]` (u32) from rows of ids.
pub fn ids_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let n = rows.len();
    let l = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    if flat.len() != n * l {
        return Err(Error::Shape("ragged token rows".into()));
    }
    Ok(Tensor::from_vec(flat, (n, l), device)?)
}

/// Per-row `-log p[target]` of log-probabilities `logp: [B, L, V]` at `targets: [B, L]` (u32)
/// -> `[B, L]`.
pub fn gather_nll(logp: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, l) = targets.dims2()?;
    Ok(logp
        .gather(&targets.reshape((b, l, 1))?, 2)? // [B, L, 1]
        .reshape((b, l))?
        .neg()?)
}

/// The likelihood a language-model family reports: `opts.likelihood` is "auto" (the first of
/// `choices`) or one of `choices`; anything else is an error naming the options.
pub fn lm_likelihood_choice(
    opts: &EvalOptions,
    family: &str,
    choices: &[&'static str],
) -> Result<&'static str> {
    let want = opts.likelihood.trim().to_ascii_lowercase();
    if want == "auto" {
        if let Some(first) = choices.first() {
            return Ok(first);
        }
    }
    choices
        .iter()
        .find(|c| **c == want)
        .copied()
        .ok_or_else(|| {
            Error::Config(format!(
                "the {family} family reports no likelihood '{want}'; use auto or {}",
                choices.join(", ")
            ))
        })
}

/// Checks `opts.prompt_len` leaves at least one scored token of `len`; `supported` is false for
/// families or estimators that cannot condition.
pub fn check_prompt_len(opts: &EvalOptions, len: usize, what: &str, supported: bool) -> Result<()> {
    match opts.prompt_len {
        0 => Ok(()),
        _ if !supported => Err(Error::Config(format!(
            "{what} cannot score conditionally on a prompt (prompt_len {}); use 0, or an \
             autoregressive model, or MDLM with likelihood = \"llada\"",
            opts.prompt_len
        ))),
        p if p >= len => Err(Error::Config(format!(
            "prompt_len {p} leaves nothing to score in examples of {len} tokens"
        ))),
        _ => Ok(()),
    }
}

/// Rows per network call when scoring a held-out set (bounds the attention memory).
pub const EVAL_CHUNK: usize = 64;

/// Apply `f` to consecutive chunks of at most [`EVAL_CHUNK`] rows of `ids` and concatenate.
pub fn per_chunk(ids: &Tensor, mut f: impl FnMut(&Tensor) -> Result<Vec<f64>>) -> Result<Vec<f64>> {
    let n = ids.dim(0)?;
    let mut out = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = EVAL_CHUNK.min(n - start);
        out.extend(f(&ids.narrow(0, start, len)?)?);
        start += len;
    }
    Ok(out)
}
