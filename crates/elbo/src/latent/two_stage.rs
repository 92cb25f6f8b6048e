//! Two-stage models ("compress first, then generate"; van den Oord et al. 2017, sec. 3.2 and
//! 4.2; Esser et al. 2021): a discrete autoencoder (the VQ-VAE) maps an image to a grid of
//! codes `z_q(x)` and back, and a prior `p(z)` over code sequences is any discrete family
//! trained on those codes (`codes:RUN`). The composition is a model of the images:
//!
//! - sampling draws `z ~ p_prior` and then `x ~ p(x | z)` from the decoder;
//! - its likelihood is the bound with the deterministic encoder
//!
//!   -log p(x) = -log Σ_z p_prior(z) p(x | z) <= -log p(x | z_q(x)) - log p_prior(z_q(x)),
//!
//!   since the sum is at least its term at `z = z_q(x)` (all terms are non-negative): an upper
//!   bound on the NLL, whatever the prior's own label (exact for an autoregressive prior, itself
//!   a bound for a diffusion prior, whose bound then adds).
//!
//! Neither stage is copied: [`TwoStage`] holds both models and only calls their contracts.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::config::{EvalOptions, SampleOptions};
use crate::model::{GenerativeModel, ModelCore};
use crate::{Error, Nll, NllKind, Result, Rng};

/// What a discrete autoencoder offers a two-stage model: images to code grids (row-major) and
/// code grids to the decoder's distribution over images.
pub trait CodeAutoencoder {
    /// Codes `K` in the codebook (the prior's levels).
    fn codebook_size(&self) -> usize;
    /// The code grid `(h, w)` of one image (the prior's sequence length is `h w`).
    fn code_grid(&self) -> (usize, usize);
    /// The codes of each image of `batch: [N, dim]`, `[N, h w]` f32 levels, row-major over
    /// the grid.
    fn encode_codes(&self, batch: &Tensor) -> Result<Tensor>;
    /// `-log p(x | z)` per example (nats) of images `batch: [N, dim]` given code grids
    /// `codes: [N, h w]`.
    fn decoder_nll(&self, codes: &Tensor, batch: &Tensor) -> Result<Vec<f64>>;
    /// `x ~ p(x | z)` for code grids `codes: [N, h w]`, `[N, dim]` in the data's levels.
    fn decode_sample(&self, codes: &Tensor, rng: &mut Rng) -> Result<Tensor>;
    /// One line for reports: the decoder and its observation model.
    fn decoder_label(&self) -> String;
}

/// A prior over codes composed with the autoencoder whose codes it was trained on: a model of
/// the autoencoder's images.
pub struct TwoStage {
    core: ModelCore,
    autoencoder: Box<dyn GenerativeModel>,
    prior: Box<dyn GenerativeModel>,
}

impl TwoStage {
    /// Compose `prior` (a model of `[N, h w]` code sequences with `K` levels) with
    /// `autoencoder`, whose [`GenerativeModel::code_autoencoder`] must be present and agree
    /// with the prior's shape.
    pub fn new(
        autoencoder: Box<dyn GenerativeModel>,
        prior: Box<dyn GenerativeModel>,
    ) -> Result<Self> {
        let ae = autoencoder.code_autoencoder().ok_or_else(|| {
            Error::Config(format!(
                "a two-stage model needs a discrete autoencoder (vq-vae) as its first stage, \
                 got the {} family",
                autoencoder.family()
            ))
        })?;
        let (h, w) = ae.code_grid();
        if prior.dim() != h * w {
            return Err(Error::Config(format!(
                "the prior models sequences of {} codes, the autoencoder's grid has {h}x{w} = {}",
                prior.dim(),
                h * w
            )));
        }
        // both stages' parameters, under one map (shared variables, not copies)
        let varmap = VarMap::new();
        {
            let mut all = varmap
                .data()
                .lock()
                .map_err(|_| Error::Config("parameter map lock poisoned".into()))?;
            for (stage, m) in [("autoencoder", &autoencoder), ("prior", &prior)] {
                let vars = m
                    .varmap()
                    .data()
                    .lock()
                    .map_err(|_| Error::Config("parameter map lock poisoned".into()))?
                    .clone();
                for (k, v) in vars {
                    all.insert(format!("{stage}.{k}"), v);
                }
            }
        }
        let core = ModelCore {
            varmap,
            dim: autoencoder.dim(),
            device: autoencoder.device().clone(),
        };
        Ok(Self {
            core,
            autoencoder,
            prior,
        })
    }

    fn ae(&self) -> Result<&dyn CodeAutoencoder> {
        self.autoencoder
            .code_autoencoder()
            .ok_or_else(|| Error::Config("the first stage lost its autoencoder".into()))
    }

    /// The prior over codes.
    pub fn prior(&self) -> &dyn GenerativeModel {
        self.prior.as_ref()
    }

    /// The autoencoder.
    pub fn autoencoder(&self) -> &dyn GenerativeModel {
        self.autoencoder.as_ref()
    }
}

impl GenerativeModel for TwoStage {
    fn family(&self) -> &'static str {
        self.prior.family()
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn device(&self) -> &Device {
        &self.core.device
    }

    fn loss(&self, _batch: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        Err(Error::Config(
            "a two-stage model trains in two runs: the vq-vae on the images, then the prior on \
             codes:VQ_RUN"
                .into(),
        ))
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        self.prior.likelihoods()
    }

    fn sampling(&self, opts: &SampleOptions) -> String {
        let ae = self
            .ae()
            .map(|a| a.decoder_label())
            .unwrap_or_else(|e| e.to_string());
        format!(
            "codes from the prior ({}), then x ~ p(x | z) of the {ae}",
            self.prior.sampling(opts)
        )
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let codes = self.prior.sample(n, opts, rng)?; // [n, h w]
        self.ae()?.decode_sample(&codes, rng)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        let ae = self.ae()?;
        let codes = ae.encode_codes(batch)?; // [N, h w]
        let prior = self.prior.log_likelihood(&codes, opts, rng)?;
        let dec = ae.decoder_nll(&codes, batch)?;
        let kind = match prior.kind {
            NllKind::Exact | NllKind::Bound => NllKind::Bound,
            k => k,
        };
        if prior.nats.len() != dec.len() {
            return Ok(Nll {
                nats: Vec::new(),
                dims: self.core.dim,
                kind: NllKind::None,
            });
        }
        Ok(Nll {
            nats: prior.nats.iter().zip(&dec).map(|(p, d)| p + d).collect(),
            dims: self.core.dim,
            kind,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let ae = self
            .ae()
            .map(|a| a.decoder_label())
            .unwrap_or_else(|e| e.to_string());
        format!(
            "two-stage bound -log p(x | z_q(x)) - log p_prior(z_q(x)) with the deterministic \
             encoder (p(x) >= p_prior(z_q) p(x | z_q)); decoder: {ae}; prior: {}",
            self.prior.likelihood_method(opts)
        )
    }
}
