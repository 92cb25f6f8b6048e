//! A PatchGAN discriminator (Isola et al. 2017, sec. 3.2.2 and appendix 6.1.2): a few strided
//! convolutions whose output is a map of logits, one per receptive-field patch of the image,
//! so the discriminator judges local texture rather than the whole image; VQGAN's
//! discriminator (Esser et al. 2021, sec. 3.1) is this network.
//!
//! `layers` 4x4 stride-2 convolutions (each halves the side; channels `channels`,
//! `2 channels`, ... up to `8 channels`), each followed by LeakyReLU(0.2), then a 3x3 stride-1
//! convolution to one logit per cell. Unlike the reference network there is no batch
//! normalisation: one image's logits do not depend on the others in its batch. Images are
//! channels last, `[B, H, W, C]`; the sides must be divisible by `2^layers`.

use candle_core::Tensor;

use super::conv::{Conv2d, Window};
use super::plain::leaky_relu;
use super::ParamInit;
use crate::{Error, Result};

const DOWN: Window = Window {
    k: 4,
    stride: 2,
    padding: 1,
};
const HEAD: Window = Window {
    k: 3,
    stride: 1,
    padding: 1,
};

/// The LeakyReLU slope of the reference PatchGAN.
pub const SLOPE: f64 = 0.2;

/// The shape of a [`PatchDiscriminator`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PatchShape {
    /// Image channels.
    pub image_channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels of the first convolution (doubled by each further one, at most 8x).
    pub channels: usize,
    /// Stride-2 convolutions.
    pub layers: usize,
}

impl PatchShape {
    /// Errors unless the sides are divisible by `2^layers` and the widths are positive.
    pub fn validate(&self) -> Result<()> {
        let f = 1usize << self.layers.min(16);
        if self.layers == 0
            || self.layers > 6
            || !self.height.is_multiple_of(f)
            || !self.width.is_multiple_of(f)
        {
            return Err(Error::Config(format!(
                "model.adversarial.layers = {}: the discriminator halves a {}x{} image that many \
                 times, so it must be in 1..=6 and the sides divisible by 2^layers; lower it",
                self.layers, self.height, self.width
            )));
        }
        if self.channels == 0 || self.image_channels == 0 {
            return Err(Error::Config(
                "model.adversarial.channels must be at least 1".into(),
            ));
        }
        Ok(())
    }

    /// `(in, out, window)` of each convolution.
    fn convs(&self) -> Vec<(usize, usize, Window)> {
        let mut l = Vec::new();
        let mut c = self.image_channels;
        for i in 0..self.layers {
            let o = self.channels << i.min(3);
            l.push((c, o, DOWN));
            c = o;
        }
        l.push((c, 1, HEAD));
        l
    }

    /// Parameters of the network.
    pub fn params(&self) -> usize {
        self.convs()
            .iter()
            .map(|(i, o, w)| o * (i * w.k * w.k + 1))
            .sum()
    }

    /// The logit map `(h, w)` of one image.
    pub fn patches(&self) -> (usize, usize) {
        (self.height >> self.layers, self.width >> self.layers)
    }
}

/// Images `[B, H, W, C]` -> patch logits `[B, h, w, 1]`.
#[derive(Clone, Debug)]
pub struct PatchDiscriminator {
    convs: Vec<Conv2d>,
}

impl PatchDiscriminator {
    /// The discriminator of `shape`, weights from `p` (`conv0.*`, `conv1.*`, ...).
    pub fn new(p: &mut ParamInit, shape: PatchShape) -> Result<Self> {
        shape.validate()?;
        let convs = shape
            .convs()
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, w))| Conv2d::new(&mut p.push(&format!("conv{i}")), ci, co, w))
            .collect::<Result<_>>()?;
        Ok(Self { convs })
    }

    /// `x: [B, H, W, C]` -> `[B, h, w, 1]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, c) in self.convs.iter().enumerate() {
            h = c.forward_nhwc(&h, false)?;
            if i < last {
                h = leaky_relu(&h, SLOPE)?;
            }
        }
        Ok(h)
    }
}
