//! A convolutional encoder and decoder for small images (channels last), the networks of the
//! VQ-VAE (van den Oord et al. 2017, sec. 4.1: strided convolutions down to a small grid, and
//! their mirror image up) and of the convolutional VAE.
//!
//! Encoder: a 3x3 stem to `channels / 2`, `downsample` 4x4 stride-2 convolutions (each halves
//! the side) to `channels`, a 3x3 convolution, and a 1x1 projection to `out` channels per grid
//! cell. Decoder: a 3x3 convolution from `in` to `channels`, a second 3x3, `downsample`
//! nearest-neighbour doublings each followed by a 3x3 convolution (the last to `channels / 2`),
//! and a 3x3 head to `out` channels per pixel. SiLU after every convolution but the last.
//! Images are `[B, H, W, C]`; the side must be divisible by `2^downsample`.

use candle_core::Tensor;

use super::conv::{Conv2d, Window};
use super::unet::upsample_nearest2_nhwc;
use super::ParamInit;
use crate::{Error, Result};

const K3: Window = Window {
    k: 3,
    stride: 1,
    padding: 1,
};
const K1: Window = Window {
    k: 1,
    stride: 1,
    padding: 0,
};
const DOWN: Window = Window {
    k: 4,
    stride: 2,
    padding: 1,
};

/// The shape of a [`ConvEncoder`] / [`ConvDecoder`] pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvNetShape {
    /// Image channels.
    pub image_channels: usize,
    /// Image height and width.
    pub height: usize,
    /// Image width.
    pub width: usize,
    /// Channels at the reduced resolutions (half of them at full resolution).
    pub channels: usize,
    /// Number of stride-2 reductions.
    pub downsample: usize,
}

impl ConvNetShape {
    /// Errors unless the image sides are divisible by `2^downsample` and the channels are at
    /// least 2.
    pub fn validate(&self) -> Result<()> {
        let f = 1usize << self.downsample.min(16);
        if self.downsample > 6 || !self.height.is_multiple_of(f) || !self.width.is_multiple_of(f) {
            return Err(Error::Config(format!(
                "model.downsample = {}: a {}x{} image cannot be halved that many times (its \
                 sides must be divisible by 2^downsample); lower model.downsample",
                self.downsample, self.height, self.width
            )));
        }
        if self.channels < 2 || self.image_channels == 0 {
            return Err(Error::Config(format!(
                "model.channels must be at least 2, got {}",
                self.channels
            )));
        }
        Ok(())
    }

    /// The latent grid `(h, w)` the encoder produces.
    pub fn grid(&self) -> (usize, usize) {
        (
            self.height >> self.downsample,
            self.width >> self.downsample,
        )
    }

    fn half(&self) -> usize {
        (self.channels / 2).max(1)
    }

    /// `(in, out, window)` of each encoder convolution producing `out` channels per cell.
    fn encoder_layers(&self, out: usize) -> Vec<(usize, usize, Window)> {
        let mut l = vec![(self.image_channels, self.half(), K3)];
        let mut c = self.half();
        for _ in 0..self.downsample {
            l.push((c, self.channels, DOWN));
            c = self.channels;
        }
        l.push((c, self.channels, K3));
        l.push((self.channels, out, K1));
        l
    }

    /// `(in, out, window)` of each decoder convolution from `inp` channels per cell to `out`
    /// per pixel; the flag marks those preceded by an upsampling.
    fn decoder_layers(&self, inp: usize, out: usize) -> Vec<(usize, usize, Window, bool)> {
        let c = self.channels;
        let mut l = vec![(inp, c, K3, false), (c, c, K3, false)];
        for i in 0..self.downsample {
            let to = if i + 1 == self.downsample {
                self.half()
            } else {
                c
            };
            l.push((c, to, K3, true));
        }
        let last = if self.downsample == 0 { c } else { self.half() };
        l.push((last, out, K3, false));
        l
    }

    /// Parameters of the encoder with `out` channels per cell.
    pub fn encoder_params(&self, out: usize) -> usize {
        self.encoder_layers(out)
            .iter()
            .map(|(i, o, w)| o * (i * w.k * w.k + 1))
            .sum()
    }

    /// Parameters of the decoder from `inp` channels per cell to `out` per pixel.
    pub fn decoder_params(&self, inp: usize, out: usize) -> usize {
        self.decoder_layers(inp, out)
            .iter()
            .map(|(i, o, w, _)| o * (i * w.k * w.k + 1))
            .sum()
    }

    /// Floats of the largest activation map of one image (for memory estimates).
    pub fn activation_floats(&self) -> usize {
        self.height * self.width * self.channels.max(self.image_channels)
    }
}

/// Images `[B, H, W, C]` -> `[B, h, w, out]`.
#[derive(Clone, Debug)]
pub struct ConvEncoder {
    layers: Vec<Conv2d>,
}

impl ConvEncoder {
    /// The encoder of `shape` with `out` channels per grid cell.
    pub fn new(p: &mut ParamInit, shape: ConvNetShape, out: usize) -> Result<Self> {
        shape.validate()?;
        let layers = shape
            .encoder_layers(out)
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, w))| Conv2d::new(&mut p.push(&format!("conv{i}")), ci, co, w))
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// `x: [B, H, W, C]` -> `[B, h, w, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let last = self.layers.len() - 1;
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward_nhwc(&h, i < last)?;
        }
        Ok(h)
    }
}

/// Latent grids `[B, h, w, in]` -> `[B, H, W, out]`.
#[derive(Clone, Debug)]
pub struct ConvDecoder {
    layers: Vec<(Conv2d, bool)>,
}

impl ConvDecoder {
    /// The decoder of `shape` from `inp` channels per cell to `out` per pixel.
    pub fn new(p: &mut ParamInit, shape: ConvNetShape, inp: usize, out: usize) -> Result<Self> {
        shape.validate()?;
        let layers = shape
            .decoder_layers(inp, out)
            .into_iter()
            .enumerate()
            .map(|(i, (ci, co, w, up))| {
                Ok((
                    Conv2d::new(&mut p.push(&format!("conv{i}")), ci, co, w)?,
                    up,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }

    /// The last convolution's kernel `[out, 9 c]` (VQGAN's adaptive weight compares the
    /// gradients of two losses at this tensor).
    pub fn last_weight(&self) -> &Tensor {
        self.layers[self.layers.len() - 1].0.weight()
    }

    /// `z: [B, h, w, in]` -> `[B, H, W, out]`.
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = z.clone();
        let last = self.layers.len() - 1;
        for (i, (l, up)) in self.layers.iter().enumerate() {
            if *up {
                h = upsample_nearest2_nhwc(&h)?; // [B, 2h, 2w, C]
            }
            h = l.forward_nhwc(&h, i < last)?;
        }
        Ok(h)
    }
}
