//! Small matrix products against a right-hand operand packed once and reused: the tile
//! products of the fused attention kernel.
//!
//! Flash attention multiplies each `64 x 64` tile of scores by a slice of `K`, `V`, `Q` or
//! `dO` of the same head, dozens of times per head. Through a general GEMM every one of those
//! products repacks both operands (and the `gemm` crate dispatches per call): on W3's shapes
//! the attention ran at 70-90 GFLOP/s against 190 for the model's large products. Here each
//! right-hand operand is packed once per head into the 16-column panels of
//! [`super::packed`]'s micro-kernel (`[panel][k][16]`, times a scale folded in for free), and
//! a product over any `k` range and any panel-aligned column range of it packs only the small
//! left tile (BLIS order, Van Zee & van de Geijn 2015), always on the calling thread.

use candle_core::bail;

#[cfg(target_arch = "x86_64")]
use super::packed::{avx2, via_scratch};
use super::packed::{avx512, MR, NR};
use super::tile::{MatMut, MatRef};

/// `scale · B` for a `B: [k, n]` packed as `[ceil(n / 16)][k][16]` (zero beyond `n`).
#[derive(Clone, Debug, Default)]
pub(crate) struct Panels {
    k: usize,
    n: usize,
    data: Vec<f32>,
}

impl Panels {
    /// Pack `scale · b` (any strides), reusing this buffer.
    pub fn pack(&mut self, b: MatRef<'_>, scale: f32) -> candle_core::Result<()> {
        if !b.in_bounds() {
            bail!("panels: the matrix view runs past its slice")
        }
        let (k, n) = (b.rows, b.cols);
        let np = n.div_ceil(NR);
        self.k = k;
        self.n = n;
        self.data.clear();
        self.data.resize(np * k * NR, 0.0);
        let src = b.data.as_ptr();
        for j in 0..np {
            let panel = self.data[j * k * NR..(j + 1) * k * NR].as_mut_ptr();
            let cols = NR.min(n - j * NR);
            // SAFETY: element (p, j·16 + c) for p < k, c < cols is inside `b.data` (`b` is in
            // bounds), and the panel holds k·16 elements.
            unsafe {
                if b.cs == 1 {
                    // rows of B contiguous: 16 at a time
                    for p in 0..k {
                        let s = src.add(p * b.rs + j * NR);
                        for c in 0..cols {
                            *panel.add(p * NR + c) = scale * *s.add(c);
                        }
                    }
                } else {
                    // a transposed view: each column of B is a row of the source
                    for c in 0..cols {
                        let s = src.add((j * NR + c) * b.cs);
                        for p in 0..k {
                            *panel.add(p * NR + c) = scale * *s.add(p * b.rs);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// `dst <- a B'` (`accumulate = false`) or `dst <- dst + a B'` for the block
/// `B' = B[k0..k0 + a.cols, n0..n0 + dst.cols]` of the packed `b` (`n0` a multiple of 16);
/// An empty `k` zeroes `dst` unless accumulating.
pub(crate) fn matmul_panels(
    dst: MatMut<'_>,
    a: MatRef<'_>,
    b: &Panels,
    (k0, n0): (usize, usize),
    accumulate: bool,
) -> candle_core::Result<()> {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    if a.rows != m || k0 + k > b.k || n0 % NR != 0 || n0 + n > b.n {
        bail!(
            "panel matmul: [{m}, {k}] x B[{k0}.., {n0}..] of [{}, {}] into [{}, {n}]",
            b.k,
            b.n,
            dst.rows
        )
    }
    let dst_ok = m == 0 || n == 0 || (dst.cols <= dst.rs && (m - 1) * dst.rs + n <= dst.data.len());
    if !dst_ok || !a.in_bounds() {
        bail!("panel matmul: a matrix view runs past its slice")
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for r in dst.data.chunks_mut(dst.rs).take(m) {
                r[..n].fill(0.0);
            }
        }
        return Ok(());
    }
    let c = dst.data.as_mut_ptr();
    let ap = a.data.as_ptr();
    let wide = avx512();
    let (j0, j1) = (n0 / NR, (n0 + n).div_ceil(NR));
    let mut j = j0;
    while j < j1 {
        let cols = NR.min(n0 + n - j * NR);
        let bp = &b.data[(j * b.k + k0) * NR..(j * b.k + k0 + k) * NR];
        // two full panels at once where AVX-512 can hold them (a 6 x 32 tile)
        let pair = wide && j + 1 < j1 && (j + 2) * NR <= n0 + n;
        for r0 in (0..m).step_by(MR) {
            let mr = MR.min(m - r0);
            // SAFETY: rows r0..r0 + mr and columns j·16 - n0..+ cols (+ 16 for a pair) of
            // `dst` lie inside its slice (checked above: (m - 1) rs + n <= len) and `dst` is
            // borrowed exclusively; `a` is in bounds, so are its rows r0..r0 + mr over all k
            // columns; `bp` (and the next panel's slice) holds k·16 elements.
            unsafe {
                let cp = c.add(r0 * dst.rs + j * NR - n0);
                let at = ap.add(r0 * a.rs);
                if pair {
                    let bq = &b.data[((j + 1) * b.k + k0) * NR..((j + 1) * b.k + k0 + k) * NR];
                    strided_pair(k, (at, a.rs, a.cs), bp, bq, (cp, dst.rs), mr, !accumulate);
                } else {
                    strided_tile(k, (at, a.rs, a.cs), bp, (cp, dst.rs), mr, cols, !accumulate);
                }
            }
        }
        j += if pair { 2 } else { 1 };
    }
    Ok(())
}

/// `C[mr, cols] (+)= A[mr, k] B[k, 16]` with `A` read in place (element (r, p) at
/// `a + r rs + p cs`: small tiles sit in L1, so packing them costs more than it saves) and `B`
/// one packed panel; `first` overwrites `C`.
///
/// # Safety
/// `A`'s `mr x k` elements and `C`'s `mr` rows of `cols` at stride `ldc` are valid; `b` holds
/// `k * 16` elements.
unsafe fn strided_tile(
    k: usize,
    a: (*const f32, usize, usize),
    b: &[f32],
    (c, ldc): (*mut f32, usize),
    mr: usize,
    cols: usize,
    first: bool,
) {
    debug_assert!(b.len() >= k * NR && mr <= MR && cols <= NR);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            if cols == NR {
                let b = b.as_ptr();
                return match mr {
                    6 => micro_strided::<6>(k, a, b, c, ldc, first),
                    5 => micro_strided::<5>(k, a, b, c, ldc, first),
                    4 => micro_strided::<4>(k, a, b, c, ldc, first),
                    3 => micro_strided::<3>(k, a, b, c, ldc, first),
                    2 => micro_strided::<2>(k, a, b, c, ldc, first),
                    _ => micro_strided::<1>(k, a, b, c, ldc, first),
                };
            }
            // a partial panel: through a full-width scratch tile
            return via_scratch(c, ldc, mr, cols, first, |t| {
                strided_tile(k, a, b, (t, NR), mr, NR, first)
            });
        }
    }
    let (ap, rs, cs) = a;
    for r in 0..mr {
        let mut acc = [0f32; NR];
        if !first {
            for (q, v) in acc.iter_mut().enumerate().take(cols) {
                *v = *c.add(r * ldc + q);
            }
        }
        for p in 0..k {
            let av = *ap.add(r * rs + p * cs);
            for (v, &bv) in acc.iter_mut().zip(&b[p * NR..(p + 1) * NR]) {
                *v += av * bv;
            }
        }
        for (q, v) in acc.iter().enumerate().take(cols) {
            *c.add(r * ldc + q) = *v;
        }
    }
}

/// [`strided_tile`] for two adjacent full panels `b0`, `b1` (columns `0..32` of `C`): on
/// AVX-512 one `mr x 32` tile, each element summed over `k` in the same order as by
/// [`strided_tile`] (identical results).
///
/// # Safety
/// As [`strided_tile`] with 32 columns; `b0` and `b1` hold `k * 16` elements each.
#[allow(clippy::too_many_arguments)]
unsafe fn strided_pair(
    k: usize,
    a: (*const f32, usize, usize),
    b0: &[f32],
    b1: &[f32],
    (c, ldc): (*mut f32, usize),
    mr: usize,
    first: bool,
) {
    debug_assert!(b0.len() >= k * NR && b1.len() >= k * NR && mr <= MR);
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            let (b0, b1) = (b0.as_ptr(), b1.as_ptr());
            return match mr {
                6 => micro_strided512::<6>(k, a, b0, b1, c, ldc, first),
                5 => micro_strided512::<5>(k, a, b0, b1, c, ldc, first),
                4 => micro_strided512::<4>(k, a, b0, b1, c, ldc, first),
                3 => micro_strided512::<3>(k, a, b0, b1, c, ldc, first),
                2 => micro_strided512::<2>(k, a, b0, b1, c, ldc, first),
                _ => micro_strided512::<1>(k, a, b0, b1, c, ldc, first),
            };
        }
    }
    strided_tile(k, a, b0, (c, ldc), mr, NR, first);
    strided_tile(k, a, b1, (c.add(NR), ldc), mr, NR, first);
}

/// The `M x 32` AVX-512 micro-kernel of [`super::packed`] with `A` read through its strides.
///
/// # Safety
/// As [`strided_pair`] with `mr == M`; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_strided512<const M: usize>(
    k: usize,
    (a, rs, cs): (*const f32, usize, usize),
    b0: *const f32,
    b1: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm512_setzero_ps(); M];
    let mut acc1 = [_mm512_setzero_ps(); M];
    if !first {
        for r in 0..M {
            acc0[r] = _mm512_loadu_ps(c.add(r * ldc));
            acc1[r] = _mm512_loadu_ps(c.add(r * ldc + NR));
        }
    }
    let mut rows = [a; M];
    for (r, p) in rows.iter_mut().enumerate() {
        *p = a.add(r * rs);
    }
    let (mut p0, mut p1) = (b0, b1);
    for p in 0..k {
        let v0 = _mm512_loadu_ps(p0);
        let v1 = _mm512_loadu_ps(p1);
        let off = p * cs;
        for r in 0..M {
            let av = _mm512_set1_ps(*rows[r].add(off));
            acc0[r] = _mm512_fmadd_ps(av, v0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(av, v1, acc1[r]);
        }
        p0 = p0.add(NR);
        p1 = p1.add(NR);
    }
    for r in 0..M {
        _mm512_storeu_ps(c.add(r * ldc), acc0[r]);
        _mm512_storeu_ps(c.add(r * ldc + NR), acc1[r]);
    }
}

/// The `M x 16` micro-kernel of [`super::packed`] with `A` read through its strides.
///
/// # Safety
/// As [`strided_tile`] with `cols == 16` and `mr == M`; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_strided<const M: usize>(
    k: usize,
    (a, rs, cs): (*const f32, usize, usize),
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    first: bool,
) {
    use std::arch::x86_64::*;
    let mut acc0 = [_mm256_setzero_ps(); M];
    let mut acc1 = [_mm256_setzero_ps(); M];
    if !first {
        for r in 0..M {
            acc0[r] = _mm256_loadu_ps(c.add(r * ldc));
            acc1[r] = _mm256_loadu_ps(c.add(r * ldc + 8));
        }
    }
    let mut rows = [a; M];
    for (r, p) in rows.iter_mut().enumerate() {
        *p = a.add(r * rs);
    }
    let mut bp = b;
    for p in 0..k {
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        let off = p * cs;
        for r in 0..M {
            let av = _mm256_broadcast_ss(&*rows[r].add(off));
            acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
        }
        bp = bp.add(NR);
    }
    for r in 0..M {
        _mm256_storeu_ps(c.add(r * ldc), acc0[r]);
        _mm256_storeu_ps(c.add(r * ldc + 8), acc1[r]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operand shape the attention uses (transposed views, partial panels and groups,
    /// k and column sub-ranges, more than one KC pass) against the triple loop.
    #[test]
    fn matches_the_triple_loop() {
        let f = |i: usize| ((i * 7919) % 23) as f32 / 11.0 - 1.0;
        for &(m, n, k, kb, nb, k0, n0, tr_a, tr_b, acc) in &[
            (5, 3, 7, 7, 3, 0, 0, false, false, false),
            (13, 20, 9, 30, 40, 4, 16, true, false, true),
            (64, 64, 64, 256, 256, 64, 192, false, true, false),
            (7, 33, 300, 300, 33, 0, 0, true, true, true),
            (6, 16, 0, 4, 16, 2, 0, false, false, false),
        ] {
            let a_src: Vec<f32> = (0..m * k).map(f).collect();
            let b_src: Vec<f32> = (0..kb * nb).map(|i| f(i + 5)).collect();
            let a = if tr_a {
                MatRef::rows(&a_src, k, m).t()
            } else {
                MatRef::rows(&a_src, m, k)
            };
            let b = if tr_b {
                MatRef::rows(&b_src, nb, kb).t()
            } else {
                MatRef::rows(&b_src, kb, nb)
            };
            let mut panels = Panels::default();
            panels.pack(b, 0.5).unwrap();
            let mut c: Vec<f32> = (0..m * (n + 3)).map(|i| f(i + 1)).collect();
            let c0 = c.clone();
            let dst = MatMut {
                data: &mut c,
                rows: m,
                cols: n,
                rs: n + 3,
            };
            matmul_panels(dst, a, &panels, (k0, n0), acc).unwrap();
            for i in 0..m {
                for j in 0..n + 3 {
                    let got = c[i * (n + 3) + j];
                    if j >= n {
                        assert_eq!(got, c0[i * (n + 3) + j], "wrote past the view");
                        continue;
                    }
                    let at = |x: &MatRef, r: usize, s: usize| x.data[r * x.rs + s * x.cs];
                    let s: f32 = (0..k)
                        .map(|l| at(&a, i, l) * 0.5 * at(&b, k0 + l, n0 + j))
                        .sum();
                    let want = if acc { c0[i * (n + 3) + j] + s } else { s };
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{m}x{n}x{k} at ({i}, {j}): {got} vs {want}"
                    );
                }
            }
        }
        let mut p = Panels::default();
        p.pack(MatRef::rows(&[0.0; 16], 4, 4), 1.0).unwrap();
        let mut c = [0f32; 4];
        // a column offset that is not a panel boundary, and k past the packed rows
        assert!(matmul_panels(
            MatMut::rows(&mut c, 1, 2),
            MatRef::rows(&[0.0; 4], 1, 4),
            &p,
            (0, 2),
            false
        )
        .is_err());
        assert!(matmul_panels(
            MatMut::rows(&mut c, 1, 4),
            MatRef::rows(&[0.0; 4], 1, 2),
            &p,
            (3, 0),
            false
        )
        .is_err());
    }
}
