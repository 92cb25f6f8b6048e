//! The VQ-VAE (van den Oord et al. 2017): a convolutional encoder `z_e(x)` to a grid of
//! `h x w` vectors, each replaced by its nearest code of a learned codebook (eq. 1-2), and a
//! convolutional decoder with a proper discrete observation model `p(x | z_q)` over the pixel
//! levels ([`crate::latent::observation`]: Bernoulli, categorical or discretized logistic).
//! Trained on (eq. 3)
//!
//!   L = -log p(x | z_q(x)) + ||sg[z_e(x)] - e||^2 + β ||z_e(x) - sg[e]||^2,
//!
//! the reconstruction in nats per dimension and the two squared distances averaged over the
//! grid's values; the decoder's gradient reaches the encoder by the straight-through estimator
//! `z_q + z_e - sg[z_e]` (sec. 3.2). With `codebook = "ema"` (default) the codebook term is
//! dropped and the codebook follows exponential moving averages (appendix A.1), kept in
//! `state_tensors`; unused codes restart at encoder outputs ([`crate::latent::codebook`]).
//! Codebook usage and perplexity are logged every step.
//!
//! The VQ-VAE alone is no density on images: its likelihood (`uniform-prior`) is the bound
//! with a uniform prior over the `h w` codes, `-log p(x) <= -log p(x | z_q(x)) + h w log K`
//! (p(x) >= p(z_q) p(x | z_q) for the deterministic encoder). A learned prior over the codes is
//! any discrete family trained on `codes:RUN` ([`crate::data::codes`]); loading that run gives
//! the two-stage model ([`crate::latent::two_stage`]).
//!
//! With a `[model.adversarial]` table the VQ-VAE trains as a VQGAN (Esser et al. 2021): a
//! patch discriminator in its own parameter group `disc.*` with its own optimiser, and the
//! adversarial term with its adaptive weight added to eq. 3 ([`crate::latent::vqgan`]; no
//! perceptual loss, since no pretrained network can be fetched at run time).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::net::{check_batch, DataScale};
use crate::data::Layout;
use crate::latent::codebook::{usage, Codebook, CodebookUpdate};
use crate::latent::two_stage::CodeAutoencoder;
use crate::latent::vqgan::{adaptive_weight, Adversarial, Vqgan, DISC_GROUP};
use crate::latent::{Observation, ObservationModel};
use crate::model::{
    likelihood_choice, DataInfo, GenerativeModel, GroupSettings, ModelCore, ParamGroup,
    StepContext, StepOutput, DEFAULT_GROUP,
};
use crate::models::FamilyConfig;
use crate::nn::conv_net::{ConvDecoder, ConvEncoder, ConvNetShape};
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `vq-vae`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Codes `K` in the codebook.
    pub codebook_size: usize,
    /// Dimensions of a code vector.
    pub code_dim: usize,
    /// Channels of the networks at the reduced resolutions (half at full resolution).
    pub channels: usize,
    /// Stride-2 reductions from the image to the code grid (28x28 -> 7x7 with 2).
    pub downsample: usize,
    /// Weight β of the commitment term.
    pub beta: f64,
    /// How the codebook learns: "ema" (moving averages) or "loss" (the codebook term).
    pub codebook: CodebookUpdate,
    /// Decay γ of the codebook's moving averages.
    pub ema_decay: f64,
    /// Steps a code may go unused before it restarts at an encoder output (0: never).
    pub dead_after: usize,
    /// The decoder's observation model: auto, bernoulli, categorical or logistic.
    pub observation: Observation,
    /// Samples show the decoder's most likely value instead of a draw from `p(x | z)`.
    pub sample_mean: bool,
    /// VQGAN's patch discriminator and adaptive weight (absent: a plain VQ-VAE).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adversarial: Option<Adversarial>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            codebook_size: 64,
            code_dim: 16,
            channels: 64,
            downsample: 2,
            beta: 0.25,
            codebook: CodebookUpdate::Ema,
            ema_decay: 0.99,
            dead_after: 100,
            observation: Observation::Auto,
            sample_mean: false,
            adversarial: None,
        }
    }
}

impl Config {
    fn shape(&self, data: &DataInfo) -> Result<ConvNetShape> {
        let Layout::Image {
            channels,
            height,
            width,
        } = data.layout
        else {
            return Err(Error::Config(
                "vq-vae needs image data (digits, mnist, mnist-binary); this data set has no \
                 image layout"
                    .into(),
            ));
        };
        let s = ConvNetShape {
            image_channels: channels,
            height,
            width,
            channels: self.channels,
            downsample: self.downsample,
        };
        s.validate()?;
        Ok(s)
    }

    fn image(&self, data: &DataInfo) -> Result<(usize, usize, usize)> {
        let s = self.shape(data)?;
        Ok((s.image_channels, s.height, s.width))
    }

    fn obs(&self, data: &DataInfo) -> Result<ObservationModel> {
        let o = self.observation.resolve(data.kind)?;
        if o == ObservationModel::Gaussian {
            return Err(Error::Config(
                "vq-vae models discrete pixel levels; use digits, mnist or mnist-binary".into(),
            ));
        }
        Ok(o)
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "VQ-VAE: conv encoder, EMA codebook, straight-through; bound with a uniform code prior";
    const LIKELIHOODS: &'static [&'static str] = &["uniform-prior"];

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if !(2..=65536).contains(&self.codebook_size) {
            return bad(format!(
                "model.codebook_size must be in 2..=65536, got {}",
                self.codebook_size
            ));
        }
        if self.code_dim == 0 || self.code_dim > 1024 {
            return bad(format!(
                "model.code_dim must be in 1..=1024, got {}",
                self.code_dim
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(format!("model.beta must be >= 0, got {}", self.beta));
        }
        if !(self.ema_decay > 0.0 && self.ema_decay < 1.0) {
            return bad(format!(
                "model.ema_decay must be in (0, 1), got {}",
                self.ema_decay
            ));
        }
        if let Some(a) = &self.adversarial {
            a.validate()?;
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let per_dim = self.obs(data).map(|o| o.outputs_per_dim()).unwrap_or(2);
        let (params, act) = match self.shape(data) {
            Ok(s) => (
                s.encoder_params(self.code_dim)
                    + s.decoder_params(self.code_dim, s.image_channels * per_dim)
                    + match self.codebook {
                        CodebookUpdate::Loss => self.codebook_size * self.code_dim,
                        CodebookUpdate::Ema => 0,
                    }
                    + match &self.adversarial {
                        Some(a) => a
                            .shape((s.image_channels, s.height, s.width))
                            .map_or(0, |p| p.params()),
                        None => 0,
                    },
                s.activation_floats(),
            ),
            Err(_) => (0, data.dim * self.channels),
        };
        MemoryEstimate {
            params: params as u64,
            activations: estimate::prod(&[batch, act * 16 + 3 * data.dim * per_dim, 4]),
            fixed: estimate::prod(&[self.codebook_size, self.code_dim, 4 * 4]),
        }
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(VqVae::new(self, *data, device, rng)?))
    }
}

/// A VQ-VAE on images.
pub struct VqVae {
    core: ModelCore,
    cfg: Config,
    obs: ObservationModel,
    scale: DataScale,
    shape: ConvNetShape,
    encoder: ConvEncoder,
    decoder: ConvDecoder,
    codebook: Codebook,
    adversarial: Option<Vqgan>,
}

/// One forward pass: the encoder outputs, their codes and the decoder's outputs.
pub struct Forward {
    /// `z_e`, `[N h w, D]`.
    pub z_e: Tensor,
    /// Nearest codes, `[N h w]` u32.
    pub codes: Tensor,
    /// Their vectors `z_q` (the codebook parameter's rows with `codebook = "loss"`).
    pub z_q: Tensor,
    /// Decoder outputs `[N, dim * outputs_per_dim]` from the straight-through `z_q`.
    pub out: Tensor,
}

impl VqVae {
    /// The VQ-VAE of `cfg` on images shaped like `data`, initial weights from `rng`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let obs = cfg.obs(&data)?;
        let shape = cfg.shape(&data)?;
        let core = ModelCore::new(data.dim, device);
        let (k, d) = (cfg.codebook_size, cfg.code_dim);
        let (encoder, decoder, codebook, adversarial) = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let enc = ConvEncoder::new(&mut p.push("encoder"), shape, d)?;
            let out = shape.image_channels * obs.outputs_per_dim();
            let dec = ConvDecoder::new(&mut p.push("decoder"), shape, d, out)?;
            let init = p.rng().normal_vec(k * d);
            let param = match cfg.codebook {
                CodebookUpdate::Loss => Some(p.insert(
                    "codebook.embedding",
                    Tensor::from_vec(init.clone(), (k, d), device)?,
                )?),
                CodebookUpdate::Ema => None,
            };
            let codebook = Codebook::new(k, d, init, param)?;
            // drawn after everything else, so a run without it initialises as before
            let adversarial = match &cfg.adversarial {
                Some(a) => Some(Vqgan::new(&mut p.push("disc"), a, cfg.image(&data)?)?),
                None => None,
            };
            (enc, dec, codebook, adversarial)
        };
        Ok(Self {
            core,
            cfg: cfg.clone(),
            obs,
            scale: DataScale::new(data.kind)?,
            shape,
            encoder,
            decoder,
            codebook,
            adversarial,
        })
    }

    /// The codebook.
    pub fn codebook(&self) -> &Codebook {
        &self.codebook
    }

    /// The code grid `(h, w)` of one image.
    pub fn grid(&self) -> (usize, usize) {
        self.shape.grid()
    }

    /// Values per code grid (`h w`).
    fn cells(&self) -> usize {
        let (h, w) = self.grid();
        h * w
    }

    /// `z_e(x)`, `[N h w, D]`, for a batch of levels `[N, dim]`.
    pub fn encode(&self, batch: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let n = batch.dim(0)?;
        let x = self.scale.to_grid(batch)?; // [N, C H W] in [-1, 1]
        let x = x
            .reshape((n, s.image_channels, s.height, s.width))?
            .permute((0, 2, 3, 1))?
            .contiguous()?; // [N, H, W, C]
        let z = self.encoder.forward(&x)?; // [N, h, w, D]
        Ok(z.reshape((n * self.cells(), self.cfg.code_dim))?)
    }

    /// Decoder outputs `[N, dim * outputs_per_dim]` (the observation model's layout) from
    /// code vectors `[N h w, D]`.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let s = self.shape;
        let (h, w) = self.grid();
        let n = z.dim(0)? / self.cells();
        let z = z.reshape((n, h, w, self.cfg.code_dim))?;
        let out = self.decoder.forward(&z)?; // [N, H, W, C P]
        let p = self.obs.outputs_per_dim();
        let c = s.image_channels;
        Ok(if c == 1 {
            out.reshape((n, s.height * s.width * p))?
        } else {
            out.reshape((n, s.height, s.width, c, p))?
                .permute((0, 3, 1, 2, 4))?
                .reshape((n, c * s.height * s.width * p))?
        })
    }

    /// `log p(x | z)` per row, `[N]`, for decoder outputs of [`VqVae::decode`].
    pub fn log_likelihood_given(&self, out: &Tensor, batch: &Tensor) -> Result<Tensor> {
        self.obs.log_prob(out, batch, None)
    }

    /// Encode, quantise and decode through the straight-through estimator.
    pub fn forward(&self, batch: &Tensor) -> Result<Forward> {
        let z_e = self.encode(batch)?;
        let codes = self.codebook.nearest(&z_e)?;
        let z_q = self.codebook.lookup(&codes, batch.device())?;
        // z_q in value, the identity in gradient towards z_e (sec. 3.2)
        let st = ((&z_e - z_e.detach())? + z_q.detach())?; // [N h w, D]
        let out = self.decode(&st)?;
        Ok(Forward {
            z_e,
            codes,
            z_q,
            out,
        })
    }

    /// The training objective of eq. 3 and its parts `(reconstruction nats/dim, commitment)`.
    fn objective(&self, batch: &Tensor) -> Result<(Tensor, Forward, Tensor)> {
        check_batch(batch, self.core.dim, "vq-vae")?;
        let f = self.forward(batch)?;
        let rec = (self.log_likelihood_given(&f.out, batch)?.mean_all()? * -1.0)?
            .affine(1.0 / self.core.dim as f64, 0.0)?;
        let commit = (&f.z_e - f.z_q.detach())?.sqr()?.mean_all()?;
        let mut loss = (&rec + (&commit * self.cfg.beta)?)?;
        if self.cfg.codebook == CodebookUpdate::Loss {
            let cb = (f.z_e.detach() - &f.z_q)?.sqr()?.mean_all()?;
            loss = (loss + cb)?;
        }
        Ok((loss, f, rec))
    }

    /// VQGAN's term `weight λ L_GAN` on the reconstructions of `f` (eq. 6-7), with `λ` and
    /// `L_GAN` themselves, and the reconstructions `[N, D]` (model space) the discriminator
    /// then trains on.
    pub fn adversarial_term(
        &self,
        f: &Forward,
        rec: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor, Tensor)>> {
        let Some(adv) = &self.adversarial else {
            return Ok(None);
        };
        let fake = self.obs.mean(&f.out)?; // [N, D] model space
        let gan = adv.generator_loss(&fake)?;
        let lambda = adaptive_weight(rec, &gan, self.decoder.last_weight())?;
        let term = (gan.mul(&lambda)? * adv.config().weight)?;
        Ok(Some((term, lambda, gan, fake)))
    }

    /// The discriminator's loss on the data `batch` (levels) and reconstructions `fake`.
    pub fn discriminator_loss(&self, batch: &Tensor, fake: &Tensor) -> Result<Tensor> {
        let adv = self.adversarial.as_ref().ok_or_else(|| {
            Error::Config("this VQ-VAE has no discriminator ([model.adversarial])".into())
        })?;
        adv.discriminator_loss(&self.scale.to_grid(batch)?, fake)
    }

    /// Per-example `-log p(x | z_q(x))` in nats.
    pub fn reconstruction_nll(&self, batch: &Tensor) -> Result<Vec<f64>> {
        let z_e = self.encode(batch)?;
        let codes = self.codebook.nearest(&z_e)?;
        self.decoder_nll(&codes, batch)
    }

    fn decoder_nll(&self, codes: &Tensor, batch: &Tensor) -> Result<Vec<f64>> {
        let z_q = self.codebook.lookup(codes, batch.device())?.detach();
        let lp = self.log_likelihood_given(&self.decode(&z_q)?, batch)?;
        Ok(lp
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| -f64::from(v))
            .collect())
    }
}

impl CodeAutoencoder for VqVae {
    fn codebook_size(&self) -> usize {
        self.cfg.codebook_size
    }

    fn code_grid(&self) -> (usize, usize) {
        self.grid()
    }

    fn encode_codes(&self, batch: &Tensor) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "vq-vae")?;
        let n = batch.dim(0)?;
        let codes = self.codebook.nearest(&self.encode(batch)?)?;
        Ok(codes
            .to_dtype(candle_core::DType::F32)?
            .reshape((n, self.cells()))?)
    }

    fn decoder_nll(&self, codes: &Tensor, batch: &Tensor) -> Result<Vec<f64>> {
        let flat = codes.flatten_all()?.to_dtype(candle_core::DType::U32)?;
        VqVae::decoder_nll(self, &flat, batch)
    }

    fn decode_sample(&self, codes: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let flat = codes.flatten_all()?.to_dtype(candle_core::DType::U32)?;
        let z_q = self.codebook.lookup(&flat, &self.core.device)?.detach();
        let out = self.decode(&z_q)?;
        self.obs.sample(&out, None, self.cfg.sample_mean, rng)
    }

    fn decoder_label(&self) -> String {
        let (h, w) = self.grid();
        format!(
            "VQ-VAE decoder ({} observation) from a {h}x{w} grid of {} codes",
            self.obs.name(),
            self.cfg.codebook_size
        )
    }
}

impl GenerativeModel for VqVae {
    fn family(&self) -> &'static str {
        "vq-vae"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// Eq. 3; with a discriminator, as after `disc_start`, plus the adversarial term and the
    /// discriminator's loss on the detached reconstructions (each group's parameters receive
    /// their own loss's gradient); training uses `train_step`.
    fn loss(&self, batch: &Tensor, _rng: &mut Rng) -> Result<Tensor> {
        let (loss, f, rec) = self.objective(batch)?;
        match self.adversarial_term(&f, &rec)? {
            Some((term, _, _, fake)) => {
                Ok(((loss + term)? + self.discriminator_loss(batch, &fake)?)?)
            }
            None => Ok(loss),
        }
    }

    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let batch = ctx.batch()?;
        let (mut loss, f, rec) = self.objective(&batch)?;
        let active = self
            .adversarial
            .as_ref()
            .is_some_and(|a| a.active(ctx.step()));
        let mut adv = None;
        if active {
            if let Some((term, lambda, gan, fake)) = self.adversarial_term(&f, &rec)? {
                loss = (loss + term)?;
                adv = Some((lambda, gan, fake));
            }
        }
        let mut out = ctx.minimize(DEFAULT_GROUP, &loss)?;
        if let Some((lambda, gan, fake)) = adv {
            let d = self.discriminator_loss(&batch, &fake)?;
            let disc = ctx.minimize(DISC_GROUP, &d)?;
            out.extra.extend([
                (
                    "adaptive_weight".to_string(),
                    lambda.to_scalar::<f32>()? as f64,
                ),
                ("gan_loss".to_string(), gan.to_scalar::<f32>()? as f64),
                ("disc_loss".to_string(), disc.loss),
            ]);
        }
        let z: Vec<f32> = f.z_e.detach().flatten_all()?.to_vec1()?;
        let codes: Vec<u32> = f.codes.to_vec1()?;
        match self.cfg.codebook {
            CodebookUpdate::Ema => self.codebook.ema_update(&z, &codes, self.cfg.ema_decay)?,
            CodebookUpdate::Loss => self.codebook.pull_param()?,
        }
        let restarted = self
            .codebook
            .restart_dead(&z, &codes, self.cfg.dead_after, ctx.rng())?;
        let u = usage(&codes, self.cfg.codebook_size);
        out.extra.extend([
            ("reconstruction".to_string(), rec.to_scalar::<f32>()? as f64),
            ("codebook_usage".to_string(), u.used),
            ("perplexity".to_string(), u.perplexity),
            ("restarted_codes".to_string(), restarted as f64),
        ]);
        Ok(out)
    }

    /// One group without a weight EMA: the codebook follows the live encoder, so averaged
    /// weights would not match it.
    /// With a discriminator, its own group `disc` (Adam with its own settings).
    fn param_groups(&self) -> Vec<ParamGroup> {
        let mut groups = vec![ParamGroup::all(DEFAULT_GROUP).settings(GroupSettings {
            ema: Some(false),
            ..GroupSettings::default()
        })];
        if let Some(a) = &self.adversarial {
            groups.push(a.group());
        }
        groups
    }

    fn code_autoencoder(&self) -> Option<&dyn CodeAutoencoder> {
        Some(self)
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        Ok(self.codebook.state("codebook.")?.into_iter().collect())
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        self.codebook.load_state("codebook.", |k| t.get(k).cloned())
    }

    fn init_from_data(&mut self, batch: &Tensor, rng: &mut Rng) -> Result<()> {
        let z: Vec<f32> = self.encode(batch)?.detach().flatten_all()?.to_vec1()?;
        self.codebook.init_from(&z, rng)
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        format!(
            "codes uniform over the codebook (no learned prior: train one on codes:RUN), then \
             {} of the {} decoder",
            if self.cfg.sample_mean {
                "the most likely x"
            } else {
                "x ~ p(x | z_q)"
            },
            self.obs.name()
        )
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let k = self.cfg.codebook_size;
        let codes: Vec<f32> = (0..n * self.cells()).map(|_| rng.below(k) as f32).collect();
        let codes = Tensor::from_vec(codes, (n, self.cells()), &self.core.device)?;
        self.decode_sample(&codes, rng)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, _rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "vq-vae", Config::LIKELIHOODS)?;
        check_batch(batch, self.core.dim, "vq-vae")?;
        let prior = self.cells() as f64 * (self.cfg.codebook_size as f64).ln();
        let nats = self
            .reconstruction_nll(batch)?
            .into_iter()
            .map(|r| r + prior)
            .collect();
        Ok(Nll {
            nats,
            dims: self.core.dim,
            kind: NllKind::Bound,
        })
    }

    fn likelihood_method(&self, _opts: &EvalOptions) -> String {
        let (h, w) = self.grid();
        format!(
            "-log p(x | z_q(x)) + {h}·{w}·log {} (a uniform prior over the codes, deterministic \
             encoder: p(x) >= p(z_q) p(x | z_q)), {} decoder",
            self.cfg.codebook_size,
            self.obs.name()
        )
    }
}
