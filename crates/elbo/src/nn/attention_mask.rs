//! Which keys each query of an attention layer sees, as a type: bidirectional, causal,
//! block-causal, and block diffusion's two-copy mask (Arriola et al. 2025, "Block Diffusion",
//! sec. 3.2 and their Fig. 2 / `block_diff_mask`).
//!
//! Every mask is a function of the query index `i < Lq` and the key index `j < Lk`; for each
//! query the visible keys are at most two contiguous ranges ([`AttentionMask::visible`]), which
//! is what lets the flash-attention kernel skip whole key tiles. Causal and block-causal masks
//! are aligned bottom-right: query `i` sits at position `p = i + Lk - Lq`, the convention when
//! the first `Lk - Lq` keys are cached.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::{Error, Result};

/// An attention mask.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionMask {
    /// Every query sees every key (masked diffusion).
    #[default]
    Full,
    /// Query at position `p` sees keys `j <= p` (autoregressive).
    Causal,
    /// Query at position `p` sees every key of its own block of `block` positions and of the
    /// blocks before: `j < (p / block + 1) block`.
    BlockCausal {
        /// Block length `L'`.
        block: usize,
    },
    /// Block diffusion's vectorised training mask over `[x_t ; x_0]` of length `2 len`
    /// (Arriola et al. 2025, sec. 3.2): a query of `x_t` block `b` sees `x_t` block `b`
    /// (bidirectionally) and the clean blocks `< b` of `x_0`; a query of `x_0` block `b` sees
    /// the clean blocks `<= b` (block-causal). `x_0` never sees `x_t`.
    BlockDiffusion {
        /// Block length `L'`.
        block: usize,
        /// Sequence length `L` (each copy); the mask is `[2L, 2L]`.
        len: usize,
    },
}

impl From<bool> for AttentionMask {
    /// `true`: [`AttentionMask::Causal`], `false`: [`AttentionMask::Full`].
    fn from(causal: bool) -> Self {
        if causal {
            Self::Causal
        } else {
            Self::Full
        }
    }
}

impl AttentionMask {
    /// A short name for messages.
    pub fn name(&self) -> String {
        match self {
            Self::Full => "full".into(),
            Self::Causal => "causal".into(),
            Self::BlockCausal { block } => format!("block-causal (block {block})"),
            Self::BlockDiffusion { block, len } => {
                format!("block-diffusion (block {block}, length {len})")
            }
        }
    }

    /// Checks the mask fits `Lq` queries and `Lk` keys.
    pub fn check(&self, lq: usize, lk: usize) -> std::result::Result<(), String> {
        match *self {
            Self::Full => Ok(()),
            Self::Causal | Self::BlockCausal { .. } if lq > lk => Err(format!(
                "{} attention: more queries ({lq}) than keys ({lk})",
                self.name()
            )),
            Self::BlockCausal { block: 0 } | Self::BlockDiffusion { block: 0, .. } => {
                Err(format!("{} attention: block must be >= 1", self.name()))
            }
            Self::BlockDiffusion { len, .. } if lq != 2 * len || lk != 2 * len => Err(format!(
                "{} attention needs {} queries and keys, got {lq} and {lk}",
                self.name(),
                2 * len
            )),
            _ => Ok(()),
        }
    }

    /// The keys query `i` sees, as two sorted, disjoint ranges (the second often empty).
    pub fn visible(&self, i: usize, lq: usize, lk: usize) -> [Range<usize>; 2] {
        let p = i + lk.saturating_sub(lq);
        match *self {
            Self::Full => [0..lk, 0..0],
            Self::Causal => [0..(p + 1).min(lk), 0..0],
            Self::BlockCausal { block } => [0..((p / block.max(1) + 1) * block).min(lk), 0..0],
            Self::BlockDiffusion { block, len } => {
                let block = block.max(1);
                if i < len {
                    // x_t block b: clean blocks < b of x_0, then its own noisy block
                    let b = i / block;
                    let own = b * block..((b + 1) * block).min(len);
                    [own, len..len + b * block]
                } else {
                    let b = (i - len) / block;
                    [len..(len + (b + 1) * block).min(2 * len), 0..0]
                }
            }
        }
    }

    /// Whether query `i` sees key `j`.
    pub fn allows(&self, i: usize, j: usize, lq: usize, lk: usize) -> bool {
        self.visible(i, lq, lk).iter().any(|r| r.contains(&j))
    }

    /// The `[Lq, Lk]` additive mask (0 where visible, -inf elsewhere), `None` for
    /// [`AttentionMask::Full`].
    pub fn additive(&self, lq: usize, lk: usize, device: &Device) -> Result<Option<Tensor>> {
        self.check(lq, lk).map_err(Error::Shape)?;
        if *self == Self::Full {
            return Ok(None);
        }
        let v: Vec<f32> = (0..lq * lk)
            .map(|ij| {
                if self.allows(ij / lk, ij % lk, lq, lk) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        Ok(Some(Tensor::from_vec(v, (lq, lk), device)?))
    }
}
