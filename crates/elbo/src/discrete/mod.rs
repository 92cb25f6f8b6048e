//! The shared mathematics of models of discrete sequences x in {0..V-1}^L: token ids, orders
//! and the any-order Jensen bound (Uria et al. 2014), masking and the masked-diffusion ELBO
//! (Sahoo et al. 2024; Shi et al. 2024), token filters and the masked-diffusion samplers. The
//! families built on them (autoregressive, any-order, MDLM) live in [`crate::models`].
//!
//! Text windows and digit images are both `[B, L]` batches of levels stored as f32; every family
//! here reports the NLL of the discrete data in nats per example (bits/char for text).

use candle_core::{DType, Device, Tensor};

use serde::{Deserialize, Serialize};

use crate::config::EvalOptions;
use crate::data::DataKind;
use crate::model::DataInfo;
use crate::nn::transformer::{AttentionMask, Positions, TransformerConfig};
use crate::{Error, Result};

pub mod any_order;
pub mod block_diffusion;
pub mod d3pm;
pub mod filter;
pub mod graph;
pub mod masked_diffusion;
pub mod ratio_sampler;
pub mod sampler;
pub mod score_entropy;

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

/// The `[model.transformer]` table of the language-model families.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TransformerSettings {
    /// Width.
    pub d_model: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// "rope" (rotary angles on queries and keys, Su et al. 2021) or "learned" (a learned table
    /// added to the input, as GPT-2).
    pub positions: Positions,
}

impl Default for TransformerSettings {
    fn default() -> Self {
        Self {
            d_model: 128,
            n_heads: 4,
            n_layers: 4,
            positions: Positions::Rotary,
        }
    }
}

impl TransformerSettings {
    /// Check the sizes fit together.
    pub fn validate(&self) -> Result<()> {
        if self.d_model == 0
            || self.n_heads == 0
            || !self.d_model.is_multiple_of(self.n_heads)
            || self.n_layers == 0
        {
            return Err(Error::Config(format!(
                "model.transformer.d_model ({}) must be a positive multiple of n_heads ({}) and \
                 n_layers >= 1",
                self.d_model, self.n_heads
            )));
        }
        Ok(())
    }

    /// The backbone for these vocabularies and length.
    pub fn backbone(
        &self,
        vocab_in: usize,
        vocab_out: usize,
        max_len: usize,
        mask: impl Into<AttentionMask>,
    ) -> TransformerConfig {
        TransformerConfig {
            vocab_in,
            vocab_out,
            max_len,
            d_model: self.d_model,
            n_layers: self.n_layers,
            n_heads: self.n_heads,
            mask: mask.into(),
            positions: self.positions,
        }
    }
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

/// Samples `[n, L]` as `f32` token values (the layout of the data batches) from rows of ids.
pub fn samples_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    Ok(ids_tensor(rows, device)?.to_dtype(DType::F32)?)
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
