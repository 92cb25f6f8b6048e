//! The two players of a GAN, on the plain layers of [`super::plain`] so the critic can be
//! differentiated twice (the WGAN-GP penalty): MLPs for flat data and, for images, the DCGAN
//! layout of Radford et al. (2016, sec. 3): no pooling layers in the generator (learned
//! upsampling: here nearest-neighbour upsampling followed by a 3x3 convolution, which avoids
//! the checkerboard artefacts of strided transposed convolutions, Odena et al. 2016), ReLU in
//! the generator with `tanh` at its output, LeakyReLU (slope 0.2) in the critic. The critic
//! halves the resolution by 2x2 average pooling after each convolution (Gulrajani et al. 2017
//! use mean pooling in their ResNet critic), so its input gradient stays a plain composition.
//! The critic never uses batch normalisation (the WGAN-GP critic must not: Gulrajani et al.
//! 2017, sec. 4, "no critic batch normalization"); the generator may (`GenNorm::Batch`, the
//! DCGAN layout: after every layer but the output), sampled with standing statistics.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::batch_norm::{BatchNorm, LayerStats, StatsMode};
use super::plain::{leaky_relu, PlainConv, PlainLinear};
use super::ParamInit;
use crate::{Error, Result};

/// The shape of the networks: MLP widths, or the images' geometry and channel widths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// Flat vectors of `dim` values: MLPs with `depth` hidden layers of `hidden` units.
    Mlp {
        /// Values per example.
        dim: usize,
        /// Units per hidden layer.
        hidden: usize,
        /// Hidden layers.
        depth: usize,
    },
    /// Images `[channels, height, width]` (height and width divisible by 4) with `width`
    /// channels at full resolution, `2 width` at half and `4 width` at a quarter.
    Conv {
        /// Image channels.
        channels: usize,
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
        /// Base channel width.
        base: usize,
    },
}

impl Shape {
    /// Check the geometry: images need sides divisible by 4 (two halvings).
    pub fn validate(&self) -> Result<()> {
        match *self {
            Shape::Mlp { dim, hidden, .. } if dim == 0 || hidden == 0 => Err(Error::Config(
                "the GAN's MLPs need at least one input and one hidden unit".into(),
            )),
            Shape::Conv { height, width, .. } if height % 4 != 0 || width % 4 != 0 => {
                Err(Error::Config(format!(
                    "the DCGAN networks halve the image twice, so its sides must be divisible \
                     by 4, got {height}x{width}; use model.arch = \"mlp\" for these images"
                )))
            }
            Shape::Conv { base: 0, .. } => {
                Err(Error::Config("model.channels must be at least 1".into()))
            }
            _ => Ok(()),
        }
    }

    /// Values per example.
    pub fn dim(&self) -> usize {
        match *self {
            Shape::Mlp { dim, .. } => dim,
            Shape::Conv {
                channels,
                height,
                width,
                ..
            } => channels * height * width,
        }
    }

    /// The same geometry with base channel width `base` (convolutions only).
    pub fn with_base(self, base: usize) -> Shape {
        match self {
            Shape::Conv {
                channels,
                height,
                width,
                ..
            } => Shape::Conv {
                channels,
                height,
                width,
                base,
            },
            mlp => mlp,
        }
    }
}

/// Normalisation inside the generator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GenNorm {
    /// None.
    #[default]
    None,
    /// Batch normalisation after every hidden layer (Radford et al. 2016, sec. 3), sampled
    /// with standing statistics.
    Batch,
}

/// The generator `g(z)`: latent `[B, Z]` -> example `[B, D]` in model space.
#[derive(Clone, Debug)]
pub struct Generator {
    shape: Shape,
    layers: Vec<PlainLinear>,
    convs: Vec<PlainConv>,
    /// One batch norm per hidden layer, or none.
    norms: Vec<BatchNorm>,
    /// Squash the output into [-1, 1] (images and other discrete data).
    tanh: bool,
}

impl Generator {
    /// A generator for `shape` from `latent` dimensions, weights from `p`, without normalisation.
    pub fn new(p: &mut ParamInit, shape: Shape, latent: usize, tanh: bool) -> Result<Self> {
        Self::with_norm(p, shape, latent, tanh, GenNorm::None)
    }

    /// A generator with normalisation `norm` after each hidden layer.
    pub fn with_norm(
        p: &mut ParamInit,
        shape: Shape,
        latent: usize,
        tanh: bool,
        norm: GenNorm,
    ) -> Result<Self> {
        shape.validate()?;
        let widths: Vec<usize> = match shape {
            Shape::Mlp { hidden, depth, .. } => vec![hidden; depth],
            Shape::Conv { base, .. } => vec![4 * base, 2 * base, base],
        };
        let norms = match norm {
            GenNorm::None => Vec::new(),
            GenNorm::Batch => widths
                .iter()
                .enumerate()
                .map(|(i, &c)| BatchNorm::new(&mut p.push(&format!("bn{i}")), c, i))
                .collect::<Result<Vec<_>>>()?,
        };
        let (layers, convs) = match shape {
            Shape::Mlp { dim, hidden, depth } => {
                let mut layers = Vec::new();
                let mut d_in = latent;
                for i in 0..depth {
                    layers.push(PlainLinear::new(
                        &mut p.push(&format!("h{i}")),
                        d_in,
                        hidden,
                    )?);
                    d_in = hidden;
                }
                layers.push(PlainLinear::new(&mut p.push("out"), d_in, dim)?);
                (layers, Vec::new())
            }
            Shape::Conv {
                channels,
                height,
                width,
                base,
            } => {
                let cells = (height / 4) * (width / 4);
                let first = PlainLinear::new(&mut p.push("in"), latent, 4 * base * cells)?;
                let convs = vec![
                    PlainConv::new(&mut p.push("up1"), 4 * base, 2 * base, 3)?,
                    PlainConv::new(&mut p.push("up2"), 2 * base, base, 3)?,
                    PlainConv::new(&mut p.push("out"), base, channels, 3)?,
                ];
                (vec![first], convs)
            }
        };
        Ok(Self {
            shape,
            layers,
            convs,
            norms,
            tanh,
        })
    }

    /// Whether the generator normalises by batch statistics (so sampling needs standing ones).
    pub fn batch_norm(&self) -> bool {
        !self.norms.is_empty()
    }

    /// `z: [B, Z]` -> `[B, D]`, normalising by the statistics of this batch (training).
    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        self.forward_with(z, &mut StatsMode::Batch(&mut Vec::new()))
    }

    /// The standing statistics of every normalisation layer for the reference batch `z_ref`
    /// (empty without normalisation).
    pub fn standing_stats(&self, z_ref: &Tensor) -> Result<Vec<LayerStats>> {
        let mut stats = Vec::new();
        if self.batch_norm() {
            self.forward_with(z_ref, &mut StatsMode::Batch(&mut stats))?;
        }
        Ok(stats)
    }

    /// `z: [B, Z]` -> `[B, D]` with the statistics `mode` gives.
    pub fn forward_with(&self, z: &Tensor, mode: &mut StatsMode<'_>) -> Result<Tensor> {
        let act = |i: usize, h: Tensor, mode: &mut StatsMode<'_>| -> Result<Tensor> {
            let h = match self.norms.get(i) {
                Some(bn) => bn.forward(&h, mode)?,
                None => h,
            };
            Ok(h.relu()?)
        };
        let out = match self.shape {
            Shape::Mlp { .. } => {
                let n = self.layers.len();
                let mut h = z.clone();
                for (i, layer) in self.layers[..n - 1].iter().enumerate() {
                    h = act(i, layer.forward(&h)?, mode)?;
                }
                self.layers[n - 1].forward(&h)?
            }
            Shape::Conv { height, width, .. } => {
                let b = z.dim(0)?;
                let (h4, w4) = (height / 4, width / 4);
                let h = self.layers[0].forward(z)?.reshape((b, (), h4, w4))?; // [B, 4C, H/4, W/4]
                let h = act(0, h, mode)?.upsample_nearest2d(h4 * 2, w4 * 2)?;
                let h = act(1, self.convs[0].forward(&h)?, mode)?; // [B, 2C, H/2, W/2]
                let h = h.upsample_nearest2d(height, width)?;
                let h = act(2, self.convs[1].forward(&h)?, mode)?; // [B, C, H, W]
                self.convs[2].forward(&h)?.reshape((b, ()))? // [B, D]
            }
        };
        Ok(if self.tanh { out.tanh()? } else { out })
    }
}

/// The critic (discriminator) `D(x)`: example `[B, D]` -> score `[B]` (a logit for the
/// original GAN, an unbounded score for the Wasserstein critic).
#[derive(Clone, Debug)]
pub struct Critic {
    shape: Shape,
    layers: Vec<PlainLinear>,
    convs: Vec<PlainConv>,
    slope: f64,
}

impl Critic {
    /// A critic for `shape` with LeakyReLU slope `slope`, weights from `p`.
    pub fn new(p: &mut ParamInit, shape: Shape, slope: f64) -> Result<Self> {
        shape.validate()?;
        match shape {
            Shape::Mlp { dim, hidden, depth } => {
                let mut layers = Vec::new();
                let mut d_in = dim;
                for i in 0..depth {
                    layers.push(PlainLinear::new(
                        &mut p.push(&format!("h{i}")),
                        d_in,
                        hidden,
                    )?);
                    d_in = hidden;
                }
                layers.push(PlainLinear::new(&mut p.push("out"), d_in, 1)?);
                Ok(Self {
                    shape,
                    layers,
                    convs: Vec::new(),
                    slope,
                })
            }
            Shape::Conv {
                channels,
                height,
                width,
                base,
            } => {
                let convs = vec![
                    PlainConv::new(&mut p.push("c1"), channels, base, 3)?,
                    PlainConv::new(&mut p.push("c2"), base, 2 * base, 3)?,
                    PlainConv::new(&mut p.push("c3"), 2 * base, 4 * base, 3)?,
                ];
                let cells = (height / 4) * (width / 4);
                let layers = vec![PlainLinear::new(&mut p.push("out"), 4 * base * cells, 1)?];
                Ok(Self {
                    shape,
                    layers,
                    convs,
                    slope,
                })
            }
        }
    }

    /// `x: [B, D]` (model space) -> `[B]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.slope;
        let h = match self.shape {
            Shape::Mlp { .. } => {
                let mut h = x.clone();
                for layer in &self.layers[..self.layers.len() - 1] {
                    h = leaky_relu(&layer.forward(&h)?, a)?;
                }
                h
            }
            Shape::Conv {
                channels,
                height,
                width,
                ..
            } => {
                let b = x.dim(0)?;
                let h = x.reshape((b, channels, height, width))?;
                let h = leaky_relu(&self.convs[0].forward(&h)?, a)?; // [B, C, H, W]
                let h = leaky_relu(&self.convs[1].forward(&h)?, a)?.avg_pool2d(2)?; // [B, 2C, H/2, W/2]
                let h = leaky_relu(&self.convs[2].forward(&h)?, a)?.avg_pool2d(2)?; // [B, 4C, H/4, W/4]
                h.reshape((b, ()))?
            }
        };
        let out = self.layers[self.layers.len() - 1].forward(&h)?; // [B, 1]
        Ok(out.squeeze(1)?)
    }
}
