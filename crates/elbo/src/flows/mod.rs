//! Normalizing flows: invertible maps `f: x -> z` with a tractable Jacobian determinant, so that
//! the exact density of the data is the base density of `z` times the volume change,
//!
//!   log p(x) = log N(f(x); 0, I) + log |det ∂f/∂x|        (Dinh et al. 2015, eq. 3),
//!
//! and samples are `x = f⁻¹(z)`, `z ~ N(0, T² I)` (temperature `T`; Kingma & Dhariwal 2018,
//! sec. 5). A flow is a sequence of [`Bijector`]s whose log-determinants add up:
//!
//! - [`Coupling`]: additive (NICE; Dinh et al. 2015, eq. 7) or affine (RealNVP; Dinh et al.
//!   2017, eq. 6-9) coupling with an MLP conditioner, on flat data;
//! - [`ActNorm`]: per-dimension affine with data-dependent initialisation (Glow, sec. 3.1);
//! - [`BatchNorm`]: RealNVP's batch normalisation (Dinh et al. 2017, sec. 3.7), batch
//!   statistics in training and running averages at evaluation;
//! - [`LuLinear`]: an invertible linear map (Glow's 1x1 convolution, sec. 3.2) through its LU
//!   decomposition, whose log-determinant is `Σ log |s|`;
//! - [`Scaling`]: NICE's diagonal scaling layer (Dinh et al. 2015, sec. 3.3);
//! - [`Squeeze`]: space-to-depth between the scales of an image flow (Dinh et al. 2017,
//!   sec. 3.6), and [`MultiScale`]: the multi-scale architecture that factors out half of the
//!   channels at each scale to a Gaussian (standard or, as in Glow, conditioned on the rest).
//!
//! Layers act on flat rows `[B, D]` or on channels-last images `[B, H, W, C]`; ActNorm, the LU
//! map and the scaling act along the last axis (per channel on images: Glow's invertible 1x1
//! convolution is `LuLinear` over the channels), couplings take an MLP or a convolutional
//! conditioner.
//!
//! Every layer's log-determinant is computed in closed form; `tests/flows/` checks each one
//! against the brute-force `log |det J|` from autograd, and each inverse to 1e-5.

mod actnorm;
pub mod batch_norm;
mod conv_net;
mod coupling;
mod lu_linear;
mod multiscale;
mod scaling;
mod squeeze;

use std::collections::HashMap;

pub use actnorm::ActNorm;
pub use batch_norm::BatchNorm;
pub use conv_net::ConvNet;
pub use coupling::{Coupling, CouplingKind, Mask};
pub use lu_linear::LuLinear;
pub use multiscale::{MultiScale, Split, SplitPrior};
pub use scaling::Scaling;
pub use squeeze::Squeeze;

use candle_core::{DType, Tensor};

use crate::Result;

/// One invertible layer `z = f(x)` on a batch `x: [B, ...]` (flat rows `[B, D]` or
/// channels-last images `[B, H, W, C]`).
pub trait Bijector {
    /// `(z, log |det ∂z/∂x|)`: `z: [B, ...]` and the log-determinant per example, `[B]`.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)>;
    /// The exact inverse `x = f⁻¹(z)` (no autograd graph needed).
    fn inverse(&self, z: &Tensor) -> Result<Tensor>;
    /// A data-dependent initialisation from a batch of this layer's inputs (ActNorm);
    /// default nothing.
    fn init_from_data(&mut self, x: &Tensor) -> Result<()> {
        let _ = x;
        Ok(())
    }
    /// Switch between training (batch statistics) and evaluation; default nothing.
    fn set_training(&self, on: bool) {
        let _ = on;
    }
    /// Fixed, non-trainable tensors (a permutation, signs) to keep in checkpoints, under names
    /// prefixed with `prefix`.
    fn state(&self, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
        let _ = (prefix, out);
        Ok(())
    }
    /// Restore what [`Bijector::state`] saved (a missing entry keeps the value built from the
    /// seed).
    fn load_state(&mut self, prefix: &str, t: &HashMap<String, Tensor>) -> Result<()> {
        let _ = (prefix, t);
        Ok(())
    }
}

/// A composition `f = f_K ∘ ... ∘ f_1` of bijectors.
#[derive(Default)]
pub struct Flow {
    layers: Vec<Box<dyn Bijector>>,
}

impl Flow {
    /// An empty flow (the identity).
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a layer (applied after the ones before it).
    pub fn push(&mut self, layer: Box<dyn Bijector>) {
        self.layers.push(layer);
    }

    /// Number of layers.
    pub fn len(&self) -> usize {
        self.layers.len()
    }

    /// Whether the flow has no layers.
    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }

    /// `(z, Σ_k log |det J_k|)`: `[B, ...]` and `[B]`.
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut z = x.clone();
        let mut log_det = Tensor::zeros(x.dim(0)?, DType::F32, x.device())?; // [B]
        for l in &self.layers {
            let (y, ld) = l.forward(&z)?;
            z = y;
            log_det = (log_det + ld)?;
        }
        Ok((z, log_det))
    }

    /// Put every layer in training (`true`) or evaluation mode.
    pub fn set_training(&self, on: bool) {
        for l in &self.layers {
            l.set_training(on);
        }
    }

    /// `x = f⁻¹(z)`, the layers inverted in reverse order.
    pub fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        let mut x = z.detach();
        for l in self.layers.iter().rev() {
            x = l.inverse(&x)?;
        }
        Ok(x)
    }

    /// `-log p(x)` per example in nats, `[B]`, under the standard normal base density.
    pub fn nll(&self, x: &Tensor) -> Result<Tensor> {
        let (z, log_det) = self.forward(x)?;
        Ok((std_normal_nll(&z.flatten_from(1)?)? - log_det)?)
    }

    /// Initialise every layer from the batch in turn, each on the outputs of the layers before
    /// it (so an ActNorm standardises what actually reaches it).
    pub fn init_from_data(&mut self, x: &Tensor) -> Result<()> {
        let mut h = x.detach();
        for l in &mut self.layers {
            l.init_from_data(&h)?;
            h = l.forward(&h)?.0.detach();
        }
        Ok(())
    }

    /// The layers' fixed state, under `layer.{i}.` prefixes.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        self.state_into("", &mut out)?;
        Ok(out)
    }

    /// The layers' fixed state, under `{prefix}layer.{i}.` names, into `out`.
    pub fn state_into(&self, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
        for (i, l) in self.layers.iter().enumerate() {
            l.state(&format!("{prefix}layer.{i}."), out)?;
        }
        Ok(())
    }

    /// Restore [`Flow::state`].
    pub fn load_state(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        self.load_state_from("", t)
    }

    /// Restore [`Flow::state_into`] saved under `prefix`.
    pub fn load_state_from(&mut self, prefix: &str, t: &HashMap<String, Tensor>) -> Result<()> {
        for (i, l) in self.layers.iter_mut().enumerate() {
            l.load_state(&format!("{prefix}layer.{i}."), t)?;
        }
        Ok(())
    }
}

/// `-log N(z; 0, I)` per row: `|z|²/2 + D/2 log 2π`, `[B]`.
pub fn std_normal_nll(z: &Tensor) -> Result<Tensor> {
    let d = z.dim(1)? as f64;
    let c = 0.5 * d * (2.0 * std::f64::consts::PI).ln();
    Ok(((z.sqr()?.sum(1)? * 0.5)? + c)?)
}

/// How many positions share each entry of the last axis: 1 for rows `[B, D]`, `H W` for images
/// `[B, H, W, C]` (a per-channel layer's log-determinant counts each pixel).
pub(crate) fn positions(x: &Tensor) -> Result<usize> {
    let dims = x.dims();
    Ok(dims[1..dims.len().saturating_sub(1)].iter().product())
}
