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
//! The mask is an [`AttentionMask`]: for each query its visible keys are at most two ranges, so
//! a key tile that no query of a query tile sees is skipped (causal, block-causal and block
//! diffusion's two-copy mask leave about half the tiles out). Causal masks are aligned
//! bottom-right: query `i` sees keys `j <= i + Lk - Lq` (the usual convention when `Lq < Lk`
//! holds cached keys), which is `j <= i` when `Lq = Lk`. Work is split
//! over `B H` heads (and the query tiles of each head in the forward pass) on rayon's pool when
//! large enough; every tile's arithmetic is fixed by the sizes, so results do not depend on the
//! number of threads. The tile products run against each head's operands packed once
//! ([`super::panels`]).
//!
//! Two layouts: split `q, k, v: [B, H, L, dh]` tensors, or one packed `qkv: [B, L, 3, H, dh]`
//! tensor (the output of a fused QKV projection) with output `[B, L, H, dh]`, read and written
//! in place through row strides so that no head permutation is ever copied. The custom ops
//! around these kernels are in [`super::attention_op`].

use candle_core::bail;
use rayon::prelude::*;

use super::kernels::{exp_shift, exp_shift_sum, row_max};
use super::panels::{matmul_panels, Panels};
use super::tile::{MatMut, MatRef};
use crate::nn::attention_mask::AttentionMask;

/// Query rows per tile.
const BR: usize = 64;
/// Keys per tile.
const BC: usize = 64;
/// Heads x Lq x Lk x dh below which everything runs on the calling thread.
const PAR_WORK: usize = 1 << 20;

/// Where the heads live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Packing {
    /// `q: [B H, Lq, dh]`, `k, v: [B H, Lk, dh]` and the output `[B H, Lq, dh]`, contiguous.
    Split,
    /// One `qkv: [B, L, 3, h, dh]` buffer and the output `[B, L, h, dh]`.
    Packed { h: usize },
}

/// The problem sizes and layout shared by the forward and backward passes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    /// `B H`.
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    pub dh: usize,
    pub scale: f32,
    pub mask: AttentionMask,
    pub packing: Packing,
}

impl Dims {
    /// Checks and completes the sizes (`scale = 1 / sqrt(dh)`).
    pub fn new(
        heads: usize,
        (lq, lk, dh): (usize, usize, usize),
        mask: AttentionMask,
        packing: Packing,
    ) -> candle_core::Result<Self> {
        if lq > 0 && lk == 0 {
            bail!("attention: {lq} queries but no keys")
        }
        if let Err(e) = mask.check(lq, lk) {
            bail!("{e}")
        }
        Ok(Self {
            heads,
            lq,
            lk,
            dh,
            scale: 1.0 / (dh.max(1) as f32).sqrt(),
            mask,
            packing,
        })
    }

    /// The keys query `i` sees within the key tile `ks..ks + bc`, as two sorted ranges of
    /// column indices of the tile (possibly empty).
    fn segments(&self, i: usize, ks: usize, bc: usize) -> [(usize, usize); 2] {
        self.mask.visible(i, self.lq, self.lk).map(|r| {
            let lo = r.start.clamp(ks, ks + bc) - ks;
            let hi = r.end.clamp(ks, ks + bc) - ks;
            (lo, hi.max(lo))
        })
    }

    /// Whether some query of `qs..qs + br` sees some key of `ks..ks + bc`.
    fn tile_visible(&self, (qs, br): (usize, usize), (ks, bc): (usize, usize)) -> bool {
        self.mask == AttentionMask::Full
            || (qs..qs + br).any(|i| self.segments(i, ks, bc).iter().any(|(a, b)| a < b))
    }

    fn parallel(&self) -> bool {
        self.heads * self.lq * self.lk * self.dh >= PAR_WORK
    }

    /// Elements of the output (and of `q`).
    pub fn q_len(&self) -> usize {
        self.heads * self.lq * self.dh
    }

    /// Elements of `k` (and of `v`).
    pub fn k_len(&self) -> usize {
        self.heads * self.lk * self.dh
    }

    /// Offsets of head `i`'s first query, key and value rows in their buffers, and the row
    /// stride of the three.
    fn qkv_at(&self, i: usize) -> ([usize; 3], usize) {
        let dh = self.dh;
        match self.packing {
            Packing::Split => ([i * self.lq * dh, i * self.lk * dh, i * self.lk * dh], dh),
            Packing::Packed { h } => {
                let d = h * dh;
                let base = (i / h) * self.lq * 3 * d + (i % h) * dh;
                ([base, base + d, base + 2 * d], 3 * d)
            }
        }
    }

    /// Offset of head `i`'s first output row, and the output row stride.
    fn o_at(&self, i: usize) -> (usize, usize) {
        let dh = self.dh;
        match self.packing {
            Packing::Split => (i * self.lq * dh, dh),
            Packing::Packed { h } => ((i / h) * self.lq * h * dh + (i % h) * dh, h * dh),
        }
    }
}

/// One head's inputs: rows at stride `rs` from the start of each slice.
#[derive(Clone, Copy)]
struct Head<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    rs: usize,
}

impl<'a> Head<'a> {
    /// Head `i` of the buffers (the same buffer three times when packed).
    fn of(src: [&'a [f32]; 3], d: &Dims, i: usize) -> Self {
        let ([oq, ok, ov], rs) = d.qkv_at(i);
        Self {
            q: &src[0][oq..],
            k: &src[1][ok..],
            v: &src[2][ov..],
            rs,
        }
    }

    /// Rows `start..start + n` of `x` (one of `self.q`, `self.k`, `self.v`).
    fn rows(&self, x: &'a [f32], start: usize, n: usize, dh: usize) -> MatRef<'a> {
        MatRef::strided(&x[start * self.rs..], n, dh, self.rs)
    }
}

/// `s <- scale Q_t K_t^T` (`[br, bc]`) for the query tile at `qs` (`br` rows) and the key tile
/// at `ks` (`bc` keys), with `kt` the head's `scale K^T` packed.
fn tile_scores(
    s: &mut [f32],
    hd: Head<'_>,
    d: &Dims,
    kt: &Panels,
    (qs, br): (usize, usize),
    (ks, bc): (usize, usize),
) -> candle_core::Result<()> {
    let q = hd.rows(hd.q, qs, br, d.dh);
    matmul_panels(MatMut::rows(s, br, bc), q, kt, (0, ks), false)
}

/// One head's right-hand operands, packed once and shared by all its tiles.
#[derive(Default)]
struct HeadPanels {
    /// `scale K^T`: `[dh, Lk]`.
    kt: Panels,
    /// `V`: `[Lk, dh]` (forward) or `V^T`: `[dh, Lk]` (backward).
    v: Panels,
    /// Backward only: `scale K`, `scale Q` and `dO`.
    k: Panels,
    q: Panels,
    go: Panels,
}

/// Forward pass for one query tile of one head (Dao et al. 2022, Algorithm 1, lines 6-13):
/// `o: [br, dh]` and `lse: [br]`.
fn forward_tile(
    hd: Head<'_>,
    d: &Dims,
    pk: &HeadPanels,
    qs: usize,
    o: &mut [f32],
    lse: &mut [f32],
) -> candle_core::Result<()> {
    let (dh, br) = (d.dh, lse.len());
    let mut s = vec![0f32; br * BC];
    let mut m = vec![f32::NEG_INFINITY; br];
    let mut l = vec![0f32; br];
    o.fill(0.0);
    for ks in (0..d.lk).step_by(BC) {
        let bc = BC.min(d.lk - ks);
        if !d.tile_visible((qs, br), (ks, bc)) {
            continue; // every key of this tile is masked for every query of it
        }
        tile_scores(&mut s, hd, d, &pk.kt, (qs, br), (ks, bc))?;
        for r in 0..br {
            let row = &mut s[r * bc..(r + 1) * bc];
            let segs = d.segments(qs + r, ks, bc);
            let mx = segs
                .iter()
                .filter(|(a, b)| a < b)
                .map(|&(a, b)| row_max(&row[a..b]))
                .fold(f32::NEG_INFINITY, f32::max);
            let m_new = m[r].max(mx);
            if mx == f32::NEG_INFINITY || m_new == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            // online softmax: P = exp(S - m_new) on the visible keys, 0 elsewhere; rescale the
            // running sum and output
            let sum = exp_masked(row, &segs, |x| exp_shift_sum(x, m_new));
            if m[r] > f32::NEG_INFINITY && m[r] != m_new {
                let alpha = (m[r] - m_new).exp();
                l[r] *= alpha;
                o[r * dh..(r + 1) * dh].iter_mut().for_each(|x| *x *= alpha);
            }
            l[r] += sum;
            m[r] = m_new;
        }
        matmul_panels(
            MatMut::rows(o, br, dh),
            MatRef::rows(&s, br, bc),
            &pk.v,
            (ks, 0),
            true,
        )?; // O += P V
    }
    for r in 0..br {
        let inv = if l[r] > 0.0 { 1.0 / l[r] } else { 0.0 }; // a query that sees no key: 0
        o[r * dh..(r + 1) * dh].iter_mut().for_each(|x| *x *= inv);
        lse[r] = m[r] + l[r].ln();
    }
    Ok(())
}

/// Applies `f` to the visible segments of `row` (sorted, disjoint), zeroes the rest, and
/// returns the sum of `f`'s results.
fn exp_masked(
    row: &mut [f32],
    segs: &[(usize, usize); 2],
    mut f: impl FnMut(&mut [f32]) -> f32,
) -> f32 {
    let mut at = 0;
    let mut sum = 0.0;
    for &(a, b) in segs {
        if a < b {
            row[at..a].fill(0.0);
            sum += f(&mut row[a..b]);
            at = b;
        }
    }
    row[at..].fill(0.0);
    sum
}

/// Forward pass of one head into `o: [Lq, dh]` (contiguous) and `lse: [Lq]`.
fn forward_head(
    hd: Head<'_>,
    d: &Dims,
    o: &mut [f32],
    lse: &mut [f32],
    par: bool,
) -> candle_core::Result<()> {
    let mut pk = HeadPanels::default();
    pk.kt.pack(hd.rows(hd.k, 0, d.lk, d.dh).t(), d.scale)?;
    pk.v.pack(hd.rows(hd.v, 0, d.lk, d.dh), 1.0)?;
    let pk = &pk;
    let tiles = o.chunks_mut(BR * d.dh).zip(lse.chunks_mut(BR));
    if par {
        let tiles: Vec<_> = tiles.enumerate().collect();
        tiles
            .into_par_iter()
            .try_for_each(|(t, (ot, lt))| forward_tile(hd, d, pk, t * BR, ot, lt))
    } else {
        tiles
            .enumerate()
            .try_for_each(|(t, (ot, lt))| forward_tile(hd, d, pk, t * BR, ot, lt))
    }
}

/// The forward pass over all heads: the output `[B H, Lq, dh]` (head-major, whatever the
/// packing) and `lse: [B H, Lq]`. `src` holds `q`, `k`, `v` (the packed buffer three times).
pub(crate) fn forward(src: [&[f32]; 3], d: &Dims) -> candle_core::Result<(Vec<f32>, Vec<f32>)> {
    let mut o = vec![0f32; d.q_len()];
    let mut lse = vec![0f32; d.heads * d.lq];
    if o.is_empty() {
        return Ok((o, lse));
    }
    let heads = o.chunks_mut(d.lq * d.dh).zip(lse.chunks_mut(d.lq));
    if d.parallel() {
        let heads: Vec<_> = heads.enumerate().collect();
        heads
            .into_par_iter()
            .try_for_each(|(i, (oh, lh))| forward_head(Head::of(src, d, i), d, oh, lh, true))?;
    } else {
        heads
            .enumerate()
            .try_for_each(|(i, (oh, lh))| forward_head(Head::of(src, d, i), d, oh, lh, false))?;
    }
    Ok((o, lse))
}

/// Head-major `[B H, L, dh]` rows into their places in `dst` (`[B, L, 3, h, dh]` at `slot`
/// 0, 1, 2 when `qkv`, else `[B, L, h, dh]`); the identity layout when split.
pub(crate) fn scatter(src: &[f32], d: &Dims, l: usize, slot: usize, qkv: bool, dst: &mut [f32]) {
    let Packing::Packed { h } = d.packing else {
        dst[..src.len()].copy_from_slice(src);
        return;
    };
    let dh = d.dh;
    let width = if qkv { 3 * h * dh } else { h * dh };
    for (i, head) in src.chunks_exact((l * dh).max(1)).enumerate() {
        let base = (i / h) * l * width + slot * h * dh + (i % h) * dh;
        for (r, row) in head.chunks_exact(dh.max(1)).enumerate() {
            let at = base + r * width;
            dst[at..at + dh].copy_from_slice(row);
        }
    }
}

/// The backward pass of one head (Dao et al. 2022, Algorithm 4 without dropout): from the
/// output `o` and its gradient `go` (rows at stride `ors`) and `lse: [Lq]`, the gradients
/// `gq: [Lq, dh]`, `gk, gv: [Lk, dh]` (contiguous, overwritten).
#[allow(clippy::too_many_arguments)]
fn backward_head(
    hd: Head<'_>,
    d: &Dims,
    (o, go, ors): (&[f32], &[f32], usize),
    lse: &[f32],
    gq: &mut [f32],
    gk: &mut [f32],
    gv: &mut [f32],
) -> candle_core::Result<()> {
    let dh = d.dh;
    // D_i = sum_d dO_id O_id, [Lq]
    let dd: Vec<f32> = (0..d.lq)
        .map(|i| {
            let (a, b) = (&go[i * ors..i * ors + dh], &o[i * ors..i * ors + dh]);
            a.iter().zip(b).map(|(x, y)| x * y).sum()
        })
        .collect();
    gq.fill(0.0);
    gk.fill(0.0);
    gv.fill(0.0);
    let mut pk = HeadPanels::default();
    pk.kt.pack(hd.rows(hd.k, 0, d.lk, dh).t(), d.scale)?;
    pk.v.pack(hd.rows(hd.v, 0, d.lk, dh).t(), 1.0)?;
    pk.k.pack(hd.rows(hd.k, 0, d.lk, dh), d.scale)?;
    pk.q.pack(hd.rows(hd.q, 0, d.lq, dh), d.scale)?;
    pk.go.pack(MatRef::strided(go, d.lq, dh, ors), 1.0)?;
    let mut p = vec![0f32; BR * BC];
    let mut ds = vec![0f32; BR * BC];
    for ks in (0..d.lk).step_by(BC) {
        let bc = BC.min(d.lk - ks);
        for qs in (0..d.lq).step_by(BR) {
            let br = BR.min(d.lq - qs);
            if !d.tile_visible((qs, br), (ks, bc)) {
                continue; // every key of this tile is masked for every query of it
            }
            tile_scores(&mut p, hd, d, &pk.kt, (qs, br), (ks, bc))?;
            for r in 0..br {
                let row = &mut p[r * bc..(r + 1) * bc];
                let segs = d.segments(qs + r, ks, bc);
                let shift = lse[qs + r];
                exp_masked(row, &segs, |x| {
                    exp_shift(x, shift);
                    0.0
                });
            }
            let p_t = MatRef::rows(&p, br, bc);
            let gv_t = MatMut::rows(&mut gv[ks * dh..], bc, dh);
            matmul_panels(gv_t, p_t.t(), &pk.go, (qs, 0), true)?; // dV_t += P^T dO_t
            let go_t = MatRef::strided(&go[qs * ors..], br, dh, ors);
            let ds_m = MatMut::rows(&mut ds, br, bc);
            matmul_panels(ds_m, go_t, &pk.v, (0, ks), false)?; // dP = dO_t V_t^T
            for r in 0..br {
                let di = dd[qs + r];
                let (dsr, pr) = (&mut ds[r * bc..(r + 1) * bc], &p[r * bc..(r + 1) * bc]);
                dsr.iter_mut()
                    .zip(pr)
                    .for_each(|(x, &pv)| *x = pv * (*x - di)); // dS = P (dP - D)
            }
            let ds_t = MatRef::rows(&ds, br, bc);
            let gq_t = MatMut::rows(&mut gq[qs * dh..], br, dh);
            matmul_panels(gq_t, ds_t, &pk.k, (ks, 0), true)?; // dQ_t += dS scale K_t
            let gk_t = MatMut::rows(&mut gk[ks * dh..], bc, dh);
            matmul_panels(gk_t, ds_t.t(), &pk.q, (qs, 0), true)?; // dK_t += dS^T scale Q_t
        }
    }
    Ok(())
}

/// One head's index and its `dq`, `dk` and `dv` output slices.
type HeadGrads<'a> = (usize, ((&'a mut [f32], &'a mut [f32]), &'a mut [f32]));

/// The backward pass over all heads into head-major `gq: [B H, Lq, dh]` and
/// `gk, gv: [B H, Lk, dh]`. `o`, `go` are laid out as the forward output (see [`Packing`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    src: [&[f32]; 3],
    d: &Dims,
    o: &[f32],
    go: &[f32],
    lse: &[f32],
    gq: &mut [f32],
    gk: &mut [f32],
    gv: &mut [f32],
) -> candle_core::Result<()> {
    if d.q_len() == 0 || d.k_len() == 0 {
        return Ok(());
    }
    let (sq, sk) = (d.lq * d.dh, d.lk * d.dh);
    let heads = gq
        .chunks_mut(sq)
        .zip(gk.chunks_mut(sk))
        .zip(gv.chunks_mut(sk))
        .enumerate();
    let run = |(i, ((gqh, gkh), gvh)): HeadGrads<'_>| {
        let (oo, ors) = d.o_at(i);
        let lh = &lse[i * d.lq..(i + 1) * d.lq];
        let out = (&o[oo..], &go[oo..], ors);
        backward_head(Head::of(src, d, i), d, out, lh, gqh, gkh, gvh)
    };
    if d.parallel() {
        heads.collect::<Vec<_>>().into_par_iter().try_for_each(run)
    } else {
        heads.into_iter().try_for_each(run)
    }
}
