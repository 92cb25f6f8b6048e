//! The convolutional conditioner of image couplings (Kingma & Dhariwal 2018, sec. 3.3; the
//! `NN()` of Glow's affine coupling): a 3x3 convolution, a 1x1 convolution and a 3x3 read-out,
//! with an activation after the first two. The read-out starts near zero (its initial bounds
//! scaled by 1e-2 rather than set to zero, so every weight receives a gradient from the first
//! step), which makes each coupling start close to the identity.

use candle_core::Tensor;

use crate::nn::conv::{Conv2d, Window};
use crate::nn::{Activation, ParamInit};
use crate::Result;

/// Scale of the read-out's initial bounds.
const OUT_SCALE: f64 = 1e-2;

/// `[B, H, W, c_in] -> [B, H, W, c_out]`, three same-padded convolutions.
pub struct ConvNet {
    first: Conv2d,
    middle: Conv2d,
    out: Conv2d,
    act: Activation,
}

impl ConvNet {
    /// Parameters: `first.*`, `middle.*`, `out.*` (weight and bias each).
    pub fn new(
        p: &mut ParamInit,
        c_in: usize,
        hidden: usize,
        c_out: usize,
        act: Activation,
    ) -> Result<Self> {
        let k3 = Window {
            k: 3,
            stride: 1,
            padding: 1,
        };
        let k1 = Window {
            k: 1,
            stride: 1,
            padding: 0,
        };
        Ok(Self {
            first: Conv2d::new(&mut p.push("first"), c_in, hidden, k3)?,
            middle: Conv2d::new(&mut p.push("middle"), hidden, hidden, k1)?,
            out: Conv2d::with_scale(&mut p.push("out"), hidden, c_out, k3, OUT_SCALE)?,
            act,
        })
    }

    /// `x: [B, H, W, c_in]` -> `[B, H, W, c_out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.layer(&self.first, x)?; // [B, H, W, hidden]
        let h = self.layer(&self.middle, &h)?;
        self.out.forward_nhwc(&h, false)
    }

    fn layer(&self, conv: &Conv2d, x: &Tensor) -> Result<Tensor> {
        match self.act {
            Activation::Silu => conv.forward_nhwc(x, true),
            act => act.apply(&conv.forward_nhwc(x, false)?),
        }
    }
}
