//! The multi-scale architecture of image flows (Dinh et al. 2017, sec. 3.6, eq. 13-14; Kingma
//! & Dhariwal 2018, sec. 3 and Fig. 2): a sequence of levels, each a flow on channels-last
//! images (typically a squeeze and then flow steps), after which half of the channels are
//! factored out to a Gaussian and only the other half continue to the next level:
//!
//!   h⁰ = x,   (z¹ⁱ, z²ⁱ) = split(f_i(hⁱ⁻¹)),   hⁱ = z¹ⁱ,
//!   log p(x) = Σ_i [log |det ∂f_i/∂hⁱ⁻¹| + log p(z²ⁱ | z¹ⁱ)] + log N(h_L; 0, I).
//!
//! The factored-out prior is the standard normal (RealNVP) or a Gaussian whose mean and
//! log-standard deviation are a convolution of the kept half (Glow's learned prior at each
//! split). Sampling runs the levels backwards from `z ~ N(0, T² I)` at every scale: the
//! temperature `T` scales each prior's standard deviation (Kingma & Dhariwal 2018, sec. 5).

use std::collections::HashMap;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::{std_normal_nll, Flow};
use crate::nn::conv::{Conv2d, Window};
use crate::nn::ParamInit;
use crate::{Error, Result, Rng};

/// Scale of the learned prior's initial bounds: it starts near the standard normal.
const PRIOR_SCALE: f64 = 1e-2;

/// The density of the channels factored out at a split.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitPrior {
    /// `N(0, I)` (RealNVP).
    Standard,
    /// `N(μ(z¹), diag σ(z¹)²)` from a 3x3 convolution of the kept channels (Glow).
    #[default]
    Learned,
}

/// The factor-out at the end of a level.
pub struct Split {
    /// The learned prior's convolution `c_kept -> 2 c_out` (means, then log-standard
    /// deviations), `None` for the standard normal.
    net: Option<Conv2d>,
}

impl Split {
    /// A split of an image with `c` channels into `c / 2` kept and `c - c / 2` factored out.
    /// Parameters (learned prior): `prior.weight`, `prior.bias`.
    pub fn new(p: &mut ParamInit, prior: SplitPrior, c: usize) -> Result<Self> {
        if c < 2 {
            return Err(Error::Config(format!(
                "a multi-scale split needs at least 2 channels, got {c}"
            )));
        }
        let net = match prior {
            SplitPrior::Standard => None,
            SplitPrior::Learned => {
                let k3 = Window {
                    k: 3,
                    stride: 1,
                    padding: 1,
                };
                let (kept, out) = (c / 2, c - c / 2);
                Some(Conv2d::with_scale(
                    &mut p.push("prior"),
                    kept,
                    2 * out,
                    k3,
                    PRIOR_SCALE,
                )?)
            }
        };
        Ok(Self { net })
    }

    /// `(μ, log σ)` of the factored-out channels given the kept ones, each
    /// `[B, H, W, c_out]`; `None` for the standard normal.
    fn mean_log_std(&self, kept: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        let Some(net) = &self.net else {
            return Ok(None);
        };
        let h = net.forward_nhwc(kept, false)?; // [B, H, W, 2 c_out]
        let c = h.dim(3)? / 2;
        Ok(Some((h.narrow(3, 0, c)?, h.narrow(3, c, c)?)))
    }

    /// The standardised `ε = (z² - μ(z¹)) / σ(z¹)` and `log |det ∂ε/∂z²| = -Σ log σ`, `[B]`
    /// (`ε = z²` and 0 under the standard normal).
    fn whiten(&self, out: &Tensor, kept: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match self.mean_log_std(kept)? {
            None => (out.clone(), None),
            Some((mu, log_std)) => {
                let eps = ((out - mu)? * log_std.neg()?.exp()?)?; // [B, H, W, c_out]
                (eps, Some(log_std.flatten_from(1)?.sum(1)?.neg()?))
            }
        })
    }

    /// The inverse of [`Split::whiten`]: `z² = μ(z¹) + σ(z¹) ε`.
    fn color(&self, eps: &Tensor, kept: &Tensor) -> Result<Tensor> {
        Ok(match self.mean_log_std(kept)? {
            None => eps.clone(),
            Some((mu, log_std)) => (mu + (eps * log_std.exp()?)?)?,
        })
    }
}

/// One scale: a flow, then (except at the last scale) a split.
struct Level {
    flow: Flow,
    /// The shape `(H, W, C)` of the flow's output.
    shape: (usize, usize, usize),
    split: Option<Split>,
}

/// A multi-scale flow on channels-last images `[B, H, W, C]`.
#[derive(Default)]
pub struct MultiScale {
    levels: Vec<Level>,
}

impl MultiScale {
    /// No levels yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a level whose flow outputs images of shape `shape = (H, W, C)`; with a `split`,
    /// its first `C / 2` channels continue and the rest are factored out.
    pub fn push_level(&mut self, flow: Flow, shape: (usize, usize, usize), split: Option<Split>) {
        self.levels.push(Level { flow, shape, split });
    }

    /// The standard-normal latents of every scale (each split's factored-out channels
    /// standardised by its prior, then the last level's output) and `-log p(x)` per example in
    /// nats, `[B]`: `Σ_l -log N(ε_l; 0, I) - log |det ∂(ε_1, .., ε_L)/∂x|`.
    pub fn encode(&self, x: &Tensor) -> Result<(Vec<Tensor>, Tensor)> {
        let mut h = x.clone();
        let mut nll = Tensor::zeros(x.dim(0)?, DType::F32, x.device())?; // [B]
        let mut eps = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            let (y, log_det) = level.flow.forward(&h)?;
            nll = (nll - log_det)?;
            let e = match &level.split {
                Some(split) => {
                    let (kept, out) = halves(&y)?;
                    let (e, log_det) = split.whiten(&out, &kept)?;
                    if let Some(ld) = log_det {
                        nll = (nll - ld)?;
                    }
                    h = kept;
                    e
                }
                None => y,
            };
            nll = (nll + std_normal_nll(&e.flatten_from(1)?)?)?;
            eps.push(e);
        }
        Ok((eps, nll))
    }

    /// `-log p(x)` per example in nats, `[B]`.
    pub fn nll(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.encode(x)?.1)
    }

    /// The exact inverse of [`MultiScale::encode`]: the image whose latents are `eps`.
    pub fn decode(&self, eps: &[Tensor]) -> Result<Tensor> {
        if eps.len() != self.levels.len() || eps.is_empty() {
            return Err(Error::Shape(format!(
                "a {}-level flow needs {} latents, got {}",
                self.levels.len(),
                self.levels.len(),
                eps.len()
            )));
        }
        let mut h: Option<Tensor> = None;
        for (level, e) in self.levels.iter().zip(eps).rev() {
            let e = e.detach();
            let y = match (h, &level.split) {
                (Some(kept), Some(split)) => {
                    let out = split.color(&e, &kept)?;
                    Tensor::cat(&[&kept, &out], 3)? // [B, H, W, C]
                }
                _ => e,
            };
            h = Some(level.flow.inverse(&y)?);
        }
        h.ok_or_else(|| Error::Shape("a multi-scale flow needs at least one level".into()))
    }

    /// `n` images drawn at temperature `t`: every scale's latent `ε ~ N(0, t² I)`, decoded
    /// (so each prior's standard deviation is scaled by `t`).
    pub fn sample(
        &self,
        n: usize,
        t: f64,
        dev: &candle_core::Device,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let mut eps = Vec::with_capacity(self.levels.len());
        for level in &self.levels {
            let (h, w, c) = level.shape;
            let c = if level.split.is_some() { c - c / 2 } else { c };
            eps.push((rng.normal_tensor(&[n, h, w, c], dev)? * t)?);
        }
        self.decode(&eps)
    }

    /// Put every level's layers in training (`true`) or evaluation mode (batch norm).
    pub fn set_training(&self, on: bool) {
        for level in &self.levels {
            level.flow.set_training(on);
        }
    }

    /// Each level's data-dependent initialisation (ActNorm) on what reaches it.
    pub fn init_from_data(&mut self, x: &Tensor) -> Result<()> {
        let mut h = x.detach();
        for level in &mut self.levels {
            level.flow.init_from_data(&h)?;
            let y = level.flow.forward(&h)?.0.detach();
            h = match level.split {
                Some(_) => halves(&y)?.0,
                None => y,
            };
        }
        Ok(())
    }

    /// Every level's fixed state, under `level.{l}.layer.{i}.` names.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (l, level) in self.levels.iter().enumerate() {
            level.flow.state_into(&format!("level.{l}."), &mut out)?;
        }
        Ok(out)
    }

    /// Restore [`MultiScale::state`].
    pub fn load_state(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        for (l, level) in self.levels.iter_mut().enumerate() {
            level.flow.load_state_from(&format!("level.{l}."), t)?;
        }
        Ok(())
    }
}

/// `(z¹, z²)`: the first `C / 2` channels and the rest, of `[B, H, W, C]`.
fn halves(y: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = y.dim(3)?;
    Ok((y.narrow(3, 0, c / 2)?, y.narrow(3, c / 2, c - c / 2)?))
}
