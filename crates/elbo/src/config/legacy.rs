//! Run directories written before the typed per-family layout: their `config.json` holds one
//! flat `[model]` table for every family (and sampler knobs in `[sample]`). [`parse_json`] reads
//! that layout exactly as the old release wrote it and [`LegacyConfig::into_config`] maps it
//! onto today's typed [`Config`], so old runs still sample, evaluate and resume.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{Config, DataSpec, EvalOptions, SampleOptions, TrainConfig};
use crate::nn::Activation;
use crate::{Error, Result};

/// The whole config of the flat layout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct LegacyConfig {
    /// The flat model table.
    pub model: LegacyModel,
    /// Unchanged.
    pub data: DataSpec,
    /// Unchanged.
    pub train: TrainConfig,
    /// Solver settings plus the sampler knobs that now live in `[model.sampling]`.
    pub sample: LegacySample,
    /// Unchanged.
    pub eval: EvalOptions,
}

/// A `config.json` of the flat layout.
pub fn parse_json(text: &str) -> Result<LegacyConfig> {
    serde_json::from_str(text).map_err(|e| Error::Config(format!("legacy config: {e}")))
}

/// A TOML config of the flat layout (to name it in an error message).
pub fn parse_toml(text: &str) -> Result<LegacyConfig> {
    toml::from_str(text).map_err(|e| Error::Config(format!("legacy config: {e}")))
}

/// The model family and its network.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LegacyModel {
    /// Family name, e.g. "flow".
    pub name: String,
    /// Width of each hidden layer.
    pub hidden: usize,
    /// Number of hidden layers.
    pub layers: usize,
    /// Size of the sinusoidal time embedding.
    pub time_embed_dim: usize,
    /// Times are multiplied by this before the sinusoidal embedding.
    pub time_scale: f64,
    /// Hidden activation.
    pub activation: Activation,
    /// Network family for diffusion models: "auto" (U-Net for image data when available,
    /// else MLP), "mlp" or "unet".
    pub backbone: String,
    /// Gaussian-diffusion settings (families ddpm / ddim / sde / edm).
    pub diffusion: LegacyDiffusion,
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

impl Default for LegacyModel {
    fn default() -> Self {
        Self {
            name: "flow".into(),
            hidden: 256,
            layers: 4,
            time_embed_dim: 32,
            time_scale: 1.0,
            activation: Activation::Silu,
            backbone: "auto".into(),
            diffusion: LegacyDiffusion::default(),
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
pub struct LegacyDiffusion {
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

impl Default for LegacyDiffusion {
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

/// Options for drawing samples.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LegacySample {
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

impl Default for LegacySample {
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

impl LegacyConfig {
    /// The same run in today's layout. Values are carried over unchanged; names the old
    /// release normalised (case, `-` vs `_`) are normalised the same way.
    pub fn into_config(self) -> Result<Config> {
        let m = &self.model;
        let d = &m.diffusion;
        let s = &self.sample;
        let norm = |v: &str| v.trim().to_ascii_lowercase();
        let net = json!({
            "backbone": norm(&m.backbone),
            "hidden": m.hidden,
            "layers": m.layers,
            "time_embed_dim": m.time_embed_dim,
            "time_scale": m.time_scale,
            "activation": m.activation,
        });
        let family = norm(&m.name);
        let sampler = match (family.as_str(), norm(&s.sampler).as_str()) {
            ("ddim", "auto") => "ddim".to_string(),
            (_, other) => other.to_string(),
        };
        let diffusion_sampling = json!({
            "sampler": sampler,
            "eta": s.eta,
            "churn": s.churn,
            "s_noise": s.s_noise,
            "snr": s.snr,
        });
        let transformer = json!({
            "d_model": m.d_model,
            "n_heads": m.n_heads,
            "n_layers": m.n_layers,
            "positions": norm(&m.positions),
        });
        let tokens = json!({"temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p});
        let model: Value = match family.as_str() {
            "flow" | "flow-matching" | "flow_matching" | "rectified-flow" | "fm" => {
                // flow matching ran only on the MLP then, whatever the backbone said
                let mut net = net.clone();
                net["backbone"] = json!("mlp");
                // and put levels in the tiled bins 2(k + u)/L - 1
                json!({"name": "flow-matching", "net": net, "sampling": diffusion_sampling,
                       "bins": "tiled"})
            }
            "ddpm" | "ddim" => json!({
                "name": "ddpm",
                "net": net,
                "timesteps": d.timesteps,
                "beta_schedule": norm(&d.beta_schedule),
                "parameterization": norm(&d.parameterization),
                "objective": norm(&d.objective),
                "variance": norm(&d.variance).replace('-', "_"),
                "clip_x0": d.clip_x0,
                "ode_t_min": d.ode_t_min,
                "sampling": diffusion_sampling,
            }),
            "sde" | "score-sde" | "score_sde" => json!({
                "name": "sde",
                "net": net,
                "sde": norm(&d.sde).replace(['-', '_'], ""),
                "beta_min": d.beta_min,
                "beta_max": d.beta_max,
                "ve_sigma_min": d.ve_sigma_min,
                "ve_sigma_max": d.ve_sigma_max,
                "t_eps": d.t_eps,
                "sampling": diffusion_sampling,
            }),
            "edm" => json!({
                "name": "edm",
                "net": net,
                "p_mean": d.p_mean,
                "p_std": d.p_std,
                "sigma_data": d.sigma_data,
                "sigma_min": d.sigma_min,
                "sigma_max": d.sigma_max,
                "rho": d.rho,
                "sampling": diffusion_sampling,
            }),
            "ar" | "autoregressive" => json!({
                "name": "ar", "transformer": transformer, "sampling": tokens,
            }),
            "ao-ar" | "any-order" | "aoar" => json!({
                "name": "ao-ar", "transformer": transformer, "sampling": tokens,
            }),
            "mdlm" | "masked-diffusion" => json!({
                "name": "mdlm",
                "transformer": transformer,
                "diffusion_steps": m.diffusion_steps,
                "antithetic": m.antithetic,
                "sampling": {
                    "sampler": norm(&s.lm_sampler),
                    "block_len": s.block_len,
                    "temperature": s.temperature,
                    "top_k": s.top_k,
                    "top_p": s.top_p,
                },
            }),
            other => {
                return Err(Error::Config(format!(
                    "legacy config names an unknown family '{other}'"
                )))
            }
        };
        let model = serde_json::from_value(model)
            .map_err(|e| Error::Config(format!("legacy config: [model]: {e}")))?;
        Ok(Config {
            model,
            data: self.data,
            train: self.train,
            sample: SampleOptions {
                solver: s.solver.parse()?,
                steps: s.steps,
                rtol: s.rtol,
                atol: s.atol,
                ..SampleOptions::default()
            },
            eval: self.eval,
        })
    }
}
