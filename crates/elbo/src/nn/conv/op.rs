//! The whole convolution as one tiled custom op (CPU, f32).
//!
//! Forward: the output rows (pixels of all images, in order) are processed in tiles of about
//! [`TILE_FLOATS`] column floats: gather a tile of `cols(x)`, multiply by `W^T` (candle's CPU GEMM), add the bias. The
//! full column matrix (9x the image for a 3x3 kernel, 170 MB for a 28x28 batch of 64 with 96
//! channels) is never allocated, and each tile is still in cache when multiplied.
//!
//! Backward (no graph recorded): per tile, `dW += dy_tile^T cols_tile`,
//! `dx += col2im(dy_tile W)`; `db = sum_rows dy`. Only `dx` (image-sized) returns to candle's
//! gradient store.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::f32_contiguous;
use super::im2col::{geometry, Geometry};
use super::Window;

/// Column floats per tile (1 MiB of f32).
pub const TILE_FLOATS: usize = 1 << 18;

/// `y = cols(x) W^T + b` on `(x: [B, H, W, C], W: [out, k k C], b: [out])`, giving
/// `[B Ho Wo, out]`.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOp {
    /// The window.
    pub win: Window,
}

/// Row tiles `r0..r1` of `rows` rows, at most `tile` each.
fn tiles(rows: usize, tile: usize) -> impl Iterator<Item = (usize, usize)> {
    let tile = tile.max(1);
    (0..rows)
        .step_by(tile)
        .map(move |r0| (r0, (r0 + tile).min(rows)))
}

/// Split global rows `r0..r1` (pixel-major within image-major order) into per-image pieces
/// `(image, p0, p1, offset of the piece within the tile)`.
fn pieces(
    r0: usize,
    r1: usize,
    pixels: usize,
) -> impl Iterator<Item = (usize, usize, usize, usize)> {
    let mut r = r0;
    std::iter::from_fn(move || {
        if r >= r1 || pixels == 0 {
            return None;
        }
        let (i, p0) = (r / pixels, r % pixels);
        let p1 = pixels.min(p0 + (r1 - r));
        let piece = (i, p0, p1, r - r0);
        r += p1 - p0;
        Some(piece)
    })
}

/// Gather rows `r0..r1` of `cols(x)` into `out`.
fn gather_rows(g: &Geometry, x: &[f32], r0: usize, r1: usize, out: &mut [f32]) {
    let row = g.row();
    for (i, p0, p1, off) in pieces(r0, r1, g.pixels()) {
        let img = &x[i * g.image()..(i + 1) * g.image()];
        g.gather(img, p0, p1, &mut out[off * row..(off + p1 - p0) * row]);
    }
}

/// Scatter-add rows `r0..r1` of a column gradient `cols` into `dx`.
fn scatter_rows(g: &Geometry, cols: &[f32], r0: usize, r1: usize, dx: &mut [f32]) {
    let row = g.row();
    for (i, p0, p1, off) in pieces(r0, r1, g.pixels()) {
        let img = &mut dx[i * g.image()..(i + 1) * g.image()];
        g.scatter(&cols[off * row..(off + p1 - p0) * row], p0, p1, img);
    }
}

/// `lhs [m, k] (layout lhs_l) x rhs (layout rhs_l, [k, n])` through candle's CPU GEMM.
fn matmul(
    lhs: &CpuStorage,
    lhs_l: &Layout,
    rhs: &CpuStorage,
    rhs_l: &Layout,
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<Vec<f32>> {
    match lhs.matmul(rhs, (1, m, n, k), lhs_l, rhs_l)? {
        CpuStorage::F32(v) => Ok(v),
        s => bail!("conv2d: expected an f32 product, got {:?}", s.dtype()),
    }
}

impl Conv2dOp {
    fn check(&self, xl: &Layout, wl: &Layout, c_out: usize) -> candle_core::Result<Geometry> {
        let dims = xl.shape().dims4()?;
        let g = geometry(dims, self.win)?;
        if wl.shape().dims() != [c_out, g.row()] {
            bail!(
                "conv2d: x {:?} and W {:?} do not fit together",
                xl.dims(),
                wl.dims()
            )
        }
        Ok(g)
    }
}

impl CustomOp3 for Conv2dOp {
    fn name(&self) -> &'static str {
        "elbo-conv2d"
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
        let c_out = bl.shape().dims1()?;
        let g = self.check(xl, wl, c_out)?;
        let x = f32_contiguous(xs, xl, self.name())?;
        let bias = f32_contiguous(bs, bl, self.name())?;
        let (b, row) = (xl.dims()[0], g.row());
        let rows = b * g.pixels();
        let mut y = vec![0f32; rows * c_out];
        let tile = (TILE_FLOATS / row.max(1)).max(1);
        let mut buf = CpuStorage::F32(vec![0f32; tile.min(rows) * row]);
        let wt = wl.transpose(0, 1)?; // [k k C, out]
        for (r0, r1) in tiles(rows, tile) {
            let n = r1 - r0;
            let CpuStorage::F32(cols) = &mut buf else {
                bail!("conv2d: tile buffer is not f32")
            };
            gather_rows(&g, x, r0, r1, &mut cols[..n * row]);
            let out = matmul(
                &buf,
                &Layout::contiguous((n, row)),
                ws,
                &wt,
                (n, c_out, row),
            )?;
            for (dst, src) in y[r0 * c_out..(r0 + n) * c_out]
                .chunks_exact_mut(c_out)
                .zip(out.chunks_exact(c_out))
            {
                for ((d, s), bv) in dst.iter_mut().zip(src).zip(bias) {
                    *d = s + bv;
                }
            }
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = Conv2dBackward {
            win: self.win,
            want_dx: x.track_op(),
            params: Mutex::new(None),
        };
        let dx = x
            .detach()
            .apply_op3_no_bwd(&w.detach(), &grad.detach().contiguous()?, &op)?;
        let Ok(Some((dw, db))) = op.params.into_inner() else {
            bail!("conv2d backward: the parameter gradients were not computed")
        };
        let (c_out, row) = w.dims2()?;
        let dev = x.device();
        Ok((
            x.track_op().then_some(dx),
            Some(Tensor::from_vec(dw, (c_out, row), dev)?),
            Some(Tensor::from_vec(db, c_out, dev)?),
        ))
    }
}

/// The backward pass of [`Conv2dOp`] as an op on `(x, W, dy)` giving `dx` (zeros when not
/// wanted) and leaving `(dW, db)` in `params`.
struct Conv2dBackward {
    win: Window,
    want_dx: bool,
    params: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp3 for Conv2dBackward {
    fn name(&self) -> &'static str {
        "elbo-conv2d-backward"
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
        let (rows, c_out) = gl.shape().dims2()?;
        let g = Conv2dOp { win: self.win }.check(xl, wl, c_out)?;
        let x = f32_contiguous(xs, xl, self.name())?;
        let dy = f32_contiguous(gs, gl, self.name())?;
        let (b, row) = (xl.dims()[0], g.row());
        if rows != b * g.pixels() {
            bail!(
                "conv2d backward: gradient {:?} for input {:?}",
                gl.dims(),
                xl.dims()
            )
        }
        let gstart = gl.start_offset();
        let mut dx = vec![0f32; x.len()];
        let mut dw = vec![0f32; c_out * row];
        let mut db = vec![0f32; c_out];
        for r in dy.chunks_exact(c_out) {
            for (a, v) in db.iter_mut().zip(r) {
                *a += v;
            }
        }
        let tile = (TILE_FLOATS / row.max(1)).max(1);
        let mut buf = CpuStorage::F32(vec![0f32; tile.min(rows) * row]);
        for (r0, r1) in tiles(rows, tile) {
            let n = r1 - r0;
            let CpuStorage::F32(cols) = &mut buf else {
                bail!("conv2d backward: tile buffer is not f32")
            };
            gather_rows(&g, x, r0, r1, &mut cols[..n * row]);
            // dW += dy_tile^T cols_tile: [out, n] x [n, k k C]
            let dy_t =
                Layout::contiguous_with_offset((n, c_out), gstart + r0 * c_out).transpose(0, 1)?;
            let part = matmul(
                gs,
                &dy_t,
                &buf,
                &Layout::contiguous((n, row)),
                (c_out, row, n),
            )?;
            for (a, v) in dw.iter_mut().zip(&part) {
                *a += v;
            }
            if self.want_dx {
                // dcols = dy_tile W: [n, out] x [out, k k C], scattered back into the image
                let dy_l = Layout::contiguous_with_offset((n, c_out), gstart + r0 * c_out);
                let dcols = matmul(gs, &dy_l, ws, wl, (n, row, c_out))?;
                scatter_rows(&g, &dcols, r0, r1, &mut dx);
            }
        }
        match self.params.lock() {
            Ok(mut p) => *p = Some((dw, db)),
            Err(_) => bail!("conv2d backward: lock poisoned"),
        }
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}
