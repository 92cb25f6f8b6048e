//! Attention of a few new queries against a preallocated KV cache, for incremental decoding
//! (one token per call in autoregressive sampling, one block per call in block diffusion).
//!
//! `q: [B, H, Lq, dh]` (contiguous) attends to the first `Lk` rows of `k, v: [B, H, cap, dh]`
//! (contiguous buffers with room for `cap >= Lk` positions, filled in place as decoding goes),
//! under an [`AttentionMask`] aligned bottom-right as in [`super::attention`]. With `Lq` this
//! small the flash kernel's tiling and packing cost more than the products: each query row
//! takes its scores `s_j = scale q . k_j` over its visible keys, the softmax, and
//! `o = sum_j p_j v_j` directly, streaming each head's keys and values once. Inference only:
//! no gradient is recorded (the op is applied with `apply_op3_no_bwd`).

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape};
use rayon::prelude::*;

use super::kernels::{axpy, dot, exp_shift_sum, row_max};
use crate::nn::attention_mask::AttentionMask;

/// Heads x Lq x Lk x dh below which everything runs on the calling thread.
const PAR_WORK: usize = 1 << 16;

/// The custom op: `(q, k_buf, v_buf)` -> `[B, H, Lq, dh]`, reading `lk` rows of the buffers.
pub(crate) struct CachedAttention {
    pub lk: usize,
    pub mask: AttentionMask,
}

/// One head: `o: [lq, dh]` from `q: [lq, dh]` and the first `lk` rows of `k, v: [.., dh]`.
fn head(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    o: &mut [f32],
    (lk, dh): (usize, usize),
    mask: AttentionMask,
) {
    let lq = q.len() / dh.max(1);
    let scale = 1.0 / (dh.max(1) as f32).sqrt();
    let mut s = vec![0f32; lk];
    for i in 0..lq {
        let qi = &q[i * dh..(i + 1) * dh];
        let oi = &mut o[i * dh..(i + 1) * dh];
        let ranges = mask.visible(i, lq, lk);
        let mut n = 0;
        for r in ranges.iter() {
            for j in r.clone() {
                let kj = &k[j * dh..(j + 1) * dh];
                s[n] = scale * dot(qi, kj);
                n += 1;
            }
        }
        oi.fill(0.0);
        if n == 0 {
            continue;
        }
        let m = row_max(&s[..n]);
        let z = exp_shift_sum(&mut s[..n], m);
        let inv = 1.0 / z;
        let mut n = 0;
        for r in ranges.iter() {
            for j in r.clone() {
                let p = s[n] * inv;
                n += 1;
                axpy(oi, p, &v[j * dh..(j + 1) * dh]);
            }
        }
    }
}

impl CustomOp3 for CachedAttention {
    fn name(&self) -> &'static str {
        "elbo-cached-attention"
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
        let (b, h, lq, dh) = ql.shape().dims4()?;
        let (kb, kh, cap, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, h, dh) || vl.dims() != kl.dims() || self.lk > cap {
            bail!(
                "cached attention: q {:?} against {} rows of k {:?} and v {:?}",
                ql.dims(),
                self.lk,
                kl.dims(),
                vl.dims()
            )
        }
        if let Err(e) = self.mask.check(lq, self.lk) {
            bail!("{e}")
        }
        let (q, k, v) = match (qs, ks, vs) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => (q, k, v),
            _ => bail!("cached attention: f32 tensors only"),
        };
        let contiguous = |l: &Layout| l.contiguous_offsets();
        let (Some((q0, q1)), Some((k0, k1)), Some((v0, v1))) =
            (contiguous(ql), contiguous(kl), contiguous(vl))
        else {
            bail!("cached attention: q and the cache buffers must be contiguous")
        };
        let (q, k, v) = (&q[q0..q1], &k[k0..k1], &v[v0..v1]);
        let mut o = vec![0f32; b * h * lq * dh];
        if o.is_empty() {
            return Ok((CpuStorage::F32(o), ql.shape().clone()));
        }
        let (lk, mask, hk) = (self.lk, self.mask, cap * dh);
        let run = |(i, oh): (usize, &mut [f32])| {
            let qh = &q[i * lq * dh..(i + 1) * lq * dh];
            head(qh, &k[i * hk..], &v[i * hk..], oh, (lk, dh), mask);
        };
        if b * h * lq * lk * dh >= PAR_WORK {
            o.par_chunks_mut(lq * dh).enumerate().for_each(run);
        } else {
            o.chunks_mut(lq * dh).enumerate().for_each(run);
        }
        Ok((CpuStorage::F32(o), ql.shape().clone()))
    }
}
