//! The building blocks of the U-Net (Ho et al. 2020, appendix B; Nichol & Dhariwal 2021,
//! "Improved Denoising Diffusion Probabilistic Models", the `ResBlock` / `AttentionBlock` /
//! `Downsample` / `Upsample` of their code) on channels-last feature maps `[B, H, W, C]`: every
//! op records gradients.

use candle_core::Tensor;

use super::upsample::upsample_nearest2_nhwc;
use crate::nn::conv::{Conv2d, Window};
use crate::nn::group_norm::GroupNorm;
use crate::nn::transformer::softmax_last_dim;
use crate::nn::{fused, Linear, ParamInit};
use crate::{Error, Result, Rng};

/// A 3x3 convolution keeping the size.
pub(crate) const SAME3: Window = Window {
    k: 3,
    stride: 1,
    padding: 1,
};
/// A 1x1 convolution (a linear map of the channels).
pub(crate) const POINT: Window = Window {
    k: 1,
    stride: 1,
    padding: 0,
};

/// Inverted dropout (Srivastava et al. 2014): zero each entry with probability `p` and scale
/// the rest by `1 / (1 - p)`; the mask is drawn from `rng`. Identity when `p == 0`.
pub fn dropout(x: &Tensor, p: f64, rng: &mut Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return Err(Error::Config(format!("dropout must be in [0, 1), got {p}")));
    }
    let u = rng.uniform_tensor(x.dims(), x.device())?; // [shape] in [0, 1)
    let keep = u.ge(p)?.to_dtype(x.dtype())?;
    Ok((x * (keep * (1.0 / (1.0 - p)))?)?)
}

/// Residual block: `skip(x) + conv2(drop(silu(gn2(conv1(silu(gn1(x))) + proj(temb)))))`,
/// with the time embedding projected per channel and added after the first convolution
/// (Ho et al. 2020). `skip` is a 1x1 convolution when the channel count changes.
#[derive(Clone, Debug)]
pub struct ResBlock {
    gn1: GroupNorm,
    conv1: Conv2d,
    temb: Linear,
    gn2: GroupNorm,
    conv2: Conv2d,
    skip: Option<Conv2d>,
}

impl ResBlock {
    /// `c_in -> c_out` channels; `temb_dim` is the width of the (already SiLU-ed) time
    /// embedding; `zero_out` starts `conv2` at zero so the block is the identity (on its skip).
    pub fn new(
        p: &mut ParamInit,
        c_in: usize,
        c_out: usize,
        temb_dim: usize,
        groups: usize,
        zero_out: bool,
    ) -> Result<Self> {
        let gn1 = GroupNorm::new(&mut p.push("gn1"), groups, c_in)?;
        let conv1 = Conv2d::new(&mut p.push("conv1"), c_in, c_out, SAME3)?;
        let temb = Linear::new(&mut p.push("temb"), temb_dim, c_out, true)?;
        let gn2 = GroupNorm::new(&mut p.push("gn2"), groups, c_out)?;
        let conv2 = if zero_out {
            Conv2d::zeros(&mut p.push("conv2"), c_out, c_out, SAME3)?
        } else {
            Conv2d::new(&mut p.push("conv2"), c_out, c_out, SAME3)?
        };
        let skip = if c_in != c_out {
            Some(Conv2d::new(&mut p.push("skip"), c_in, c_out, POINT)?)
        } else {
            None
        };
        Ok(Self {
            gn1,
            conv1,
            temb,
            gn2,
            conv2,
            skip,
        })
    }

    /// `x: [B, H, W, c_in]`, `temb: [B, E]` (SiLU already applied) -> `[B, H, W, c_out]`;
    /// dropout with probability `drop.0` from `drop.1` when given.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        drop: Option<(f64, &mut Rng)>,
    ) -> Result<Tensor> {
        let e = self.temb.forward(temb)?; // [B, c_out]
                                          // conv1(silu(gn1(x))) + e, the time embedding added inside the convolution
        let h = self
            .conv1
            .forward_nhwc_shifted(&self.gn1.forward_nhwc(x, true)?, &e)?; // [B, H, W, c_out]
        let h = self.gn2.forward_nhwc(&h, true)?;
        let h = match drop {
            Some((p, rng)) => dropout(&h, p, rng)?,
            None => h,
        };
        let h = self.conv2.forward_nhwc(&h, false)?;
        let s = match &self.skip {
            Some(s) => s.forward_nhwc(x, false)?,
            None => x.clone(),
        };
        fused::add(&s, &h)
    }
}

/// Multi-head self-attention over the `H W` positions of a feature map, with a residual:
/// `x + proj(attn(gn(x)))` (Ho et al. 2020 use one head at 16x16; the softmax is the
/// differentiable composition of `nn::transformer`).
#[derive(Clone, Debug)]
pub struct AttnBlock {
    gn: GroupNorm,
    qkv: Conv2d,
    proj: Conv2d,
    heads: usize,
}

impl AttnBlock {
    /// Attention over `c` channels split into `heads` heads (`heads` must divide `c`).
    pub fn new(
        p: &mut ParamInit,
        c: usize,
        heads: usize,
        groups: usize,
        zero_out: bool,
    ) -> Result<Self> {
        if heads == 0 || !c.is_multiple_of(heads) {
            return Err(Error::Config(format!(
                "attention: {heads} heads do not divide {c} channels"
            )));
        }
        let gn = GroupNorm::new(&mut p.push("gn"), groups, c)?;
        let qkv = Conv2d::new(&mut p.push("qkv"), c, 3 * c, POINT)?;
        let proj = if zero_out {
            Conv2d::zeros(&mut p.push("proj"), c, c, POINT)?
        } else {
            Conv2d::new(&mut p.push("proj"), c, c, POINT)?
        };
        Ok(Self {
            gn,
            qkv,
            proj,
            heads,
        })
    }

    /// `x: [B, H, W, C]` -> `[B, H, W, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let (nh, dh, l) = (self.heads, c / self.heads, h * w);
        let qkv = self
            .qkv
            .forward_nhwc(&self.gn.forward_nhwc(x, false)?, false)? // [B, H, W, 3C]
            .reshape((b, l, 3, nh, dh))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?; // [3, B, nh, L, dh]
        let (q, k, v) = (qkv.get(0)?, qkv.get(1)?, qkv.get(2)?); // [B, nh, L, dh]
        let scores = q
            .matmul(&k.t()?)? // [B, nh, L, L]
            .affine(1.0 / (dh as f64).sqrt(), 0.0)?;
        let y = softmax_last_dim(&scores)?.matmul(&v)?; // [B, nh, L, dh]
        let y = y.transpose(1, 2)?.reshape((b, h, w, c))?; // [B, H, W, C]
        fused::add(x, &self.proj.forward_nhwc(&y, false)?)
    }
}

/// Halve the resolution with a 3x3 convolution of stride 2 (Ho et al. 2020).
#[derive(Clone, Debug)]
pub struct Downsample {
    conv: Conv2d,
}

impl Downsample {
    /// `c -> c` channels.
    pub fn new(p: &mut ParamInit, c: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(
                &mut p.push("conv"),
                c,
                c,
                Window {
                    k: 3,
                    stride: 2,
                    padding: 1,
                },
            )?,
        })
    }

    /// `x: [B, H, W, C]` (H, W even) -> `[B, H/2, W/2, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward_nhwc(x, false)
    }
}

/// Double the resolution: nearest-neighbour upsampling, then a 3x3 convolution.
#[derive(Clone, Debug)]
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    /// `c -> c` channels.
    pub fn new(p: &mut ParamInit, c: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::new(&mut p.push("conv"), c, c, SAME3)?,
        })
    }

    /// `x: [B, H, W, C]` -> `[B, 2H, 2W, C]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward_nhwc(&upsample_nearest2_nhwc(x)?, false)
    }
}
