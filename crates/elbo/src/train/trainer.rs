//! One short, explicit training loop: a family's training step (by default: draw a batch, loss,
//! backward, clip, AdamW step, EMA), log, evaluate, checkpoint. Every family goes through it
//! via [`GenerativeModel`]; a family with several parameter groups gets one optimiser each.
//!
//! Determinism: the model's initial weights come from `Rng::new(seed).fork(INIT)` and every
//! batch and noise draw from one training generator whose state is saved in each checkpoint, so
//! a run interrupted and resumed with `--resume` produces the same losses as an uninterrupted
//! run. Periodic evaluation uses its own generator (forked by step) and never perturbs it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::checkpoint;
use super::optim::named_vars;
use super::run_dir::{self, DataFingerprint, RunLock};
use super::step::{build_groups, subset, GroupState, StepContext, StepOutput};
use crate::atomic_file;
use crate::config::Config;
use crate::data::{self, DataSource};
use crate::model::{dataset_nll_within, DataInfo, GenerativeModel};
use crate::rng::RngState;
use crate::{Error, Result, Rng};

mod open;
mod selection;

/// The training log of a run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// Fork tags of the run seed.
pub(crate) const INIT_STREAM: u64 = 1;
pub(crate) const TRAIN_STREAM: u64 = 2;
pub(crate) const EVAL_STREAM: u64 = 3;
pub(crate) const DATA_INIT_STREAM: u64 = 4;

/// The `state.json` of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: u64,
    rng: RngState,
    /// Optimiser steps of the default group (kept for checkpoints from before groups).
    #[serde(default)]
    optim_steps: u64,
    /// EMA updates of the default group.
    #[serde(default)]
    ema_updates: u64,
    best_eval: Option<f64>,
    #[serde(default)]
    evals_since_best: u64,
    #[serde(default)]
    family: String,
    /// Per-group counters.
    #[serde(default)]
    groups: BTreeMap<String, GroupCounters>,
    /// The checkpoint was written before this step's held-out evaluation, which a resumed run
    /// therefore runs first.
    #[serde(default)]
    eval_pending: bool,
    /// The training loss of the step the checkpoint was written after.
    #[serde(default)]
    last_loss: Option<f64>,
    /// Early stopping ended the run: resuming it trains no further.
    #[serde(default)]
    stopped_early: bool,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
struct GroupCounters {
    optim_steps: u64,
    ema_updates: u64,
}

/// What a finished (or stopped) training run reports.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// Steps completed.
    pub steps: usize,
    /// Loss of every step run in this call, `(step, loss)`.
    pub losses: Vec<(usize, f64)>,
    /// Held-out NLL (nats/example) of every evaluation in this call, `(step, nll)`.
    pub evals: Vec<(usize, f64)>,
    /// Best validation score seen in the whole run (the NLL in nats, or the metric named by
    /// `selected_by`, negated when higher is better, such as `modes`).
    pub best_eval: Option<f64>,
    /// What chose the best checkpoint (`train.select_by`).
    pub selected_by: String,
    /// True if early stopping ended the run.
    pub stopped_early: bool,
    /// Wall-clock seconds spent in this call.
    pub seconds: f64,
}

/// A training run bound to its directory.
pub struct Trainer {
    cfg: Config,
    dir: PathBuf,
    model: Box<dyn GenerativeModel>,
    data: Box<dyn DataSource>,
    groups: Vec<GroupState>,
    rng: Rng,
    step: usize,
    best: Option<f64>,
    evals_since_best: usize,
    /// This step's held-out evaluation has not run yet (its checkpoint was written first).
    eval_pending: bool,
    last_loss: Option<f64>,
    stopped_early: bool,
    /// Leave each step's loss on the device until the next log step ([`Trainer::set_deferred_reads`]).
    defer_reads: bool,
    /// What opening the run directory did (stale lock taken over, temporaries removed, ...).
    notes: Vec<String>,
    /// Held for the trainer's lifetime: no other process trains into the directory meanwhile.
    _lock: RunLock,
}

impl Trainer {
    /// What opening the run directory did that a user should know (a stale lock taken over,
    /// temporaries of an interrupted write removed, a restart from step 0), one line each.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Steps completed so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The run's configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The model being trained (live weights).
    pub fn model(&self) -> &dyn GenerativeModel {
        self.model.as_ref()
    }

    /// The data source.
    pub fn data(&self) -> &dyn DataSource {
        self.data.as_ref()
    }

    /// Train to the configured number of steps.
    pub fn run(&mut self, progress: bool) -> Result<TrainOutcome> {
        self.run_until(self.cfg.train.steps, progress)
    }

    /// Train until `stop_at` steps are done (at most the configured total), checkpointing on
    /// the way and at the end. Stopping early and resuming gives the same losses as one call.
    ///
    /// A step due for held-out evaluation is checkpointed first, so an evaluation that fails,
    /// runs over `train.eval_budget_s` or is interrupted never costs the training before it: a
    /// failure is reported (terminal and `metrics.jsonl`) and training goes on, and a resumed
    /// run re-runs an evaluation its checkpoint was written before.
    pub fn run_until(&mut self, stop_at: usize, progress: bool) -> Result<TrainOutcome> {
        let tc = self.cfg.train.clone();
        let stop_at = stop_at.min(tc.steps);
        let bar = progress_bar(progress, tc.steps as u64, self.step as u64);
        let metrics_path = self.dir.join(METRICS_FILE);
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;
        let start = Instant::now();
        let mut out = TrainOutcome {
            steps: self.step,
            losses: Vec::new(),
            evals: Vec::new(),
            best_eval: self.best,
            selected_by: tc.select_by.clone(),
            stopped_early: false,
            seconds: 0.0,
        };
        let mut smooth = self.last_loss.unwrap_or(f64::NAN);
        if self.stopped_early {
            out.stopped_early = true;
            return Ok(self.finish(out, start));
        }
        if self.eval_pending {
            // the checkpoint this run resumed from was written before its evaluation
            if self.evaluate_and_select(&mut metrics, &bar, smooth, &mut out)? {
                bar.finish_and_clear();
                return Ok(self.finish(out, start));
            }
        }
        // Steps whose loss is still on the device (deferred reads): read together at the next
        // log, checkpoint or evaluation step, before anything is written.
        let mut pending: Vec<(usize, StepOutput)> = Vec::new();
        while self.step < stop_at {
            let s = match self.train_step() {
                Ok(s) => s,
                Err(e) => {
                    bar.abandon();
                    return Err(self.explain_failure(e));
                }
            };
            self.step += 1;
            let log_due = self.step.is_multiple_of(tc.log_every) || self.step == stop_at;
            let eval_due = (tc.eval_every > 0 && self.step.is_multiple_of(tc.eval_every))
                || self.step == tc.steps;
            let save_due = eval_due || self.step.is_multiple_of(tc.checkpoint_every);
            let on_host = s.on_device.is_none();
            pending.push((self.step, s));
            if !(on_host || log_due || save_due) {
                continue;
            }
            let read = match read_pending(&mut pending) {
                Ok(r) => r,
                Err(e) => {
                    bar.abandon();
                    return Err(self.explain_failure(e));
                }
            };
            let Some((_, s)) = read.last().cloned() else {
                continue;
            };
            for (step, r) in read {
                self.last_loss = Some(r.loss);
                out.losses.push((step, r.loss));
                smooth = if smooth.is_nan() {
                    r.loss
                } else {
                    0.98 * smooth + 0.02 * r.loss
                };
            }
            bar.set_position(self.step as u64);
            bar.set_message(format!("loss {smooth:.4}"));
            if log_due {
                let mut line = json!({"step": self.step, "loss": s.loss, "lr": s.lr,
                    "grad_norm": s.grad_norm, "elapsed_s": start.elapsed().as_secs_f64()});
                for (k, v) in &s.extra {
                    line[k] = json!(v);
                }
                writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            }
            if eval_due {
                self.eval_pending = true;
                self.save_latest(&bar)?;
                if self.evaluate_and_select(&mut metrics, &bar, smooth, &mut out)? {
                    break;
                }
            } else if self.step.is_multiple_of(tc.checkpoint_every) || self.step == stop_at {
                self.save_latest(&bar)?;
            }
        }
        bar.finish_and_clear();
        Ok(self.finish(out, start))
    }

    fn finish(&self, mut out: TrainOutcome, start: Instant) -> TrainOutcome {
        out.steps = self.step;
        out.best_eval = self.best;
        out.seconds = start.elapsed().as_secs_f64();
        out
    }

    /// Whether training steps leave their loss and gradient norm on the device, to be read in
    /// one transfer at the next log, checkpoint or evaluation step, instead of synchronising
    /// with the device at every step. On by default off the CPU (CUDA), where each read waits
    /// for the step's queued kernels; off on the CPU, where a read costs nothing. The losses,
    /// metrics and checkpoints are the same either way; what differs is when a NaN or infinite
    /// loss is noticed: at once (and the step changes nothing), or at the next read, after the
    /// parameters were updated with it (the error names the step the loss went bad at, and the
    /// last checkpoint, written from finite weights, is kept). See
    /// [`StepContext::minimize`](crate::train::step::StepContext::minimize).
    pub fn set_deferred_reads(&mut self, on: bool) {
        self.defer_reads = on;
    }

    /// The family's training step in a context over this run's data, generator and groups.
    fn train_step(&mut self) -> Result<StepOutput> {
        let device = self.model.device().clone();
        let mut ctx = StepContext {
            data: self.data.as_mut(),
            batch_size: self.cfg.train.batch_size,
            rng: &mut self.rng,
            device,
            groups: &mut self.groups,
            step: self.step,
            defer_reads: self.defer_reads,
        };
        self.model.train_step(&mut ctx)
    }

    /// What is on disk after a failed step: the last checkpoint, which [`Trainer::save_latest`]
    /// only ever writes with finite weights after a finite loss.
    fn kept_checkpoint(&self) -> String {
        let ck = self.dir.join("checkpoint");
        match checkpoint::load(&ck, self.model.device()) {
            Ok(l) => {
                let loss = l.state["last_loss"]
                    .as_f64()
                    .map_or(String::new(), |v| format!(", loss {v:.4}"));
                format!(
                    "the last checkpoint with finite weights (step {}{loss}) is kept in {}",
                    l.state["step"],
                    ck.display()
                )
            }
            Err(_) => "no checkpoint had been written yet".to_string(),
        }
    }

    /// A non-finite loss names what is on disk.
    fn explain_failure(&self, e: Error) -> Error {
        match e {
            Error::NonFiniteLoss { step, loss, .. } => Error::NonFiniteLoss {
                step,
                loss,
                kept: self.kept_checkpoint(),
            },
            other => other,
        }
    }

    /// Write `checkpoint/`, unless the weights (or the last loss) are no longer finite: then
    /// the previous checkpoint stays and training stops with [`Error::Diverged`].
    fn save_latest(&self, bar: &ProgressBar) -> Result<()> {
        let bad_loss = self.last_loss.filter(|l| !l.is_finite());
        let bad_param = self.first_non_finite_param()?;
        if bad_loss.is_some() || bad_param.is_some() {
            bar.abandon();
            let what = match (bad_param, bad_loss) {
                (Some(p), _) => format!("parameter '{p}' holds NaN or infinite values"),
                (None, Some(l)) => format!("the loss is {l}"),
                (None, None) => unreachable!("checked above"),
            };
            return Err(Error::Diverged {
                step: self.step,
                what,
                kept: self.kept_checkpoint(),
            });
        }
        self.save_checkpoint(&self.dir.join("checkpoint"))
    }

    /// The first parameter (by name) with a NaN or infinite entry.
    fn first_non_finite_param(&self) -> Result<Option<String>> {
        for g in &self.groups {
            for (name, var) in &g.params {
                let v: Vec<f32> = var
                    .as_tensor()
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                if v.iter().any(|x| !x.is_finite()) {
                    return Ok(Some(name.clone()));
                }
            }
        }
        Ok(None)
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let all: Vec<(String, Var)> = self.groups.iter().flat_map(|g| g.params.clone()).collect();
        let model = checkpoint::vars_to_map(&all);
        let optims: Vec<(String, HashMap<String, Tensor>)> = self
            .groups
            .iter()
            .map(|g| (g.optim_file(), g.optim.state_tensors()))
            .collect();
        let mut ema: HashMap<String, Tensor> = HashMap::new();
        for g in &self.groups {
            if let Some(e) = g.ema.as_ref() {
                ema.extend(e.tensors());
            }
        }
        let state_tensors = self.model.state_tensors()?;
        let mut files: Vec<(&str, &HashMap<String, Tensor>)> = vec![("model", &model)];
        files.extend(optims.iter().map(|(n, t)| (n.as_str(), t)));
        if self.groups.iter().any(|g| g.ema.is_some()) {
            files.push(("ema", &ema));
        }
        if !state_tensors.is_empty() {
            files.push(("model_state", &state_tensors));
        }
        let counters = |g: &GroupState| GroupCounters {
            optim_steps: g.optim.steps_taken(),
            ema_updates: g.ema.as_ref().map(|e| e.updates()).unwrap_or(0),
        };
        let default = self
            .groups
            .iter()
            .find(|g| g.name == crate::model::DEFAULT_GROUP)
            .map(counters);
        let state = TrainState {
            step: self.step as u64,
            rng: self.rng.state(),
            optim_steps: default.map_or(0, |c| c.optim_steps),
            ema_updates: default.map_or(0, |c| c.ema_updates),
            best_eval: self.best,
            evals_since_best: self.evals_since_best as u64,
            family: self.model.family().to_string(),
            groups: self
                .groups
                .iter()
                .map(|g| (g.name.clone(), counters(g)))
                .collect(),
            eval_pending: self.eval_pending,
            last_loss: self.last_loss,
            stopped_early: self.stopped_early,
        };
        let state = serde_json::to_value(&state)
            .map_err(|e| Error::Config(format!("cannot serialise the training state: {e}")))?;
        checkpoint::save(dir, &files, &state)
    }
}

/// The data set, the model with its seeded initial weights, and its parameters sorted by name,
/// as a run's configuration describes them.
pub(crate) type Parts = (
    Box<dyn DataSource>,
    Box<dyn GenerativeModel>,
    Vec<(String, Var)>,
);

/// Open the configured data set and build the configured model for it.
pub(crate) fn open_parts(cfg: &Config, device: &Device) -> Result<Parts> {
    // a loaded run (sampling, evaluation) takes no training step: its memory check leaves the
    // training batch and the metric sampling of periodic evaluation out
    let mut loaded = cfg.clone();
    loaded.train.batch_size = 1;
    loaded.train.select_by = "nll".into();
    open_parts_checked(cfg, &loaded, device, None)
}

/// Builds a model outside the registry for the run's data, from its initial-weight generator.
pub type ModelBuilder = dyn Fn(&DataInfo, &Device, &mut Rng) -> Result<Box<dyn GenerativeModel>>;

fn open_parts_with(cfg: &Config, device: &Device, build: Option<&ModelBuilder>) -> Result<Parts> {
    open_parts_checked(cfg, cfg, device, build)
}

/// [`open_parts_with`] whose memory check is made for `checked` (the work that will be done).
fn open_parts_checked(
    cfg: &Config,
    checked: &Config,
    device: &Device,
    build: Option<&ModelBuilder>,
) -> Result<Parts> {
    let data = data::open(&cfg.data.name, &cfg.data.options())?;
    let info = DataInfo::of(data.as_ref());
    crate::resources::check_resources(checked, &info)?;
    let mut init = Rng::new(cfg.train.seed).fork(INIT_STREAM);
    let model = match build {
        Some(b) => b(&info, device, &mut init)?,
        None => cfg.model.build(&info, device, &mut init)?,
    };
    let params = named_vars(model.varmap())?;
    Ok((data, model, params))
}

fn progress_bar(visible: bool, len: u64, pos: u64) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg} {per_sec} ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_position(pos);
    bar
}

/// Reads the losses and gradient norms of the `pending` steps still on the device in one
/// transfer, fills them in and returns every pending step (emptying `pending`). A loss read from
/// the device that is NaN or infinite is [`Error::NonFiniteLoss`] at its step (values computed
/// on the host were checked by [`StepContext::minimize`](crate::train::step::StepContext::minimize)).
fn read_pending(pending: &mut Vec<(usize, StepOutput)>) -> Result<Vec<(usize, StepOutput)>> {
    let mut steps = std::mem::take(pending);
    let mut scalars = Vec::new();
    for (_, s) in &steps {
        if let Some(d) = &s.on_device {
            scalars.push(d.loss.clone());
            scalars.push(d.grad_norm.clone());
        }
    }
    if scalars.is_empty() {
        return Ok(steps);
    }
    let vals: Vec<f64> = Tensor::stack(&scalars, 0)?.to_vec1()?;
    let mut vals = vals.chunks_exact(2);
    for (step, s) in &mut steps {
        if s.on_device.take().is_none() {
            continue;
        }
        let Some(&[loss, grad_norm]) = vals.next() else {
            unreachable!("two values per step on the device");
        };
        if !loss.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: *step,
                loss,
                kept: String::new(),
            });
        }
        (s.loss, s.grad_norm) = (loss, grad_norm);
    }
    Ok(steps)
}
