//! The variational autoencoder (Kingma & Welling 2014): a Gaussian encoder `q(z | x)`, the
//! standard normal prior and a decoder `p(x | z)` with an observation model fitted to the data
//! ([`crate::latent::observation`]: Bernoulli, categorical, discretized logistic, Gaussian),
//! trained on the negative ELBO
//!
//!   -L(x) = -E_q[log p(x | z)] + KL(q(z | x) || p(z))                 (eq. 3),
//!
//! with an optional linear KL warm-up (Sønderby et al. 2016) and free bits per latent
//! dimension (Kingma et al. 2016, eq. 15) during training only. Held out it reports the ELBO
//! (`elbo`, a bound) or the importance-weighted bound with `k = eval.importance_samples` draws
//! (`iwae`, Burda et al. 2016, eq. 8), both upper bounds on the NLL of the data as stored, or an
//! annealed-importance-sampling estimate of `log p(x)` from the prior through the decoder alone
//! (`ais`, Wu et al. 2017, section 3; [`crate::eval::ais`]), which checks the encoder-driven
//! bounds against an estimate that does not use the encoder.
//!
//! Encoder and decoder are MLPs on the flat example (`net = "mlp"`; a decoder with `depth = 0`
//! is linear, which with the Gaussian observation model is factor analysis, probabilistic PCA
//! with a shared scale, whose marginal likelihood is known in closed form: the tests check the
//! bounds against it), or, on images, the VQ-VAE's strided convolutional networks
//! ([`crate::nn::conv_net`]) with a linear map between the latent vector and the feature grid
//! (`net = "conv"`, `channels`, `downsample`).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::net::{check_batch, DataScale};
use crate::data::Layout;
use crate::eval::ais::{self, AisOptions};
use crate::latent::observation::log_mean_exp_rows;
use crate::latent::{
    diag_normal_log_density, kl_std_normal, reparameterise, std_normal_log_density, LatentDecoder,
    Observation, ObservationModel,
};
use crate::model::{
    likelihood_choice, DataInfo, GenerativeModel, ModelCore, StepContext, StepOutput, DEFAULT_GROUP,
};
use crate::models::FamilyConfig;
use crate::nn::conv_net::{ConvDecoder, ConvEncoder, ConvNetShape};
use crate::nn::{Activation, Linear, Mlp, ParamInit};
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `vae`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Latent dimensions.
    pub latent: usize,
    /// Units of each hidden layer of the encoder and the decoder.
    pub hidden: usize,
    /// Hidden layers of each network (0: linear maps).
    pub depth: usize,
    /// The networks' activation.
    pub activation: Activation,
    /// The decoder's observation model: auto, bernoulli, categorical, logistic or gaussian.
    pub observation: Observation,
    /// Training steps over which the KL weight rises linearly from 0 to 1 (0: no warm-up).
    pub kl_warmup_steps: usize,
    /// Free bits: nats per latent dimension below which the batch-mean KL is not penalised
    /// during training (0: off).
    pub free_bits: f64,
    /// Samples show the decoder's most likely value instead of a draw from `p(x | z)`.
    pub sample_mean: bool,
    /// The networks: "mlp" on the flat example, or "conv" on images.
    pub net: VaeNet,
    /// Conv networks: channels at the reduced resolutions (half at full resolution).
    pub channels: usize,
    /// Conv networks: stride-2 reductions of the image (28x28 -> 7x7 with 2).
    pub downsample: usize,
}

/// The VAE's encoder and decoder networks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VaeNet {
    /// MLPs of `depth` hidden layers of `hidden` units.
    Mlp,
    /// Strided convolutions to a grid, a linear map to the latent, and back.
    Conv,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            latent: 32,
            hidden: 512,
            depth: 2,
            activation: Activation::Silu,
            observation: Observation::Auto,
            kl_warmup_steps: 0,
            free_bits: 0.0,
            sample_mean: false,
            net: VaeNet::Mlp,
            channels: 32,
            downsample: 2,
        }
    }
}

impl Config {
    fn mlp_params(&self, d_in: usize, d_out: usize) -> usize {
        let h = self.hidden;
        match self.depth {
            0 => d_in * d_out + d_out,
            n => d_in * h + h + (n - 1) * (h * h + h) + h * d_out + d_out,
        }
    }

    fn param_count(&self, data: &DataInfo, per_dim: usize, gaussian: bool) -> usize {
        let d = data.dim;
        let nets = match (self.net, self.conv_shape(data)) {
            (VaeNet::Conv, Ok(s)) => {
                let (h, w) = s.grid();
                let cells = h * w * s.channels;
                s.encoder_params(s.channels)
                    + cells * 2 * self.latent
                    + 2 * self.latent
                    + self.latent * cells
                    + cells
                    + s.decoder_params(s.channels, s.image_channels * per_dim)
            }
            _ => self.mlp_params(d, 2 * self.latent) + self.mlp_params(self.latent, d * per_dim),
        };
        nets + if gaussian { d } else { 0 }
    }

    /// The conv networks' shape on `data` (an error unless it is an image).
    fn conv_shape(&self, data: &DataInfo) -> Result<ConvNetShape> {
        let Layout::Image {
            channels,
            height,
            width,
        } = data.layout
        else {
            return Err(Error::Config(
                "model.net = \"conv\" needs image data (digits, mnist, mnist-binary); use \
                 net = \"mlp\" for flat data"
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
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "variational autoencoder: Gaussian encoder, ELBO training, ELBO or IWAE-k bound, AIS";
    const LIKELIHOODS: &'static [&'static str] = &["elbo", "iwae", "ais"];

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.latent == 0 || self.latent > 4096 {
            return bad(format!(
                "model.latent must be in 1..=4096, got {}",
                self.latent
            ));
        }
        if self.hidden == 0 {
            return bad("model.hidden must be at least 1".into());
        }
        if self.depth > 16 {
            return bad(format!(
                "model.depth must be at most 16, got {}",
                self.depth
            ));
        }
        if !(self.free_bits.is_finite() && self.free_bits >= 0.0) {
            return bad(format!(
                "model.free_bits must be >= 0, got {}",
                self.free_bits
            ));
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let d = data.dim;
        let per_dim = self
            .observation
            .resolve(data.kind)
            .map(|o| o.outputs_per_dim())
            .unwrap_or(1);
        let conv = match (self.net, self.conv_shape(data)) {
            (VaeNet::Conv, Ok(s)) => 4 * s.activation_floats(),
            _ => 0,
        };
        MemoryEstimate {
            params: self.param_count(
                data,
                per_dim,
                data.kind == crate::data::DataKind::Continuous,
            ) as u64,
            activations: estimate::prod(&[
                batch,
                2 * self.hidden * (self.depth + 1) + 3 * d * per_dim + conv,
                8,
            ]),
            fixed: 0,
        }
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        // the IWAE bound decodes a chunk of at most IWAE_CHUNK_VALUES outputs at a time
        let per = self
            .memory_estimate(data, eval.batch_size.min(256))
            .activations;
        let ais_rows = if eval.likelihood.trim().eq_ignore_ascii_case("ais") {
            self.memory_estimate(data, AisOptions::default().max_rows)
                .activations
        } else {
            0
        };
        per.max(estimate::prod(&[IWAE_CHUNK_VALUES, 4 * 4]))
            .max(ais_rows)
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Vae::new(self, *data, device, rng)?))
    }
}

/// Decoder outputs (examples x draws x values) decoded at once by the IWAE bound.
const IWAE_CHUNK_VALUES: usize = 1 << 22;

/// A VAE on flat examples.
pub struct Vae {
    core: ModelCore,
    cfg: Config,
    obs: ObservationModel,
    scale: DataScale,
    nets: Nets,
    /// The Gaussian observation model's per-dimension log-scale, `[D]`.
    log_scale: Option<Tensor>,
}

impl Vae {
    /// The VAE of `cfg` on data shaped like `data`, initial weights from `rng`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let obs = cfg.observation.resolve(data.kind)?;
        let d = data.dim;
        let core = ModelCore::new(d, device);
        let (nets, log_scale) = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let (h, n, act) = (cfg.hidden, cfg.depth, cfg.activation);
            let out = obs.outputs_per_dim();
            let nets = match cfg.net {
                VaeNet::Mlp => Nets::Mlp {
                    encoder: Mlp::new(&mut p.push("encoder"), d, h, n, 2 * cfg.latent, act)?,
                    decoder: Mlp::new(&mut p.push("decoder"), cfg.latent, h, n, d * out, act)?,
                },
                VaeNet::Conv => {
                    let s = cfg.conv_shape(&data)?;
                    let (gh, gw) = s.grid();
                    let cells = gh * gw * s.channels;
                    Nets::Conv {
                        shape: s,
                        encoder: ConvEncoder::new(&mut p.push("encoder"), s, s.channels)?,
                        to_latent: Linear::new(
                            &mut p.push("to_latent"),
                            cells,
                            2 * cfg.latent,
                            true,
                        )?,
                        from_latent: Linear::new(
                            &mut p.push("from_latent"),
                            cfg.latent,
                            cells,
                            true,
                        )?,
                        decoder: ConvDecoder::new(
                            &mut p.push("decoder"),
                            s,
                            s.channels,
                            s.image_channels * out,
                        )?,
                    }
                }
            };
            let ls = match obs {
                ObservationModel::Gaussian => {
                    Some(p.constant("log_scale", &[d], 0.0)?.as_tensor().clone())
                }
                _ => None,
            };
            (nets, ls)
        };
        Ok(Self {
            core,
            cfg: cfg.clone(),
            obs,
            scale: DataScale::new(data.kind)?,
            nets,
            log_scale,
        })
    }

    /// The observation model the decoder uses.
    pub fn observation(&self) -> ObservationModel {
        self.obs
    }

    /// `(μ, logvar)` of `q(z | x)`, each `[N, Z]`.
    pub fn encode(&self, batch: &Tensor, graph: bool) -> Result<(Tensor, Tensor)> {
        let x = self.scale.to_grid(batch)?; // [N, D] in [-1, 1]
        let h = self.nets.encode(&x, graph)?; // [N, 2Z]
        let z = self.cfg.latent;
        Ok((h.narrow(1, 0, z)?, h.narrow(1, z, z)?.clamp(-30f32, 20f32)?))
    }

    /// `log p(x | z)` per row for latents `z: [N, Z]` and data `x: [N, D]`.
    pub fn decode_log_prob(&self, z: &Tensor, x: &Tensor, graph: bool) -> Result<Tensor> {
        let out = self.nets.decode(z, self.obs.outputs_per_dim(), graph)?;
        self.obs.log_prob(&out, x, self.log_scale.as_ref())
    }

    /// Per-example `(log p(x | z), KL per latent dimension [N, Z])` at one posterior draw.
    fn elbo_terms(&self, batch: &Tensor, rng: &mut Rng, graph: bool) -> Result<(Tensor, Tensor)> {
        let (mu, logvar) = self.encode(batch, graph)?;
        let z = reparameterise(&mu, &logvar, rng)?;
        let rec = self.decode_log_prob(&z, batch, graph)?; // [N]
        Ok((rec, kl_std_normal(&mu, &logvar)?))
    }

    /// The KL weight at training step `step` (linear warm-up).
    fn kl_weight(&self, step: usize) -> f64 {
        match self.cfg.kl_warmup_steps {
            0 => 1.0,
            w => ((step + 1) as f64 / w as f64).min(1.0),
        }
    }

    /// The training objective at `step`: `(-E log p(x|z) + β KL_fb) / D`, with the free-bits
    /// floor applied per latent dimension to the batch-mean KL.
    fn objective(&self, batch: &Tensor, rng: &mut Rng, step: usize) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "vae")?;
        let (rec, kl) = self.elbo_terms(batch, rng, true)?;
        let kl = kl.mean(0)?; // [Z]
        let kl = if self.cfg.free_bits > 0.0 {
            kl.maximum(self.cfg.free_bits)?
        } else {
            kl
        };
        let total = ((kl.sum_all()? * self.kl_weight(step))? - rec.mean_all()?)?;
        Ok((total / self.core.dim as f64)?)
    }

    /// `-L_k(x)` per example for `k` importance samples (k = 1: the ELBO).
    fn iwae_nll(&self, batch: &Tensor, k: usize, rng: &mut Rng) -> Result<Vec<f64>> {
        let n = batch.dim(0)?;
        let d = self.core.dim;
        let (mu, logvar) = self.encode(batch, false)?;
        let per_draw = d * self.obs.outputs_per_dim();
        let chunk = (IWAE_CHUNK_VALUES / (n * per_draw).max(1)).clamp(1, k);
        let mut w: Vec<Vec<f64>> = vec![Vec::with_capacity(k); n];
        let x_rep = |c: usize| -> Result<Tensor> {
            Ok(batch
                .unsqueeze(0)?
                .broadcast_as((c, n, d))?
                .reshape((c * n, d))?)
        };
        let mut done = 0;
        while done < k {
            let c = chunk.min(k - done);
            let z_dim = self.cfg.latent;
            let mu_c = mu
                .unsqueeze(0)?
                .broadcast_as((c, n, z_dim))?
                .reshape((c * n, z_dim))?;
            let lv_c = logvar
                .unsqueeze(0)?
                .broadcast_as((c, n, z_dim))?
                .reshape((c * n, z_dim))?;
            let z = reparameterise(&mu_c, &lv_c, rng)?; // [c*n, Z]
            let lw = ((self.decode_log_prob(&z, &x_rep(c)?, false)?
                + std_normal_log_density(&z)?)?
                - diag_normal_log_density(&z, &mu_c, &lv_c)?)?; // [c*n]
            let lw: Vec<f32> = lw.to_vec1()?;
            for (j, v) in lw.iter().enumerate() {
                w[j % n].push(f64::from(*v));
            }
            done += c;
        }
        Ok(log_mean_exp_rows(&w).into_iter().map(|l| -l).collect())
    }
}

/// The encoder `x -> (μ, logvar)` and the decoder `z -> ` observation parameters.
enum Nets {
    Mlp {
        encoder: Mlp,
        decoder: Mlp,
    },
    Conv {
        shape: ConvNetShape,
        encoder: ConvEncoder,
        to_latent: Linear,
        from_latent: Linear,
        decoder: ConvDecoder,
    },
}

impl Nets {
    /// `x: [N, D]` in [-1, 1] -> `[N, 2Z]`.
    fn encode(&self, x: &Tensor, graph: bool) -> Result<Tensor> {
        match self {
            Nets::Mlp { encoder, .. } => match graph {
                true => encoder.forward(x),
                false => encoder.forward_inference(x),
            },
            Nets::Conv {
                shape: s,
                encoder,
                to_latent,
                ..
            } => {
                let n = x.dim(0)?;
                let img = x
                    .reshape((n, s.image_channels, s.height, s.width))?
                    .permute((0, 2, 3, 1))?
                    .contiguous()?; // [N, H, W, C]
                let h = encoder.forward(&img)?; // [N, h, w, c]
                to_latent.forward(&h.reshape((n, ()))?)
            }
        }
    }

    /// `z: [N, Z]` -> `[N, D * per_dim]` in the observation model's layout.
    fn decode(&self, z: &Tensor, per_dim: usize, graph: bool) -> Result<Tensor> {
        match self {
            Nets::Mlp { decoder, .. } => match graph {
                true => decoder.forward(z),
                false => decoder.forward_inference(z),
            },
            Nets::Conv {
                shape: s,
                from_latent,
                decoder,
                ..
            } => {
                let n = z.dim(0)?;
                let (h, w) = s.grid();
                let g = from_latent
                    .forward_silu(z)?
                    .reshape((n, h, w, s.channels))?;
                let out = decoder.forward(&g)?; // [N, H, W, C P]
                let c = s.image_channels;
                Ok(if c == 1 {
                    out.reshape((n, ()))?
                } else {
                    out.reshape((n, s.height, s.width, c, per_dim))?
                        .permute((0, 3, 1, 2, 4))?
                        .reshape((n, ()))?
                })
            }
        }
    }
}

impl GenerativeModel for Vae {
    fn family(&self) -> &'static str {
        "vae"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// The negative ELBO in nats per dimension (full KL weight, no free bits).
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.objective(batch, rng, usize::MAX - 1)
    }

    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let step = ctx.step();
        let batch = ctx.batch()?;
        let loss = self.objective(&batch, ctx.rng(), step)?;
        ctx.minimize(DEFAULT_GROUP, &loss)
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        format!(
            "z ~ N(0, I), then {} of the {} decoder",
            if self.cfg.sample_mean {
                "the most likely x"
            } else {
                "x ~ p(x | z)"
            },
            self.obs.name()
        )
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let z = rng.normal_tensor(&[n, self.cfg.latent], &self.core.device)?; // [n, Z]
        let out = self.nets.decode(&z, self.obs.outputs_per_dim(), false)?;
        self.obs
            .sample(&out, self.log_scale.as_ref(), self.cfg.sample_mean, rng)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        let which = likelihood_choice(opts, "vae", Config::LIKELIHOODS)?;
        check_batch(batch, self.core.dim, "vae")?;
        if which == "ais" {
            let est = ais::log_marginal(self, batch, &AisOptions::from_eval(opts), rng)?;
            return Ok(Nll {
                nats: est.log_z.iter().map(|l| -l).collect(),
                dims: self.core.dim,
                kind: NllKind::Estimate {
                    samples: opts.ais_chains,
                },
            });
        }
        let nats = match which {
            "iwae" => self.iwae_nll(batch, opts.importance_samples.max(1), rng)?,
            _ => {
                let (rec, kl) = self.elbo_terms(batch, rng, false)?;
                let nll = (kl.sum(1)? - rec)?.detach();
                nll.to_vec1::<f32>()?.into_iter().map(f64::from).collect()
            }
        };
        Ok(Nll {
            nats,
            dims: self.core.dim,
            kind: NllKind::Bound,
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let obs = self.obs.name();
        match likelihood_choice(opts, "vae", Config::LIKELIHOODS) {
            Ok("iwae") => format!(
                "IWAE bound (Burda et al. 2016, eq. 8) with k = {} importance samples from \
                 q(z|x), {obs} decoder (standard error over examples includes the sampling)",
                opts.importance_samples.max(1)
            ),
            Ok("ais") => format!(
                "{} from the prior p(z) to p(z|x) through the {obs} decoder (Wu et al. 2017); \
                 a stochastic upper bound on the NLL whose gap shrinks with chains and steps \
                 (standard error over examples includes the sampling)",
                AisOptions::from_eval(opts).describe()
            ),
            _ => format!(
                "negative ELBO, one posterior draw per example, KL in closed form, {obs} decoder \
                 (standard error over examples includes the draw)"
            ),
        }
    }
}

/// The decoder as a [`LatentDecoder`]: the standard normal prior and `p(x | z)` of the
/// observation model, differentiable in `z` (for AIS).
impl LatentDecoder for Vae {
    fn latent_dim(&self) -> usize {
        self.cfg.latent
    }

    fn log_likelihood_given(&self, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        self.decode_log_prob(z, x, true)
    }

    fn observation_label(&self) -> String {
        format!("{} decoder", self.obs.name())
    }
}
