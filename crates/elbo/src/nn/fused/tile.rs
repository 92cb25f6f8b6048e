//! Small dense matrix products on borrowed `f32` slices, for the tile loops of the fused
//! attention kernel: a bounds-checked, safe front end to the `gemm` crate (the one candle's CPU
//! matmul uses, with its run-time selected AVX2 / AVX-512 micro-kernels), always on the calling
//! thread so the callers decide the parallelism.

use candle_core::bail;

/// A read-only `rows x cols` matrix in `data`: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// The row-major `rows x cols` matrix at the start of `data`.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// `rows x cols` with row stride `rs` (contiguous rows) at the start of `data`.
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (a view: no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// True when every element lies inside `data`.
    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// A mutable row-major `rows x cols` matrix with row stride `rs` in `data`.
#[derive(Debug)]
pub(crate) struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
}

impl<'a> MatMut<'a> {
    /// The row-major `rows x cols` matrix at the start of `data`.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
        }
    }
}

/// `dst <- beta * a b` (`accumulate = false`) or `dst <- dst + beta * a b` (`true`), with
/// `a: [m, k]`, `b: [k, n]`, `dst: [m, n]`. Shapes and bounds are checked; an empty `k` leaves
/// `dst` unchanged when accumulating and zero otherwise.
pub(crate) fn matmul(
    dst: MatMut<'_>,
    a: MatRef<'_>,
    b: MatRef<'_>,
    beta: f32,
    accumulate: bool,
) -> candle_core::Result<()> {
    let (m, n, k) = (dst.rows, dst.cols, a.cols);
    if a.rows != m || b.rows != k || b.cols != n {
        bail!(
            "tile matmul: [{}, {}] x [{}, {}] does not give [{m}, {n}]",
            a.rows,
            a.cols,
            b.rows,
            b.cols
        )
    }
    let dst_ok = m == 0 || n == 0 || (dst.cols <= dst.rs && (m - 1) * dst.rs + n <= dst.data.len());
    if !dst_ok || !a.in_bounds() || !b.in_bounds() {
        bail!("tile matmul: a matrix view runs past its slice")
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
    // SAFETY: the checks above put every element of the three views inside their slices
    // (`dst` exclusively borrowed, so it aliases neither input); strides fit in isize because
    // the slices' lengths do; `gemm` reads and writes exactly the elements of the views.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_triple_loop_with_transposed_views() {
        let (m, n, k) = (5, 3, 7);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let bt: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect(); // [n, k]
        let mut c = vec![1f32; m * n];
        let b = MatRef::rows(&bt, n, k).t(); // [k, n]
        matmul(
            MatMut::rows(&mut c, m, n),
            MatRef::rows(&a, m, k),
            b,
            2.0,
            true,
        )
        .unwrap();
        for i in 0..m {
            for j in 0..n {
                let s: f32 = (0..k).map(|l| a[i * k + l] * bt[j * k + l]).sum();
                assert!((c[i * n + j] - (1.0 + 2.0 * s)).abs() < 1e-4);
            }
        }
        let short = MatRef::rows(&a[..10], m, k);
        assert!(matmul(MatMut::rows(&mut c, m, n), short, b, 1.0, false).is_err());
    }
}
