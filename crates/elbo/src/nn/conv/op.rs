//! The whole convolution as one custom op (CPU, f32), with its backward pass as a second op
//! that computes all three gradients in one sweep; the kernels are in [`super::tiled`].
//!
//! Forward: `y = cols(x) W^T + b`, the column matrix gathered tile by tile and never allocated
//! whole (9x the image for a 3x3 kernel). Backward (no graph recorded): `dW = dy^T cols`,
//! `dx = col2im(dy W)`, `db = sum_rows dy`; only `dx` (image-sized) returns to candle's
//! gradient store.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::f32_contiguous;
use super::im2col::{geometry, Geometry};
use super::tiled;
use super::Window;

/// `y = cols(x) W^T + b` on `(x: [B, H, W, C], W: [out, k k C], b)`, giving `[B Ho Wo, out]`,
/// with one bias `b: [out]` for all images or one per image, `b: [B, out]` (a convolution's
/// bias plus a per-image shift such as a projected time embedding, added while the output
/// tile is in cache; its gradient is then per image too).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOp {
    /// The window.
    pub win: Window,
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
        let b = xl.dims()[0];
        let c_out = match *bl.dims() {
            [c] => c,
            [bb, c] if bb == b => c,
            _ => bail!(
                "conv2d: bias {:?} for input {:?}: expected [out] or [B, out]",
                bl.dims(),
                xl.dims()
            ),
        };
        let g = self.check(xl, wl, c_out)?;
        let x = f32_contiguous(xs, xl, self.name())?;
        let bias = f32_contiguous(bs, bl, self.name())?;
        let w = f32_contiguous(ws, wl, self.name())?;
        let y = tiled::forward(&g, x, w, bias, b, c_out);
        let rows = b * g.pixels();
        Ok((CpuStorage::F32(y), Shape::from((rows, c_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
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
        let db = Tensor::from_vec(db, (x.dim(0)?, c_out), dev)?; // [B, out]
        let db = if bias.rank() == 1 { db.sum(0)? } else { db };
        Ok((
            x.track_op().then_some(dx),
            Some(Tensor::from_vec(dw, (c_out, row), dev)?),
            Some(db),
        ))
    }
}

/// The backward pass of [`Conv2dOp`] as an op on `(x, W, dy)` giving `dx` (an empty tensor
/// when not wanted) and leaving `(dW, db)` in `params`, `db` per image (`[B, out]`).
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
        let b = xl.dims()[0];
        if rows != b * g.pixels() {
            bail!(
                "conv2d backward: gradient {:?} for input {:?}",
                gl.dims(),
                xl.dims()
            )
        }
        let w = f32_contiguous(ws, wl, self.name())?;
        let (dx, dw, db) = tiled::backward(&g, x, w, dy, b, self.want_dx);
        match self.params.lock() {
            Ok(mut p) => *p = Some((dw, db)),
            Err(_) => bail!("conv2d backward: lock poisoned"),
        }
        // without `dx` the result is an empty placeholder (the caller drops it)
        let shape = if self.want_dx {
            xl.shape().clone()
        } else {
            Shape::from(0)
        };
        Ok((CpuStorage::F32(dx), shape))
    }
}
