//! Layer normalisation (Ba et al. 2016) over the last dimension as one custom op with its own
//! backward pass (CPU, f32): `y = (x - mu) rstd * w + b` with `rstd = 1 / sqrt(var + eps)` and
//! the biased variance, as `torch.nn.LayerNorm`.
//!
//! Forward: one pass per row for the mean, one for the variance of the centred values (the
//! composed reference's order of operations), one for the output; the per-row `mu` and `rstd`
//! are saved. Backward, with `xhat = (x - mu) rstd` and `gh = dy * w`:
//! `dx = rstd (gh - mean(gh) - xhat mean(gh xhat))`, `dw = sum_rows dy xhat`, `db = sum_rows dy`.
//! Rows are split over rayon's pool in blocks fixed by the sizes; the column sums are added block
//! by block in order, so results do not depend on the thread count.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::PAR_MIN;
use super::linear::f32_slice;

/// Elements per parallel block of rows.
const CHUNK: usize = 1 << 14;

/// Rows per parallel block for rows of `d` elements.
fn rows_per_block(d: usize) -> usize {
    (CHUNK / d.max(1)).max(1)
}

/// `[N, D]` from a layout `[..., D]` (a rank-0 tensor is refused).
fn rows_cols(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let Some(&d) = l.dims().last() else {
        bail!("layer norm: the input must have at least one dimension")
    };
    Ok((l.shape().elem_count() / d.max(1), d))
}

/// The op; `save` keeps `mu` and `rstd` for the backward pass.
pub(crate) struct LayerNormOp {
    eps: f32,
    save: bool,
    /// `(mu, rstd)`, each `[N]`.
    stats: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl LayerNormOp {
    pub(crate) fn new(eps: f32, save: bool) -> Self {
        Self {
            eps,
            save,
            stats: Mutex::new(None),
        }
    }
}

/// Normalises the rows of `x` into `y` (both `[rows, w.len()]`), writing `mu` and `rstd`.
fn forward_block(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    y: &mut [f32],
    mu: &mut [f32],
    rstd: &mut [f32],
) {
    let d = w.len();
    let inv_d = 1.0 / d as f32;
    let rows = x.chunks_exact(d).zip(y.chunks_exact_mut(d));
    for ((xr, yr), (m, r)) in rows.zip(mu.iter_mut().zip(rstd.iter_mut())) {
        let mean = xr.iter().sum::<f32>() * inv_d;
        let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() * inv_d;
        let rs = 1.0 / (var + eps).sqrt();
        for (((yv, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
            *yv = (xv - mean) * rs * wv + bv;
        }
        *m = mean;
        *r = rs;
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "elbo-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = rows_cols(xl)?;
        if wl.dims() != [d] || bl.dims() != [d] {
            bail!(
                "layer norm: x {:?} needs weight and bias [{d}], got {:?} and {:?}",
                xl.dims(),
                wl.dims(),
                bl.dims()
            )
        }
        let x = f32_slice(xs, xl, "layer norm input")?;
        let w = f32_slice(ws, wl, "layer norm weight")?;
        let b = f32_slice(bs, bl, "layer norm bias")?;
        let mut y = vec![0f32; n * d];
        let (mut mu, mut rstd) = (vec![0f32; n], vec![0f32; n]);
        if d > 0 {
            let rb = rows_per_block(d);
            if x.len() >= PAR_MIN {
                x.par_chunks(rb * d)
                    .zip(y.par_chunks_mut(rb * d))
                    .zip(mu.par_chunks_mut(rb).zip(rstd.par_chunks_mut(rb)))
                    .for_each(|((xc, yc), (mc, rc))| forward_block(xc, w, b, self.eps, yc, mc, rc));
            } else {
                forward_block(x, w, b, self.eps, &mut y, &mut mu, &mut rstd);
            }
        }
        if self.save {
            match self.stats.lock() {
                Ok(mut g) => *g = Some((mu, rstd)),
                Err(_) => bail!("{}: saved-statistics lock poisoned", self.name()),
            }
        }
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let guard = match self.stats.lock() {
            Ok(g) => g,
            Err(_) => bail!("{}: saved-statistics lock poisoned", self.name()),
        };
        let Some((mu, rstd)) = guard.as_ref() else {
            bail!("{}: backward without a saved forward pass", self.name())
        };
        let grad = grad.contiguous()?;
        let op = LayerNormBackward { mu, rstd };
        let all = x.apply_op3_no_bwd(w, &grad, &op)?; // [dx | dw | db], flat
        let (nx, d) = (x.elem_count(), w.elem_count());
        let dx = all.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = all.narrow(0, nx, d)?;
        let db = all.narrow(0, nx + d, d)?;
        Ok((
            x.track_op().then_some(dx),
            w.track_op().then_some(dw),
            b.track_op().then_some(db),
        ))
    }
}

/// The backward pass as an op on `(x, w, dy)`, returning `dx`, `dw`, `db` one after the other
/// in one flat buffer.
struct LayerNormBackward<'a> {
    mu: &'a [f32],
    rstd: &'a [f32],
}

/// `dx` for the rows of a block, and that block's contributions to `dw` and `db` (returned as
/// `[dw | db]`).
fn backward_block(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    mu: &[f32],
    rstd: &[f32],
    dx: &mut [f32],
) -> Vec<f32> {
    let d = w.len();
    let inv_d = 1.0 / d as f32;
    let mut acc = vec![0f32; 2 * d];
    let (dw, db) = acc.split_at_mut(d);
    let mut xhat = vec![0f32; d];
    let rows = x
        .chunks_exact(d)
        .zip(g.chunks_exact(d))
        .zip(dx.chunks_exact_mut(d));
    for (((xr, gr), dxr), (&m, &rs)) in rows.zip(mu.iter().zip(rstd)) {
        let (mut a, mut c) = (0f32, 0f32);
        for (((xh, &xv), &gv), &wv) in xhat.iter_mut().zip(xr).zip(gr).zip(w) {
            *xh = (xv - m) * rs;
            let gh = gv * wv;
            a += gh;
            c += gh * *xh;
        }
        let (a, c) = (a * inv_d, c * inv_d);
        for ((((dv, &xh), &gv), &wv), (dwv, dbv)) in dxr
            .iter_mut()
            .zip(&xhat)
            .zip(gr)
            .zip(w)
            .zip(dw.iter_mut().zip(db.iter_mut()))
        {
            *dv = rs * (gv * wv - a - xh * c);
            *dwv += gv * xh;
            *dbv += gv;
        }
    }
    acc
}

impl CustomOp3 for LayerNormBackward<'_> {
    fn name(&self) -> &'static str {
        "elbo-layer-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, d) = rows_cols(xl)?;
        let x = f32_slice(xs, xl, "layer norm input")?;
        let w = f32_slice(ws, wl, "layer norm weight")?;
        let g = f32_slice(gs, gl, "layer norm output gradient")?;
        if g.len() != x.len() || w.len() != d || self.mu.len() != n || self.rstd.len() != n {
            bail!("{}: saved state does not match the inputs", self.name())
        }
        let mut out = vec![0f32; n * d + 2 * d];
        if d > 0 {
            let (dx, rest) = out.split_at_mut(n * d);
            let rb = rows_per_block(d);
            let partials: Vec<Vec<f32>> = if x.len() >= PAR_MIN {
                x.par_chunks(rb * d)
                    .zip(g.par_chunks(rb * d))
                    .zip(dx.par_chunks_mut(rb * d))
                    .zip(self.mu.par_chunks(rb).zip(self.rstd.par_chunks(rb)))
                    .map(|(((xc, gc), dc), (mc, rc))| backward_block(xc, gc, w, mc, rc, dc))
                    .collect()
            } else {
                vec![backward_block(x, g, w, self.mu, self.rstd, dx)]
            };
            for p in &partials {
                rest.iter_mut().zip(p).for_each(|(s, &v)| *s += v);
            }
        }
        Ok((CpuStorage::F32(out), Shape::from(n * d + 2 * d)))
    }
}
