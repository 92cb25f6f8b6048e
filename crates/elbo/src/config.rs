//! Run configuration: serde structs with defaults, read from TOML, overridden by CLI flags, and
//! saved as `config.json` beside every checkpoint. Unknown keys are rejected, so a typo in a
//! config file is an error that names the key rather than a silently ignored setting.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::nn::Activation;
use crate::{Error, Result};

/// Everything a run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Model family and network size.
    pub model: ModelConfig,
    /// Data set.
    pub data: DataSpec,
    /// Optimisation and logging.
    pub train: TrainConfig,
    /// Defaults for `elbo sample`.
    pub sample: SampleOptions,
    /// Defaults for `elbo eval` and periodic held-out evaluation.
    pub eval: EvalOptions,
}

/// The model family and its network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Family name, e.g. "flow" (see `elbo::model::KNOWN_MODELS`).
    pub name: String,
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Number of hidden layers.
    pub layers: usize,
    /// Size of the sinusoidal time embedding.
    pub time_embed_dim: usize,
    /// Times are multiplied by this before the sinusoidal embedding. 1 (the default) gives
    /// smooth features of t in [0, 1]; 1000 (DDPM's range, used by the W1 benchmark) adds
    /// sin(1000 t)-like features, which measured worse held-out NLL on checkerboard
    /// (3.637 vs 3.610 nats at equal steps).
    pub time_scale: f64,
    /// Hidden activation.
    pub activation: Activation,
    /// Network family for diffusion models: "auto" (U-Net for image data when available,
    /// else MLP), "mlp" or "unet".
    pub backbone: String,
    /// Gaussian-diffusion settings (families ddpm / ddim / sde / edm).
    pub diffusion: DiffusionConfig,
    // --- language models (ar, ao-ar, mdlm): the transformer backbone ---
    /// Transformer width (language models).
    pub d_model: usize,
    /// Attention heads; must divide `d_model` (language models).
    pub n_heads: usize,
    /// Transformer blocks (language models; `layers` is the MLP depth of other families).
    pub n_layers: usize,
    /// How the transformer sees positions: "rope" (rotary angles on queries and keys, Su et al.
    /// 2021) or "learned" (a learned table added to the input, as GPT-2).
    pub positions: String,
    /// MDLM: number of discrete time steps of the training ELBO (0: continuous time).
    pub diffusion_steps: usize,
    /// MDLM: antithetic (stratified) sampling of the training times (Kingma et al. 2021).
    pub antithetic: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            name: "flow".into(),
            hidden: 256,
            layers: 4,
            time_embed_dim: 32,
            time_scale: 1.0,
            activation: Activation::Silu,
            backbone: "auto".into(),
            diffusion: DiffusionConfig::default(),
            d_model: 128,
            n_heads: 4,
            n_layers: 4,
            positions: "rope".into(),
            diffusion_steps: 0,
            antithetic: true,
        }
    }
}

/// Settings of the Gaussian-diffusion families (`[model.diffusion]`): the discrete DDPM chain,
/// the score-SDE kind and EDM's noise distribution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiffusionConfig {
    /// DDPM: number of steps T.
    pub timesteps: usize,
    /// DDPM: beta schedule ("linear", "scaled_linear", "cosine").
    pub beta_schedule: String,
    /// DDPM: what the network predicts: "eps", "x0", "v", "levels" (softmax over the levels
    /// of discrete data, with the exact likelihood of x_t as a skip term) or "auto" (levels on
    /// discrete data when D·L <= 65536, else eps).
    pub parameterization: String,
    /// DDPM: "simple" (L_simple: MSE of the prediction, or the levels' cross-entropy), "vlb"
    /// (the bound's own weights) or "hybrid" (simple + 0.001 vlb, Nichol & Dhariwal 2021).
    pub objective: String,
    /// DDPM: reverse variances "fixed_small" (β̃) or "fixed_large" (β).
    pub variance: String,
    /// DDPM: clip x̂_0 to [-1, 1] on discrete data.
    pub clip_x0: bool,
    /// Score SDE kind: "vp", "subvp" or "ve" (Song et al. 2021).
    pub sde: String,
    /// VP / sub-VP: β(t) = beta_min + t (beta_max - beta_min).
    pub beta_min: f64,
    /// VP / sub-VP: see `beta_min`.
    pub beta_max: f64,
    /// VE: σ(t) = sigma_min (sigma_max / sigma_min)^t.
    pub ve_sigma_min: f64,
    /// VE: see `ve_sigma_min`.
    pub ve_sigma_max: f64,
    /// Score SDE: smallest training / likelihood time.
    pub t_eps: f64,
    /// DDPM probability-flow likelihood: data end of the path in t = i/T (0: automatic, the
    /// time where σ/α equals the dequantization noise's std on discrete data, else 1/T).
    pub ode_t_min: f64,
    /// EDM: log σ ~ N(p_mean, p_std²) in training (Karras et al. 2022, Table 1).
    pub p_mean: f64,
    /// EDM: see `p_mean`.
    pub p_std: f64,
    /// EDM: σ_data of the preconditioning.
    pub sigma_data: f64,
    /// EDM: smallest σ of sampling and the likelihood.
    pub sigma_min: f64,
    /// EDM: largest σ.
    pub sigma_max: f64,
    /// EDM: ρ of the Karras σ grid.
    pub rho: f64,
}

impl Default for DiffusionConfig {
    fn default() -> Self {
        Self {
            timesteps: 1000,
            beta_schedule: "linear".into(),
            parameterization: "auto".into(),
            objective: "simple".into(),
            variance: "fixed_small".into(),
            clip_x0: true,
            sde: "vp".into(),
            beta_min: 0.1,
            beta_max: 20.0,
            ve_sigma_min: 0.01,
            ve_sigma_max: 50.0,
            t_eps: 1e-5,
            ode_t_min: 0.0,
            p_mean: -1.2,
            p_std: 1.2,
            sigma_data: 0.5,
            sigma_min: 0.002,
            sigma_max: 80.0,
            rho: 7.0,
        }
    }
}

/// Which data set, and its split options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSpec {
    /// A data set name ("8gaussians", "digits", ...) or a path to a `.npy` / `.csv` file.
    pub name: String,
    /// Held-out points of a 2-D toy set.
    pub test_size: usize,
    /// Held-out fraction of a user array (.npy / .csv) or of the end of a user text file.
    pub test_fraction: f64,
    /// Text data: tokens per example (the language model's sequence length).
    pub seq_len: usize,
    /// Text data: cap on the held-out windows (0: all).
    pub test_windows: usize,
}

impl Default for DataSpec {
    fn default() -> Self {
        let d = DataConfig::default();
        Self {
            name: "8gaussians".into(),
            test_size: d.test_size,
            test_fraction: d.test_fraction,
            seq_len: d.seq_len,
            test_windows: d.test_windows,
        }
    }
}

impl DataSpec {
    /// The options `data::open` takes. (Explicit fields rather than `#[serde(flatten)]`, which
    /// would switch off serde's unknown-key check for the whole `[data]` table.)
    pub fn options(&self) -> DataConfig {
        DataConfig {
            test_size: self.test_size,
            test_fraction: self.test_fraction,
            seq_len: self.seq_len,
            test_windows: self.test_windows,
            ..DataConfig::default()
        }
    }
}

/// Optimisation, logging, evaluation and checkpoint cadence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// Total optimisation steps.
    pub steps: usize,
    /// Examples per step.
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// Final learning rate as a fraction of `lr` (cosine decay).
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// Clip the global gradient norm to this (0 disables).
    pub grad_clip: f64,
    /// EMA decay of the weights (0 disables EMA).
    pub ema_decay: f64,
    /// Seed of the run's random generator.
    pub seed: u64,
    /// Write a `metrics.jsonl` line every this many steps.
    pub log_every: usize,
    /// Evaluate the held-out NLL every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Held-out examples used by periodic evaluation (the final `elbo eval` uses all).
    pub eval_examples: usize,
    /// Write a checkpoint every this many steps (and always at the end).
    pub checkpoint_every: usize,
    /// Stop after this many evaluations without improvement (0: never stop early).
    pub patience: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            steps: 5000,
            batch_size: 1024,
            lr: 2e-3,
            warmup_steps: 200,
            min_lr_ratio: 0.05,
            weight_decay: 0.0,
            beta1: 0.9,
            beta2: 0.999,
            grad_clip: 1.0,
            ema_decay: 0.999,
            seed: 0,
            log_every: 25,
            eval_every: 1000,
            eval_examples: 1000,
            checkpoint_every: 1000,
            patience: 0,
        }
    }
}

/// Options for drawing samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleOptions {
    /// ODE solver: "euler", "heun" or "dopri5".
    pub solver: String,
    /// Steps for fixed-step solvers.
    pub steps: usize,
    /// Relative tolerance for adaptive solvers.
    pub rtol: f64,
    /// Absolute tolerance for adaptive solvers.
    pub atol: f64,
    /// Diffusion sampler: "auto" (the family's own), "ddpm", "ddim", "euler", "heun", "edm",
    /// "dpm++2m", "euler-maruyama", "pc" or "ode" (the probability-flow ODE with `solver`).
    pub sampler: String,
    /// DDIM: η in [0, 1] (0 deterministic, 1 ancestral-like).
    pub eta: f64,
    /// EDM Heun: S_churn (0: deterministic).
    pub churn: f64,
    /// EDM Heun: S_noise.
    pub s_noise: f64,
    /// Predictor-corrector: signal-to-noise ratio of the Langevin corrector.
    pub snr: f64,
    // --- language models ---
    /// Softmax temperature (1: the model's distribution).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens with mass >= `top_p` (1: all).
    pub top_p: f64,
    /// MDLM sampler: "ancestral", "cached", "low-confidence" or "random" (LLaDA remasking).
    pub lm_sampler: String,
    /// MDLM semi-autoregressive block length (0: one block, the whole sequence).
    pub block_len: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            solver: "dopri5".into(),
            steps: 100,
            rtol: 1e-5,
            atol: 1e-5,
            sampler: "auto".into(),
            eta: 0.0,
            churn: 0.0,
            s_noise: 1.0,
            snr: 0.16,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            lm_sampler: "cached".into(),
            block_len: 0,
        }
    }
}

/// Options for likelihood evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalOptions {
    /// ODE solver for the probability-flow likelihood.
    pub solver: String,
    /// Steps for fixed-step solvers.
    pub steps: usize,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// "auto" (exact up to `exact_max_dim` dimensions, else Hutchinson), "exact" or "hutchinson".
    pub divergence: String,
    /// Hutchinson probes per example.
    pub probes: usize,
    /// Largest dimension for which "auto" uses the exact divergence.
    pub exact_max_dim: usize,
    /// Examples per likelihood batch.
    pub batch_size: usize,
    /// Which likelihood a model reports: "auto" (the family's default); diffusion: "vlb" (DDPM's
    /// bound) or "pf-ode" (probability-flow ODE, dequantized on discrete data); MDLM: "nelbo"
    /// (its continuous-time bound) or "llada" (LLaDA's Monte-Carlo estimator of the same bound,
    /// Nie et al. 2025 eq. 6, also conditional with `prompt_len`).
    pub likelihood: String,
    // --- language models ---
    /// Monte-Carlo samples per example of the any-order (orders) and MDLM (times) bounds.
    pub lm_samples: usize,
    /// Condition on the first `prompt_len` tokens of each held-out example and score only the
    /// rest: -log p(rest | prompt). Autoregressive models (exact) and MDLM with LLaDA's
    /// estimator (`likelihood = "llada"`); 0 scores the whole example.
    pub prompt_len: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            solver: "dopri5".into(),
            steps: 100,
            rtol: 1e-5,
            atol: 1e-5,
            divergence: "auto".into(),
            probes: 1,
            exact_max_dim: 16,
            batch_size: 2500,
            likelihood: "auto".into(),
            lm_samples: 4,
            prompt_len: 0,
        }
    }
}

impl Config {
    /// Parse a TOML config; errors name the file and the offending key.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Self> {
        let cfg: Config = toml::from_str(text)
            .map_err(|e| Error::Config(format!("{source}: {}", e.to_string().trim())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a TOML config file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Read the `config.json` saved in a run directory.
    pub fn from_run_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let cfg: Config = serde_json::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check ranges that serde cannot.
    pub fn validate(&self) -> Result<()> {
        let t = &self.train;
        let bad = |m: String| Err(Error::Config(m));
        if t.steps == 0 {
            return bad("train.steps must be at least 1".into());
        }
        if t.batch_size == 0 {
            return bad("train.batch_size must be at least 1".into());
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            return bad(format!("train.lr must be a positive number, got {}", t.lr));
        }
        if !(0.0..1.0).contains(&t.ema_decay) {
            return bad(format!(
                "train.ema_decay must be in [0, 1), got {}",
                t.ema_decay
            ));
        }
        if !(0.0..1.0).contains(&t.beta1) || !(0.0..1.0).contains(&t.beta2) {
            return bad("train.beta1 and train.beta2 must be in [0, 1)".into());
        }
        if t.grad_clip < 0.0 || !t.grad_clip.is_finite() {
            return bad("train.grad_clip must be >= 0 (0 disables clipping)".into());
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) {
            return bad("train.min_lr_ratio must be in [0, 1]".into());
        }
        if self.model.hidden == 0 || self.model.time_embed_dim < 2 {
            return bad("model.hidden must be >= 1 and model.time_embed_dim >= 2".into());
        }
        if self.eval.batch_size == 0 || self.eval.probes == 0 {
            return bad("eval.batch_size and eval.probes must be at least 1".into());
        }
        let m = &self.model;
        if m.d_model == 0 || m.n_heads == 0 || m.d_model % m.n_heads != 0 || m.n_layers == 0 {
            return bad(format!(
                "model.d_model ({}) must be a positive multiple of model.n_heads ({}) and model.n_layers >= 1",
                m.d_model, m.n_heads
            ));
        }
        let s = &self.sample;
        if !(s.temperature.is_finite() && s.temperature > 0.0) {
            return bad(format!(
                "sample.temperature must be > 0, got {}",
                s.temperature
            ));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return bad(format!("sample.top_p must be in (0, 1], got {}", s.top_p));
        }
        if self.data.seq_len == 0 || self.eval.lm_samples == 0 {
            return bad("data.seq_len and eval.lm_samples must be at least 1".into());
        }
        if t.log_every == 0 || t.checkpoint_every == 0 {
            return bad("train.log_every and train.checkpoint_every must be at least 1".into());
        }
        self.validate_diffusion()?;
        Ok(())
    }
}

impl Config {
    /// Ranges of the diffusion and sampler settings.
    fn validate_diffusion(&self) -> Result<()> {
        let d = &self.model.diffusion;
        let s = &self.sample;
        let bad = |m: String| Err(Error::Config(m));
        if d.timesteps == 0 {
            return bad("model.diffusion.timesteps must be at least 1".into());
        }
        if !(d.beta_min > 0.0 && d.beta_max > d.beta_min) {
            return bad("model.diffusion needs 0 < beta_min < beta_max".into());
        }
        if !(d.ve_sigma_min > 0.0 && d.ve_sigma_max > d.ve_sigma_min) {
            return bad("model.diffusion needs 0 < ve_sigma_min < ve_sigma_max".into());
        }
        if !(d.sigma_min > 0.0 && d.sigma_max > d.sigma_min && d.sigma_data > 0.0) {
            return bad(
                "model.diffusion needs 0 < sigma_min < sigma_max and sigma_data > 0".into(),
            );
        }
        if !(d.p_std > 0.0 && d.rho > 0.0) {
            return bad("model.diffusion.p_std and rho must be positive".into());
        }
        if !(d.t_eps > 0.0 && d.t_eps < 1.0 && (0.0..1.0).contains(&d.ode_t_min)) {
            return bad("model.diffusion.t_eps must be in (0, 1) and ode_t_min in [0, 1)".into());
        }
        if !(0.0..=1.0).contains(&s.eta) {
            return bad(format!("sample.eta must be in [0, 1], got {}", s.eta));
        }
        if !(s.churn >= 0.0 && s.s_noise >= 0.0 && s.snr > 0.0) {
            return bad("sample.churn and sample.s_noise must be >= 0 and sample.snr > 0".into());
        }
        if s.steps == 0 {
            return bad("sample.steps must be at least 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml_and_json() {
        let c = Config::default();
        let t = toml::to_string(&c).unwrap();
        assert_eq!(Config::from_toml_str(&t, "x").unwrap(), c);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Config>(&j).unwrap(), c);
    }

    #[test]
    fn typo_and_bad_values_are_named() {
        let e = Config::from_toml_str("[train]\nstepz = 3\n", "cfg.toml").unwrap_err();
        assert!(e.to_string().contains("stepz"), "{e}");
        let e = Config::from_toml_str("[train]\nlr = -1.0\n", "cfg.toml").unwrap_err();
        assert!(e.to_string().contains("train.lr"), "{e}");
        let e = Config::from_toml_str("[data]\ntest_sise = 3\n", "cfg.toml").unwrap_err();
        assert!(e.to_string().contains("test_sise"), "{e}");
        let e = Config::from_toml_str("[train\nlr = 1", "cfg.toml").unwrap_err();
        assert!(e.to_string().contains("cfg.toml"), "{e}");
    }
}
