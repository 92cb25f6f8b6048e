//! Layers composed only of candle's own differentiable ops (`matmul`, `broadcast_add`,
//! `maximum`, `conv2d`, `avg_pool2d`, `upsample_nearest2d`), so every gradient they produce is
//! itself a graph that can be differentiated again with `Tensor::backward_create_graph`.
//!
//! The fast layers of [`crate::nn`] ([`crate::nn::Linear`], [`crate::nn::Mlp`], the im2col
//! convolution) carry hand-written backward passes that return constants: a gradient computed
//! through them is right, but the gradient *of that gradient* silently misses every path through
//! their weights. Anything that differentiates a derivative (the WGAN-GP gradient penalty,
//! Gulrajani et al. 2017, algorithm 1; score matching) must run on these layers instead.

use candle_core::{Tensor, Var};

use super::ParamInit;
use crate::{Error, Result};

/// `y = x W^T + b` as `matmul` + `broadcast_add`; W: [out, in], b: [out].
#[derive(Clone, Debug)]
pub struct PlainLinear {
    weight: Var,
    bias: Var,
}

impl PlainLinear {
    /// Initialised as `torch.nn.Linear`: W, b ~ U(-1/sqrt(in), 1/sqrt(in)).
    pub fn new(p: &mut ParamInit, d_in: usize, d_out: usize) -> Result<Self> {
        let bound = 1.0 / (d_in.max(1) as f64).sqrt();
        Ok(Self {
            weight: p.uniform("weight", &[d_out, d_in], bound)?,
            bias: p.uniform("bias", &[d_out], bound)?,
        })
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The bias `[out]`.
    pub fn bias(&self) -> &Tensor {
        self.bias.as_tensor()
    }

    /// `x: [B, in]` -> `[B, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }
}

/// A `k x k` convolution, stride 1, zero padding `k / 2` (the output keeps the input's size),
/// on NCHW images through candle's `conv2d`; W: [out, in, k, k], b: [out].
#[derive(Clone, Debug)]
pub struct PlainConv {
    weight: Var,
    bias: Var,
    padding: usize,
}

impl PlainConv {
    /// Initialised as `torch.nn.Conv2d`: U(-1/sqrt(in k k), 1/sqrt(in k k)).
    pub fn new(p: &mut ParamInit, c_in: usize, c_out: usize, k: usize) -> Result<Self> {
        if k.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "a size-preserving convolution needs an odd kernel, got {k}"
            )));
        }
        let bound = 1.0 / ((c_in * k * k).max(1) as f64).sqrt();
        Ok(Self {
            weight: p.uniform("weight", &[c_out, c_in, k, k], bound)?,
            bias: p.uniform("bias", &[c_out], bound)?,
            padding: k / 2,
        })
    }

    /// `x: [B, in, H, W]` -> `[B, out, H, W]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(self.weight.as_tensor(), self.padding, 1, 1, 1)?; // [B, out, H, W]
        let b = self.bias.as_tensor().reshape((1, (), 1, 1))?; // [1, out, 1, 1]
        Ok(y.broadcast_add(&b)?)
    }
}

/// LeakyReLU `max(x, slope x)` for `0 <= slope < 1` (Maas et al. 2013), as candle's
/// `maximum`, whose backward is a mask times the incoming gradient (differentiable again).
pub fn leaky_relu(x: &Tensor, slope: f64) -> Result<Tensor> {
    Ok(x.maximum(&(x * slope)?)?)
}

/// `log(1 + e^x)` computed stably as `relu(x) + log(1 + e^{-|x|})`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}
