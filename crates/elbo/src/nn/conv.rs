//! 2-D convolution `y = W * x + b` over `[B, C, H, W]` images (cross-correlation, as
//! `torch.nn.Conv2d`), with PyTorch's default initialisation.
//!
//! The product is candle's `conv2d`, which records a gradient for the input and the kernel
//! (its backward is a transposed convolution and a convolution of the input with the output
//! gradient; `tests/unet.rs` checks both against finite differences). 1x1 convolutions are
//! computed as one batched matrix product `W [out, in] x X [B, in, H W]`, which skips candle's
//! layout conversion.

use candle_core::{Tensor, Var};

use super::ParamInit;
use crate::{Error, Result};

/// A `k x k` convolution with `stride` and zero `padding`, weight `[out, in, k, k]`, bias `[out]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Var,
    bias: Var,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// Initialised as `torch.nn.Conv2d`: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    /// `fan_in = in k^2` (Kaiming-uniform with a = sqrt(5), He et al. 2015).
    pub fn new(
        p: &mut ParamInit,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::check(c_in, c_out, k, stride)?;
        let bound = 1.0 / ((c_in * k * k) as f64).sqrt();
        Ok(Self {
            weight: p.uniform("weight", &[c_out, c_in, k, k], bound)?,
            bias: p.uniform("bias", &[c_out], bound)?,
            stride,
            padding,
        })
    }

    /// A convolution whose weight and bias start at zero (the output layers of Ho et al. 2020's
    /// residual blocks and head, so each block starts as the identity).
    pub fn zeros(
        p: &mut ParamInit,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Self::check(c_in, c_out, k, stride)?;
        Ok(Self {
            weight: p.constant("weight", &[c_out, c_in, k, k], 0.0)?,
            bias: p.constant("bias", &[c_out], 0.0)?,
            stride,
            padding,
        })
    }

    fn check(c_in: usize, c_out: usize, k: usize, stride: usize) -> Result<()> {
        if c_in == 0 || c_out == 0 || k == 0 || stride == 0 {
            return Err(Error::Config(format!(
                "conv2d: channels ({c_in} -> {c_out}), kernel size ({k}) and stride ({stride}) \
                 must be at least 1"
            )));
        }
        Ok(())
    }

    /// The kernel, `[out, in, k, k]`.
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> &Tensor {
        self.bias.as_tensor()
    }

    /// `x: [B, in, H, W]` -> `[B, out, H', W']`, `H' = (H + 2 pad - k) / stride + 1`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let (c_out, c_in, kh, kw) = w.dims4()?;
        let (b, c, h, wd) = x.dims4().map_err(|_| {
            Error::Shape(format!(
                "conv2d: expected input [B, C, H, W], got {:?}",
                x.dims()
            ))
        })?;
        if c != c_in {
            return Err(Error::Shape(format!(
                "conv2d: input has {c} channels, the kernel expects {c_in}"
            )));
        }
        let bias = self.bias.as_tensor().reshape((1, c_out, 1, 1))?;
        if kh == 1 && kw == 1 && self.stride == 1 && self.padding == 0 {
            let y = w
                .reshape((c_out, c_in))?
                .broadcast_matmul(&x.reshape((b, c, h * wd))?)?; // [B, out, H W]
            return Ok(y.reshape((b, c_out, h, wd))?.broadcast_add(&bias)?);
        }
        // candle's conv2d backward derives the output padding of its transposed convolution from
        // the height alone, so a strided input whose height and width leave different
        // remainders gets a gradient of the wrong width. Then pad explicitly and drop the
        // trailing rows / columns that no window reaches (they do not affect the output).
        let (p, s) = (self.padding, self.stride);
        let (rh, rw) = (
            (h + 2 * p).saturating_sub(kh) % s,
            (wd + 2 * p).saturating_sub(kw) % s,
        );
        let y = if rh != rw && h + 2 * p >= kh && wd + 2 * p >= kw {
            let xp = x
                .pad_with_zeros(2, p, p)?
                .pad_with_zeros(3, p, p)? // [B, in, H + 2p, W + 2p]
                .narrow(2, 0, h + 2 * p - rh)?
                .narrow(3, 0, wd + 2 * p - rw)?;
            xp.conv2d(w, 0, s, 1, 1)? // [B, out, H', W']
        } else {
            x.conv2d(w, p, s, 1, 1)? // [B, out, H', W']
        };
        Ok(y.broadcast_add(&bias)?)
    }
}
