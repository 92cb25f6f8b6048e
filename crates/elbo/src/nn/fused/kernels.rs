//! Plain-Rust CPU kernels over contiguous `f32` slices: a vectorisable `exp`, bias + SiLU with
//! its derivative, the matching backward pass, AdamW and EMA updates.
//!
//! Every loop body is branch-free straight-line arithmetic so the compiler vectorises it. Work is
//! split over rayon's pool only when a call touches at least [`PAR_MIN`] elements, and always in
//! chunks whose boundaries depend on the sizes alone, never on the number of threads, so results
//! are bit-for-bit reproducible across machines and thread counts.
//!
//! The compute-bound kernels (SiLU forward and backward, AdamW) are also compiled a second time
//! with AVX2 + FMA enabled and chosen at run time when the CPU has them, which doubles the
//! vector width over the x86-64 baseline. Rust never contracts `a * b + c` into an FMA on its
//! own, so both builds give identical results.

use rayon::prelude::*;

/// Defines `$name`, an AVX2 + FMA build of the `#[inline(always)]` function `$base`, and
/// `$public`, which calls it when the running CPU supports those features and `$base`
/// otherwise.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $public:ident / $name:ident => $base:ident ($($p:ident : $t:ty),*) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name($($p: $t),*) $(-> $ret)? {
            $base($($p),*)
        }

        $(#[$m])*
        $vis fn $public($($p: $t),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: `$name` is `$base` compiled with the avx2 and fma target
                    // features, which were just detected on this CPU; it has no other
                    // precondition.
                    return unsafe { $name($($p),*) };
                }
            }
            $base($($p),*)
        }
    };
}

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
    // 1.5 * 2^23: adding it rounds to the nearest integer, left in the low mantissa bits.
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

/// `x <- exp(x - shift)` element by element, through [`exp_f32`], flushed to exactly 0 below
/// `exp(-87)` (about 1.6e-38) so that masked (-inf) entries give probability 0.
#[inline(always)]
fn exp_shift_base(x: &mut [f32], shift: f32) {
    for v in x.iter_mut() {
        let y = *v - shift;
        let e = exp_f32(y);
        *v = if y < -87.0 { 0.0 } else { e };
    }
}

multiversion!(
    /// [`exp_shift_base`], vectorised for the running CPU.
    pub(crate) fn exp_shift / exp_shift_avx2 => exp_shift_base(x: &mut [f32], shift: f32)
);

/// Lanes of the vectorised reductions (one AVX register).
const LANES: usize = 8;

/// [`exp_shift_base`] that also returns the sum of the results, accumulated in [`LANES`]
/// interleaved partial sums (a fixed order, so the result depends on `x` alone).
#[inline(always)]
fn exp_shift_sum_base(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (v, a) in c.iter_mut().zip(acc.iter_mut()) {
            let y = *v - shift;
            let e = exp_f32(y);
            *v = if y < -87.0 { 0.0 } else { e };
            *a += *v;
        }
    }
    let rem = chunks.into_remainder();
    exp_shift_base(rem, shift);
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

multiversion!(
    /// [`exp_shift_sum_base`], vectorised for the running CPU.
    pub(crate) fn exp_shift_sum / exp_shift_sum_avx2 => exp_shift_sum_base(x: &mut [f32], shift: f32) -> f32
);

/// `a . b` over the common length, accumulated in [`LANES`] interleaved partial sums (a fixed
/// order, so the result depends on the inputs alone).
#[inline(always)]
fn dot_base(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((s, p), q) in acc.iter_mut().zip(x).zip(y) {
            *s += p * q;
        }
    }
    acc.iter().sum::<f32>() + ra.iter().zip(rb).map(|(p, q)| p * q).sum::<f32>()
}

multiversion!(
    /// [`dot_base`], vectorised for the running CPU.
    pub(crate) fn dot / dot_avx2 => dot_base(a: &[f32], b: &[f32]) -> f32
);

/// `y <- y + alpha x` over the common length.
#[inline(always)]
fn axpy_base(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (v, u) in y.iter_mut().zip(x) {
        *v += alpha * u;
    }
}

multiversion!(
    /// [`axpy_base`], vectorised for the running CPU.
    pub(crate) fn axpy / axpy_avx2 => axpy_base(y: &mut [f32], alpha: f32, x: &[f32])
);

/// The largest element of `x` (`-inf` when empty; NaNs are skipped unless all are NaN), over
/// [`LANES`] interleaved running maxima.
#[inline(always)]
fn max_base(x: &[f32]) -> f32 {
    let pick = |a: f32, b: f32| if b > a { b } else { a };
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = pick(*a, v);
        }
    }
    let m = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &v| pick(a, v));
    acc.iter().fold(m, |a, &v| pick(a, v))
}

multiversion!(
    /// [`max_base`], vectorised for the running CPU.
    pub(crate) fn row_max / row_max_avx2 => max_base(x: &[f32]) -> f32
);

/// `(gelu(z), gelu'(z))` for the exact GELU `gelu(z) = z Phi(z)` (Hendrycks & Gimpel 2016),
/// `Phi` the standard normal CDF, `gelu'(z) = Phi(z) + z phi(z)`.
///
/// `Phi(z) = 1 - erfc(z / sqrt 2) / 2` for `z >= 0` and `erfc(|z| / sqrt 2) / 2` below, with
/// the Chebyshev fit of `erfc` from Numerical Recipes (`erfcc`, fractional error below 1.2e-7
/// everywhere, so both tails keep their relative accuracy), all through [`exp_f32`].
#[inline(always)]
pub fn gelu_erf_f32(z: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let u = z.abs() * std::f32::consts::FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * u);
    // erfcc's degree-9 polynomial in `t`, by Estrin's scheme (a dependency chain of depth 5
    // instead of Horner's 18, so consecutive elements overlap in the pipeline)
    let (t2, p01, p23, p45, p67, p89) = (
        t * t,
        -1.265_512_2 + t * 1.000_023_7,
        0.374_091_96 + t * 0.096_784_18,
        -0.186_288_06 + t * 0.278_868_07,
        -1.135_204 + t * 1.488_515_9,
        -0.822_152_2 + t * 0.170_872_77,
    );
    let t4 = t2 * t2;
    let poly = (p01 + t2 * p23) + t4 * ((p45 + t2 * p67) + t4 * p89);
    let erfc = t * exp_f32(poly - u * u);
    let half = 0.5 * erfc;
    let cdf = if z < 0.0 { half } else { 1.0 - half };
    let pdf = FRAC_1_SQRT_2PI * exp_f32(-0.5 * z * z);
    (z * cdf, cdf + z * pdf)
}

/// Rows of `y` ([rows, b.len()]) become `gelu(y + b)`; `d`, when given, receives `gelu'(y + b)`.
#[inline(always)]
fn bias_gelu_base(y: &mut [f32], d: Option<&mut [f32]>, b: &[f32]) {
    let cols = b.len();
    match d {
        Some(d) => {
            for (yr, dr) in y.chunks_exact_mut(cols).zip(d.chunks_exact_mut(cols)) {
                for ((yv, dv), &bv) in yr.iter_mut().zip(dr.iter_mut()).zip(b) {
                    (*yv, *dv) = gelu_erf_f32(*yv + bv);
                }
            }
        }
        None => {
            for yr in y.chunks_exact_mut(cols) {
                for (yv, &bv) in yr.iter_mut().zip(b) {
                    *yv = gelu_erf_f32(*yv + bv).0;
                }
            }
        }
    }
}

multiversion!(
    /// [`bias_gelu_base`], vectorised for the running CPU.
    fn bias_gelu_serial / bias_gelu_avx2 => bias_gelu_base(
        y: &mut [f32],
        d: Option<&mut [f32]>,
        b: &[f32]
    )
);

/// The element-wise activation fused after an affine map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowAct {
    /// `z`.
    Identity,
    /// `silu(z) = z sigmoid(z)`, through [`silu_f32`].
    Silu,
    /// The exact GELU `z Phi(z)`, through [`gelu_erf_f32`].
    GeluErf,
}

/// Rows of `y` ([rows, b.len()]) become `silu(y + b)`; `d`, when given, receives
/// `silu'(y + b) = s (1 + z (1 - s))`.
#[inline(always)]
fn bias_silu_base(y: &mut [f32], d: Option<&mut [f32]>, b: &[f32]) {
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

multiversion!(
    /// [`bias_silu_base`], vectorised for the running CPU.
    fn bias_silu_serial / bias_silu_avx2 => bias_silu_base(
        y: &mut [f32],
        d: Option<&mut [f32]>,
        b: &[f32]
    )
);

/// Rows of `y` ([rows, b.len()]) become `y + b`.
fn bias_serial(y: &mut [f32], b: &[f32]) {
    for yr in y.chunks_exact_mut(b.len()) {
        for (yv, &bv) in yr.iter_mut().zip(b) {
            *yv += bv;
        }
    }
}

/// In place on `y: [rows, b.len()]`, on the calling thread: `y <- act(y + b)`.
/// With SiLU or GELU, `d` (same length as `y`) receives `act'(y + b)`.
pub(crate) fn bias_act_rows_serial(y: &mut [f32], d: Option<&mut [f32]>, b: &[f32], act: RowAct) {
    match act {
        RowAct::Identity => bias_serial(y, b),
        RowAct::Silu => bias_silu_serial(y, d, b),
        RowAct::GeluErf => bias_gelu_serial(y, d, b),
    }
}

/// Rows per parallel chunk for rows of `cols` elements (at least one).
fn rows_per_chunk(cols: usize) -> usize {
    (CHUNK / cols.max(1)).max(1)
}

/// In place on `y: [rows, b.len()]`: `y <- act(y + b)`. With SiLU or GELU, `deriv` (same
/// length as `y`) receives `act'(y + b)`. `b` must be non-empty and divide `y`'s length.
pub(crate) fn bias_act_rows(y: &mut [f32], deriv: Option<&mut [f32]>, b: &[f32], act: RowAct) {
    let cols = b.len();
    if cols == 0 {
        return;
    }
    let step = rows_per_chunk(cols) * cols;
    let par = y.len() >= PAR_MIN;
    let kernel: fn(&mut [f32], Option<&mut [f32]>, &[f32]) = match act {
        RowAct::Identity => {
            if par {
                y.par_chunks_mut(step).for_each(|c| bias_serial(c, b));
            } else {
                bias_serial(y, b);
            }
            return;
        }
        RowAct::Silu => bias_silu_serial,
        RowAct::GeluErf => bias_gelu_serial,
    };
    match deriv {
        Some(d) if par => y
            .par_chunks_mut(step)
            .zip(d.par_chunks_mut(step))
            .for_each(|(yc, dc)| kernel(yc, Some(dc), b)),
        d if !par => kernel(y, d, b),
        _ => y.par_chunks_mut(step).for_each(|c| kernel(c, None, b)),
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
            Some((d, out)) => mul_colsum_block(g, d, out, &mut acc),
            None => colsum_block(g, &mut acc),
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

/// `out = g * d` element by element, and the column sums of `out` added to `acc`
/// (`g`, `d`, `out`: [rows, acc.len()]).
#[inline(always)]
fn mul_colsum_base(g: &[f32], d: &[f32], out: &mut [f32], acc: &mut [f32]) {
    let cols = acc.len();
    let rows = g.chunks_exact(cols).zip(d.chunks_exact(cols));
    for ((gr, dr), or) in rows.zip(out.chunks_exact_mut(cols)) {
        for (((a, &gv), &dv), ov) in acc.iter_mut().zip(gr).zip(dr).zip(or.iter_mut()) {
            let v = gv * dv;
            *ov = v;
            *a += v;
        }
    }
}

multiversion!(
    /// [`mul_colsum_base`], vectorised for the running CPU.
    fn mul_colsum_block / mul_colsum_avx2 => mul_colsum_base(
        g: &[f32],
        d: &[f32],
        out: &mut [f32],
        acc: &mut [f32]
    )
);

/// The column sums of `g` ([rows, acc.len()]) added to `acc`.
fn colsum_block(g: &[f32], acc: &mut [f32]) {
    for gr in g.chunks_exact(acc.len()) {
        for (a, &gv) in acc.iter_mut().zip(gr) {
            *a += gv;
        }
    }
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
#[inline(always)]
fn adamw_base(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], h: &AdamWScalars) {
    for (((pv, mv), vv), &gv) in p.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
        let mn = *mv * h.b1 + gv * h.one_minus_b1;
        let vn = *vv * h.b2 + (gv * gv) * h.one_minus_b2;
        let denom = vn.sqrt() * h.inv_bc2_sqrt + h.eps;
        *pv = *pv * h.decay - (mn / denom) * h.step_size;
        *mv = mn;
        *vv = vn;
    }
}

multiversion!(
    /// [`adamw_base`], vectorised for the running CPU.
    fn adamw_serial / adamw_avx2 => adamw_base(
        p: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        g: &[f32],
        h: &AdamWScalars
    )
);

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

#[cfg(test)]
mod tests {
    use super::*;

    /// The run-time-selected (AVX2 + FMA where available) builds give the baseline build's
    /// results bit for bit.
    #[test]
    fn dispatched_kernels_match_the_baseline_build() {
        let n = 37 * 29;
        let vals = |k: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 7919 + k * 104_729) % 2000) as f32 / 100.0 - 10.0)
                .collect()
        };
        let b: Vec<f32> = vals(1)[..29].to_vec();
        let (mut y1, mut y2) = (vals(2), vals(2));
        let (mut d1, mut d2) = (vec![0f32; n], vec![0f32; n]);
        bias_silu_base(&mut y1, Some(&mut d1), &b);
        bias_silu_serial(&mut y2, Some(&mut d2), &b);
        assert_eq!(y1, y2);
        assert_eq!(d1, d2);

        let g = vals(3);
        let (mut o1, mut o2) = (vec![0f32; n], vec![0f32; n]);
        let (mut a1, mut a2) = (vec![0f32; 29], vec![0f32; 29]);
        mul_colsum_base(&g, &d1, &mut o1, &mut a1);
        mul_colsum_block(&g, &d1, &mut o2, &mut a2);
        assert_eq!((o1, a1), (o2, a2));

        let h = AdamWScalars {
            b1: 0.9,
            one_minus_b1: 0.1,
            b2: 0.999,
            one_minus_b2: 1e-3,
            inv_bc2_sqrt: 3.2,
            eps: 1e-8,
            step_size: 1e-2,
            decay: 0.9999,
        };
        let v0: Vec<f32> = vals(6).iter().map(|x| x.abs()).collect();
        let (mut p1, mut m1, mut v1) = (vals(4), vals(5), v0.clone());
        let (mut p2, mut m2, mut v2) = (vals(4), vals(5), v0);
        adamw_base(&mut p1, &mut m1, &mut v1, &g, &h);
        adamw_serial(&mut p2, &mut m2, &mut v2, &g, &h);
        assert_eq!((p1, m1, v1), (p2, m2, v2));
    }
}
