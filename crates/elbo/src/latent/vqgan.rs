//! VQGAN's additions to the VQ-VAE (Esser et al. 2021, sec. 3.1): a patch-based discriminator
//! `D` ([`crate::nn::patch_gan`]) trained against the decoder's reconstructions, and the
//! adversarial term added to the VQ-VAE's objective with an adaptive weight (eq. 4-7):
//!
//!   Q* = argmin_{E,G,Z} max_D E[ L_VQ(E, G, Z) + λ L_GAN({E, G, Z}, D) ],
//!   λ = ∇_{G_L}[L_rec] / (∇_{G_L}[L_GAN] + δ),
//!
//! with the gradients' norms taken at `G_L`, the decoder's last layer, `δ = 1e-4`, `λ`
//! clamped to `[0, 10^4]` and treated as a constant (no gradient flows through it), and the
//! adversarial term off before `disc_start` steps (the reference code's warm-up). `L_rec` is
//! the VQ-VAE's reconstruction term `-log p(x | z_q) / D`; the discriminator sees the
//! decoder's expected image ([`crate::latent::ObservationModel::mean`]) against the data's
//! levels on the same grid. The losses are the hinge loss (VQGAN's default) or the original
//! GAN's with the non-saturating generator loss, the free functions of
//! [`crate::continuous::adversarial`].
//!
//! No perceptual (LPIPS) term: VQGAN's `L_rec` adds the distance between the features of a
//! pretrained VGG network (Zhang et al. 2018), and no pretrained network can be downloaded at
//! run time here. The likelihood reported stays that of the same discrete decoder, so the
//! adversarial term trades likelihood for sharper reconstructions.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::continuous::adversarial::{
    discriminator_loss, hinge_discriminator_loss, non_saturating_generator_loss,
    wasserstein_generator_loss,
};
use crate::model::{GroupSettings, ParamGroup};
use crate::nn::patch_gan::{PatchDiscriminator, PatchShape};
use crate::nn::ParamInit;
use crate::{Error, Result};

/// The name of the discriminator's parameter group (parameters `disc.*`).
pub const DISC_GROUP: &str = "disc";

/// `δ` of eq. 7.
pub const DELTA: f64 = 1e-4;
/// The upper clamp of `λ` (the reference code's).
pub const MAX_WEIGHT: f64 = 1e4;

/// The adversarial loss pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AdversarialLoss {
    /// `E relu(1 - D(x)) + E relu(1 + D(x̂))` for the discriminator, `-E D(x̂)` for the
    /// autoencoder.
    #[default]
    Hinge,
    /// The original GAN's discriminator loss and the non-saturating generator loss.
    NonSaturating,
}

/// The `[model.adversarial]` table of `vq-vae`: present, the VQ-VAE trains as a VQGAN.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Adversarial {
    /// hinge or non-saturating.
    pub loss: AdversarialLoss,
    /// Steps before the adversarial term and the discriminator's training start.
    pub disc_start: usize,
    /// A constant factor on the adaptive weight `λ` (the reference code's `disc_weight`).
    pub weight: f64,
    /// Channels of the discriminator's first convolution.
    pub channels: usize,
    /// Stride-2 convolutions of the discriminator.
    pub layers: usize,
    /// The discriminator's learning rate (unset: `train.lr`).
    pub lr: Option<f64>,
    /// Adam's beta1 for the discriminator.
    pub beta1: f64,
    /// Adam's beta2 for the discriminator.
    pub beta2: f64,
}

impl Default for Adversarial {
    fn default() -> Self {
        Self {
            loss: AdversarialLoss::Hinge,
            disc_start: 250,
            weight: 0.8,
            channels: 32,
            layers: 2,
            lr: None,
            beta1: 0.5,
            beta2: 0.9,
        }
    }
}

impl Adversarial {
    /// Ranges serde cannot check.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return bad(format!(
                "model.adversarial.weight must be a finite number >= 0, got {}",
                self.weight
            ));
        }
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr > 0.0) {
                return bad(format!("model.adversarial.lr must be > 0, got {lr}"));
            }
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!(
                    "model.adversarial.{name} must be in [0, 1), got {b}"
                ));
            }
        }
        if self.channels == 0 || self.channels > 1024 {
            return bad(format!(
                "model.adversarial.channels must be in 1..=1024, got {}",
                self.channels
            ));
        }
        Ok(())
    }

    /// The discriminator's shape on `(channels, height, width)` images.
    pub fn shape(&self, image: (usize, usize, usize)) -> Result<PatchShape> {
        let s = PatchShape {
            image_channels: image.0,
            height: image.1,
            width: image.2,
            channels: self.channels,
            layers: self.layers,
        };
        s.validate()?;
        Ok(s)
    }
}

/// `λ = ||∇_last rec|| / (||∇_last gan|| + δ)`, clamped to `[0, 10^4]`, as a detached scalar
/// (eq. 7). `last` is the decoder's last weight; each gradient comes from its own backward
/// pass through the graph of its loss.
pub fn adaptive_weight(rec: &Tensor, gan: &Tensor, last: &Tensor) -> Result<Tensor> {
    let norm = |loss: &Tensor, what: &str| -> Result<Tensor> {
        let grads = loss.backward()?;
        let g = grads.get(last).ok_or_else(|| {
            Error::Config(format!(
                "adaptive weight: the {what} loss does not depend on the decoder's last layer"
            ))
        })?;
        Ok(g.to_dtype(DType::F64)?.sqr()?.sum_all()?.sqrt()?)
    };
    let r = norm(rec, "reconstruction")?;
    let g = norm(gan, "adversarial")?;
    let w = (r / (g + DELTA)?)?.clamp(0.0, MAX_WEIGHT)?;
    Ok(w.to_dtype(rec.dtype())?.detach())
}

/// The discriminator and its losses on images in model space.
pub struct Vqgan {
    cfg: Adversarial,
    shape: PatchShape,
    disc: PatchDiscriminator,
}

impl Vqgan {
    /// The discriminator of `cfg` on `(channels, height, width)` images, weights from `p`.
    pub fn new(p: &mut ParamInit, cfg: &Adversarial, image: (usize, usize, usize)) -> Result<Self> {
        cfg.validate()?;
        let shape = cfg.shape(image)?;
        Ok(Self {
            cfg: cfg.clone(),
            shape,
            disc: PatchDiscriminator::new(p, shape)?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &Adversarial {
        &self.cfg
    }

    /// Whether the adversarial term is on after `step` completed steps.
    pub fn active(&self, step: usize) -> bool {
        step >= self.cfg.disc_start
    }

    /// Patch logits `[N, h w]` of images `x: [N, C H W]` (channel-major rows, model space).
    pub fn logits(&self, x: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let n = x.dim(0)?;
        let img = x
            .reshape((n, s.image_channels, s.height, s.width))?
            .permute((0, 2, 3, 1))?
            .contiguous()?; // [N, H, W, C]
        let (h, w) = s.patches();
        Ok(self.disc.forward(&img)?.reshape((n, h * w))?)
    }

    /// The autoencoder's adversarial loss `L_GAN` on reconstructions `fake: [N, D]`.
    pub fn generator_loss(&self, fake: &Tensor) -> Result<Tensor> {
        let d = self.logits(fake)?;
        match self.cfg.loss {
            AdversarialLoss::Hinge => wasserstein_generator_loss(&d),
            AdversarialLoss::NonSaturating => non_saturating_generator_loss(&d),
        }
    }

    /// The discriminator's loss on data `real` and (detached) reconstructions `fake`.
    pub fn discriminator_loss(&self, real: &Tensor, fake: &Tensor) -> Result<Tensor> {
        let (r, f) = (self.logits(real)?, self.logits(&fake.detach())?);
        match self.cfg.loss {
            AdversarialLoss::Hinge => hinge_discriminator_loss(&r, &f),
            AdversarialLoss::NonSaturating => discriminator_loss(&r, &f),
        }
    }

    /// The discriminator's parameter group: Adam at its own rate and betas, no weight decay,
    /// no clipping, no weight EMA.
    pub fn group(&self) -> ParamGroup {
        ParamGroup::with_prefixes(DISC_GROUP, &["disc."]).settings(GroupSettings {
            lr: self.cfg.lr,
            beta1: Some(self.cfg.beta1),
            beta2: Some(self.cfg.beta2),
            weight_decay: Some(0.0),
            grad_clip: Some(0.0),
            ema: Some(false),
            ..GroupSettings::default()
        })
    }

    /// Parameters of the discriminator.
    pub fn params(&self) -> usize {
        self.shape.params()
    }
}
