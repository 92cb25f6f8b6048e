//! Run configuration: serde structs with defaults, read from TOML, overridden by CLI flags or
//! `--set key=value` ([`Config::set`]), and saved as `config.json` beside every checkpoint.
//! Unknown keys are rejected, so a typo in a config file is an error that names the key rather
//! than a silently ignored setting.
//!
//! `[model]` is one of the families of [`crate::models`], chosen by its `name` and typed per
//! family (`[model.net]`, `[model.transformer]`, `[model.sampling]` are the shared pieces some
//! families use). `[data]`, `[train]`, `[sample]` and `[eval]` hold only settings that mean the
//! same for every family. Run directories written before the typed layout still load
//! ([`legacy`]).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
pub use crate::models::ModelConfig;
use crate::{Error, Result};

pub mod choices;
pub mod legacy;
pub mod set;
mod validate;

pub use choices::{DivergenceChoice, SolverName};

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
    /// Text data: cap on the held-out windows (0: all; the validation windows too).
    pub test_windows: usize,
    /// Validation points of a 2-D toy set (drawn from their own fixed stream).
    pub val_size: usize,
    /// Fraction of the training rows (or text) of a finite data set held out for validation:
    /// periodic evaluation, the `best/` checkpoint and early stopping read it, never the test
    /// split.
    pub val_fraction: f64,
    /// CSV data: whether the first row is a header: "auto" (when none of its fields is a
    /// number), "yes" or "no". Absent from `config.json` of earlier runs, which read as "auto".
    pub csv_header: crate::data::csv::CsvHeader,
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
            val_size: d.val_size,
            val_fraction: d.val_fraction,
            csv_header: d.csv_header,
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
            val_size: self.val_size,
            val_fraction: self.val_fraction,
            csv_header: self.csv_header,
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
    /// What chooses the `best/` checkpoint and early stopping on the validation split: "nll"
    /// (the family's default likelihood) or a sample metric ("energy-distance", "mmd",
    /// "sliced-wasserstein"), the only choice for a family without a likelihood.
    pub select_by: String,
    /// Seconds a periodic held-out evaluation may take (checked between likelihood batches);
    /// one that runs over is reported and skipped, and training goes on (0: no limit).
    pub eval_budget_s: f64,
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
            select_by: "nll".into(),
            eval_budget_s: 3600.0,
        }
    }
}

/// Options for drawing samples that mean the same for every family (a family's own sampler
/// and its knobs live in its `[model.sampling]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleOptions {
    /// ODE solver of ODE-based sampling: "euler", "heun" or "dopri5".
    pub solver: SolverName,
    /// Steps of the sampler (network calls of fixed-step solvers, denoising steps of diffusion
    /// and masked-diffusion samplers).
    pub steps: usize,
    /// Relative tolerance for adaptive solvers.
    pub rtol: f64,
    /// Absolute tolerance for adaptive solvers.
    pub atol: f64,
    /// Samples drawn per call of the model by `elbo sample` and the sample metrics of `elbo
    /// eval`; more are drawn in further batches of this size (bounds the sampler's memory).
    pub batch_size: usize,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            solver: SolverName::Dopri5,
            steps: 100,
            rtol: 1e-5,
            atol: 1e-5,
            batch_size: 2000,
        }
    }
}

/// Options for likelihood evaluation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalOptions {
    /// ODE solver for the probability-flow likelihood: "euler", "heun" or "dopri5".
    pub solver: SolverName,
    /// Steps for fixed-step solvers.
    pub steps: usize,
    /// Relative tolerance.
    pub rtol: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// "auto" (exact up to `exact_max_dim` dimensions, else Hutchinson), "exact" or "hutchinson".
    pub divergence: DivergenceChoice,
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
    // --- latent-variable models ---
    /// Importance samples per example of the VAE's IWAE bound (`likelihood = "iwae"`; Burda
    /// et al. 2016 report k = 5000).
    pub importance_samples: usize,
    /// Annealed importance sampling (`likelihood = "ais"`: VAE, EBM): independent chains per
    /// example (per log-normaliser for an energy).
    pub ais_chains: usize,
    /// AIS: intermediate distributions between the start and the target.
    pub ais_steps: usize,
    /// AIS: leapfrog steps of each HMC transition.
    pub ais_leapfrog: usize,
    /// Sample metrics `elbo eval` reports beside the likelihood (energy-distance, mmd,
    /// sliced-wasserstein), each comparing `metric_samples` samples with the held-out examples.
    pub metrics: Vec<String>,
    /// Samples drawn for the sample metrics (at most the number of held-out examples).
    pub metric_samples: usize,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            solver: SolverName::Dopri5,
            steps: 100,
            rtol: 1e-5,
            atol: 1e-5,
            divergence: DivergenceChoice::Auto,
            probes: 1,
            exact_max_dim: 16,
            batch_size: 2500,
            likelihood: "auto".into(),
            lm_samples: 4,
            prompt_len: 0,
            importance_samples: 64,
            ais_chains: 16,
            ais_steps: 500,
            ais_leapfrog: 10,
            metrics: Vec::new(),
            metric_samples: 2000,
        }
    }
}

impl Config {
    /// Parse a TOML config; errors name the file and the offending key.
    pub fn from_toml_str(text: &str, source: &str) -> Result<Self> {
        let cfg: Config = match toml::from_str(text) {
            Ok(c) => c,
            Err(e) => {
                let hint = if legacy::parse_toml(text).is_ok() {
                    " (this is the flat [model] layout of earlier elbo releases: see docs/architecture.md, \
                     \"Configs\", for the per-family layout)"
                } else {
                    ""
                };
                return Err(Error::Config(format!(
                    "{source}: {}{hint}",
                    e.to_string().trim()
                )));
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a TOML config file.
    pub fn from_toml_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Read the `config.json` saved in a run directory (also one written by an elbo release
    /// before the typed per-family layout, converted by [`legacy`]).
    pub fn from_run_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Parse a saved `config.json` (current or legacy layout).
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let cfg: Config = match serde_json::from_str(text) {
            Ok(c) => c,
            Err(e) => match legacy::parse_json(text) {
                Ok(old) => old.into_config()?,
                Err(_) => return Err(Error::Config(format!("{source}: {e}"))),
            },
        };
        cfg.validate()?;
        Ok(cfg)
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
