//! The im2col gather on channels-last images and its adjoint, as candle custom ops and as
//! row-range kernels for the tiled convolution of [`super::op`].
//!
//! Row `(b, oy, ox)` of `cols(x): [B Ho Wo, k k C]` holds `x[b, oy s + ky - p, ox s + kx - p, c]`
//! at column `(ky k + kx) C + c` (zero outside the image). The `kx` run of one kernel row is a
//! run of adjacent pixels, i.e. `(kx1 - kx0) C` contiguous floats, copied in one piece.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::{f32_contiguous, Window};

/// im2col on channels-last images: `[B, H, W, C]` -> `[B H' W', k k C]`, row
/// `(b, oy, ox)` holding `x[b, oy s + ky - p, ox s + kx - p, c]` at column `(ky k + kx) C + c`
/// (zero outside the image). Its backward is [`Col2Im`].
#[derive(Clone, Copy, Debug)]
pub struct Im2Col {
    /// The window.
    pub win: Window,
}

/// The adjoint of [`Im2Col`]: scatter-adds `[B H' W', k k C]` rows back into `[B, H, W, C]`.
#[derive(Clone, Copy, Debug)]
pub struct Col2Im {
    /// The window.
    pub win: Window,
    /// The image shape `(B, H, W, C)` to scatter into.
    pub shape: (usize, usize, usize, usize),
}

/// For output column `ox`, the kernel columns `kx0..kx1` that fall inside an image of width
/// `w`, and the image column `x0` of `kx0` (`None` when no column does).
fn kx_run(ox: usize, win: Window, w: usize) -> Option<(usize, usize, usize)> {
    let left = ox * win.stride; // image column of kx = 0, plus the padding
    let kx0 = win.padding.saturating_sub(left);
    let kx1 = win.k.min((w + win.padding).saturating_sub(left));
    (kx0 < kx1).then(|| (left + kx0 - win.padding, kx0, kx1))
}

/// Geometry shared by the row kernels: image `(h, w, c)`, window, output `(ho, wo)`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub win: Window,
    pub ho: usize,
    pub wo: usize,
}

impl Geometry {
    /// Columns of the im2col matrix, `k k C`.
    pub fn row(&self) -> usize {
        self.win.k * self.win.k * self.c
    }

    /// Floats per image, `H W C`.
    pub fn image(&self) -> usize {
        self.h * self.w * self.c
    }

    /// Output pixels per image, `Ho Wo`.
    pub fn pixels(&self) -> usize {
        self.ho * self.wo
    }

    /// True when the window of output pixel `p` lies inside the image (no padding read), so
    /// its runs cover its whole row of the column matrix.
    fn interior(&self, p: usize) -> bool {
        let (oy, ox) = (p / self.wo, p % self.wo);
        let Window { k, stride, padding } = self.win;
        let inside = |o: usize, n: usize| o * stride >= padding && o * stride + k <= n + padding;
        inside(oy, self.h) && inside(ox, self.w)
    }

    /// Visit the in-image runs of output pixel `p` of an image: `(column offset in the row,
    /// image offset, length)`.
    fn runs(&self, p: usize, mut f: impl FnMut(usize, usize, usize)) {
        let (oy, ox) = (p / self.wo, p % self.wo);
        let Window { k, stride, padding } = self.win;
        let Some((x0, kx0, kx1)) = kx_run(ox, self.win, self.w) else {
            return;
        };
        for ky in 0..k {
            let iy = (oy * stride + ky) as isize - padding as isize;
            if iy < 0 || iy >= self.h as isize {
                continue;
            }
            f(
                (ky * k + kx0) * self.c,
                (iy as usize * self.w + x0) * self.c,
                (kx1 - kx0) * self.c,
            );
        }
    }

    /// Gather output pixels `p0..p1` of one image `img: [H, W, C]` into `out`
    /// (`(p1 - p0) k k C` floats, fully overwritten).
    pub fn gather(&self, img: &[f32], p0: usize, p1: usize, out: &mut [f32]) {
        let row = self.row();
        for (r, p) in out.chunks_exact_mut(row).zip(p0..p1) {
            if !self.interior(p) {
                r.fill(0.0); // the window overhangs the image: zero padding
            }
            self.runs(p, |d, s, len| {
                r[d..d + len].copy_from_slice(&img[s..s + len])
            });
        }
    }

    /// Scatter-add the rows of output pixels `p0..p1` (`cols`, `(p1 - p0) k k C` floats) into
    /// one image's gradient `img: [H, W, C]`.
    pub fn scatter(&self, cols: &[f32], p0: usize, p1: usize, img: &mut [f32]) {
        let row = self.row();
        for (r, p) in cols.chunks_exact(row).zip(p0..p1) {
            self.runs(p, |d, s, len| {
                for (a, v) in img[s..s + len].iter_mut().zip(&r[d..d + len]) {
                    *a += v;
                }
            });
        }
    }
}

/// The geometry of `x: [B, H, W, C]` under `win`, or an error naming the misfit.
pub(crate) fn geometry(
    dims: (usize, usize, usize, usize),
    win: Window,
) -> candle_core::Result<Geometry> {
    let (_, h, w, c) = dims;
    let (Some(ho), Some(wo)) = (win.out_size(h), win.out_size(w)) else {
        bail!(
            "conv2d: a {k}x{k} window does not fit a {h}x{w} image",
            k = win.k
        )
    };
    Ok(Geometry {
        h,
        w,
        c,
        win,
        ho,
        wo,
    })
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "elbo-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims4()?;
        let x = f32_contiguous(s, l, self.name())?;
        let g = geometry(dims, self.win)?;
        let (rows, row) = (dims.0 * g.pixels(), g.row());
        let mut out = vec![0f32; rows * row];
        if !out.is_empty() {
            out.par_chunks_mut(g.pixels() * row)
                .zip(x.par_chunks(g.image()))
                .for_each(|(dst, img)| g.gather(img, 0, g.pixels(), dst));
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, row))))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let op = Col2Im {
            win: self.win,
            shape: arg.dims4()?,
        };
        Ok(Some(grad.contiguous()?.apply_op1(op)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "elbo-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = self.shape;
        let cols = f32_contiguous(s, l, self.name())?;
        let g = geometry(self.shape, self.win)?;
        if l.shape().dims() != [b * g.pixels(), g.row()] {
            bail!(
                "col2im: expected [{}, {}], got {:?}",
                b * g.pixels(),
                g.row(),
                l.dims()
            )
        }
        let mut out = vec![0f32; b * h * w * c];
        if !out.is_empty() {
            out.par_chunks_mut(g.image())
                .zip(cols.par_chunks(g.pixels() * g.row()))
                .for_each(|(img, src)| g.scatter(src, 0, g.pixels(), img));
        }
        Ok((CpuStorage::F32(out), Shape::from((b, h, w, c))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?.apply_op1(Im2Col { win: self.win })?,
        ))
    }
}
