//! Fused CPU kernels for the hot paths of MLP training and sampling.
//!
//! - [`linear_act`]: `act(x W^T + b)` as one candle custom op with its own backward pass (the
//!   bias add and SiLU and their gradients fused around the GEMMs), used by
//!   [`crate::nn::Linear`] and [`crate::nn::Mlp`];
//! - [`linear_act_inference`]: the same without recording an autograd graph;
//! - [`PackedLinear`]: `act(x W^T + b)` against weights packed once (a BLIS-style AVX2 / AVX-512 GEMM
//!   with the bias and activation applied in cache), the forward pass of [`linear_act`] and the
//!   sampling path of [`crate::nn::PackedMlp`];
//! - [`layer_norm`], [`softmax`], [`log_softmax`], [`attention`] (flash attention, causal or
//!   not) and [`cross_entropy`] (per-row, weighted, with an ignore index): the transformer's hot
//!   paths, each one custom op whose backward pass saves and materialises as little as possible
//!   (no `L x L` attention matrix, no `[N, V]` probabilities); called by
//!   [`crate::nn::transformer`]'s free functions, which also hold the composed references;
//! - [`add`]: a residual sum on rayon's pool (candle's own spreads it over a second pool);
//! - in-place AdamW and EMA updates (crate-internal; used by [`crate::train::optim::AdamW`] and
//!   [`crate::train::ema::Ema`]).
//!
//! Every entry point runs the fused kernel only on the CPU with `f32` tensors ([`fused_at`]) and
//! falls back to the equivalent composition of candle ops elsewhere (CUDA included), so results
//! agree up to float rounding. The custom ops themselves ([`layer_norm`], [`softmax`],
//! [`attention`], ...) have only a CPU forward pass: callers dispatch first.
//! SiLU uses [`exp_f32`], a branch-free `exp` with relative error below 3e-7, in place of libm.

mod add;
mod attention;
mod attention_decode;
mod attention_op;
mod cross_entropy;
mod inplace;
mod kernels;
mod layer_norm;
mod linear;
mod packed;
mod panels;
pub mod reference;
mod softmax;
mod tile;

use candle_core::{bail, DType, DeviceLocation, Storage, Tensor};

pub use add::add;
pub use cross_entropy::IGNORE_INDEX;
pub(crate) use inplace::{adamw_inplace, ema_inplace};
pub(crate) use kernels::AdamWScalars;
pub use kernels::RowAct;
pub use kernels::{exp_f32, gelu_erf_f32, silu_f32};
pub use packed::PackedLinear;

use crate::Result;

/// The activation applied after the affine map by [`linear_act`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedAct {
    /// No activation: `x W^T + b`.
    Identity,
    /// `silu(z) = z sigmoid(z)`.
    Silu,
}

/// True when the fused kernels handle a tensor of `dtype` on the device at `location`: the CPU
/// with `f32`, nothing else. This is the one dispatch rule of the crate: every entry point above
/// (and every caller of the CPU-only custom ops below: layer norm, softmax, attention,
/// cross-entropy, group norm, convolution, rotary embedding, AdamW, EMA, packed weights) takes
/// the differentiable composition of candle ops otherwise, e.g. on a CUDA or Metal device, where
/// candle's own kernels and autograd run. The custom ops have only `cpu_fwd`, so reaching one
/// with a GPU tensor would be an error.
pub fn fused_at(location: DeviceLocation, dtype: DType) -> bool {
    matches!(location, DeviceLocation::Cpu) && dtype == DType::F32
}

/// True when every tensor is on the CPU with dtype `f32`, the case the fused kernels handle
/// ([`fused_at`]).
pub fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| fused_at(t.device().location(), t.dtype()))
}

/// True when [`linear_act`] takes the fused path for these operands: CPU, `f32`, `x: [B, in]`,
/// `w: [out, in]`, `b: [out]` with `b` contiguous.
fn fusable(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    cpu_f32(&[x, w, b])
        && x.rank() == 2
        && w.rank() == 2
        && b.rank() == 1
        && b.is_contiguous()
        && x.dim(1).ok() == w.dim(1).ok()
        && w.dim(0).ok() == b.dim(0).ok()
}

/// The composed reference: `act(x W^T + b)` from candle ops (records gradients).
fn composed(x: &Tensor, w: &Tensor, b: &Tensor, act: FusedAct) -> Result<Tensor> {
    let z = x.matmul(&w.t()?)?.broadcast_add(b)?;
    Ok(match act {
        FusedAct::Identity => z,
        FusedAct::Silu => z.silu()?,
    })
}

/// `act(x W^T + b)` for `x: [B, in]`, `w: [out, in]`, `b: [out]`, recording gradients for every
/// input that tracks them. On CPU `f32` this is one fused custom op whose backward pass gives
/// `dx`, `dW` and `db`; elsewhere it is the composition of candle ops.
pub fn linear_act(x: &Tensor, w: &Tensor, b: &Tensor, act: FusedAct) -> Result<Tensor> {
    if !fusable(x, w, b) {
        return composed(x, w, b, act);
    }
    let save = x.track_op() || w.track_op() || b.track_op();
    Ok(x.apply_op3(w, b, linear::LinearAct::new(act.into(), save))?)
}

/// [`linear_act`] without an autograd graph (the result never tracks gradients), for sampling
/// and evaluation: nothing is saved for a backward pass.
pub fn linear_act_inference(x: &Tensor, w: &Tensor, b: &Tensor, act: FusedAct) -> Result<Tensor> {
    if !fusable(x, w, b) {
        return composed(&x.detach(), &w.detach(), &b.detach(), act);
    }
    Ok(x.apply_op3_no_bwd(w, b, &linear::LinearAct::new(act.into(), false))?)
}

impl From<FusedAct> for RowAct {
    fn from(a: FusedAct) -> Self {
        match a {
            FusedAct::Identity => RowAct::Identity,
            FusedAct::Silu => RowAct::Silu,
        }
    }
}

/// `gelu(x W^T + b)` with the exact (erf) GELU, for `x: [B, in]`, `w: [out, in]`, `b: [out]`,
/// recording gradients: on CPU `f32` one fused op saving only `gelu'(z)` (through
/// [`gelu_erf_f32`], within 2e-7 of libm's `erf`); elsewhere candle's `gelu_erf` after the
/// affine map.
pub fn linear_gelu_erf(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !fusable(x, w, b) {
        return Ok(composed(x, w, b, FusedAct::Identity)?.gelu_erf()?);
    }
    let save = x.track_op() || w.track_op() || b.track_op();
    Ok(x.apply_op3(w, b, linear::LinearAct::new(RowAct::GeluErf, save))?)
}

/// Runs `f` on the contiguous `f32` data of a CPU tensor (an error otherwise).
pub(crate) fn with_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*s else {
        bail!("{what}: expected a CPU tensor")
    };
    f(linear::f32_slice(cs, l, what)?)
}

/// True when some input records gradients, so the forward pass must save its state.
fn tracks(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// Layer norm over the last dimension, `(x - mean) / sqrt(var + eps) * w + b` (biased
/// variance), as one custom op with its backward pass. CPU `f32` only: callers dispatch (see
/// [`crate::nn::transformer::layer_norm`]). `x: [..., D]`, `w`, `b: [D]`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let (x, w, b) = (x.contiguous()?, w.contiguous()?, b.contiguous()?);
    let op = layer_norm::LayerNormOp::new(eps as f32, tracks(&[&x, &w, &b]));
    Ok(x.apply_op3(&w, &b, op)?)
}

/// Softmax over the last dimension as one custom op with its backward pass (CPU `f32` only).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(softmax::Softmax { log: false })?)
}

/// Log-softmax over the last dimension as one custom op with its backward pass (CPU `f32`
/// only).
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(softmax::Softmax { log: true })?)
}

/// Flash attention `softmax(Q K^T / sqrt(dh) + mask) V` for `q: [B, H, Lq, dh]`,
/// `k, v: [B, H, Lk, dh]` -> `[B, H, Lq, dh]` (CPU `f32` only) under `mask` (an
/// [`AttentionMask`](crate::nn::attention_mask::AttentionMask), or a bool: `true` causal, query
/// `i` sees keys `j <= i + Lk - Lq`). The algorithm (Dao et al. 2022) is described in
/// `fused/attention.rs`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: impl Into<crate::nn::attention_mask::AttentionMask>,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = attention_op::FlashAttention::new(mask.into(), tracks(&[&q, &k, &v]));
    Ok(q.apply_op3(&k, &v, op)?)
}

/// [`attention`] of a few new queries `q: [B, H, Lq, dh]` against the first `lk` rows of a
/// preallocated KV cache `k_buf, v_buf: [B, H, cap, dh]` (contiguous, `cap >= lk`), for
/// incremental decoding (CPU `f32` only; inference: no gradient is recorded). Equal to
/// [`attention`] on `k_buf.narrow(2, 0, lk)` and `v_buf.narrow(2, 0, lk)` up to rounding.
pub fn attention_cached(
    q: &Tensor,
    k_buf: &Tensor,
    v_buf: &Tensor,
    lk: usize,
    mask: impl Into<crate::nn::attention_mask::AttentionMask>,
) -> Result<Tensor> {
    let q = q.contiguous()?;
    let op = attention_decode::CachedAttention {
        lk,
        mask: mask.into(),
    };
    Ok(q.apply_op3_no_bwd(k_buf, v_buf, &op)?)
}

/// [`attention`] on a packed `qkv: [B, L, 3 D]` (the output of one `D -> 3 D` projection: `q`,
/// `k`, `v` one after the other, each `heads` heads of `D / heads`), giving `[B, L, D]` with the
/// heads side by side. The heads are read and written in place through strides: no permuted
/// copy of `q`, `k`, `v` or of the output exists, and the backward pass gives `dqkv` in the same
/// layout (CPU `f32` only).
pub fn attention_packed(
    qkv: &Tensor,
    heads: usize,
    mask: impl Into<crate::nn::attention_mask::AttentionMask>,
) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let op = attention_op::PackedAttention::new(heads, mask.into(), qkv.track_op());
    Ok(qkv.apply_op1(op)?)
}

/// Per-row cross-entropy `w_i (logsumexp(z_i) - z_{i, t_i})` for `logits: [N, V]` (CPU `f32`),
/// `targets: [N]` (u32; [`IGNORE_INDEX`] marks a row to skip) and `weights: [N]` -> `[N]`.
/// Rows with weight 0 or an ignored target give 0 and no gradient.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (z, t, w) = (
        logits.contiguous()?,
        targets.contiguous()?,
        weights.contiguous()?,
    );
    let op = cross_entropy::CrossEntropy::new(tracks(&[&z, &w]));
    Ok(z.apply_op3(&t, &w, op)?)
}
