//! Resource bounds checked before any work starts: a memory estimate made from the config and
//! the data's shape alone, before the model is built, compared with the memory the system says
//! is available (`MemAvailable` of `/proc/meminfo`, see proc(5); elsewhere the check is skipped).
//! A configuration that cannot fit is refused with the estimate, the available memory and the
//! settings to lower, rather than aborting mid-run on a failed allocation.
//!
//! The estimate (see [`estimate`]) counts the parameters four times over in training (weights,
//! gradients, AdamW's two moments, Kingma & Ba 2015) plus the EMA copy, 4 bytes each; the
//! activations of the largest of one training batch, one held-out likelihood batch
//! (`eval.batch_size`, with its probes or tangents) and, when `train.select_by` is a sample
//! metric, the periodic sampling of `train.eval_examples`; and what depends on neither (noise
//! schedules, time grids of `sample.steps` and `eval.steps`). Drawing samples is checked when
//! their number is known ([`check_sampling`]): the output, and one batch of
//! `sample.batch_size` without a graph.

use crate::config::Config;
use crate::model::DataInfo;
use crate::{Error, Result};

pub mod estimate;

use estimate::{prod, sum, F32};

/// Copies of every parameter held while training: weights, gradients, the two AdamW moments
/// and the EMA.
pub const PARAM_COPIES: u64 = 5;

/// Fraction of the available memory a run may plan to use (the rest is left to the allocator's
/// slack, the data set and the rest of the system).
const USABLE: f64 = 0.9;

/// What a family's configuration needs in memory for data of a given shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// Trainable parameters (a count, not bytes).
    pub params: u64,
    /// Bytes of activations (forward values and their gradients) of one batch.
    pub activations: u64,
    /// Bytes that depend on neither the parameters nor the batch (schedules, statistics).
    pub fixed: u64,
}

impl MemoryEstimate {
    /// Bytes of the parameters in training: [`PARAM_COPIES`] copies of 4 bytes each.
    pub fn param_bytes(&self) -> u64 {
        self.params.saturating_mul(PARAM_COPIES * F32)
    }
}

/// The whole estimate of a run, as [`check_resources`] compares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunEstimate {
    /// The family's estimate for one training batch.
    pub train: MemoryEstimate,
    /// Bytes of one held-out likelihood batch.
    pub eval: u64,
    /// Bytes of the periodic sampling of `train.eval_examples` when `train.select_by` is a
    /// sample metric (0 otherwise).
    pub sample: u64,
    /// Bytes of the time grids of the sampler and the ODE solver.
    pub grids: u64,
}

impl RunEstimate {
    /// The estimate of `cfg` on data shaped like `data`.
    pub fn of(cfg: &Config, data: &DataInfo) -> Self {
        let train = cfg.model.memory_estimate(data, cfg.train.batch_size);
        let eval = cfg.model.eval_memory(data, &cfg.eval);
        // periodic selection by a sample metric draws `eval_examples` samples in one call
        let sample = if cfg.train.select_by == "nll" {
            0
        } else {
            sampling_bytes(cfg, data, cfg.train.eval_examples)
        };
        let grids = prod(&[cfg.sample.steps.saturating_add(cfg.eval.steps), 4, 8]);
        Self {
            train,
            eval,
            sample,
            grids,
        }
    }

    /// Bytes of the largest batch of the three.
    pub fn peak_activations(&self) -> u64 {
        self.train.activations.max(self.eval).max(self.sample)
    }

    /// Everything: parameters, fixed buffers and grids, and the largest batch.
    pub fn total(&self) -> u64 {
        sum(&[
            self.train.param_bytes(),
            self.train.fixed,
            self.grids,
            self.peak_activations(),
        ])
    }
}

/// Refuse `cfg` on data shaped like `data` when its memory estimate exceeds the memory the
/// system has available (no check where `/proc/meminfo` cannot be read).
pub fn check_resources(cfg: &Config, data: &DataInfo) -> Result<()> {
    check_resources_with(cfg, data, available_memory())
}

/// [`check_resources`] against `available` bytes (`None`: unknown, no check).
pub fn check_resources_with(cfg: &Config, data: &DataInfo, available: Option<u64>) -> Result<()> {
    let Some(avail) = available else {
        return Ok(());
    };
    let est = RunEstimate::of(cfg, data);
    let total = est.total();
    if (total as f64) <= avail as f64 * USABLE {
        return Ok(());
    }
    let size = "the model's size (model.net.hidden / layers, model.transformer.d_model / \
                n_layers, data.seq_len)";
    let peak = est.peak_activations();
    let fixed = est.train.fixed.saturating_add(est.grids);
    let which = if fixed >= peak.max(est.train.param_bytes()) {
        "model.timesteps (the noise schedule), sample.steps or eval.steps".to_string()
    } else if est.train.param_bytes() >= peak {
        size.to_string()
    } else if est.train.activations == peak {
        format!("train.batch_size or {size}")
    } else if est.eval == peak {
        format!(
            "eval.batch_size, eval.probes or eval.lm_samples (or the exact divergence's \
             tangents, one per dimension, with eval.divergence = \"hutchinson\") or {size}"
        )
    } else {
        format!(
            "train.eval_examples (sampled at once when train.select_by is a sample metric) \
             or {size}"
        )
    };
    Err(Error::Config(format!(
        "the {} model needs an estimated {} of memory but {} is available: parameters {} \
         ({} values x {PARAM_COPIES} copies for weights, gradients, AdamW moments and EMA), \
         activations {} per training batch of {}, {} per evaluation batch of {}, {} for \
         sampling by train.select_by, {} for schedules and time grids; lower {which}",
        cfg.model.name(),
        bytes(total),
        bytes(avail),
        bytes(est.train.param_bytes()),
        est.train.params,
        bytes(est.train.activations),
        cfg.train.batch_size,
        bytes(est.eval),
        cfg.eval.batch_size,
        bytes(est.sample),
        bytes(fixed),
    )))
}

/// Bytes of sampling `rows` examples at once: the family's forward pass without a graph
/// (about half of a training batch's activations).
fn sampling_bytes(cfg: &Config, data: &DataInfo, rows: usize) -> u64 {
    cfg.model.memory_estimate(data, rows).activations / 2
}

/// Refuse drawing `n` samples of a run of `cfg` on data shaped like `data` when they cannot fit
/// in memory: the output is held about three times (the tensor, its values on the host, the
/// file's buffer), beside the weights and one sampling batch of at most `sample.batch_size`.
pub fn check_sampling(cfg: &Config, data: &DataInfo, n: usize) -> Result<()> {
    check_sampling_with(cfg, data, n, available_memory())
}

/// [`check_sampling`] against `available` bytes (`None`: unknown, no check).
pub fn check_sampling_with(
    cfg: &Config,
    data: &DataInfo,
    n: usize,
    available: Option<u64>,
) -> Result<()> {
    let Some(avail) = available else {
        return Ok(());
    };
    let rows = n.min(cfg.sample.batch_size);
    let output = prod(&[n, data.dim, 3]).saturating_mul(F32);
    let batch = sampling_bytes(cfg, data, rows);
    let weights = cfg
        .model
        .memory_estimate(data, 1)
        .params
        .saturating_mul(F32);
    let need = sum(&[output, batch, weights]);
    if (need as f64) <= avail as f64 * USABLE {
        return Ok(());
    }
    let fix = if output >= batch {
        let most = (avail as f64 * USABLE / (3 * F32) as f64 / data.dim.max(1) as f64) as u64;
        format!("draw at most about {most} samples at a time (-n) and concatenate the files")
    } else {
        "lower sample.batch_size (--set sample.batch_size=N)".to_string()
    };
    Err(Error::Config(format!(
        "{n} samples of {} values need an estimated {} of memory but {} is available: the \
         output {}, one sampling batch of {rows} {}, the weights {}; {fix}",
        data.dim,
        bytes(need),
        bytes(avail),
        bytes(output),
        bytes(batch),
        bytes(weights),
    )))
}

/// The memory the system has available for a new process, in bytes: `MemAvailable` of
/// `/proc/meminfo` (Linux 3.14 and later); `None` elsewhere.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

/// `MemAvailable` of a `/proc/meminfo` text, in bytes.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let mut parts = line.split_whitespace().skip(1);
    let value: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next() {
        Some("kB") | Some("KB") => 1024,
        None => 1,
        Some(_) => return None,
    };
    Some(value.saturating_mul(unit))
}

/// `1.5 GiB`, `320.0 MiB`, `12 B`.
pub fn bytes(b: u64) -> String {
    if b == u64::MAX {
        return "more than 16 EiB".into();
    }
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}
