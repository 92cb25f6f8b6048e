//! `act(x W^T + b)` against weights packed once: the sampling path, and the forward pass of the
//! fused linear layer.
//!
//! A BLIS-style GEMM (Van Zee & van de Geijn 2015, the loops around a register-blocked
//! micro-kernel) specialised to the case samplers hit a thousand times per call: the same
//! weights, many rows. The weights are packed once into 16-column panels (`[panel][k][16]`), so
//! no call repacks them (the `gemm` crate packs its operands on every call: 12% of DDPM
//! sampling); each cache block of rows of `x` is copied into the micro-kernel's order (rows `k`
//! floats apart would share cache sets). On CPUs with AVX2 + FMA a 6 x 16 micro-kernel keeps
//! its 12 accumulators in registers across a `KC`-deep slice of `k`; with AVX-512 a 6 x 32
//! kernel covers two panels at once (12 accumulators of 16 lanes, the same summation order
//! per element, so the same results); the bias and the
//! activation (and its derivative, for training) are applied to each block of rows right after
//! its last slice, while it is still in cache, instead of in a separate pass over the output.
//! Elsewhere a portable tile with the same summation order runs.
//!
//! Rows are split between threads in fixed-size blocks (columns when there are few rows), and
//! every output element is summed over `k` in the same order whatever the split, so results do
//! not depend on the thread count.

use rayon::prelude::*;

use super::kernels::{self, RowAct};

/// Columns per packed panel (two AVX registers).
pub(super) const NR: usize = 16;
/// Rows per micro-kernel call.
pub(super) const MR: usize = 6;
/// Depth of one pass over `k` (a `KC x NR` panel slice is 16 KiB, resident in L1).
pub(super) const KC: usize = 256;
/// Most rows per cache block (a `MC x KC` slice of `x` is 144 KiB, resident in L2).
const MC: usize = 144;
/// Weights with at least this many entries are packed on all threads.
const PACK_PAR_MIN: usize = 1 << 16;

/// A weight matrix `W: [out, in]` and bias `b: [out]` packed for [`PackedLinear::forward`].
#[derive(Clone, Debug)]
pub struct PackedLinear {
    d_in: usize,
    d_out: usize,
    /// `[ceil(out / 16)][in][16]`: `panels[(j * in + p) * 16 + c] = W[16 j + c, p]`, zero
    /// beyond `out`.
    panels: Vec<f32>,
    bias: Vec<f32>,
}

/// A raw pointer that may cross threads; every use writes a disjoint part of the output.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the tasks that share an `OutPtr` write disjoint rows or columns of one buffer that
// outlives them (see `PackedLinear::forward`).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl PackedLinear {
    /// Pack row-major `w: [d_out, d_in]` and `bias: [d_out]`.
    pub fn new(w: &[f32], bias: &[f32], d_out: usize, d_in: usize) -> crate::Result<Self> {
        if w.len() != d_out * d_in || bias.len() != d_out {
            return Err(crate::Error::Shape(format!(
                "packed linear: W has {} elements and b {}, expected [{d_out}, {d_in}] and [{d_out}]",
                w.len(),
                bias.len()
            )));
        }
        let n_panels = d_out.div_ceil(NR);
        let mut panels = vec![0f32; n_panels * d_in * NR];
        // one panel per task: 16 rows of W read side by side, the panel written in order
        let fill = |(j, panel): (usize, &mut [f32])| {
            let o_end = ((j + 1) * NR).min(d_out);
            for (c, o) in (j * NR..o_end).enumerate() {
                let row = &w[o * d_in..(o + 1) * d_in];
                for (p, &v) in row.iter().enumerate() {
                    panel[p * NR + c] = v;
                }
            }
        };
        if d_in * d_out >= PACK_PAR_MIN {
            panels
                .par_chunks_mut((d_in * NR).max(1))
                .enumerate()
                .for_each(fill);
        } else {
            panels
                .chunks_mut((d_in * NR).max(1))
                .enumerate()
                .for_each(fill);
        }
        Ok(Self {
            d_in,
            d_out,
            panels,
            bias: bias.to_vec(),
        })
    }

    /// Input width.
    pub fn d_in(&self) -> usize {
        self.d_in
    }

    /// Output width.
    pub fn d_out(&self) -> usize {
        self.d_out
    }

    /// The bias.
    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// `y = act(x W^T + bias)` for row-major `x: [rows, in]`, `y: [rows, out]`, where `bias`
    /// replaces the packed bias when given (length `out`).
    pub fn forward(&self, x: &[f32], y: &mut [f32], act: RowAct, bias: Option<&[f32]>) {
        let rows = y.len() / self.d_out.max(1);
        assert_eq!(y.len(), rows * self.d_out, "packed linear: output length");
        // SAFETY: `y` holds `rows * out` elements.
        unsafe { self.run(x, rows, OutPtr(y.as_mut_ptr()), None, act, bias) }
    }

    /// `act(x W^T + b)` for `x: [rows, in]` into a new `[rows, out]` buffer (never zeroed
    /// first), and `act'` at the same points when `deriv` (the derivative is not formed for
    /// the identity).
    pub fn forward_new(
        &self,
        x: &[f32],
        rows: usize,
        act: RowAct,
        deriv: bool,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        let n = rows * self.d_out;
        let mut y = Vec::with_capacity(n);
        let mut d = (deriv && act != RowAct::Identity).then(|| Vec::<f32>::with_capacity(n));
        let dp = d.as_mut().map(|d| OutPtr(d.as_mut_ptr()));
        // SAFETY: both buffers have capacity for `rows * out` elements; `run` writes every one
        // of them (the tiles overwrite on the first slice of `k`, the epilogue rewrites them
        // and fills the derivative) before the lengths are set.
        unsafe {
            self.run(x, rows, OutPtr(y.as_mut_ptr()), dp, act, None);
            y.set_len(n);
            if let Some(d) = d.as_mut() {
                d.set_len(n);
            }
        }
        (y, d)
    }

    /// The threaded driver.
    ///
    /// # Safety
    /// `y` (and `deriv`) point at buffers of `rows * out` elements that nothing else uses.
    unsafe fn run(
        &self,
        x: &[f32],
        rows: usize,
        y: OutPtr,
        deriv: Option<OutPtr>,
        act: RowAct,
        bias: Option<&[f32]>,
    ) {
        assert_eq!(x.len(), rows * self.d_in, "packed linear: input length");
        let bias = bias.unwrap_or(&self.bias);
        assert_eq!(bias.len(), self.d_out, "packed linear: bias length");
        if rows == 0 || self.d_out == 0 {
            return;
        }
        if self.d_in == 0 {
            // no terms: the epilogue gives act(0 + b)
            std::ptr::write_bytes(y.0, 0, rows * self.d_out);
        }
        let n_panels = self.d_out.div_ceil(NR);
        let flops = rows * self.d_in * self.d_out;
        let threads = rayon::current_num_threads();
        if threads == 1 || flops < (1 << 18) {
            self.block(x, y, deriv, 0..rows, 0..n_panels, act, bias);
        } else if rows >= 4 * MR * threads {
            // rows in equal blocks (multiples of MR), one task per thread
            let per = rows.div_ceil(threads).div_ceil(MR) * MR;
            (0..rows.div_ceil(per)).into_par_iter().for_each(|i| {
                let r = i * per..((i + 1) * per).min(rows);
                // SAFETY: tasks write disjoint row ranges.
                unsafe { self.block(x, y, deriv, r, 0..n_panels, act, bias) };
            });
        } else {
            // few rows: split the panels (column blocks) instead
            let per = n_panels.div_ceil(threads);
            (0..n_panels.div_ceil(per)).into_par_iter().for_each(|i| {
                let pj = i * per..((i + 1) * per).min(n_panels);
                // SAFETY: tasks write disjoint column ranges.
                unsafe { self.block(x, y, deriv, 0..rows, pj, act, bias) };
            });
        }
    }

    /// Rows `rows` and panels `pj` of the output, serially.
    ///
    /// # Safety
    /// As [`PackedLinear::run`]; no other thread touches the part written.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        x: &[f32],
        y: OutPtr,
        deriv: Option<OutPtr>,
        rows: std::ops::Range<usize>,
        pj: std::ops::Range<usize>,
        act: RowAct,
        bias: &[f32],
    ) {
        let (k, n) = (self.d_in, self.d_out);
        let c0 = pj.start * NR;
        let c1 = (pj.end * NR).min(n);
        // equal cache blocks of at most MC rows (a multiple of MR), so no block is a sliver
        let n_blocks = rows.len().div_ceil(MC).max(1);
        let mc = rows.len().div_ceil(n_blocks).div_ceil(MR) * MR;
        // the rows of `x` in one block, packed as `[group of MR rows][kc][MR]` (zero-padded) so
        // the micro-kernel reads one contiguous stream (rows `k` apart would share cache sets)
        let mut apack = vec![0f32; mc.max(MR) * KC.min(k).max(1)];
        let wide = avx512();
        for ic in rows.clone().step_by(mc.max(MR)) {
            let ie = (ic + mc).min(rows.end);
            let mut pc = 0;
            while pc < k {
                let kc = KC.min(k - pc);
                pack_rows(&mut apack, x, k, ic..ie, pc, kc);
                let mut j = pj.start;
                while j < pj.end {
                    let b = &self.panels[(j * k + pc) * NR..];
                    // two full panels at once where AVX-512 can hold them (a 6 x 32 tile)
                    let pair = wide && j + 1 < pj.end && (j + 2) * NR <= n;
                    let cols = NR.min(n - j * NR);
                    for (g, ir) in (ic..ie).step_by(MR).enumerate() {
                        let mr = MR.min(ie - ir);
                        let a = &apack[g * kc * MR..(g + 1) * kc * MR];
                        let c = y.0.add(ir * n + j * NR);
                        if pair {
                            let b1 = &self.panels[((j + 1) * k + pc) * NR..];
                            tile_pair(kc, a, b, b1, c, n, mr, pc == 0);
                        } else {
                            tile(kc, a, b, c, n, mr, cols, pc == 0);
                        }
                    }
                    j += if pair { 2 } else { 1 };
                }
                pc += kc;
            }
            // bias + activation on the finished rows while they are in cache
            for r in ic..ie {
                let row = std::slice::from_raw_parts_mut(y.0.add(r * n + c0), c1 - c0);
                let d = deriv.map(|d| std::slice::from_raw_parts_mut(d.0.add(r * n + c0), c1 - c0));
                kernels::bias_act_rows_serial(row, d, &bias[c0..c1], act);
            }
        }
    }
}

/// Rows `rows` of `x: [_, k]`, columns `pc..pc + kc`, into `dst` as `[group][kc][MR]`, the
/// last group zero-padded to `MR` rows.
fn pack_rows(
    dst: &mut [f32],
    x: &[f32],
    k: usize,
    rows: std::ops::Range<usize>,
    pc: usize,
    kc: usize,
) {
    for (g, r0) in rows.clone().step_by(MR).enumerate() {
        let grp = &mut dst[g * kc * MR..(g + 1) * kc * MR];
        for r in 0..MR {
            if r0 + r < rows.end {
                let src = &x[(r0 + r) * k + pc..(r0 + r) * k + pc + kc];
                for (p, &v) in src.iter().enumerate() {
                    grp[p * MR + r] = v;
                }
            } else {
                for p in 0..kc {
                    grp[p * MR + r] = 0.0;
                }
            }
        }
    }
}

/// `C[mr, cols] (+)= A[mr, kc] B[kc, 16]` for `A` packed as `[kc][MR]`, packed `B`, `C` with
/// row stride `ldc`; `first` overwrites `C` instead of adding to it.
///
/// # Safety
/// `c` is valid for `mr` rows of `cols` elements at stride `ldc`; `a` holds `kc * MR` elements
/// and `b` at least `kc * 16`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn tile(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    cols: usize,
    first: bool,
) {
    debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    #[cfg(target_arch = "x86_64")]
    {
        if avx2() {
            if cols == NR {
                let (a, b) = (a.as_ptr(), b.as_ptr());
                return match mr {
                    6 => micro_avx2::<6>(kc, a, b, c, ldc, first),
                    5 => micro_avx2::<5>(kc, a, b, c, ldc, first),
                    4 => micro_avx2::<4>(kc, a, b, c, ldc, first),
                    3 => micro_avx2::<3>(kc, a, b, c, ldc, first),
                    2 => micro_avx2::<2>(kc, a, b, c, ldc, first),
                    _ => micro_avx2::<1>(kc, a, b, c, ldc, first),
                };
            }
            // a partial panel: through a full-width scratch tile
            return via_scratch(c, ldc, mr, cols, first, |t| {
                tile(kc, a, b, t, NR, mr, NR, first)
            });
        }
    }
    tile_scalar(kc, a, b, c, ldc, mr, cols, first);
}

/// Runs `full`, a kernel that writes a whole `mr x 16` tile at row stride 16, on a scratch
/// tile standing in for the `mr x cols` block of `c` (the partial-panel path of the
/// micro-kernels): `c`'s block is copied in unless `first`, and copied back out.
///
/// # Safety
/// `c` is valid for `mr <= MR` rows of `cols <= 16` elements at stride `ldc`.
#[inline(always)]
pub(super) unsafe fn via_scratch(
    c: *mut f32,
    ldc: usize,
    mr: usize,
    cols: usize,
    first: bool,
    full: impl FnOnce(*mut f32),
) {
    let mut t = [0f32; MR * NR];
    if !first {
        for r in 0..mr {
            std::ptr::copy_nonoverlapping(c.add(r * ldc), t.as_mut_ptr().add(r * NR), cols);
        }
    }
    full(t.as_mut_ptr());
    for r in 0..mr {
        std::ptr::copy_nonoverlapping(t.as_ptr().add(r * NR), c.add(r * ldc), cols);
    }
}

/// Whether the AVX2 + FMA micro-kernels can run here.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn avx2() -> bool {
    std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
}

/// Whether the AVX-512 micro-kernel of [`tile_pair`] can run here.
#[inline(always)]
pub(super) fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`tile`] for two adjacent full panels `b0`, `b1` (columns `0..16` and `16..32` of `c`) in
/// one pass over `a`: on AVX-512 a `mr x 32` tile of 12 accumulators (each element summed
/// over `k` in the same order as by [`tile`], so the results are identical).
///
/// # Safety
/// As [`tile`] with 32 columns; `b0` and `b1` hold at least `kc * 16` elements each.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_pair(
    kc: usize,
    a: &[f32],
    b0: &[f32],
    b1: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    first: bool,
) {
    debug_assert!(a.len() >= kc * MR && b0.len() >= kc * NR && b1.len() >= kc * NR);
    #[cfg(target_arch = "x86_64")]
    {
        if avx512() {
            let (a, b0, b1) = (a.as_ptr(), b0.as_ptr(), b1.as_ptr());
            return match mr {
                6 => micro_avx512::<6>(kc, a, b0, b1, c, ldc, first),
                5 => micro_avx512::<5>(kc, a, b0, b1, c, ldc, first),
                4 => micro_avx512::<4>(kc, a, b0, b1, c, ldc, first),
                3 => micro_avx512::<3>(kc, a, b0, b1, c, ldc, first),
                2 => micro_avx512::<2>(kc, a, b0, b1, c, ldc, first),
                _ => micro_avx512::<1>(kc, a, b0, b1, c, ldc, first),
            };
        }
    }
    tile(kc, a, b0, c, ldc, mr, NR, first);
    tile(kc, a, b1, c.add(NR), ldc, mr, NR, first);
}

/// The `M x 32` AVX-512 micro-kernel over two packed panels: per step of `k`, two loads, `M`
/// broadcasts and `2 M` FMAs of 16 lanes.
///
/// # Safety
/// As [`tile_pair`] with `mr == M`; the CPU has AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn micro_avx512<const M: usize>(
    kc: usize,
    a: *const f32,
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
    let (mut ap, mut p0, mut p1) = (a, b0, b1);
    for _ in 0..kc {
        let v0 = _mm512_loadu_ps(p0);
        let v1 = _mm512_loadu_ps(p1);
        for r in 0..M {
            let av = _mm512_set1_ps(*ap.add(r));
            acc0[r] = _mm512_fmadd_ps(av, v0, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(av, v1, acc1[r]);
        }
        ap = ap.add(MR);
        p0 = p0.add(NR);
        p1 = p1.add(NR);
    }
    for r in 0..M {
        _mm512_storeu_ps(c.add(r * ldc), acc0[r]);
        _mm512_storeu_ps(c.add(r * ldc + NR), acc1[r]);
    }
}

/// The portable tile: same summation order as the AVX2 one (FMA aside).
#[allow(clippy::too_many_arguments)]
unsafe fn tile_scalar(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    cols: usize,
    first: bool,
) {
    for r in 0..mr {
        let mut acc = [0f32; NR];
        if !first {
            for (q, v) in acc.iter_mut().enumerate().take(cols) {
                *v = *c.add(r * ldc + q);
            }
        }
        for p in 0..kc {
            let av = a[p * MR + r];
            let bp = &b[p * NR..(p + 1) * NR];
            for (v, &bv) in acc.iter_mut().zip(bp) {
                *v += av * bv;
            }
        }
        for (q, v) in acc.iter().enumerate().take(cols) {
            *c.add(r * ldc + q) = *v;
        }
    }
}

/// The `M x 16` register-blocked micro-kernel: per step of `k`, two loads of the packed panel,
/// `M` broadcasts from the packed rows and `2 M` FMAs.
///
/// # Safety
/// As [`tile`] with `cols == 16` and `mr == M`; the CPU has AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2<const M: usize>(
    kc: usize,
    a: *const f32,
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
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        for r in 0..M {
            let av = _mm256_broadcast_ss(&*ap.add(r));
            acc0[r] = _mm256_fmadd_ps(av, b0, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(av, b1, acc1[r]);
        }
        ap = ap.add(MR);
        bp = bp.add(NR);
    }
    for r in 0..M {
        _mm256_storeu_ps(c.add(r * ldc), acc0[r]);
        _mm256_storeu_ps(c.add(r * ldc + 8), acc1[r]);
    }
}
