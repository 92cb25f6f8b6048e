//! A pre-LN transformer over token sequences (Vaswani et al. 2017, "Attention Is All You Need";
//! layer norm before each sub-layer as in Xiong et al. 2020, "On Layer Normalization in the
//! Transformer Architecture").
//!
//! The architecture is exactly the `CharTransformer` of the PyTorch reference workloads: token
//! embedding plus learned absolute positions ([`Positions::Learned`]; or rotary angles on the
//! queries and keys, [`Positions::Rotary`], see [`super::rotary`]), `n_layers` blocks of
//! `x + proj(attn(LN(x)))` and `x + fc2(GELU(fc1(LN(x))))` with a 4x MLP and exact (erf) GELU,
//! a final layer norm and an untied linear head. Which keys each query sees is an
//! [`AttentionMask`]: causal (autoregressive models), full (masked diffusion), block-causal, or
//! block diffusion's two-copy mask over `[x_t ; x_0]` (Arriola et al. 2025, sec. 3.2), where
//! both copies take the positions `0..L` ([`Transformer::forward_masked`]). Initialisation follows PyTorch's defaults: linear layers
//! U(-1/sqrt(in), 1/sqrt(in)), embeddings N(0, 1), layer norms weight 1 and bias 0.
//!
//! candle's fused `softmax_last_dim` and `layer_norm` record no gradient. This module's free
//! functions ([`layer_norm`], [`softmax_last_dim`], [`log_softmax_last_dim`],
//! [`cross_entropy_weighted`], [`attention`], [`attention_qkv`]) run elbo's own fused CPU `f32`
//! custom ops, each with its backward pass ([`crate::nn::fused`]), and fall back elsewhere to
//! the differentiable compositions (the `*_composed` functions, also the tests' references).

use candle_core::{DType, Tensor, Var};

pub use super::attention_mask::AttentionMask;
use super::fused::reference::{attention_check, ce_check};
pub use super::fused::reference::{
    attention_composed, cross_entropy_weighted_composed, layer_norm_composed,
    log_softmax_last_dim_composed, softmax_last_dim_composed,
};
use super::fused::{self, FusedAct};
use super::rotary::{Rotary, RotaryAt};
use super::ParamInit;
use crate::{Error, Result};

mod decoding;
pub use decoding::KvCache;

/// Shapes of a [`Transformer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransformerConfig {
    /// Number of input token ids (including e.g. a mask token).
    pub vocab_in: usize,
    /// Number of output classes of the head.
    pub vocab_out: usize,
    /// Longest sequence (number of learned positions).
    pub max_len: usize,
    /// Model width.
    pub d_model: usize,
    /// Number of blocks.
    pub n_layers: usize,
    /// Attention heads; must divide `d_model`.
    pub n_heads: usize,
    /// Which keys each query sees (causal: position i attends to j <= i; full: all).
    pub mask: AttentionMask,
    /// How positions enter: a learned table added to the input, or rotary angles.
    pub positions: Positions,
}

/// How a [`Transformer`] sees token positions (no default: every caller says which; the
/// language-model families default to rotary, the benchmark workloads use learned).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Positions {
    /// A learned `[max_len, D]` table added to the token embeddings (GPT-2; the benchmark
    /// workloads).
    #[serde(rename = "learned")]
    Learned,
    /// Rotary angles on each head's queries and keys (Su et al. 2021); no position parameters.
    #[serde(rename = "rope", alias = "rotary")]
    Rotary,
}

impl Positions {
    /// `"learned"` or `"rope"` (also `"rotary"`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "learned" => Ok(Self::Learned),
            "rope" | "rotary" => Ok(Self::Rotary),
            other => Err(Error::Config(format!(
                "unknown positions '{other}' (expected learned or rope)"
            ))),
        }
    }
}

impl TransformerConfig {
    /// Check the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("transformer: {m}")));
        if self.vocab_in == 0 || self.vocab_out == 0 || self.max_len == 0 {
            return bad("vocab_in, vocab_out and max_len must be at least 1".into());
        }
        if self.d_model == 0 || self.n_heads == 0 || !self.d_model.is_multiple_of(self.n_heads) {
            return bad(format!(
                "d_model ({}) must be a positive multiple of n_heads ({})",
                self.d_model, self.n_heads
            ));
        }
        if self.positions == Positions::Rotary && !(self.d_model / self.n_heads).is_multiple_of(2) {
            return bad(format!(
                "rotary positions need an even head width, got d_model {} / {} heads",
                self.d_model, self.n_heads
            ));
        }
        Ok(())
    }

    /// The number of parameters, from the formula: embeddings `(V_in + L) d` (`V_in d` with
    /// rotary positions), per block two layer norms `4d`, qkv `3d^2 + 3d`, proj `d^2 + d`, MLP
    /// `8d^2 + 5d`; final norm `2d`; head `d V_out + V_out`.
    pub fn num_params(&self) -> usize {
        let d = self.d_model;
        let block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d);
        let table = match self.positions {
            Positions::Learned => self.max_len,
            Positions::Rotary => 0,
        };
        (self.vocab_in + table) * d
            + self.n_layers * block
            + 2 * d
            + d * self.vocab_out
            + self.vocab_out
    }
}

/// Layer normalisation (Ba et al. 2016) over the last dimension:
/// `(x - mean) / sqrt(var + eps) * weight + bias` with the biased variance, as
/// `torch.nn.LayerNorm`. `x: [..., D]`, `weight`, `bias: [D]`. On CPU `f32` one fused op with its
/// own backward pass ([`fused::layer_norm`]); elsewhere [`layer_norm_composed`].
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied();
    if fused::cpu_f32(&[x, weight, bias])
        && d.is_some_and(|d| weight.dims() == [d] && bias.dims() == [d])
    {
        return fused::layer_norm(x, weight, bias, eps);
    }
    layer_norm_composed(x, weight, bias, eps)
}

/// Softmax over the last dimension, `exp(x - max) / sum exp(x - max)`, differentiable: one
/// fused op on CPU `f32` ([`fused::softmax`]), [`softmax_last_dim_composed`] elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused::cpu_f32(&[x]) && x.rank() >= 1 {
        return fused::softmax(x);
    }
    softmax_last_dim_composed(x)
}

/// `log softmax` over the last dimension, differentiable: one fused op on CPU `f32`
/// ([`fused::log_softmax`]), [`log_softmax_last_dim_composed`] elsewhere.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if fused::cpu_f32(&[x]) && x.rank() >= 1 {
        return fused::log_softmax(x);
    }
    log_softmax_last_dim_composed(x)
}

/// Per-row cross-entropy `-log softmax(logits)[target]`: `logits: [N, V]`, `targets: [N]`
/// (u32) -> `[N]`. Same as [`cross_entropy_weighted`] without weights.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    cross_entropy_weighted(logits, targets, None)
}

/// Per-row weighted cross-entropy `w_i (-log softmax(logits_i)[t_i])`: `logits: [N, V]`,
/// `targets: [N]` (u32; [`fused::IGNORE_INDEX`] marks a row to skip), optional `weights: [N]`
/// (1 when absent) -> `[N]`. Rows with weight 0 or an ignored target give 0 and no gradient
/// (e.g. MDLM's `1/t`-weighted loss on the masked positions only, Sahoo et al. 2024, eq. 10).
/// On CPU `f32` one fused op that never materialises the `[N, V]` probabilities
/// ([`fused::cross_entropy`]); elsewhere [`cross_entropy_weighted_composed`].
pub fn cross_entropy_weighted(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let n = ce_check(logits, targets, weights)?;
    let cpu = fused::cpu_f32(&[logits]) && weights.is_none_or(|w| fused::cpu_f32(&[w]));
    if !cpu || !targets.device().is_cpu() {
        return cross_entropy_weighted_composed(logits, targets, weights);
    }
    let t = match targets.dtype() {
        DType::U32 => targets.clone(),
        _ => targets.to_dtype(DType::U32)?,
    };
    let ones;
    let w = match weights {
        Some(w) => w,
        None => {
            ones = Tensor::ones(n, DType::F32, logits.device())?;
            &ones
        }
    };
    fused::cross_entropy(logits, &t, w)
}

/// Scaled dot-product attention (Vaswani et al. 2017, eq. 1) `softmax(Q K^T / sqrt(dh)) V`
/// per head: `q: [B, H, Lq, dh]`, `k, v: [B, H, Lk, dh]` -> `[B, H, Lq, dh]`, each query
/// attending to the keys `mask` lets it see (an [`AttentionMask`], or a bool: `true` causal,
/// query `i` attends to keys `j <= i + Lk - Lq`). On CPU `f32` the flash-attention op
/// ([`fused::attention`]: no `Lq x Lk` matrix in the forward or backward pass, fully masked key
/// tiles skipped); elsewhere [`attention_composed`].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: impl Into<AttentionMask>,
) -> Result<Tensor> {
    let mask = mask.into();
    attention_check(q, k, v, mask)?;
    if fused::cpu_f32(&[q, k, v]) {
        return fused::attention(q, k, v, mask);
    }
    attention_composed(q, k, v, mask)
}

/// [`attention`] of `q: [B, H, Lq, dh]` against the first `lk` positions of preallocated
/// cache buffers `k_buf, v_buf: [B, H, cap, dh]` (incremental decoding; no gradient). On CPU
/// `f32` a direct kernel streaming the cached rows ([`fused::attention_cached`]); elsewhere
/// [`attention_composed`] on the narrowed buffers.
pub fn attention_cached(
    q: &Tensor,
    k_buf: &Tensor,
    v_buf: &Tensor,
    lk: usize,
    mask: impl Into<AttentionMask>,
) -> Result<Tensor> {
    let mask = mask.into();
    if fused::cpu_f32(&[q, k_buf, v_buf]) {
        return fused::attention_cached(q, k_buf, v_buf, lk, mask);
    }
    let (k, v) = (k_buf.narrow(2, 0, lk)?, v_buf.narrow(2, 0, lk)?);
    attention_composed(q, &k, &v, mask)
}

/// Checks `qkv: [B, L, 3D]` with `D` a multiple of `heads`.
fn qkv_check(qkv: &Tensor, heads: usize) -> Result<(usize, usize, usize)> {
    match qkv.dims() {
        &[b, l, d3] if heads > 0 && d3 % (3 * heads) == 0 => Ok((b, l, d3)),
        dims => Err(Error::Shape(format!(
            "attention: qkv {dims:?} must be [B, L, 3 D] with D a multiple of {heads} heads"
        ))),
    }
}

/// `qkv: [B, L, 3D]` (q, k, v one after the other) as three `[B, H, L, D / H]` tensors.
fn split_heads(qkv: &Tensor, heads: usize) -> Result<[Tensor; 3]> {
    let (b, l, d3) = qkv_check(qkv, heads)?;
    let qkv = qkv
        .reshape((b, l, 3, heads, d3 / (3 * heads)))?
        .permute((2, 0, 3, 1, 4))?
        .contiguous()?; // [3, B, H, L, dh]
    Ok([qkv.get(0)?, qkv.get(1)?, qkv.get(2)?])
}

/// Multi-head [`attention`] on the packed output of a `D -> 3D` projection: `qkv: [B, L, 3D]`
/// holds `q`, `k`, `v` one after the other, each `heads` heads of `D / heads`; returns
/// `[B, L, D]` (heads side by side, ready for the output projection). On CPU `f32` one flash
/// op reading and writing the heads in place ([`fused::attention_packed`]: no permuted copies,
/// no `L x L` matrix); elsewhere the heads are split and [`attention`] composed.
pub fn attention_qkv(qkv: &Tensor, heads: usize, mask: impl Into<AttentionMask>) -> Result<Tensor> {
    let mask = mask.into();
    let (b, l, d3) = qkv_check(qkv, heads)?;
    mask.check(l, l).map_err(Error::Shape)?;
    if fused::cpu_f32(&[qkv]) {
        return fused::attention_packed(qkv, heads, mask);
    }
    let [q, k, v] = split_heads(qkv, heads)?; // [B, H, L, dh]
    let y = attention(&q, &k, &v, mask)?; // [B, H, L, dh]
    Ok(y.transpose(1, 2)?.reshape((b, l, d3 / 3))?) // [B, L, D]
}

/// A layer norm with learned weight (init 1) and bias (init 0), eps 1e-5.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    weight: Var,
    bias: Var,
    eps: f64,
}

impl LayerNorm {
    /// Parameters `weight` and `bias` of width `d` under `p`.
    pub fn new(p: &mut ParamInit, d: usize) -> Result<Self> {
        Ok(Self {
            weight: p.constant("weight", &[d], 1.0)?,
            bias: p.constant("bias", &[d], 0.0)?,
            eps: 1e-5,
        })
    }

    /// `x: [..., d]` -> `[..., d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, self.weight.as_tensor(), self.bias.as_tensor(), self.eps)
    }
}

/// `y = x W^T + b` applied to `[B, L, in]` as one `[B L, in] x [in, out]` product.
#[derive(Clone, Debug)]
struct Dense {
    weight: Var,
    bias: Var,
}

impl Dense {
    fn new(p: &mut ParamInit, d_in: usize, d_out: usize) -> Result<Self> {
        let bound = 1.0 / (d_in as f64).sqrt();
        Ok(Self {
            weight: p.uniform("weight", &[d_out, d_in], bound)?,
            bias: p.uniform("bias", &[d_out], bound)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let (w, bias) = (self.weight.as_tensor(), self.bias.as_tensor());
        let x = x.reshape((b * l, d))?; // [B L, in]
        let y = fused::linear_act(&x, w, bias, FusedAct::Identity)?; // [B L, out]
        Ok(y.reshape((b, l, ()))?) // [B, L, out]
    }

    /// The weights packed for [`fused::PackedLinear`] (CPU `f32` only, else `None`): for
    /// decoding, where the same frozen weights multiply a few rows many times.
    fn pack(&self) -> Result<Option<fused::PackedLinear>> {
        let (w, bias) = (self.weight.as_tensor(), self.bias.as_tensor());
        if !fused::cpu_f32(&[w, bias]) {
            return Ok(None);
        }
        let (d_out, d_in) = w.dims2()?;
        let (wv, bv) = (w.flatten_all()?.to_vec1::<f32>()?, bias.to_vec1::<f32>()?);
        Ok(Some(fused::PackedLinear::new(&wv, &bv, d_out, d_in)?))
    }

    /// `act(x W^T + b)` for `x: [B, L, in]` through `packed` (this layer's [`Dense::pack`])
    /// when given, with no autograd graph; the same kernel as the fused forward pass, so the
    /// same values as [`Dense::forward`] / [`Dense::forward_gelu`].
    fn forward_with(
        &self,
        x: &Tensor,
        packed: Option<&fused::PackedLinear>,
        act: fused::RowAct,
    ) -> Result<Tensor> {
        let Some(p) = packed else {
            return match act {
                fused::RowAct::Identity => self.forward(x),
                fused::RowAct::GeluErf => self.forward_gelu(x),
                fused::RowAct::Silu => Err(Error::Config("dense: no SiLU layer here".into())),
            };
        };
        let (b, l, d) = x.dims3()?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?; // [B L in]
        let (y, _) = p.forward_new(&xv, b * l, act, false);
        let out = y.len() / (b * l).max(1);
        if d == 0 || out * b * l != y.len() {
            return Err(Error::Shape(format!("packed dense: input {:?}", x.dims())));
        }
        Ok(Tensor::from_vec(y, (b, l, out), x.device())?) // [B, L, out]
    }

    /// `GELU(x W^T + b)` (exact erf GELU), fused on CPU `f32`.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        let (w, bias) = (self.weight.as_tensor(), self.bias.as_tensor());
        let y = fused::linear_gelu_erf(&x.reshape((b * l, d))?, w, bias)?; // [B L, out]
        Ok(y.reshape((b, l, ()))?) // [B, L, out]
    }
}

/// One pre-LN block: `x + proj(MHA(LN1 x))`, then `x + fc2(GELU(fc1(LN2 x)))`.
/// The rotary tables and where the tokens sit, with rotary positions.
type Rope<'a> = Option<(&'a Rotary, RotaryAt<'a>)>;

#[derive(Clone, Debug)]
struct Block {
    ln1: LayerNorm,
    qkv: Dense,
    proj: Dense,
    ln2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    n_heads: usize,
}

impl Block {
    fn new(p: &mut ParamInit, d: usize, n_heads: usize) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(&mut p.push("ln1"), d)?,
            qkv: Dense::new(&mut p.push("qkv"), d, 3 * d)?,
            proj: Dense::new(&mut p.push("proj"), d, d)?,
            ln2: LayerNorm::new(&mut p.push("ln2"), d)?,
            fc1: Dense::new(&mut p.push("fc1"), d, 4 * d)?,
            fc2: Dense::new(&mut p.push("fc2"), 4 * d, d)?,
            n_heads,
        })
    }

    /// Scaled dot-product attention (Vaswani et al. 2017, eq. 1) over `n_heads` heads under
    /// `mask` ([`attention_qkv`]: flash attention on CPU `f32`).
    fn attn(&self, x: &Tensor, mask: AttentionMask, rotary: Rope) -> Result<Tensor> {
        let qkv = self.qkv.forward(x)?; // [B, L, 3D]
        let qkv = match rotary {
            Some((r, at)) => r.apply_qkv(&qkv, at)?, // [B, L, 3D]
            None => qkv,
        };
        let y = attention_qkv(&qkv, self.n_heads, mask)?; // [B, L, D]
        self.proj.forward(&y)
    }

    fn forward(&self, x: &Tensor, mask: AttentionMask, rotary: Rope) -> Result<Tensor> {
        let x = (x + self.attn(&self.ln1.forward(x)?, mask, rotary)?)?; // [B, L, D]
        let m = self.fc1.forward_gelu(&self.ln2.forward(&x)?)?; // [B, L, 4D]
        Ok((x + self.fc2.forward(&m)?)?)
    }
}

/// The pre-LN transformer of the module documentation. Parameter names follow PyTorch's
/// `CharTransformer`: `tok.weight`, `pos.weight` (learned positions only),
/// `blocks.{i}.{ln1,qkv,proj,ln2,fc1,fc2}.*`, `lnf.*`, `head.*`.
#[derive(Clone, Debug)]
pub struct Transformer {
    cfg: TransformerConfig,
    tok: Var,
    /// The learned position table, or `None` with rotary positions.
    pos: Option<Var>,
    /// Rotary tables, with rotary positions.
    rotary: Option<Rotary>,
    blocks: Vec<Block>,
    lnf: LayerNorm,
    head: Dense,
}

impl Transformer {
    /// Create the parameters under `p` (in PyTorch's order: embeddings, blocks, norm, head).
    pub fn new(p: &mut ParamInit, cfg: TransformerConfig) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.d_model;
        let tok = p.push("tok").normal("weight", &[cfg.vocab_in, d], 1.0)?;
        let (pos, rotary) = match cfg.positions {
            Positions::Learned => (
                Some(p.push("pos").normal("weight", &[cfg.max_len, d], 1.0)?),
                None,
            ),
            Positions::Rotary => (
                None,
                Some(Rotary::new(cfg.max_len, d, cfg.n_heads, p.device())?),
            ),
        };
        let blocks = (0..cfg.n_layers)
            .map(|i| Block::new(&mut p.push(&format!("blocks.{i}")), d, cfg.n_heads))
            .collect::<Result<Vec<_>>>()?;
        let lnf = LayerNorm::new(&mut p.push("lnf"), d)?;
        let head = Dense::new(&mut p.push("head"), d, cfg.vocab_out)?;
        Ok(Self {
            cfg,
            tok,
            pos,
            rotary,
            blocks,
            lnf,
            head,
        })
    }

    /// The shapes.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Logits `[B, L, vocab_out]` for token ids `ids: [B, L]` (u32, each `< vocab_in`,
    /// `L <= max_len`).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2()?;
        if l > self.cfg.max_len {
            return Err(Error::Shape(format!(
                "transformer: sequence length {l} exceeds max_len {}",
                self.cfg.max_len
            )));
        }
        if ids.dtype() != DType::U32 {
            return Err(Error::Shape(format!(
                "transformer: token ids must be u32, got {:?}",
                ids.dtype()
            )));
        }
        self.forward_with(ids, None)
    }
}
