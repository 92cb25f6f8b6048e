//! Loading a finished (or running) run directory for sampling and evaluation.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::Device;

use super::checkpoint;
use super::run_dir::{DataFingerprint, RunLock};
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
    /// Set when the run's data file changed since training started: what changed. Evaluation
    /// refuses such a run; sampling warns.
    pub data_changed: Option<String>,
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
        let data_changed = DataFingerprint::changed(dir, &config.data.name)?;
        // a data file that changed shape fails to build or load: say that it changed
        Self::restore(dir, which, use_ema, device, config)
            .map(|mut run| {
                run.data_changed = data_changed.clone();
                run
            })
            .map_err(|e| match &data_changed {
                Some(why) => Error::RunDir(format!("{why} ({e})")),
                None => e,
            })
    }

    fn restore(
        dir: &Path,
        which: CheckpointChoice,
        use_ema: bool,
        device: &Device,
        config: Config,
    ) -> Result<Self> {
        let (data, mut model, params) = open_parts(&config, device)?;
        let ck = dir.join(which.dir_name());
        let loaded = load_consistent(dir, &ck, device)?;
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
        let mut label = format!("{name} weights, {} checkpoint, step {step}", which.label());
        let mut data = data;
        // a prior over a VQ-VAE's codes loads as the two-stage model of its images
        if let Some(vq_dir) = crate::data::codes::run_dir(&config.data.name) {
            let vq = crate::data::codes::open_autoencoder(&vq_dir, device)?;
            model = Box::new(crate::latent::two_stage::TwoStage::new(vq.model, model)?);
            data = vq.data;
            label = format!(
                "{label}; two-stage with the VQ-VAE of {} ({})",
                vq_dir.display(),
                vq.label
            );
        }
        Ok(Self {
            config,
            model,
            data,
            step,
            label,
            data_changed: None,
        })
    }
}

/// Read the checkpoint `ck` of the run in `dir`. While a training process holds the run's
/// lock, a save may replace the checkpoint in the middle of the read; the manifest check then
/// fails, and the read is retried (for up to 10 s) until it sees one complete checkpoint. A
/// checkpoint that fails without a trainer at work is reported at once.
fn load_consistent(dir: &Path, ck: &Path, device: &Device) -> Result<checkpoint::Loaded> {
    let patience = Instant::now() + Duration::from_secs(10);
    loop {
        match checkpoint::load(ck, device) {
            Ok(l) => return Ok(l),
            Err(_) if RunLock::holder(dir).is_some() && Instant::now() < patience => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(e),
        }
    }
}
