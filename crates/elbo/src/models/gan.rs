//! Generative adversarial networks: a generator `x = g(z)`, `z ~ N(0, I)`, trained against a
//! critic, with the objective of the original GAN (Goodfellow et al. 2014, eq. 1: `minimax`, or
//! its `non-saturating` generator loss, sec. 3), the Wasserstein GAN with weight clipping and
//! RMSProp (`wgan`, Arjovsky et al. 2017, algorithm 1) or the Wasserstein GAN with a gradient
//! penalty (`wgan-gp`, Gulrajani et al. 2017, algorithm 1). The objectives are free functions in
//! [`crate::continuous::adversarial`]; the networks (MLPs for flat data, DCGAN-style
//! convolutions for images) are in [`crate::nn::dcgan`].
//!
//! Each player is its own parameter group with its own optimiser: `gen.*` and `critic.*`.
//! One training step is `n_critic` critic minimisations (each on a fresh real batch and fresh
//! latents) followed by one generator minimisation, so `train.steps` counts generator updates
//! as the papers do. Defaults per objective follow the papers: Adam(2e-4, 0.5, 0.999) and one
//! critic step for the original GAN (Radford et al. 2016, sec. 4), RMSProp(5e-5), clip 0.01
//! and `n_critic = 5` for WGAN, Adam(1e-4, 0, 0.9), lambda = 10 and `n_critic = 5` for WGAN-GP;
//! learning rates stay constant (no warm-up, no decay), and neither player clips its gradient.
//!
//! A GAN has no likelihood (`likelihoods` is empty): it is compared by sample metrics. With a
//! stated Gaussian observation model `p(x | z) = N(x; g(z), obs_sigma^2 I)` in model space the
//! generator becomes a latent-variable density ([`crate::latent::LatentDecoder`]) whose
//! likelihood annealed importance sampling estimates when asked for by name (`--likelihood
//! ais`, an opt-in likelihood: never the default; Wu et al. 2017, sec. 3); that number is the
//! likelihood of that model with that sigma, not of the GAN.

use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::adversarial::{
    discriminator_loss, gradient_penalty, minimax_generator_loss, non_saturating_generator_loss,
    wasserstein_critic_loss, wasserstein_generator_loss,
};
use crate::continuous::diffusion::net::{check_batch, DataScale};
use crate::data::{DataKind, Layout};
use crate::eval::ais::{self, AisOptions};
use crate::latent::LatentDecoder;
use crate::model::{
    DataInfo, GenerativeModel, GroupSettings, ModelCore, ParamGroup, StepContext, StepOutput,
};
use crate::models::FamilyConfig;
use crate::nn::batch_norm::StatsMode;
use crate::nn::dcgan::{Critic, GenNorm, Generator, Shape};
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::train::optim::named_vars;
use crate::train::rmsprop::OptimizerKind;
use crate::{Error, Nll, NllKind, Result, Rng};

/// The adversarial objective.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    /// Goodfellow et al. (2014), eq. 1: the generator minimises `log(1 - D(G(z)))`.
    Minimax,
    /// Goodfellow et al. (2014), sec. 3: the generator maximises `log D(G(z))`.
    #[default]
    NonSaturating,
    /// Arjovsky et al. (2017), algorithm 1: Wasserstein critic, weight clipping, RMSProp.
    Wgan,
    /// Gulrajani et al. (2017), algorithm 1: Wasserstein critic with the gradient penalty.
    WganGp,
}

impl Objective {
    /// The kebab-case name.
    pub fn name(&self) -> &'static str {
        match self {
            Objective::Minimax => "minimax",
            Objective::NonSaturating => "non-saturating",
            Objective::Wgan => "wgan",
            Objective::WganGp => "wgan-gp",
        }
    }

    fn wasserstein(&self) -> bool {
        matches!(self, Objective::Wgan | Objective::WganGp)
    }
}

/// The networks' layout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Arch {
    /// DCGAN convolutions for images, MLPs otherwise.
    #[default]
    Auto,
    /// MLPs on the flat example.
    Mlp,
    /// DCGAN-style convolutions (images with sides divisible by 4).
    Dcgan,
}

/// The `[model]` table of `gan`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// minimax, non-saturating, wgan or wgan-gp.
    pub objective: Objective,
    /// auto, mlp or dcgan.
    pub arch: Arch,
    /// Latent dimensions.
    pub latent: usize,
    /// Units of each hidden layer of the MLPs.
    pub hidden: usize,
    /// Hidden layers of each MLP.
    pub depth: usize,
    /// Base channel width of the DCGAN networks.
    pub channels: usize,
    /// Negative slope of the critic's LeakyReLU.
    pub slope: f64,
    /// Critic minimisations per generator step (0: the objective's default, 1 for the
    /// original GAN, 5 for WGAN and WGAN-GP).
    pub n_critic: usize,
    /// WGAN: critic weights are clipped to `[-clip, clip]` after each critic step.
    pub clip: f64,
    /// WGAN-GP: the penalty's weight `lambda`.
    pub gp_lambda: f64,
    /// Generator learning rate (unset: the objective's default).
    pub gen_lr: Option<f64>,
    /// Critic learning rate (unset: the objective's default).
    pub critic_lr: Option<f64>,
    /// The standard deviation, in model space ([-1, 1] for images), of the Gaussian observation
    /// model that turns the generator into a density for likelihood estimation.
    pub obs_sigma: f64,
    /// PacGAN packing (Lin et al. 2018, sec. 3): the critic scores `pack` samples at once, all
    /// real or all generated, concatenated into one input of `pack x D` values (MLPs only; the
    /// batch size must be a multiple of it). 1 is the unpacked critic.
    pub pack: usize,
    /// Normalisation in the generator: none, or batch (the DCGAN layout).
    pub gen_norm: GenNorm,
    /// Base channel width of the DCGAN critic (unset: `channels`).
    pub critic_channels: Option<usize>,
}

/// Latents of the reference batch whose per-layer statistics a batch-normalised generator
/// samples with (standing statistics).
const STANDING_BATCH: usize = 512;

/// Seed of the reference batch of the decoder density.
const STANDING_SEED: u64 = 0x57a4d;

impl Default for Config {
    fn default() -> Self {
        Self {
            objective: Objective::NonSaturating,
            arch: Arch::Auto,
            latent: 64,
            hidden: 256,
            depth: 3,
            channels: 32,
            slope: 0.2,
            n_critic: 0,
            clip: 0.01,
            gp_lambda: 10.0,
            gen_lr: None,
            critic_lr: None,
            obs_sigma: 0.1,
            pack: 1,
            gen_norm: GenNorm::None,
            critic_channels: None,
        }
    }
}

impl Config {
    /// Critic steps per generator step.
    pub fn critic_steps(&self) -> usize {
        match (self.n_critic, self.objective.wasserstein()) {
            (0, true) => 5,
            (0, false) => 1,
            (n, _) => n,
        }
    }

    /// The networks' shape for data shaped like `data`.
    pub fn shape(&self, data: &DataInfo) -> Result<Shape> {
        let image = match data.layout {
            Layout::Image {
                channels,
                height,
                width,
            } => Some((channels, height, width)),
            _ => None,
        };
        let mlp = Shape::Mlp {
            dim: data.dim,
            hidden: self.hidden,
            depth: self.depth,
        };
        match (self.arch, image) {
            (Arch::Mlp, _) | (Arch::Auto, None) => Ok(mlp),
            (Arch::Auto, Some((c, h, w))) if h % 4 == 0 && w % 4 == 0 => Ok(Shape::Conv {
                channels: c,
                height: h,
                width: w,
                base: self.channels,
            }),
            (Arch::Auto, Some(_)) => Ok(mlp),
            (Arch::Dcgan, Some((c, h, w))) => Ok(Shape::Conv {
                channels: c,
                height: h,
                width: w,
                base: self.channels,
            }),
            (Arch::Dcgan, None) => Err(Error::Config(
                "model.arch = \"dcgan\" needs image data (the data source has a flat layout); \
                 use model.arch = \"mlp\" or \"auto\""
                    .into(),
            )),
        }
    }

    /// The critic's shape: `shape` with `pack` examples side by side (PacGAN, Lin et al. 2018).
    pub fn packed(&self, shape: Shape) -> Result<Shape> {
        match shape {
            _ if self.pack == 1 => Ok(shape),
            Shape::Mlp { dim, hidden, depth } => Ok(Shape::Mlp {
                dim: dim * self.pack,
                hidden,
                depth,
            }),
            Shape::Conv { .. } => Err(Error::Config(format!(
                "model.pack = {} packs flat examples for an MLP critic; the DCGAN critic takes \
                 one image: set model.pack = 1 or model.arch = \"mlp\"",
                self.pack
            ))),
        }
    }

    /// (learning rate, beta1, beta2, optimizer) of each player by default.
    fn optimizer(&self) -> (f64, f64, f64, OptimizerKind) {
        match self.objective {
            Objective::Minimax | Objective::NonSaturating => {
                (2e-4, 0.5, 0.999, OptimizerKind::Adamw)
            }
            // RMSProp's decay alpha is PyTorch's default 0.99 (the WGAN reference code)
            Objective::Wgan => (5e-5, 0.0, 0.99, OptimizerKind::Rmsprop),
            Objective::WganGp => (1e-4, 0.0, 0.9, OptimizerKind::Adamw),
        }
    }

    fn param_count(&self, shape: &Shape) -> u64 {
        let z = self.latent;
        match *shape {
            Shape::Mlp { dim, hidden, depth } => {
                estimate::mlp_params(z, hidden, depth, dim)
                    + estimate::mlp_params(dim * self.pack, hidden, depth, 1)
            }
            Shape::Conv {
                channels,
                height,
                width,
                base,
            } => {
                let cells = (height / 4 * (width / 4)) as u64;
                let conv = |i: usize, o: usize| (i * o * 9 + o) as u64;
                let b = base;
                let c = self.critic_channels.unwrap_or(base);
                let norm = match self.gen_norm {
                    GenNorm::None => 0,
                    GenNorm::Batch => 2 * 7 * b as u64,
                };
                (z as u64 + 1) * 4 * b as u64 * cells
                    + conv(4 * b, 2 * b)
                    + conv(2 * b, b)
                    + conv(b, channels)
                    + norm
                    + conv(channels, c)
                    + conv(c, 2 * c)
                    + conv(2 * c, 4 * c)
                    + 4 * c as u64 * cells
                    + 1
            }
        }
    }
}

fn positive(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "model.{name} must be a finite number > 0, got {v}"
        )))
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "GAN / WGAN / WGAN-GP: generator against a critic (no likelihood; sample metrics)";
    const LIKELIHOODS: &'static [&'static str] = &[];
    const OPT_IN_LIKELIHOODS: &'static [&'static str] = &["ais"];

    fn validate(&self) -> Result<()> {
        if self.latent == 0 || self.latent > 4096 {
            return Err(Error::Config(format!(
                "model.latent must be in 1..=4096, got {}",
                self.latent
            )));
        }
        if self.hidden == 0 || self.channels == 0 || self.critic_channels == Some(0) {
            return Err(Error::Config(
                "model.hidden, model.channels and model.critic_channels must be at least 1".into(),
            ));
        }
        if self.depth > 16 {
            return Err(Error::Config(format!(
                "model.depth must be at most 16, got {}",
                self.depth
            )));
        }
        if !(0.0..1.0).contains(&self.slope) {
            return Err(Error::Config(format!(
                "model.slope (the critic's LeakyReLU slope) must be in [0, 1), got {}",
                self.slope
            )));
        }
        if self.n_critic > 100 {
            return Err(Error::Config(format!(
                "model.n_critic must be at most 100 (0 takes the objective's default), got {}",
                self.n_critic
            )));
        }
        if self.pack == 0 || self.pack > 64 {
            return Err(Error::Config(format!(
                "model.pack (samples per critic input, PacGAN) must be in 1..=64, got {}",
                self.pack
            )));
        }
        positive("clip", self.clip)?;
        positive("gp_lambda", self.gp_lambda)?;
        positive("obs_sigma", self.obs_sigma)?;
        for (name, lr) in [("gen_lr", self.gen_lr), ("critic_lr", self.critic_lr)] {
            if let Some(lr) = lr {
                positive(name, lr)?;
            }
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let shape = self.shape(data).unwrap_or(Shape::Mlp {
            dim: data.dim,
            hidden: self.hidden,
            depth: self.depth,
        });
        let per_example = match shape {
            Shape::Mlp { hidden, depth, .. } => 2 * hidden * (depth + 1) + 2 * data.dim,
            Shape::Conv { base, .. } => 8 * base * data.dim,
        };
        MemoryEstimate {
            params: self.param_count(&shape),
            // the penalty keeps the graph of the input gradient: count the activations thrice
            activations: estimate::prod(&[batch, per_example, 3 * 4 * 2]),
            fixed: 0,
        }
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        // AIS runs the generator (and its z-gradient) on up to max_rows chains at once
        let rows = if eval.likelihood.trim().eq_ignore_ascii_case("ais") {
            AisOptions::default().max_rows
        } else {
            eval.batch_size
        };
        self.memory_estimate(data, rows).activations
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Gan::new(self, *data, device, rng)?))
    }
}

/// A GAN: generator and critic.
pub struct Gan {
    core: ModelCore,
    cfg: Config,
    scale: DataScale,
    gen: Generator,
    critic: Critic,
}

impl Gan {
    /// The GAN of `cfg` on data shaped like `data`, initial weights from `rng`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let shape = cfg.shape(&data)?;
        let core = ModelCore::new(data.dim, device);
        let discrete = matches!(data.kind, DataKind::Discrete { .. });
        let (gen, critic) = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let gen = Generator::with_norm(
                &mut p.push("gen"),
                shape,
                cfg.latent,
                discrete,
                cfg.gen_norm,
            )?;
            let critic_shape = shape.with_base(cfg.critic_channels.unwrap_or(cfg.channels));
            let critic = Critic::new(&mut p.push("critic"), cfg.packed(critic_shape)?, cfg.slope)?;
            (gen, critic)
        };
        Ok(Self {
            core,
            cfg: cfg.clone(),
            scale: DataScale::new(data.kind)?,
            gen,
            critic,
        })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The generator's output `g(z)` in model space, `[N, D]` for `z: [N, Z]`.
    pub fn generate(&self, z: &Tensor) -> Result<Tensor> {
        self.gen.forward(z)
    }

    /// The generator's output for sampling: with batch normalisation, normalised by the
    /// standing statistics of a reference batch of latents drawn from `rng`.
    pub fn generate_eval(&self, z: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        if !self.gen.batch_norm() {
            return self.gen.forward(z);
        }
        let z_ref = self.latents(STANDING_BATCH, rng)?; // [512, Z]
        let stats = self.gen.standing_stats(&z_ref)?;
        self.gen.forward_with(z, &mut StatsMode::Fixed(&stats))
    }

    /// The critic's score `[N / pack]` of `x: [N, D]` in model space, consecutive rows packed
    /// into one critic input (PacGAN; one score per row when `pack = 1`).
    pub fn critic_score(&self, x: &Tensor) -> Result<Tensor> {
        self.critic.forward(&self.pack(x)?)
    }

    /// `x: [N, D]` -> `[N / pack, pack D]`, consecutive rows side by side.
    fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let m = self.cfg.pack;
        if m == 1 {
            return Ok(x.clone());
        }
        if n % m != 0 {
            return Err(Error::Config(format!(
                "model.pack = {m}: the critic packs {m} examples per input, but got a batch of \
                 {n}; make train.batch_size a multiple of {m}"
            )));
        }
        Ok(x.reshape((n / m, m * d))?) // [N/m, m D]
    }

    /// A training batch in model space: discrete levels dequantized uniformly within their bins
    /// so the critic cannot tell real from generated by the lattice alone.
    fn real(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "gan")?;
        self.scale.dequantize(batch, rng)
    }

    fn latents(&self, n: usize, rng: &mut Rng) -> Result<Tensor> {
        rng.normal_tensor(&[n, self.cfg.latent], &self.core.device)
    }

    /// The critic's loss on `real` and `fake` (model space); the penalty's interpolation weights
    /// come from `rng` (WGAN-GP only).
    pub fn critic_loss(&self, real: &Tensor, fake: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let (real, fake) = (&self.pack(real)?, &self.pack(fake)?); // [B/m, m D]
        let (d_real, d_fake) = (self.critic.forward(real)?, self.critic.forward(fake)?);
        match self.cfg.objective {
            Objective::Minimax | Objective::NonSaturating => discriminator_loss(&d_real, &d_fake),
            Objective::Wgan => wasserstein_critic_loss(&d_real, &d_fake),
            Objective::WganGp => {
                let eps = rng.uniform_tensor(&[real.dim(0)?, 1], &self.core.device)?; // [B, 1]
                let gp = gradient_penalty(|x| self.critic.forward(x), real, fake, &eps)?;
                Ok((wasserstein_critic_loss(&d_real, &d_fake)? + (gp * self.cfg.gp_lambda)?)?)
            }
        }
    }

    /// The generator's loss for `n` fresh latents.
    pub fn generator_loss(&self, n: usize, rng: &mut Rng) -> Result<Tensor> {
        let fake = self.gen.forward(&self.latents(n, rng)?)?;
        let d_fake = self.critic_score(&fake)?;
        match self.cfg.objective {
            Objective::Minimax => minimax_generator_loss(&d_fake),
            Objective::NonSaturating => non_saturating_generator_loss(&d_fake),
            Objective::Wgan | Objective::WganGp => wasserstein_generator_loss(&d_fake),
        }
    }

    /// WGAN: clip every critic weight to `[-clip, clip]`.
    fn clip_critic(&self) -> Result<()> {
        let c = self.cfg.clip as f32;
        for (name, var) in named_vars(&self.core.varmap)? {
            if name.starts_with("critic.") {
                clip_var(&var, c)?;
            }
        }
        Ok(())
    }

    fn settings(&self, lr: Option<f64>) -> GroupSettings {
        let (default_lr, beta1, beta2, optimizer) = self.cfg.optimizer();
        GroupSettings {
            lr: Some(lr.unwrap_or(default_lr)),
            beta1: Some(beta1),
            beta2: Some(beta2),
            weight_decay: Some(0.0),
            grad_clip: Some(0.0),
            warmup_steps: Some(0),
            min_lr_ratio: Some(1.0),
            ema: None,
            optimizer: Some(optimizer),
        }
    }
}

fn clip_var(var: &Var, c: f32) -> Result<()> {
    Ok(var.set(&var.as_detached_tensor().clamp(-c, c)?)?)
}

impl GenerativeModel for Gan {
    fn family(&self) -> &'static str {
        "gan"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// Both players' losses at one draw, summed (the critic's on detached samples, so each
    /// player's parameters receive their own loss's gradient); training uses `train_step`.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let real = self.real(batch, rng)?;
        let n = real.dim(0)?;
        let fake = self.gen.forward(&self.latents(n, rng)?)?.detach();
        Ok((self.critic_loss(&real, &fake, rng)? + self.generator_loss(n, rng)?)?)
    }

    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let mut critic_loss = f64::NAN;
        for _ in 0..self.cfg.critic_steps() {
            let batch = ctx.batch()?;
            let real = self.real(&batch, ctx.rng())?;
            let n = real.dim(0)?;
            let z = self.latents(n, ctx.rng())?;
            let fake = self.gen.forward(&z)?.detach();
            let loss = self.critic_loss(&real, &fake, ctx.rng())?;
            critic_loss = ctx.minimize("critic", &loss)?.loss;
            if self.cfg.objective == Objective::Wgan {
                self.clip_critic()?;
            }
        }
        let n = ctx.batch_size;
        let loss = self.generator_loss(n, ctx.rng())?;
        let mut out = ctx.minimize("gen", &loss)?;
        out.extra.push(("critic_loss".into(), critic_loss));
        Ok(out)
    }

    fn param_groups(&self) -> Vec<ParamGroup> {
        let critic = GroupSettings {
            ema: Some(false),
            ..self.settings(self.cfg.critic_lr)
        };
        vec![
            ParamGroup::with_prefixes("gen", &["gen."]).settings(self.settings(self.cfg.gen_lr)),
            ParamGroup::with_prefixes("critic", &["critic."]).settings(critic),
        ]
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn opt_in_likelihoods(&self) -> &'static [&'static str] {
        Config::OPT_IN_LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        format!(
            "z ~ N(0, I_{}), x = g(z) ({} generator)",
            self.cfg.latent,
            self.cfg.objective.name()
        )
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let z = self.latents(n, rng)?; // [n, Z]
        let x = self.generate_eval(&z, rng)?.detach(); // [n, D] model space
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        check_batch(batch, self.core.dim, "gan")?;
        match opts.likelihood.trim().to_ascii_lowercase().as_str() {
            "auto" | "none" => Ok(Nll::none(self.core.dim)),
            "ais" => {
                let est = ais::log_marginal(self, batch, &AisOptions::from_eval(opts), rng)?;
                Ok(Nll {
                    nats: est.log_z.iter().map(|l| -l).collect(),
                    dims: self.core.dim,
                    kind: NllKind::Estimate {
                        samples: opts.ais_chains,
                    },
                })
            }
            other => Err(Error::Config(format!(
                "the gan family reports no likelihood '{other}': a GAN has none (compare it \
                 by sample metrics, elbo eval --metrics); use --likelihood ais for the AIS \
                 estimate under the Gaussian observation model of model.obs_sigma"
            ))),
        }
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        if opts.likelihood.trim().eq_ignore_ascii_case("ais") {
            format!(
                "{} from the prior p(z) to p(z|x) through the generator with the observation \
                 model {} (Wu et al. 2017): the likelihood of that model with sigma = {}, not \
                 of the GAN, which has none; a stochastic upper bound on that model's NLL \
                 (standard error over examples includes the sampling)",
                AisOptions::from_eval(opts).describe(),
                self.observation_label(),
                self.cfg.obs_sigma
            )
        } else {
            "none: a GAN defines no density; compared by sample metrics (--likelihood ais: \
             AIS under a stated Gaussian observation model)"
                .into()
        }
    }
}

impl LatentDecoder for Gan {
    fn latent_dim(&self) -> usize {
        self.cfg.latent
    }

    /// `log N(x; g(z), obs_sigma^2 I)` in model space, plus the Jacobian of the map to the
    /// data's stored units (discrete levels: `D log(2 / (L - 1))`).
    fn log_likelihood_given(&self, z: &Tensor, x: &Tensor) -> Result<Tensor> {
        // a fixed reference batch, so the density does not depend on the call
        let mean = self.generate_eval(z, &mut Rng::new(STANDING_SEED))?; // [N, D]
        let x = self.scale.to_grid(x)?; // [N, D]
        let s = self.cfg.obs_sigma;
        let d = self.core.dim as f64;
        let quad = ((x - mean)?.sqr()?.sum(1)? * (-0.5 / (s * s)))?; // [N]
        let norm = -d * (s.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln());
        Ok((quad + (norm + self.scale.log_jacobian(self.core.dim)))?)
    }

    fn observation_label(&self) -> String {
        format!(
            "Gaussian N(x; g(z), {}^2 I) in model space{}",
            self.cfg.obs_sigma,
            self.scale.dequantization_note()
        )
    }
}
