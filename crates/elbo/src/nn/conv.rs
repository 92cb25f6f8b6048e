//! 2-D convolution (cross-correlation, as `torch.nn.Conv2d`) computed as im2col + GEMM on
//! channels-last images `[B, H, W, C]`.
//!
//! A `k x k` convolution with stride `s` and zero padding `p` is `cols(x) W^T + b`, where
//! `cols(x): [B H' W', k k C]` gathers each output pixel's receptive field (rows of `C`
//! contiguous channels, so the gather is a sequence of `memcpy`s in the channels-last layout)
//! and `W: [out, k k C]`. The product and the bias (and an optional SiLU) are the fused
//! [`crate::nn::fused::linear_act`] op with its own backward; [`Im2Col`] is a custom op whose
//! backward is the scatter-add [`Col2Im`], so the whole convolution records gradients for the
//! input, the kernel and the bias. The result `[B H' W', out]` is already channels-last.
//!
//! candle's own `conv2d` (NCHW) is the reference in `tests/unet.rs`; it is several times slower
//! here (a layout conversion per call and a naive transposed convolution in its backward), and
//! its backward derives the width of the input gradient from the height, which is wrong for
//! strided inputs whose height and width leave different remainders.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use super::fused::{self, FusedAct};
use super::ParamInit;
use crate::{Error, Result};

/// The geometry of a square convolution window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Kernel size `k`.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Window {
    /// Output size along a dimension of input size `n`, or `None` if the window does not fit.
    pub fn out_size(&self, n: usize) -> Option<usize> {
        (n + 2 * self.padding)
            .checked_sub(self.k)
            .map(|r| r / self.stride + 1)
    }
}

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

/// A contiguous `f32` view of `s` under layout `l`.
pub(crate) fn f32_contiguous<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: expected f32, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: the tensor is not contiguous"),
    }
}

/// For output column `ox`, the kernel columns `kx0..kx1` that fall inside an image of width
/// `w`, and the image column `x0` of `kx0` (`None` when no column does).
fn kx_run(
    ox: usize,
    stride: usize,
    padding: usize,
    k: usize,
    w: usize,
) -> Option<(usize, usize, usize)> {
    let left = ox * stride; // image column of kx = 0, plus `padding`
    let kx0 = padding.saturating_sub(left);
    let kx1 = k.min((w + padding).saturating_sub(left));
    (kx0 < kx1).then(|| (left + kx0 - padding, kx0, kx1))
}

/// The im2col gather of a contiguous channels-last image batch `x: [B, H, W, C]` into
/// `[B Ho Wo, k k C]` rows (see [`Im2Col`]).
fn im2col(
    x: &[f32],
    (b, h, w, c): (usize, usize, usize, usize),
    win: Window,
    (ho, wo): (usize, usize),
) -> Vec<f32> {
    let Window { k, stride, padding } = win;
    let row = k * k * c;
    let mut out = vec![0f32; b * ho * wo * row];
    if out.is_empty() {
        return out;
    }
    out.par_chunks_mut(ho * wo * row)
        .zip(x.par_chunks(h * w * c))
        .for_each(|(dst, img)| {
            for oy in 0..ho {
                for ox in 0..wo {
                    let r = &mut dst[(oy * wo + ox) * row..(oy * wo + ox + 1) * row];
                    let Some((x0, kx0, kx1)) = kx_run(ox, stride, padding, k, w) else {
                        continue;
                    };
                    for ky in 0..k {
                        let iy = (oy * stride + ky) as isize - padding as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        // pixels kx0..kx1 of this kernel row are adjacent in the image
                        let src = (iy as usize * w + x0) * c;
                        let len = (kx1 - kx0) * c;
                        let d = (ky * k + kx0) * c;
                        r[d..d + len].copy_from_slice(&img[src..src + len]);
                    }
                }
            }
        });
    out
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "elbo-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = l.shape().dims4()?;
        let x = f32_contiguous(s, l, self.name())?;
        let k = self.win.k;
        let (Some(ho), Some(wo)) = (self.win.out_size(h), self.win.out_size(w)) else {
            bail!("im2col: a {k}x{k} window does not fit a {h}x{w} image")
        };
        let out = im2col(x, (b, h, w, c), self.win, (ho, wo));
        let row = k * k * c;
        Ok((CpuStorage::F32(out), Shape::from((b * ho * wo, row))))
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
        let g = f32_contiguous(s, l, self.name())?;
        let Window { k, stride, padding } = self.win;
        let (Some(ho), Some(wo)) = (self.win.out_size(h), self.win.out_size(w)) else {
            bail!("col2im: a {k}x{k} window does not fit a {h}x{w} image")
        };
        let row = k * k * c;
        if l.shape().dims() != [b * ho * wo, row] {
            bail!(
                "col2im: expected [{}, {row}], got {:?}",
                b * ho * wo,
                l.dims()
            )
        }
        let mut out = vec![0f32; b * h * w * c];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((b, h, w, c))));
        }
        out.par_chunks_mut(h * w * c)
            .zip(g.par_chunks(ho * wo * row))
            .for_each(|(img, src)| {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let r = &src[(oy * wo + ox) * row..(oy * wo + ox + 1) * row];
                        let Some((x0, kx0, kx1)) = kx_run(ox, stride, padding, k, w) else {
                            continue;
                        };
                        for ky in 0..k {
                            let iy = (oy * stride + ky) as isize - padding as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let d = (iy as usize * w + x0) * c;
                            let len = (kx1 - kx0) * c;
                            let sr = &r[(ky * k + kx0) * c..(ky * k + kx0) * c + len];
                            for (a, v) in img[d..d + len].iter_mut().zip(sr) {
                                *a += v;
                            }
                        }
                    }
                }
            });
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

/// The whole convolution `y = im2col(x) W^T + b` as one op on `(x: [B, H, W, C],
/// W: [out, k k C], b: [out])` giving `[B Ho Wo, out]` (CPU, f32). Only `dL/dx` (image-sized)
/// goes back through candle's gradient store: the backward recomputes the columns, takes
/// `dW = dy^T cols`, `db = sum_rows dy` and `dx = col2im(dy W)` without recording a graph, so
/// the 9x larger column gradient is never accumulated.
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOp {
    /// The window.
    pub win: Window,
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
        let (b, h, w, c) = xl.shape().dims4()?;
        let (c_out, kkc) = wl.shape().dims2()?;
        let k = self.win.k;
        let (Some(ho), Some(wo)) = (self.win.out_size(h), self.win.out_size(w)) else {
            bail!("conv2d: a {k}x{k} window does not fit a {h}x{w} image")
        };
        if kkc != k * k * c || bl.shape().dims1()? != c_out {
            bail!(
                "conv2d: x {:?}, W {:?} and b {:?} do not fit together",
                xl.dims(),
                wl.dims(),
                bl.dims()
            )
        }
        let x = f32_contiguous(xs, xl, self.name())?;
        let bias = f32_contiguous(bs, bl, self.name())?;
        let rows = b * ho * wo;
        let cols = CpuStorage::F32(im2col(x, (b, h, w, c), self.win, (ho, wo)));
        let y = cols.matmul(
            ws,
            (1, rows, c_out, kkc),
            &Layout::contiguous((rows, kkc)),
            &wl.transpose(0, 1)?,
        )?; // [rows, out]
        let CpuStorage::F32(mut y) = y else {
            bail!("conv2d: expected an f32 product")
        };
        if c_out > 0 {
            y.par_chunks_mut(c_out.max(1024 / c_out * c_out))
                .for_each(|blk| {
                    for r in blk.chunks_exact_mut(c_out) {
                        for (v, bv) in r.iter_mut().zip(bias) {
                            *v += bv;
                        }
                    }
                });
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
        let g = grad.detach().contiguous()?; // [rows, out]
        let cols = x.detach().apply_op1_no_bwd(&Im2Col { win: self.win })?; // [rows, k k C]
        let dw = g.t()?.matmul(&cols)?; // [out, k k C]
        drop(cols);
        let db = g.apply_op1_no_bwd(&ColumnSums)?; // [out]
        let dx = if x.track_op() {
            let dcols = g.matmul(&w.detach())?; // [rows, k k C]
            Some(dcols.apply_op1_no_bwd(&Col2Im {
                win: self.win,
                shape: x.dims4()?,
            })?)
        } else {
            None
        };
        Ok((dx, Some(dw), Some(db)))
    }
}

/// The column sums of a contiguous `[rows, cols]` matrix, `[cols]` (candle's `sum(0)` walks
/// the matrix with a stride; this adds whole rows).
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "elbo-conv-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, cols) = l.shape().dims2()?;
        let g = f32_contiguous(s, l, self.name())?;
        let mut acc = vec![0f32; cols];
        if cols > 0 {
            for r in g.chunks_exact(cols) {
                for (a, v) in acc.iter_mut().zip(r) {
                    *a += v;
                }
            }
        }
        Ok((CpuStorage::F32(acc), Shape::from(cols)))
    }
}

/// A `k x k` convolution with weight `[out, k k in]` (column order `(ky, kx, c)`) and bias
/// `[out]`, on channels-last images.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Var,
    bias: Var,
    win: Window,
    c_in: usize,
}

impl Conv2d {
    /// Initialised as `torch.nn.Conv2d`: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    /// `fan_in = in k^2` (Kaiming-uniform with a = sqrt(5), He et al. 2015).
    pub fn new(p: &mut ParamInit, c_in: usize, c_out: usize, win: Window) -> Result<Self> {
        Self::check(c_in, c_out, win)?;
        let fan_in = c_in * win.k * win.k;
        let bound = 1.0 / (fan_in as f64).sqrt();
        Ok(Self {
            weight: p.uniform("weight", &[c_out, fan_in], bound)?,
            bias: p.uniform("bias", &[c_out], bound)?,
            win,
            c_in,
        })
    }

    /// A convolution whose weight and bias start at zero (the output layers of the residual
    /// blocks and the head in improved DDPM, so each block starts as the identity).
    pub fn zeros(p: &mut ParamInit, c_in: usize, c_out: usize, win: Window) -> Result<Self> {
        Self::check(c_in, c_out, win)?;
        Ok(Self {
            weight: p.constant("weight", &[c_out, c_in * win.k * win.k], 0.0)?,
            bias: p.constant("bias", &[c_out], 0.0)?,
            win,
            c_in,
        })
    }

    fn check(c_in: usize, c_out: usize, win: Window) -> Result<()> {
        if c_in == 0 || c_out == 0 || win.k == 0 || win.stride == 0 {
            return Err(Error::Config(format!(
                "conv2d: channels ({c_in} -> {c_out}), kernel size ({}) and stride ({}) must be \
                 at least 1",
                win.k, win.stride
            )));
        }
        Ok(())
    }

    /// The kernel `[out, k k in]`, columns in `(ky, kx, c)` order.
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The kernel in PyTorch's layout `[out, in, k, k]` (a copy).
    pub fn weight_oihw(&self) -> Result<Tensor> {
        let (o, k) = (self.weight.dim(0)?, self.win.k);
        Ok(self
            .weight
            .as_tensor()
            .reshape((o, k, k, self.c_in))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> &Tensor {
        self.bias.as_tensor()
    }

    /// `x: [B, H, W, in]` (channels last) -> `[B, H', W', out]`,
    /// `H' = (H + 2 p - k) / s + 1`; `silu` applies SiLU to the result (fused).
    pub fn forward_nhwc(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4().map_err(|_| {
            Error::Shape(format!(
                "conv2d: expected channels-last input [B, H, W, C], got {:?}",
                x.dims()
            ))
        })?;
        if c != self.c_in {
            return Err(Error::Shape(format!(
                "conv2d: input has {c} channels, the kernel expects {}",
                self.c_in
            )));
        }
        let (Some(ho), Some(wo)) = (self.win.out_size(h), self.win.out_size(w)) else {
            return Err(Error::Shape(format!(
                "conv2d: a {k}x{k} window does not fit a {h}x{w} image",
                k = self.win.k
            )));
        };
        let act = if silu {
            FusedAct::Silu
        } else {
            FusedAct::Identity
        };
        let cols = if self.win
            == (Window {
                k: 1,
                stride: 1,
                padding: 0,
            }) {
            x.reshape((b * h * w, c))? // [B H W, C]: a 1x1 convolution is a linear map
        } else if fused::cpu_f32(&[x, self.weight.as_tensor(), self.bias.as_tensor()]) {
            let y = x.contiguous()?.apply_op3(
                self.weight.as_tensor(),
                self.bias.as_tensor(),
                Conv2dOp { win: self.win },
            )?; // [B H' W', out]
            let y = y.reshape((b, ho, wo, ()))?;
            return Ok(if silu { y.silu()? } else { y });
        } else {
            // other devices: candle's convolution in NCHW
            let y = x
                .permute((0, 3, 1, 2))?
                .conv2d(
                    &self.weight_oihw()?,
                    self.win.padding,
                    self.win.stride,
                    1,
                    1,
                )?
                .permute((0, 2, 3, 1))?
                .broadcast_add(self.bias.as_tensor())?; // [B, H', W', out]
            return Ok(if silu { y.silu()? } else { y });
        };
        let y = fused::linear_act(&cols, self.weight.as_tensor(), self.bias.as_tensor(), act)?;
        Ok(y.reshape((b, ho, wo, ()))?) // [B, H', W', out]
    }

    /// `x: [B, in, H, W]` (channels first) -> `[B, out, H', W']` (two layout copies around
    /// [`Conv2d::forward_nhwc`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            return Err(Error::Shape(format!(
                "conv2d: expected input [B, C, H, W], got {:?}",
                x.dims()
            )));
        }
        let y = self.forward_nhwc(&x.permute((0, 2, 3, 1))?.contiguous()?, false)?;
        Ok(y.permute((0, 3, 1, 2))?.contiguous()?)
    }
}
