//! Loading a finished (or running) run directory for sampling and evaluation.

use std::path::Path;

use candle_core::Device;

use super::checkpoint;
use super::trainer::open_parts;
use crate::config::Config;
use crate::data::DataSource;
use crate::model::GenerativeModel;
use crate::{Error, Result};

/// Which checkpoint of a run to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointChoice {
    /// The latest checkpoint (`checkpoint/`).
    Latest,
    /// The checkpoint with the best held-out NLL seen during training (`best/`).
    Best,
}

impl CheckpointChoice {
    /// Parse "latest" or "best".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "latest" => Ok(Self::Latest),
            "best" => Ok(Self::Best),
            _ => Err(Error::Config(format!(
                "unknown checkpoint '{s}'; use latest or best"
            ))),
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Latest => "latest",
            Self::Best => "best",
        }
    }

    fn dir_name(&self) -> &'static str {
        match self {
            Self::Latest => "checkpoint",
            Self::Best => "best",
        }
    }
}

/// A model restored from a run directory, with its data and configuration.
pub struct LoadedRun {
    /// The run's saved configuration.
    pub config: Config,
    /// The model, with EMA weights if requested and available.
    pub model: Box<dyn GenerativeModel>,
    /// The run's data set (for held-out evaluation and plots).
    pub data: Box<dyn DataSource>,
    /// Training step of the loaded checkpoint.
    pub step: usize,
    /// A label such as "ema, latest, step 3000".
    pub label: String,
}

impl LoadedRun {
    /// Load `dir`'s chosen checkpoint; `use_ema` picks the EMA weights when the run kept them.
    pub fn open(
        dir: &Path,
        which: CheckpointChoice,
        use_ema: bool,
        device: &Device,
    ) -> Result<Self> {
        Self::open_with(dir, which, use_ema, device, &[] as &[&str])
    }

    /// [`LoadedRun::open`] with `--set key=value` overrides applied to the saved config before
    /// the model is built (sampling and evaluation settings; a change to the network's shape
    /// makes the checkpoint fail to load, naming the parameter).
    pub fn open_with<S: AsRef<str>>(
        dir: &Path,
        which: CheckpointChoice,
        use_ema: bool,
        device: &Device,
        overrides: &[S],
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "run directory {} does not exist",
                dir.display()
            )));
        }
        let mut config = Config::from_run_dir(dir)?;
        config.set_all(overrides)?;
        let (data, mut model, params) = open_parts(&config, device)?;
        let ck = dir.join(which.dir_name());
        let loaded = checkpoint::load(&ck, device)?;
        let (name, weights) = match (use_ema, loaded.files.get("ema")) {
            (true, Some(w)) => ("ema", w),
            _ => (
                "live",
                loaded
                    .files
                    .get("model")
                    .ok_or_else(|| Error::checkpoint(&ck, "model.safetensors missing"))?,
            ),
        };
        if name == "ema" {
            // groups without an EMA keep their live weights
            let mut merged = loaded.files.get("model").cloned().unwrap_or_default();
            merged.extend(weights.iter().map(|(k, v)| (k.clone(), v.clone())));
            checkpoint::load_into_vars(&merged, &params, name)?;
        } else {
            checkpoint::load_into_vars(weights, &params, name)?;
        }
        model.load_state_tensors(&loaded.files.get("model_state").cloned().unwrap_or_default())?;
        let step = loaded.state["step"]
            .as_u64()
            .ok_or_else(|| Error::checkpoint(&ck, "state.json has no integer 'step'"))?
            as usize;
        let label = format!("{name} weights, {} checkpoint, step {step}", which.label());
        Ok(Self {
            config,
            model,
            data,
            step,
            label,
        })
    }
}
