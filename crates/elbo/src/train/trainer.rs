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
use std::time::{Duration, Instant};

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
    /// `selected_by`).
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
    /// What opening the run directory did (stale lock taken over, temporaries removed, ...).
    notes: Vec<String>,
    /// Held for the trainer's lifetime: no other process trains into the directory meanwhile.
    _lock: RunLock,
}

impl Trainer {
    /// Start a new run in `dir` (created if needed). Refuses a directory that holds any part
    /// of a run (see [`run_dir::run_parts`]), so no run is overwritten by accident, and one
    /// that another process is training into.
    pub fn create(cfg: Config, dir: &Path, device: &Device) -> Result<Self> {
        Self::start(cfg, dir, device, None, false)
    }

    /// [`Trainer::create`] that first deletes the run `dir` holds (`elbo train --force`). Files
    /// in `dir` that are not part of a run are kept.
    pub fn create_replacing(cfg: Config, dir: &Path, device: &Device) -> Result<Self> {
        Self::start(cfg, dir, device, None, true)
    }

    /// [`Trainer::create`] for a model built by the caller (a family outside the registry):
    /// `build(info, device, init_rng)` makes it for the configured data; resume it with
    /// [`Trainer::resume_with`] and the same builder.
    pub fn create_with(
        cfg: Config,
        dir: &Path,
        device: &Device,
        build: Option<&ModelBuilder>,
    ) -> Result<Self> {
        Self::start(cfg, dir, device, build, false)
    }

    fn start(
        cfg: Config,
        dir: &Path,
        device: &Device,
        build: Option<&ModelBuilder>,
        replace: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        if !replace {
            // fail before any work; checked again under the lock below
            run_dir::ensure_free(dir)?;
        }
        let parts = open_parts_with(&cfg, device, build)?;
        let existed = dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let started = RunLock::acquire(dir).and_then(|lock| {
            if replace {
                run_dir::remove_run(dir)?;
            } else {
                run_dir::ensure_no_run(dir)?;
            }
            Self::fresh(cfg, dir, parts, lock)
        });
        if started.is_err() && !existed {
            // leave no trace of a run that never started
            let _ = std::fs::remove_file(dir.join(run_dir::LOCK_FILE));
            let _ = std::fs::remove_dir(dir);
        }
        started
    }

    /// Step 0 of a run in `dir`, whose lock is held: the data-dependent initialisation, then
    /// `config.json`, an empty `metrics.jsonl` and the data fingerprint.
    fn fresh(cfg: Config, dir: &Path, parts: Parts, lock: RunLock) -> Result<Self> {
        let (mut data, mut model, params) = parts;
        let groups = build_groups(&model.param_groups(), params, &cfg.train)?;
        let seed = Rng::new(cfg.train.seed);
        // a data-dependent initialisation sees one batch from its own stream, so the training
        // generator (and every family without the hook) is unaffected
        let mut init_rng = seed.fork(DATA_INIT_STREAM);
        let device = model.device().clone();
        let first = data.train_batch(cfg.train.batch_size, &mut init_rng, &device)?;
        model.init_from_data(&first, &mut init_rng)?;
        let mut notes = run_dir::clean_stale(dir)?;
        if let Some(pid) = lock.stale_owner {
            notes.push(format!(
                "took over the lock of process {pid}, which ended without releasing it"
            ));
        }
        let cfg_json = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::Config(format!("cannot serialise config: {e}")))?;
        atomic_file::write(&dir.join("config.json"), cfg_json.as_bytes())?;
        atomic_file::write(&dir.join(METRICS_FILE), b"")?;
        DataFingerprint::record(dir, &cfg.data.name)?;
        Ok(Self {
            rng: seed.fork(TRAIN_STREAM),
            cfg,
            dir: dir.to_path_buf(),
            model,
            data,
            groups,
            step: 0,
            best: None,
            evals_since_best: 0,
            eval_pending: false,
            last_loss: None,
            stopped_early: false,
            notes,
            _lock: lock,
        })
    }

    /// Continue the run in `dir` from its latest checkpoint. `steps`, if given, replaces the
    /// configured total (to extend a finished run).
    pub fn resume(dir: &Path, steps: Option<usize>, device: &Device) -> Result<Self> {
        Self::resume_with(dir, steps, device, None)
    }

    /// [`Trainer::resume`] for a model built by the caller (see [`Trainer::create_with`]).
    ///
    /// Takes the directory's lock, removes what crashed writers left, and refuses to go on when
    /// the user data file changed since the run started. A run interrupted before its first
    /// checkpoint starts again from step 0 (the same run: every random draw comes from the
    /// seed). A hand-edited or inconsistent `state.json` is an error.
    pub fn resume_with(
        dir: &Path,
        steps: Option<usize>,
        device: &Device,
        build: Option<&ModelBuilder>,
    ) -> Result<Self> {
        if !dir.join("config.json").is_file() {
            return Err(Error::RunDir(format!(
                "{} holds no run (no config.json); start one with `elbo train --out {}`",
                dir.display(),
                dir.display()
            )));
        }
        let lock = RunLock::acquire(dir)?;
        let mut cfg = Config::from_run_dir(dir)?;
        if let Some(s) = steps {
            cfg.train.steps = s;
        }
        if let Some(msg) = DataFingerprint::changed(dir, &cfg.data.name)? {
            return Err(Error::RunDir(format!(
                "cannot resume {}: {msg}",
                dir.display()
            )));
        }
        let mut notes = run_dir::clean_stale(dir)?;
        let parts = open_parts_with(&cfg, device, build)?;
        let ck_dir = dir.join("checkpoint");
        if !ck_dir.exists() {
            let mut t = Self::fresh(cfg, dir, parts, lock)?;
            notes.push("no checkpoint had been written: the run starts again from step 0".into());
            t.notes.extend(notes);
            return Ok(t);
        }
        let (data, mut model, params) = parts;
        let mut groups = build_groups(&model.param_groups(), params, &cfg.train)?;
        let loaded = checkpoint::load(&ck_dir, device)?;
        let st: TrainState = serde_json::from_value(loaded.state.clone())
            .map_err(|e| Error::checkpoint(&ck_dir, format!("state.json: {e}")))?;
        let file = |name: &str| {
            loaded
                .files
                .get(name)
                .ok_or_else(|| Error::checkpoint(&ck_dir, format!("{name}.safetensors missing")))
        };
        let all: Vec<(String, Var)> = groups.iter().flat_map(|g| g.params.clone()).collect();
        checkpoint::load_into_vars(file("model")?, &all, "model")?;
        for g in groups.iter_mut() {
            let counters = match st.groups.get(&g.name) {
                Some(c) => *c,
                None if g.name == crate::model::DEFAULT_GROUP => GroupCounters {
                    optim_steps: st.optim_steps,
                    ema_updates: st.ema_updates,
                },
                None => {
                    return Err(Error::checkpoint(
                        &ck_dir,
                        format!("state.json has no counters of parameter group '{}'", g.name),
                    ))
                }
            };
            g.optim
                .load_state(file(&g.optim_file())?, counters.optim_steps, &g.params)?;
            if let Some(ema) = g.ema.as_mut() {
                ema.load(&subset(file("ema")?, &g.params), counters.ema_updates)?;
            }
        }
        let state = loaded.files.get("model_state").cloned().unwrap_or_default();
        model.load_state_tensors(&state)?;
        let step = st.step as usize;
        truncate_metrics(&dir.join(METRICS_FILE), step, st.eval_pending)?;
        if let Some(pid) = lock.stale_owner {
            notes.push(format!(
                "took over the lock of process {pid}, which ended without releasing it"
            ));
        }
        Ok(Self {
            rng: Rng::from_state(&st.rng)?,
            best: st.best_eval,
            evals_since_best: st.evals_since_best as usize,
            eval_pending: st.eval_pending,
            last_loss: st.last_loss,
            stopped_early: st.stopped_early,
            cfg,
            dir: dir.to_path_buf(),
            model,
            data,
            groups,
            step,
            notes,
            _lock: lock,
        })
    }

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
        while self.step < stop_at {
            let s = match self.train_step() {
                Ok(s) => s,
                Err(e) => {
                    bar.abandon();
                    return Err(self.explain_failure(e));
                }
            };
            self.step += 1;
            self.last_loss = Some(s.loss);
            out.losses.push((self.step, s.loss));
            smooth = if smooth.is_nan() {
                s.loss
            } else {
                0.98 * smooth + 0.02 * s.loss
            };
            bar.set_position(self.step as u64);
            bar.set_message(format!("loss {smooth:.4}"));
            if self.step.is_multiple_of(tc.log_every) || self.step == stop_at {
                let mut line = json!({"step": self.step, "loss": s.loss, "lr": s.lr,
                    "grad_norm": s.grad_norm, "elapsed_s": start.elapsed().as_secs_f64()});
                for (k, v) in &s.extra {
                    line[k] = json!(v);
                }
                writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            }
            let eval_due = (tc.eval_every > 0 && self.step.is_multiple_of(tc.eval_every))
                || self.step == tc.steps;
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

    /// The held-out evaluation of the current step (its checkpoint is already written), the
    /// choice of `best/` and early stopping. An evaluation that fails or runs out of time is
    /// reported and counts as no evaluation. The checkpoint is written again when the run
    /// ends here (last step or early stop) or when this step is due one anyway, so it holds
    /// the evaluation's outcome. Returns whether training stops early.
    fn evaluate_and_select(
        &mut self,
        metrics: &mut std::fs::File,
        bar: &ProgressBar,
        smooth: f64,
        out: &mut TrainOutcome,
    ) -> Result<bool> {
        let tc = self.cfg.train.clone();
        match self.periodic_eval(metrics, bar, smooth) {
            Ok(nll) => out.evals.push((self.step, nll)),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => {
                self.eval_pending = false;
                let msg = format!(
                    "held-out evaluation at step {} failed: {e}; the checkpoint of step {} is                      saved and training continues",
                    self.step, self.step
                );
                bar.println(format!("warning: {msg}"));
                let line = json!({"step": self.step, "eval_error": e.to_string(), "split": "val"});
                writeln!(metrics, "{line}").map_err(|e| Error::io(&self.dir, e))?;
            }
        }
        let stop = tc.patience > 0 && self.evals_since_best >= tc.patience;
        if stop {
            self.stopped_early = true;
            out.stopped_early = true;
            bar.println(format!(
                "early stop: {} evaluations without improvement",
                tc.patience
            ));
        }
        if stop || self.step == tc.steps || self.step.is_multiple_of(tc.checkpoint_every) {
            self.save_latest(bar)?;
        }
        Ok(stop)
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

    /// Evaluate, log, keep `best/` (by `train.select_by`) and count evaluations without
    /// improvement. Returns the validation NLL (NaN for a family without a likelihood).
    fn periodic_eval(
        &mut self,
        metrics: &mut std::fs::File,
        bar: &ProgressBar,
        smooth: f64,
    ) -> Result<f64> {
        let has_nll = !self.model.likelihoods().is_empty();
        let (nll, se, bpd) = if has_nll {
            self.evaluate()?
        } else {
            (f64::NAN, f64::NAN, f64::NAN)
        };
        let select_by = self.cfg.train.select_by.clone();
        let mut line = json!({"step": self.step, "eval_nll": nll, "eval_stderr": se,
            "eval_bits_per_dim": bpd, "examples": self.eval_examples(), "split": "val"});
        let mut msg = format!(
            "step {:>6}  loss {:.4}  validation NLL {:.4} ± {:.4} nats ({:.4} bits/dim)",
            self.step, smooth, nll, se, bpd
        );
        let score = if select_by == "nll" {
            if !has_nll {
                return Err(Error::Config(format!(
                    "the {} family has no likelihood: set train.select_by to a sample metric \
                     (energy-distance, mmd, sliced-wasserstein)",
                    self.model.family()
                )));
            }
            nll
        } else {
            let m = self.evaluate_metric(&select_by)?;
            line[format!("eval_{select_by}")] = json!(m.value);
            msg.push_str(&format!("  {select_by} {:.5}", m.value));
            m.value
        };
        writeln!(metrics, "{line}").map_err(|e| Error::io(&self.dir, e))?;
        bar.println(msg);
        // the evaluation is done: the state saved with best/ (and every later checkpoint)
        // says so
        self.eval_pending = false;
        if score.is_finite() && self.best.is_none_or(|b| score < b) {
            self.best = Some(score);
            self.evals_since_best = 0;
            self.save_checkpoint(&self.dir.join("best"))?;
        } else {
            self.evals_since_best += 1;
        }
        Ok(nll)
    }

    /// A sample metric of `eval_examples` samples (EMA weights) against as many validation
    /// examples.
    pub fn evaluate_metric(
        &mut self,
        name: &str,
    ) -> Result<crate::eval::sample_metric::MetricValue> {
        let metric = crate::eval::sample_metric::metric_by_name(name)?;
        let device = self.model.device().clone();
        let val = self.data.val_set(&device)?;
        let n = val.dim(0)?.min(self.cfg.train.eval_examples.max(2));
        let val: Vec<f32> = val.narrow(0, 0, n)?.flatten_all()?.to_vec1()?;
        let mut rng = Rng::new(self.cfg.train.seed)
            .fork(EVAL_STREAM)
            .fork(self.step as u64)
            .fork(1);
        self.swap_ema()?;
        let samples = self.model.sample(n, &self.cfg.sample, &mut rng);
        self.swap_ema()?;
        let samples: Vec<f32> = samples?.flatten_all()?.to_vec1()?;
        metric.compute(&samples, &val, self.model.dim(), &mut rng)
    }

    fn eval_examples(&self) -> usize {
        self.cfg.train.eval_examples
    }

    /// Validation NLL (mean, stderr, bits/dim) on the first `eval_examples` examples of the
    /// validation split, with the EMA weights when EMA is on. Past `train.eval_budget_s`
    /// seconds (checked between batches of `eval.batch_size` examples) it stops with
    /// [`Error::Budget`].
    pub fn evaluate(&mut self) -> Result<(f64, f64, f64)> {
        let device = self.model.device().clone();
        // model selection reads the validation split; only `elbo eval` reads the test split
        let val = self.data.val_set(&device)?;
        let n = val.dim(0)?.min(self.cfg.train.eval_examples.max(1));
        let val = val.narrow(0, 0, n)?;
        let mut rng = Rng::new(self.cfg.train.seed)
            .fork(EVAL_STREAM)
            .fork(self.step as u64);
        let budget = self.cfg.train.eval_budget_s;
        let deadline = (budget > 0.0).then(|| Instant::now() + Duration::from_secs_f64(budget));
        self.swap_ema()?;
        let res = dataset_nll_within(
            self.model.as_ref(),
            &val,
            &self.cfg.eval,
            &mut rng,
            deadline,
        );
        self.swap_ema()?;
        let s = res?.summary();
        Ok((s.nats, s.stderr_nats, s.bits_per_dim))
    }

    /// Exchange the live and the EMA weights of every group that keeps an EMA.
    fn swap_ema(&mut self) -> Result<()> {
        for g in self.groups.iter_mut() {
            if let Some(ema) = g.ema.as_mut() {
                ema.swap(&g.params)?;
            }
        }
        Ok(())
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
    open_parts_with(cfg, device, None)
}

/// Builds a model outside the registry for the run's data, from its initial-weight generator.
pub type ModelBuilder = dyn Fn(&DataInfo, &Device, &mut Rng) -> Result<Box<dyn GenerativeModel>>;

fn open_parts_with(cfg: &Config, device: &Device, build: Option<&ModelBuilder>) -> Result<Parts> {
    let data = data::open(&cfg.data.name, &cfg.data.options())?;
    let info = DataInfo::of(data.as_ref());
    crate::resources::check_resources(cfg, &info)?;
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

/// Keep only the metric lines of steps up to `step` (a resumed run re-does later steps), and
/// when the checkpoint was written before that step's evaluation, not that evaluation's lines
/// (it runs again). Lines cut short by a crash are dropped. The file is replaced atomically.
fn truncate_metrics(path: &Path, step: usize, eval_pending: bool) -> Result<()> {
    let text = match std::fs::read(path) {
        Ok(t) => String::from_utf8_lossy(&t).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let keep = |v: &serde_json::Value| {
        let Some(s) = v["step"].as_u64().map(|s| s as usize) else {
            return false;
        };
        let of_eval = v.get("eval_nll").is_some() || v.get("eval_error").is_some();
        s < step || (s == step && !(eval_pending && of_eval))
    };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| keep(&v)))
        .map(|l| format!("{l}\n"))
        .collect();
    atomic_file::write(path, kept.as_bytes())
}
