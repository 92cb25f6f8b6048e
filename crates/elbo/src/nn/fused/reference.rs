//! The composed references of the fused transformer kernels: the same functions built from
//! differentiable candle ops. They are the fallback of [`crate::nn::transformer`]'s free
//! functions off CPU `f32` (e.g. on CUDA or in `f64`), and the references the fused ops are
//! tested against. Re-exported from [`crate::nn::transformer`].

use candle_core::{Tensor, D};

use crate::nn::attention_mask::AttentionMask;
use crate::{Error, Result};

/// [`layer_norm`](crate::nn::transformer::layer_norm) built from differentiable candle ops (the fallback, and the tests' reference).
pub fn layer_norm_composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?; // [..., 1]
    let xc = x.broadcast_sub(&mean)?; // [..., D]
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?; // [..., 1]
    let inv = (var + eps)?.sqrt()?.recip()?; // [..., 1]
    Ok(xc
        .broadcast_mul(&inv)?
        .broadcast_mul(weight)?
        .broadcast_add(bias)?)
}

/// [`softmax_last_dim`](crate::nn::transformer::softmax_last_dim) from candle ops (the maximum is a detached constant: the result does not
/// depend on it).
pub fn softmax_last_dim_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // [..., 1]
    let e = x.broadcast_sub(&max)?.exp()?; // [..., V]
    let s = e.sum_keepdim(D::Minus1)?; // [..., 1]
    Ok(e.broadcast_div(&s)?)
}

/// [`log_softmax_last_dim`](crate::nn::transformer::log_softmax_last_dim) from candle ops (detached maximum).
pub fn log_softmax_last_dim_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach(); // [..., 1]
    let z = x.broadcast_sub(&max)?; // [..., V]
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?; // [..., 1]
    Ok(z.broadcast_sub(&lse)?)
}

/// Checks `logits: [N, V]`, `targets: [N]` and `weights: [N]`; returns `N`.
pub(crate) fn ce_check(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<usize> {
    let bad = || {
        Err(Error::Shape(format!(
            "cross-entropy: logits {:?} must be [N, V] with targets [N] and weights [N], got \
             targets {:?} and weights {:?}",
            logits.dims(),
            targets.dims(),
            weights.map(|w| w.dims().to_vec())
        )))
    };
    let [n, _] = logits.dims() else { return bad() };
    if targets.dims() != [*n] || weights.is_some_and(|w| w.dims() != [*n]) {
        return bad();
    }
    Ok(*n)
}

/// [`cross_entropy_weighted`](crate::nn::transformer::cross_entropy_weighted) from candle ops (log-softmax, gather, products).
pub fn cross_entropy_weighted_composed(
    logits: &Tensor,
    targets: &Tensor,
    weights: Option<&Tensor>,
) -> Result<Tensor> {
    let n = ce_check(logits, targets, weights)?;
    let keep = targets.ne(f64::from(super::IGNORE_INDEX))?; // [N]
    let safe = keep.where_cond(targets, &targets.zeros_like()?)?; // [N]
    let logp = log_softmax_last_dim_composed(logits)?; // [N, V]
    let picked = logp.gather(&safe.reshape((n, 1))?, 1)?; // [N, 1]
    let ce = picked.reshape(n)?.neg()?; // [N]
    let mut w = keep.to_dtype(ce.dtype())?; // [N]
    if let Some(wt) = weights {
        w = (w * wt.to_dtype(ce.dtype())?)?;
    }
    Ok((ce * w)?)
}

/// Checks `q: [B, H, Lq, dh]`, `k, v: [B, H, Lk, dh]` and that `mask` fits them.
pub(crate) fn attention_check(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: AttentionMask,
) -> Result<()> {
    let ok = match (q.dims(), k.dims()) {
        ([b, h, _, dh], [kb, kh, _, kd]) => (b, h, dh) == (kb, kh, kd) && v.dims() == k.dims(),
        _ => false,
    };
    if !ok {
        return Err(Error::Shape(format!(
            "attention: q {:?}, k {:?}, v {:?} must be [B, H, Lq, dh], [B, H, Lk, dh] twice",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    mask.check(q.dim(2)?, k.dim(2)?).map_err(Error::Shape)
}

/// [`attention`](crate::nn::transformer::attention) from candle ops: the `[B, H, Lq, Lk]`
/// scores, the additive mask of `mask`, the composed softmax.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: impl Into<AttentionMask>,
) -> Result<Tensor> {
    let mask = mask.into();
    attention_check(q, k, v, mask)?;
    let (lq, lk) = (q.dim(2)?, k.dim(2)?);
    let m = match mask.additive(lq, lk, q.device())? {
        Some(m) => Some(m.to_dtype(q.dtype())?),
        None => None,
    };
    masked_attention_composed(q, k, v, m.as_ref())
}

/// `softmax(Q K^T / sqrt(dh) + mask) V` from candle ops, `mask: [Lq, Lk]` (0 or -inf).
pub(crate) fn masked_attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let dh = q.dim(D::Minus1)?;
    let s = q.matmul(&k.t()?)?.affine(1.0 / (dh as f64).sqrt(), 0.0)?; // [B, H, Lq, Lk]
    let s = match mask {
        Some(m) => s.broadcast_add(m)?,
        None => s,
    };
    Ok(softmax_last_dim_composed(&s)?.matmul(v)?) // [B, H, Lq, dh]
}
