//! Softmax and log-softmax over the last dimension as custom ops with their own backward
//! passes (CPU, f32).
//!
//! Forward, per row: `m = max x`, `e = exp(x - m)`, `s = sum e`; softmax `y = e / s`,
//! log-softmax `y = x - m - log s`. The backward passes need only the output:
//! softmax `dx = y (dy - sum(dy y))`, log-softmax `dx = dy - exp(y) sum(dy)`.
//! Rows are split over rayon's pool in blocks fixed by the sizes.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::kernels::{exp_shift, PAR_MIN};
use super::linear::f32_slice;

/// Elements per parallel block of rows.
const CHUNK: usize = 1 << 14;

/// Applies `f` to matching blocks of whole rows of `a` and `out` (rows of `d` elements), in
/// parallel when large.
fn by_rows<F>(a: &[f32], b: Option<&[f32]>, out: &mut [f32], d: usize, f: F)
where
    F: Fn(&[f32], Option<&[f32]>, &mut [f32]) + Sync,
{
    if d == 0 {
        return;
    }
    let step = (CHUNK / d).max(1) * d;
    if a.len() < PAR_MIN {
        return f(a, b, out);
    }
    match b {
        Some(b) => a
            .par_chunks(step)
            .zip(b.par_chunks(step))
            .zip(out.par_chunks_mut(step))
            .for_each(|((ac, bc), oc)| f(ac, Some(bc), oc)),
        None => a
            .par_chunks(step)
            .zip(out.par_chunks_mut(step))
            .for_each(|(ac, oc)| f(ac, None, oc)),
    }
}

/// `[..., D]` -> `D` (a rank-0 tensor is refused).
fn last_dim(l: &Layout, what: &str) -> candle_core::Result<usize> {
    match l.dims().last() {
        Some(&d) => Ok(d),
        None => bail!("{what}: the input must have at least one dimension"),
    }
}

/// Softmax (`log = false`) or log-softmax (`log = true`) over the last dimension.
pub(crate) struct Softmax {
    pub log: bool,
}

/// One row: `y` receives the (log-)softmax of `x`.
fn forward_row(x: &[f32], y: &mut [f32], log: bool) {
    let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    y.copy_from_slice(x);
    exp_shift(y, m);
    let s: f32 = y.iter().sum();
    if log {
        let shift = m + s.ln();
        y.iter_mut().zip(x).for_each(|(yv, &xv)| *yv = xv - shift);
    } else {
        let inv = 1.0 / s;
        y.iter_mut().for_each(|v| *v *= inv);
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        if self.log {
            "elbo-log-softmax"
        } else {
            "elbo-softmax"
        }
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(l, self.name())?;
        let x = f32_slice(s, l, self.name())?;
        let mut y = vec![0f32; x.len()];
        by_rows(x, None, &mut y, d, |xc, _, yc| {
            for (xr, yr) in xc.chunks_exact(d).zip(yc.chunks_exact_mut(d)) {
                forward_row(xr, yr, self.log);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let res = res.contiguous()?;
        Ok(Some(res.apply_op2_no_bwd(
            &grad,
            &SoftmaxBackward { log: self.log },
        )?))
    }
}

/// The backward pass as an op on `(y, dy)`.
struct SoftmaxBackward {
    log: bool,
}

impl CustomOp2 for SoftmaxBackward {
    fn name(&self) -> &'static str {
        "elbo-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        yl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = last_dim(yl, self.name())?;
        let y = f32_slice(ys, yl, "softmax output")?;
        let g = f32_slice(gs, gl, "softmax output gradient")?;
        if g.len() != y.len() {
            bail!("{}: gradient and output sizes differ", self.name())
        }
        let mut dx = vec![0f32; y.len()];
        let log = self.log;
        by_rows(y, Some(g), &mut dx, d, |yc, gc, dc| {
            let Some(gc) = gc else { return };
            let rows = yc.chunks_exact(d).zip(gc.chunks_exact(d));
            for ((yr, gr), dr) in rows.zip(dc.chunks_exact_mut(d)) {
                if log {
                    let sg: f32 = gr.iter().sum();
                    dr.copy_from_slice(yr);
                    exp_shift(dr, 0.0);
                    dr.iter_mut()
                        .zip(gr)
                        .for_each(|(dv, &gv)| *dv = gv - *dv * sg);
                } else {
                    let sgy: f32 = gr.iter().zip(yr).map(|(a, b)| a * b).sum();
                    let it = dr.iter_mut().zip(gr.iter().zip(yr));
                    it.for_each(|(dv, (&gv, &yv))| *dv = yv * (gv - sgy));
                }
            }
        });
        Ok((CpuStorage::F32(dx), yl.shape().clone()))
    }
}
