//! 2-D convolution (cross-correlation, as `torch.nn.Conv2d`) computed as im2col + GEMM on
//! channels-last images `[B, H, W, C]`.
//!
//! A `k x k` convolution with stride `s` and zero padding `p` is `cols(x) W^T + b`, where
//! `cols(x): [B H' W', k k C]` gathers each output pixel's receptive field and
//! `W: [out, k k C]`. In the channels-last layout the `k` pixels of one kernel row are adjacent,
//! so the gather is one `memcpy` of `k C` floats per kernel row. On CPU `f32` the whole
//! convolution is one custom op, [`Conv2dOp`], whose backward recomputes the columns and returns
//! `dx = col2im(dy W)`, `dW = dy^T cols`, `db = sum dy`: only image-sized gradients pass through
//! candle's gradient store. [`Im2Col`] and its adjoint [`Col2Im`] are also custom ops with each
//! other as backward. 1x1 convolutions are the fused linear op of [`crate::nn::fused`]. Other
//! devices fall back to candle's `conv2d` (NCHW).
//!
//! candle's own CPU `conv2d` is the reference in `tests/nn/unet.rs`; its backward (a naive
//! transposed convolution, gradients accumulated through the graph) made a U-Net training step
//! several times slower, and it derives the width of the input gradient from the height, which
//! is wrong for strided inputs whose height and width leave different remainders.

mod im2col;
mod op;

pub use im2col::{Col2Im, Im2Col};
pub use op::{Conv2dOp, TILE_FLOATS};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Tensor, Var};

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
