//! The squeeze operation (Dinh et al. 2017, sec. 3.6, Fig. 3): each 2x2 block of pixels of a
//! channels-last image becomes one pixel with four times the channels,
//! `[B, H, W, C] -> [B, H/2, W/2, 4C]`. It only permutes the values, so `log |det J| = 0`.
//! It trades spatial size for channels between the scales of a multi-scale flow.

use candle_core::{DType, Tensor};

use super::Bijector;
use crate::{Error, Result};

/// Space-to-depth by a factor of 2; output channel `(dy * 2 + dx) * C + c` holds channel `c`
/// of the pixel at offset `(dy, dx)` of its block.
#[derive(Clone, Copy, Debug, Default)]
pub struct Squeeze;

impl Squeeze {
    /// The output shape `(H/2, W/2, 4C)` of an input `(H, W, C)`, or an error if `H` or `W` is
    /// odd.
    pub fn out_shape((h, w, c): (usize, usize, usize)) -> Result<(usize, usize, usize)> {
        if h % 2 != 0 || w % 2 != 0 {
            return Err(Error::Shape(format!(
                "squeeze needs an even height and width, got {h}x{w} (use fewer flow levels: \
                 each level halves the image)"
            )));
        }
        Ok((h / 2, w / 2, 4 * c))
    }
}

impl Bijector for Squeeze {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, h, w, c) = x.dims4()?;
        let (h2, w2, c4) = Squeeze::out_shape((h, w, c))?;
        let z = x
            .reshape((b, h2, 2, w2, 2, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((b, h2, w2, c4))?; // [B, H/2, W/2, 4C]
        Ok((z, Tensor::zeros(b, DType::F32, x.device())?))
    }

    fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        let (b, h2, w2, c4) = z.dims4()?;
        let c = c4 / 4;
        Ok(z.detach()
            .reshape((b, h2, w2, 2, 2, c))?
            .permute((0, 1, 3, 2, 4, 5))?
            .reshape((b, 2 * h2, 2 * w2, c))?) // [B, H, W, C]
    }
}
