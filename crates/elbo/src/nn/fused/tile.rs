//! Strided views of borrowed `f32` slices, for the tile loops of the fused attention kernel:
//! a tile, a head's rows inside a packed `qkv` buffer, or a transpose, without copying. The
//! products over them are in [`super::panels`].

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
    pub fn in_bounds(&self) -> bool {
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
