//! Flash attention on the CPU (Dao et al. 2022, "FlashAttention", Algorithm 1 for the forward
//! pass with the online softmax of Milakov & Gimelshein 2018, Algorithm 2 / Appendix B.4 for
//! the backward pass).
//!
//! `softmax(scale Q K^T + mask) V` for `q: [B, H, Lq, dh]`, `k, v: [B, H, Lk, dh]`, computed one
//! `BR x BC` tile of scores at a time: the `Lq x Lk` score or probability matrix never exists,
//! neither in the forward nor in the backward pass. The forward pass keeps only the output and
//! the per-row log-sum-exp `lse_i = log sum_j exp(s_ij)`; the backward pass recomputes each
//! tile's probabilities `P = exp(S - lse)` from them and, with `D_i = sum_d dO_id O_id`
//! (Dao et al. eq. in B.4), forms
//! `dV += P^T dO`, `dP = dO V^T`, `dS = P * (dP - D)`, `dQ += scale dS K`, `dK += scale dS^T Q`.
//!
//! The causal mask is aligned bottom-right: query `i` sees keys `j <= i + Lk - Lq` (the usual
//! convention when `Lq < Lk` holds cached keys), which is `j <= i` when `Lq = Lk`. Work is split
//! over `B H` heads (and the query tiles of each head in the forward pass) on rayon's pool when
//! large enough; every tile's arithmetic is fixed by the sizes, so results do not depend on the
//! number of threads. The tile products go through the `gemm` crate ([`super::tile`]).

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::exp_shift;
use super::linear::f32_slice;
use super::tile::{matmul, MatMut, MatRef};
use super::with_f32;

/// Query rows per tile.
const BR: usize = 64;
/// Keys per tile.
const BC: usize = 64;
/// Heads x Lq x Lk x dh below which everything runs on the calling thread.
const PAR_WORK: usize = 1 << 20;

/// The problem sizes shared by the forward and backward passes.
#[derive(Clone, Copy, Debug)]
struct Dims {
    heads: usize,
    lq: usize,
    lk: usize,
    dh: usize,
    scale: f32,
    causal: bool,
}

impl Dims {
    /// From the layouts of `q: [B, H, Lq, dh]`, `k, v: [B, H, Lk, dh]`.
    fn new(ql: &Layout, kl: &Layout, vl: &Layout, causal: bool) -> candle_core::Result<Self> {
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
        if lq > 0 && lk == 0 {
            bail!("attention: {lq} queries but no keys")
        }
        if causal && lq > lk {
            bail!("causal attention: more queries ({lq}) than keys ({lk})")
        }
        Ok(Self {
            heads: b * h,
            lq,
            lk,
            dh,
            scale: 1.0 / (dh.max(1) as f32).sqrt(),
            causal,
        })
    }

    /// Keys visible to query `i` are `0..limit(i)`.
    fn limit(&self, i: usize) -> usize {
        if self.causal {
            (i + 1 + self.lk - self.lq).min(self.lk)
        } else {
            self.lk
        }
    }

    fn parallel(&self) -> bool {
        self.heads * self.lq * self.lk * self.dh >= PAR_WORK
    }
}

/// One head's inputs, row-major.
#[derive(Clone, Copy)]
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
}

impl<'a> Head<'a> {
    fn of(q: &'a [f32], k: &'a [f32], v: &'a [f32], d: &Dims, h: usize) -> Self {
        let (nq, nk) = (d.lq * d.dh, d.lk * d.dh);
        Self {
            q: &q[h * nq..(h + 1) * nq],
            k: &k[h * nk..(h + 1) * nk],
            v: &v[h * nk..(h + 1) * nk],
        }
    }
}

/// `s <- scale Q_t K_t^T` for the query tile at `qs` (`br` rows) and the key tile at `ks`
/// (`bc` keys), then each row `r` becomes `exp(s - shift(r))` on its visible keys and 0
/// beyond. Returns nothing; `shift` may also update per-row state (the online softmax).
fn tile_scores(
    s: &mut [f32],
    hd: Head<'_>,
    d: &Dims,
    (qs, br): (usize, usize),
    (ks, bc): (usize, usize),
) -> candle_core::Result<()> {
    let dh = d.dh;
    matmul(
        MatMut::rows(s, br, bc),
        MatRef::rows(&hd.q[qs * dh..], br, dh),
        MatRef::rows(&hd.k[ks * dh..], bc, dh).t(),
        d.scale,
        false,
    )
}

/// Forward pass for one query tile of one head: `o: [br, dh]` and `lse: [br]`.
fn forward_tile(
    hd: Head<'_>,
    d: &Dims,
    qs: usize,
    o: &mut [f32],
    lse: &mut [f32],
) -> candle_core::Result<()> {
    let (dh, br) = (d.dh, lse.len());
    let mut s = vec![0f32; br * BC];
    let mut m = vec![f32::NEG_INFINITY; br];
    let mut l = vec![0f32; br];
    o.fill(0.0);
    let kend = d.limit(qs + br - 1);
    for ks in (0..kend).step_by(BC) {
        let bc = BC.min(d.lk - ks);
        tile_scores(&mut s, hd, d, (qs, br), (ks, bc))?;
        for r in 0..br {
            let row = &mut s[r * bc..(r + 1) * bc];
            let valid = d.limit(qs + r).saturating_sub(ks).min(bc);
            let mx = row[..valid]
                .iter()
                .fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let m_new = m[r].max(mx);
            if valid == 0 || m_new == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            exp_shift(&mut row[..valid], m_new);
            row[valid..].fill(0.0);
            let sum: f32 = row[..valid].iter().sum();
            if m[r] > f32::NEG_INFINITY && m[r] != m_new {
                let alpha = (m[r] - m_new).exp();
                l[r] *= alpha;
                o[r * dh..(r + 1) * dh].iter_mut().for_each(|x| *x *= alpha);
            }
            l[r] += sum;
            m[r] = m_new;
        }
        // O_t += P V_t
        matmul(
            MatMut::rows(o, br, dh),
            MatRef::rows(&s, br, bc),
            MatRef::rows(&hd.v[ks * dh..], bc, dh),
            1.0,
            true,
        )?;
    }
    for r in 0..br {
        let inv = 1.0 / l[r];
        o[r * dh..(r + 1) * dh].iter_mut().for_each(|x| *x *= inv);
        lse[r] = m[r] + l[r].ln();
    }
    Ok(())
}

/// Forward pass of one head: `o: [Lq, dh]`, `lse: [Lq]`.
fn forward_head(
    hd: Head<'_>,
    d: &Dims,
    o: &mut [f32],
    lse: &mut [f32],
    par: bool,
) -> candle_core::Result<()> {
    let tiles = o.chunks_mut(BR * d.dh).zip(lse.chunks_mut(BR));
    if par {
        let tiles: Vec<_> = tiles.enumerate().collect();
        tiles
            .into_par_iter()
            .try_for_each(|(t, (ot, lt))| forward_tile(hd, d, t * BR, ot, lt))
    } else {
        tiles
            .enumerate()
            .try_for_each(|(t, (ot, lt))| forward_tile(hd, d, t * BR, ot, lt))
    }
}

/// Backward pass of one head: from `o, go: [Lq, dh]` and `lse: [Lq]`, the gradients
/// `gq: [Lq, dh]`, `gk, gv: [Lk, dh]` (overwritten).
#[allow(clippy::too_many_arguments)]
fn backward_head(
    hd: Head<'_>,
    d: &Dims,
    o: &[f32],
    go: &[f32],
    lse: &[f32],
    gq: &mut [f32],
    gk: &mut [f32],
    gv: &mut [f32],
) -> candle_core::Result<()> {
    let dh = d.dh;
    // D_i = sum_d dO_id O_id, [Lq]
    let dd: Vec<f32> = go
        .chunks_exact(dh.max(1))
        .zip(o.chunks_exact(dh.max(1)))
        .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
        .collect();
    gq.fill(0.0);
    gk.fill(0.0);
    gv.fill(0.0);
    let mut p = vec![0f32; BR * BC];
    let mut ds = vec![0f32; BR * BC];
    for ks in (0..d.lk).step_by(BC) {
        let bc = BC.min(d.lk - ks);
        for qs in (0..d.lq).step_by(BR) {
            let br = BR.min(d.lq - qs);
            if d.limit(qs + br - 1) <= ks {
                continue; // every key of this tile is masked for every query of it
            }
            tile_scores(&mut p, hd, d, (qs, br), (ks, bc))?;
            for r in 0..br {
                let row = &mut p[r * bc..(r + 1) * bc];
                let valid = d.limit(qs + r).saturating_sub(ks).min(bc);
                exp_shift(&mut row[..valid], lse[qs + r]);
                row[valid..].fill(0.0);
            }
            let (p_t, go_t) = (
                MatRef::rows(&p, br, bc),
                MatRef::rows(&go[qs * dh..], br, dh),
            );
            let gv_t = MatMut::rows(&mut gv[ks * dh..], bc, dh);
            matmul(gv_t, p_t.t(), go_t, 1.0, true)?; // dV_t += P^T dO_t
            let v_t = MatRef::rows(&hd.v[ks * dh..], bc, dh);
            matmul(MatMut::rows(&mut ds, br, bc), go_t, v_t.t(), 1.0, false)?; // dP
            for r in 0..br {
                let di = dd[qs + r];
                let (dsr, pr) = (&mut ds[r * bc..(r + 1) * bc], &p[r * bc..(r + 1) * bc]);
                dsr.iter_mut()
                    .zip(pr)
                    .for_each(|(x, &pv)| *x = pv * (*x - di));
            }
            let ds_t = MatRef::rows(&ds, br, bc);
            let k_t = MatRef::rows(&hd.k[ks * dh..], bc, dh);
            let gq_t = MatMut::rows(&mut gq[qs * dh..], br, dh);
            matmul(gq_t, ds_t, k_t, d.scale, true)?; // dQ_t += scale dS K_t
            let q_t = MatRef::rows(&hd.q[qs * dh..], br, dh);
            let gk_t = MatMut::rows(&mut gk[ks * dh..], bc, dh);
            matmul(gk_t, ds_t.t(), q_t, d.scale, true)?; // dK_t += scale dS^T Q_t
        }
    }
    Ok(())
}

/// The attention custom op; the forward pass saves the per-row log-sum-exp when `save`.
pub(crate) struct FlashAttention {
    causal: bool,
    save: bool,
    /// `lse: [B H Lq]` from the forward pass.
    lse: Mutex<Option<Vec<f32>>>,
}

impl FlashAttention {
    pub(crate) fn new(causal: bool, save: bool) -> Self {
        Self {
            causal,
            save,
            lse: Mutex::new(None),
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
        let d = Dims::new(ql, kl, vl, self.causal)?;
        let q = f32_slice(qs, ql, "attention q")?;
        let k = f32_slice(ks, kl, "attention k")?;
        let v = f32_slice(vs, vl, "attention v")?;
        let mut o = vec![0f32; d.heads * d.lq * d.dh];
        let mut lse = vec![0f32; d.heads * d.lq];
        if !o.is_empty() {
            let heads = o.chunks_mut(d.lq * d.dh).zip(lse.chunks_mut(d.lq));
            if d.parallel() {
                let heads: Vec<_> = heads.enumerate().collect();
                heads.into_par_iter().try_for_each(|(h, (oh, lh))| {
                    forward_head(Head::of(q, k, v, &d, h), &d, oh, lh, true)
                })?;
            } else {
                heads.enumerate().try_for_each(|(h, (oh, lh))| {
                    forward_head(Head::of(q, k, v, &d, h), &d, oh, lh, false)
                })?;
            }
        }
        if self.save {
            match self.lse.lock() {
                Ok(mut g) => *g = Some(lse),
                Err(_) => bail!("{}: saved-lse lock poisoned", self.name()),
            }
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
        let guard = match self.lse.lock() {
            Ok(g) => g,
            Err(_) => bail!("{}: saved-lse lock poisoned", self.name()),
        };
        let Some(lse) = guard.as_deref() else {
            bail!("{}: backward without a saved forward pass", self.name())
        };
        let grad = grad.contiguous()?;
        let op = FlashAttentionBackward {
            causal: self.causal,
            o: res,
            go: &grad,
            lse,
        };
        let all = q.apply_op3_no_bwd(k, v, &op)?; // [dq | dk | dv], flat
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = all.narrow(0, 0, nq)?.reshape(q.shape())?;
        let dk = all.narrow(0, nq, nk)?.reshape(k.shape())?;
        let dv = all.narrow(0, nq + nk, nk)?.reshape(v.shape())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// One head's index and its `(dq, dk)` and `dv` output slices.
type HeadGrads<'a> = (usize, ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]));

/// The backward pass as an op on `(q, k, v)`, returning `dq`, `dk`, `dv` one after the other
/// in one flat buffer.
struct FlashAttentionBackward<'a> {
    causal: bool,
    o: &'a Tensor,
    go: &'a Tensor,
    lse: &'a [f32],
}

impl CustomOp3 for FlashAttentionBackward<'_> {
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
        let d = Dims::new(ql, kl, vl, self.causal)?;
        let q = f32_slice(qs, ql, "attention q")?;
        let k = f32_slice(ks, kl, "attention k")?;
        let v = f32_slice(vs, vl, "attention v")?;
        let (nq, nk) = (d.heads * d.lq * d.dh, d.heads * d.lk * d.dh);
        if self.lse.len() != d.heads * d.lq || self.o.elem_count() != nq {
            bail!("{}: saved state does not match the inputs", self.name())
        }
        let mut out = vec![0f32; nq + 2 * nk];
        with_f32(self.o, "attention output", |o| {
            with_f32(self.go, "attention output gradient", |go| {
                if nq == 0 || nk == 0 {
                    return Ok(());
                }
                let (gq, rest) = out.split_at_mut(nq);
                let (gk, gv) = rest.split_at_mut(nk);
                let (sq, sk) = (d.lq * d.dh, d.lk * d.dh);
                let heads = gq
                    .chunks_mut(sq)
                    .zip(gk.chunks_mut(sk))
                    .zip(gv.chunks_mut(sk))
                    .enumerate();
                let run = |(h, ((gqh, gkh), gvh)): HeadGrads<'_>| {
                    let (oh, goh) = (&o[h * sq..(h + 1) * sq], &go[h * sq..(h + 1) * sq]);
                    let lh = &self.lse[h * d.lq..(h + 1) * d.lq];
                    backward_head(Head::of(q, k, v, &d, h), &d, oh, goh, lh, gqh, gkh, gvh)
                };
                if d.parallel() {
                    heads.collect::<Vec<_>>().into_par_iter().try_for_each(run)
                } else {
                    heads.into_iter().try_for_each(run)
                }
            })
        })?;
        Ok((CpuStorage::F32(out), Shape::from(nq + 2 * nk)))
    }
}
