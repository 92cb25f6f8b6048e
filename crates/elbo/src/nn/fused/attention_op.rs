//! The flash-attention custom ops (CPU, f32) around the kernels of [`super::attention`]: one on
//! split `q, k, v: [B, H, L, dh]` tensors and one on a packed `qkv: [B, L, 3 H dh]` tensor, each
//! saving only the per-row log-sum-exp for its backward pass (which reads the output itself
//! back from candle).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::attention::{backward, forward, scatter, Dims, Packing};
use super::linear::f32_slice;
use super::with_f32;
use crate::nn::attention_mask::AttentionMask;

/// The saved `lse: [B H Lq]`, behind a lock (ops are shared through the graph).
#[derive(Default)]
struct Saved(Mutex<Option<Vec<f32>>>);

impl Saved {
    fn put(&self, lse: Vec<f32>) -> candle_core::Result<()> {
        match self.0.lock() {
            Ok(mut g) => *g = Some(lse),
            Err(_) => bail!("flash attention: saved-lse lock poisoned"),
        }
        Ok(())
    }

    /// Runs `f` on the saved values.
    fn with<R>(&self, f: impl FnOnce(&[f32]) -> candle_core::Result<R>) -> candle_core::Result<R> {
        let guard = match self.0.lock() {
            Ok(g) => g,
            Err(_) => bail!("flash attention: saved-lse lock poisoned"),
        };
        match guard.as_deref() {
            Some(lse) => f(lse),
            None => bail!("flash attention: backward without a saved forward pass"),
        }
    }
}

/// Checks `q: [B, H, Lq, dh]`, `k, v: [B, H, Lk, dh]`.
fn split_dims(
    ql: &Layout,
    kl: &Layout,
    vl: &Layout,
    mask: AttentionMask,
) -> candle_core::Result<Dims> {
    let (b, h, lq, dh) = ql.shape().dims4()?;
    let (kb, kh, lk, kd) = kl.shape().dims4()?;
    if (kb, kh, kd) != (b, h, dh) || vl.dims() != kl.dims() {
        bail!(
            "attention: q {:?}, k {:?} and v {:?} must be [B, H, Lq, dh], [B, H, Lk, dh], \
             [B, H, Lk, dh]",
            ql.dims(),
            kl.dims(),
            vl.dims()
        )
    }
    Dims::new(b * h, (lq, lk, dh), mask, Packing::Split)
}

/// Attention on split `q, k, v`; the forward pass saves `lse` when `save`.
pub(crate) struct FlashAttention {
    mask: AttentionMask,
    save: bool,
    lse: Saved,
}

impl FlashAttention {
    pub(crate) fn new(mask: AttentionMask, save: bool) -> Self {
        Self {
            mask,
            save,
            lse: Saved::default(),
        }
    }
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "elbo-flash-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = split_dims(ql, kl, vl, self.mask)?;
        let q = f32_slice(qs, ql, "attention q")?;
        let k = f32_slice(ks, kl, "attention k")?;
        let v = f32_slice(vs, vl, "attention v")?;
        let (o, lse) = forward([q, k, v], &d)?;
        if self.save {
            self.lse.put(lse)?;
        }
        Ok((CpuStorage::F32(o), ql.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let all = self.lse.with(|lse| {
            let op = SplitBackward {
                mask: self.mask,
                o: res,
                go: &grad,
                lse,
            };
            q.apply_op3_no_bwd(k, v, &op) // [dq | dk | dv], flat
        })?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward pass of [`FlashAttention`] as an op on `(q, k, v)`, returning `dq`, `dk`, `dv`
/// one after the other in one flat buffer.
struct SplitBackward<'a> {
    mask: AttentionMask,
    o: &'a Tensor,
    go: &'a Tensor,
    lse: &'a [f32],
}

impl CustomOp3 for SplitBackward<'_> {
    fn name(&self) -> &'static str {
        "elbo-flash-attention-backward"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = split_dims(ql, kl, vl, self.mask)?;
        let q = f32_slice(qs, ql, "attention q")?;
        let k = f32_slice(ks, kl, "attention k")?;
        let v = f32_slice(vs, vl, "attention v")?;
        let (nq, nk) = (d.q_len(), d.k_len());
        if self.lse.len() != d.heads * d.lq || self.o.elem_count() != nq {
            bail!("{}: saved state does not match the inputs", self.name())
        }
        let mut out = vec![0f32; nq + 2 * nk];
        let (gq, rest) = out.split_at_mut(nq);
        let (gk, gv) = rest.split_at_mut(nk);
        with_f32(self.o, "attention output", |o| {
            with_f32(self.go, "attention output gradient", |go| {
                backward([q, k, v], &d, o, go, self.lse, gq, gk, gv)
            })
        })?;
        Ok((CpuStorage::F32(out), Shape::from(nq + 2 * nk)))
    }
}

/// Checks `qkv: [B, L, 3 h dh]`.
fn packed_dims(l: &Layout, h: usize, mask: AttentionMask) -> candle_core::Result<Dims> {
    let (b, len, w) = l.shape().dims3()?;
    if h == 0 || w % (3 * h) != 0 {
        bail!(
            "packed attention: qkv {:?} must be [B, L, 3 H dh] for H = {h}",
            l.dims()
        )
    }
    Dims::new(b * h, (len, len, w / (3 * h)), mask, Packing::Packed { h })
}

/// Attention on a packed `qkv: [B, L, 3 h dh]` (`q`, `k`, `v` one after the other, each
/// `[h, dh]`), giving `[B, L, h dh]`; the forward pass saves `lse` when `save`.
pub(crate) struct PackedAttention {
    heads: usize,
    mask: AttentionMask,
    save: bool,
    lse: Saved,
}

impl PackedAttention {
    pub(crate) fn new(heads: usize, mask: AttentionMask, save: bool) -> Self {
        Self {
            heads,
            mask,
            save,
            lse: Saved::default(),
        }
    }
}

impl CustomOp1 for PackedAttention {
    fn name(&self) -> &'static str {
        "elbo-flash-attention-packed"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = packed_dims(l, self.heads, self.mask)?;
        let x = f32_slice(s, l, "attention qkv")?;
        let (o_heads, lse) = forward([x, x, x], &d)?; // [B h, L, dh]
        let mut o = vec![0f32; d.q_len()];
        scatter(&o_heads, &d, d.lq, 0, false, &mut o); // [B, L, h, dh]
        if self.save {
            self.lse.put(lse)?;
        }
        let (b, len, w) = l.shape().dims3()?;
        Ok((CpuStorage::F32(o), Shape::from((b, len, w / 3))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let g = self.lse.with(|lse| {
            let op = PackedBackward {
                heads: self.heads,
                mask: self.mask,
                o: res,
                go: &grad,
                lse,
            };
            qkv.apply_op1_no_bwd(&op)
        })?;
        Ok(Some(g))
    }
}

/// The backward pass of [`PackedAttention`] as an op on `qkv`, returning `dqkv`.
struct PackedBackward<'a> {
    heads: usize,
    mask: AttentionMask,
    o: &'a Tensor,
    go: &'a Tensor,
    lse: &'a [f32],
}

impl CustomOp1 for PackedBackward<'_> {
    fn name(&self) -> &'static str {
        "elbo-flash-attention-packed-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = packed_dims(l, self.heads, self.mask)?;
        let x = f32_slice(s, l, "attention qkv")?;
        let (nq, nk) = (d.q_len(), d.k_len());
        if self.lse.len() != d.heads * d.lq || self.o.elem_count() != nq {
            bail!("{}: saved state does not match the inputs", self.name())
        }
        let mut g = vec![0f32; nq + 2 * nk]; // head-major [dq | dk | dv]
        let (gq, rest) = g.split_at_mut(nq);
        let (gk, gv) = rest.split_at_mut(nk);
        with_f32(self.o, "attention output", |o| {
            with_f32(self.go, "attention output gradient", |go| {
                backward([x, x, x], &d, o, go, self.lse, gq, gk, gv)
            })
        })?;
        let mut out = vec![0f32; x.len()]; // [B, L, 3, h, dh]
        for (slot, part) in [&*gq, &*gk, &*gv].into_iter().enumerate() {
            scatter(part, &d, d.lq, slot, true, &mut out);
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}
