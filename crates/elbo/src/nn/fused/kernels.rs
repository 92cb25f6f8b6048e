//! Plain-Rust CPU kernels over contiguous `f32` slices: a vectorisable `exp`, bias + SiLU with
//! its derivative, the matching backward pass, AdamW and EMA updates.
//!
//! Every loop body is branch-free straight-line arithmetic so the compiler vectorises it. Work is
//! split over rayon's pool only when a call touches at least [`PAR_MIN`] elements, and always in
//! chunks whose boundaries depend on the sizes alone, never on the number of threads, so results
//! are bit-for-bit reproducible across machines and thread counts.

use rayon::prelude::*;

/// Calls touching fewer elements than this run on the calling thread.
pub(crate) const PAR_MIN: usize = 1 << 15;

/// Elements per parallel chunk of the element-wise kernels.
const CHUNK: usize = 1 << 14;

/// `exp(x)` in single precision, about 2 ulp (relative error below 3e-7) for `x` in
/// [-87, 88]; inputs outside are clamped to that range (the result saturates at about
/// 1.7e-38 and 1.7e38) and NaN gives NaN.
///
/// Cody-Waite reduction `x = n ln 2 + r` with `|r| <= ln(2) / 2`, Cephes' degree-7 polynomial for
/// `exp(r)` and `2^n` assembled from the exponent bits, all without branches or table lookups.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0.693359375, exactly representable
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, which then sits in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + SHIFT;
    let n = t - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_2e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * (r * r) + r + 1.0;
    // n in [-126, 127], so n + 127 is a valid biased exponent of a normal number.
    let ni = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    er * f32::from_bits((ni.wrapping_add(127) << 23) as u32)
}

/// `sigmoid(z)` through [`exp_f32`].
#[inline(always)]
fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-z))
}

/// `silu(z) = z sigmoid(z)` through [`exp_f32`].
#[inline(always)]
pub fn silu_f32(z: f32) -> f32 {
    z * sigmoid(z)
}

/// Rows of `y` ([rows, b.len()]) become `silu(y + b)`; `d`, when given, receives
/// `silu'(y + b) = s (1 + z (1 - s))`.
fn bias_silu_serial(y: &mut [f32], d: Option<&mut [f32]>, b: &[f32]) {
    let cols = b.len();
    match d {
        Some(d) => {
            for (yr, dr) in y.chunks_exact_mut(cols).zip(d.chunks_exact_mut(cols)) {
                for ((yv, dv), &bv) in yr.iter_mut().zip(dr.iter_mut()).zip(b) {
                    let z = *yv + bv;
                    let s = sigmoid(z);
                    *yv = z * s;
                    *dv = s * (1.0 + z * (1.0 - s));
                }
            }
        }
        None => {
            for yr in y.chunks_exact_mut(cols) {
                for (yv, &bv) in yr.iter_mut().zip(b) {
                    *yv = silu_f32(*yv + bv);
                }
            }
        }
    }
}

/// Rows of `y` ([rows, b.len()]) become `y + b`.
fn bias_serial(y: &mut [f32], b: &[f32]) {
    for yr in y.chunks_exact_mut(b.len()) {
        for (yv, &bv) in yr.iter_mut().zip(b) {
            *yv += bv;
        }
    }
}

/// Rows per parallel chunk for rows of `cols` elements (at least one).
fn rows_per_chunk(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// In place on `y: [rows, b.len()]`: `y <- act(y + b)` with `act` SiLU when `silu` is true and
/// the identity otherwise. With SiLU, `deriv` (same length as `y`) receives `silu'(y + b)`.
/// `b` must be non-empty and divide `y`'s length.
pub(crate) fn bias_act_rows(y: &mut [f32], deriv: Option<&mut [f32]>, b: &[f32], silu: bool) {
    let cols = b.len();
    if cols == 0 {
        return;
    }
    let step = rows_per_chunk(cols) * cols;
    let par = y.len() >= PAR_MIN;
    match (silu, deriv) {
        (false, _) if par => y.par_chunks_mut(step).for_each(|c| bias_serial(c, b)),
        (false, _) => bias_serial(y, b),
        (true, Some(d)) if par => y
            .par_chunks_mut(step)
            .zip(d.par_chunks_mut(step))
            .for_each(|(yc, dc)| bias_silu_serial(yc, Some(dc), b)),
        (true, d) if !par => bias_silu_serial(y, d, b),
        (true, _) => y
            .par_chunks_mut(step)
            .for_each(|c| bias_silu_serial(c, None, b)),
    }
}

/// Column sums of `g: [rows, cols]`, and `g * d` element by element when `d` is given (written
/// to `out`, same length as `g`). Partial sums are taken over fixed row blocks and added in
/// order, so the result does not depend on the thread count.
pub(crate) fn mul_colsum(g: &[f32], d: Option<(&[f32], &mut [f32])>, cols: usize) -> Vec<f32> {
    if cols == 0 {
        return Vec::new();
    }
    let step = rows_per_chunk(cols) * cols;
    let block = |g: &[f32], d: Option<(&[f32], &mut [f32])>| -> Vec<f32> {
        let mut acc = vec![0f32; cols];
        match d {
            Some((d, out)) => {
                let rows = g.chunks_exact(cols).zip(d.chunks_exact(cols));
                for ((gr, dr), or) in rows.zip(out.chunks_exact_mut(cols)) {
                    for (((a, &gv), &dv), ov) in acc.iter_mut().zip(gr).zip(dr).zip(or.iter_mut()) {
                        let v = gv * dv;
                        *ov = v;
                        *a += v;
                    }
                }
            }
            None => {
                for gr in g.chunks_exact(cols) {
                    for (a, &gv) in acc.iter_mut().zip(gr) {
                        *a += gv;
                    }
                }
            }
        }
        acc
    };
    let partials: Vec<Vec<f32>> = match d {
        Some((d, out)) if g.len() >= PAR_MIN => g
            .par_chunks(step)
            .zip(d.par_chunks(step))
            .zip(out.par_chunks_mut(step))
            .map(|((gc, dc), oc)| block(gc, Some((dc, oc))))
            .collect(),
        None if g.len() >= PAR_MIN => g.par_chunks(step).map(|gc| block(gc, None)).collect(),
        d => vec![block(g, d)],
    };
    let mut sum = vec![0f32; cols];
    for p in &partials {
        for (s, &v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

/// The per-step constants of an AdamW update, already in `f32` (see
/// [`crate::train::optim`] for the formula).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWScalars {
    pub b1: f32,
    pub one_minus_b1: f32,
    pub b2: f32,
    pub one_minus_b2: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_bc2_sqrt: f32,
    pub eps: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
}

/// One AdamW update of `p`, `m`, `v` (all the length of `g`) in a single pass. The arithmetic
/// is the tensor-op path's, operation for operation, so both give the same `f32` results.
fn adamw_serial(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: &AdamWScalars) {
    for (((pv, mv), vv), &gv) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let mn = *mv * h.b1 + gv * h.one_minus_b1;
        let vn = *vv * h.b2 + (gv * gv) * h.one_minus_b2;
        let denom = vn.sqrt() * h.inv_bc2_sqrt + h.eps;
        *pv = *pv * h.decay - (mn / denom) * h.step_size;
        *mv = mn;
        *vv = vn;
    }
}

/// [`adamw_serial`] split over rayon's pool for large parameters.
pub(crate) fn adamw_update(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    h: &AdamWScalars,
) {
    if p.len() < PAR_MIN {
        return adamw_serial(p, m, v, g, h);
    }
    p.par_chunks_mut(CHUNK)
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .zip(g.par_chunks(CHUNK))
        .for_each(|(((pc, mc), vc), gc)| adamw_serial(pc, mc, vc, gc, h));
}

/// `e <- e * d + p * (1 - d)` element by element (`one_minus_d` is `1 - d` rounded once, as
/// in the tensor-op path).
pub(crate) fn ema_update<T>(e: &mut [T], p: &[T], d: T, one_minus_d: T)
where
    T: Copy + Send + Sync + std::ops::Mul<Output = T> + std::ops::Add<Output = T>,
{
    let serial = |e: &mut [T], p: &[T]| {
        for (ev, &pv) in e.iter_mut().zip(p) {
            *ev = *ev * d + pv * one_minus_d;
        }
    };
    if e.len() < PAR_MIN {
        serial(e, p);
    } else {
        e.par_chunks_mut(CHUNK)
            .zip(p.par_chunks(CHUNK))
            .for_each(|(ec, pc)| serial(ec, pc));
    }
}
