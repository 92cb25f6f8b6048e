//! Per-row cross-entropy `w_i (log sum_j exp(z_ij) - z_{i,t_i})` as one custom op with its own
//! backward pass (CPU, f32), for `logits z: [N, V]`, `targets t: [N]` (u32) and per-row
//! weights `w: [N]`.
//!
//! A row whose weight is 0 or whose target is [`IGNORE_INDEX`] gives loss 0 and no gradient.
//! The forward pass saves the per-row log-sum-exp and the unweighted loss (`[N]` each, never the
//! `[N, V]` probabilities); the backward pass recomputes the softmax from the logits:
//! `dz_i = dy_i w_i (softmax(z_i) - onehot(t_i))`, `dw_i = dy_i ce_i`.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{exp_shift, PAR_MIN};
use super::linear::f32_slice;

/// A target equal to this marks a row to be ignored (loss 0, no gradient).
pub const IGNORE_INDEX: u32 = u32::MAX;

/// Rows per parallel block for rows of `v` logits.
fn rows_per_block(v: usize) -> usize {
    ((1 << 14) / v.max(1)).max(1)
}

/// The u32 targets under layout `l`.
fn targets<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [u32]> {
    let CpuStorage::U32(t) = s else {
        bail!("cross-entropy: targets must be u32, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&t[a..b]),
        None => bail!("cross-entropy: the targets are not contiguous"),
    }
}

/// Checks `logits: [N, V]`, `targets: [N]`, `weights: [N]`; returns `(N, V)`.
fn dims(zl: &Layout, tl: &Layout, wl: &Layout) -> candle_core::Result<(usize, usize)> {
    let (n, v) = zl.shape().dims2()?;
    if tl.dims() != [n] || wl.dims() != [n] {
        bail!(
            "cross-entropy: logits {:?} need targets and weights [{n}], got {:?} and {:?}",
            zl.dims(),
            tl.dims(),
            wl.dims()
        )
    }
    Ok((n, v))
}

/// The op; `save` keeps the log-sum-exp and unweighted losses for the backward pass.
pub(crate) struct CrossEntropy {
    save: bool,
    /// `(lse, ce)`, each `[N]`.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CrossEntropy {
    pub(crate) fn new(save: bool) -> Self {
        Self {
            save,
            saved: Mutex::new(None),
        }
    }
}

/// Loss, log-sum-exp and unweighted loss of one block of rows (`scratch`: `V` floats).
fn forward_block(
    z: &[f32],
    t: &[u32],
    w: &[f32],
    v: usize,
    out: (&mut [f32], &mut [f32], &mut [f32]),
) -> candle_core::Result<()> {
    let (loss, lse, ce) = out;
    let mut e = vec![0f32; v];
    for (i, zr) in z.chunks_exact(v).enumerate() {
        if t[i] == IGNORE_INDEX {
            (loss[i], lse[i], ce[i]) = (0.0, 0.0, 0.0);
            continue;
        }
        let ti = t[i] as usize;
        if ti >= v {
            bail!("cross-entropy: target {ti} out of range for {v} classes")
        }
        let m = zr.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        e.copy_from_slice(zr);
        exp_shift(&mut e, m);
        let l = m + e.iter().sum::<f32>().ln();
        lse[i] = l;
        ce[i] = l - zr[ti];
        loss[i] = if w[i] == 0.0 { 0.0 } else { w[i] * ce[i] };
    }
    Ok(())
}

impl CustomOp3 for CrossEntropy {
    fn name(&self) -> &'static str {
        "elbo-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = dims(zl, tl, wl)?;
        let z = f32_slice(zs, zl, "cross-entropy logits")?;
        let t = targets(ts, tl)?;
        let w = f32_slice(ws, wl, "cross-entropy weights")?;
        if v == 0 && t.iter().any(|&ti| ti != IGNORE_INDEX) {
            bail!("cross-entropy: no classes (logits {:?})", zl.dims())
        }
        let (mut loss, mut lse, mut ce) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        if v > 0 {
            let rb = rows_per_block(v);
            if z.len() >= PAR_MIN {
                z.par_chunks(rb * v)
                    .zip(t.par_chunks(rb).zip(w.par_chunks(rb)))
                    .zip(loss.par_chunks_mut(rb))
                    .zip(lse.par_chunks_mut(rb).zip(ce.par_chunks_mut(rb)))
                    .try_for_each(|(((zc, (tc, wc)), lc), (sc, cc))| {
                        forward_block(zc, tc, wc, v, (lc, sc, cc))
                    })?;
            } else {
                forward_block(z, t, w, v, (&mut loss, &mut lse, &mut ce))?;
            }
        }
        if self.save {
            match self.saved.lock() {
                Ok(mut g) => *g = Some((lse, ce)),
                Err(_) => bail!("{}: saved-state lock poisoned", self.name()),
            }
        }
        Ok((CpuStorage::F32(loss), Shape::from(n)))
    }

    fn bwd(
        &self,
        z: &Tensor,
        t: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = match self.saved.lock() {
            Ok(g) => g,
            Err(_) => bail!("{}: saved-state lock poisoned", self.name()),
        };
        let Some((lse, ce)) = guard.as_ref() else {
            bail!("{}: backward without a saved forward pass", self.name())
        };
        let g = grad.flatten_all()?.to_vec1::<f32>()?; // [N]
        let op = CrossEntropyBackward { g: &g, lse, ce };
        let all = z.apply_op3_no_bwd(t, w, &op)?; // [dz | dw], flat
        let nz = z.elem_count();
        let dz = all.narrow(0, 0, nz)?.reshape(z.shape())?;
        let dw = all.narrow(0, nz, g.len())?;
        Ok((z.track_op().then_some(dz), None, w.track_op().then_some(dw)))
    }
}

/// The backward pass as an op on `(logits, targets, weights)`, returning `dz` and `dw` one
/// after the other in one flat buffer.
struct CrossEntropyBackward<'a> {
    g: &'a [f32],
    lse: &'a [f32],
    ce: &'a [f32],
}

impl CustomOp3 for CrossEntropyBackward<'_> {
    fn name(&self) -> &'static str {
        "elbo-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        zs: &CpuStorage,
        zl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = dims(zl, tl, wl)?;
        let z = f32_slice(zs, zl, "cross-entropy logits")?;
        let t = targets(ts, tl)?;
        let w = f32_slice(ws, wl, "cross-entropy weights")?;
        if [self.g.len(), self.lse.len(), self.ce.len()] != [n; 3] {
            bail!("{}: saved state does not match the inputs", self.name())
        }
        let mut out = vec![0f32; n * v + n];
        let (dz, dw) = out.split_at_mut(n * v);
        for (i, d) in dw.iter_mut().enumerate() {
            *d = if t[i] == IGNORE_INDEX {
                0.0
            } else {
                self.g[i] * self.ce[i]
            };
        }
        if v > 0 {
            let rb = rows_per_block(v);
            let block = |i0: usize, zc: &[f32], dc: &mut [f32]| {
                for (r, (zr, dr)) in zc.chunks_exact(v).zip(dc.chunks_exact_mut(v)).enumerate() {
                    let i = i0 + r;
                    let coef = self.g[i] * w[i];
                    if t[i] == IGNORE_INDEX || w[i] == 0.0 || coef == 0.0 {
                        continue; // stays 0
                    }
                    dr.copy_from_slice(zr);
                    exp_shift(dr, self.lse[i]);
                    dr.iter_mut().for_each(|x| *x *= coef);
                    if let Some(x) = dr.get_mut(t[i] as usize) {
                        *x -= coef;
                    }
                }
            };
            if z.len() >= PAR_MIN {
                z.par_chunks(rb * v)
                    .zip(dz.par_chunks_mut(rb * v))
                    .enumerate()
                    .for_each(|(c, (zc, dc))| block(c * rb, zc, dc));
            } else {
                block(0, z, dz);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n * v + n)))
    }
}
