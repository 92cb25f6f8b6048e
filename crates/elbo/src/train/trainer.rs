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
use super::step::{build_groups, subset, GroupState, StepContext, StepOutput};
use crate::config::Config;
use crate::data::{self, DataSource};
use crate::model::{dataset_nll, DataInfo, GenerativeModel};
use crate::rng::RngState;
use crate::{Error, Result, Rng};

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
}

impl Trainer {
    /// Start a new run in `dir` (created if needed). Refuses a directory that already holds a
    /// checkpoint, so no run is overwritten by accident.
    pub fn create(cfg: Config, dir: &Path, device: &Device) -> Result<Self> {
        Self::create_with(cfg, dir, device, None)
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
        cfg.validate()?;
        if dir.join("checkpoint").exists() {
            return Err(Error::Config(format!(
                "{} already holds a run; use `elbo train --resume {}` to continue it or choose another --out",
                dir.display(),
                dir.display()
            )));
        }
        let (mut data, mut model, params) = open_parts_with(&cfg, device, build)?;
        let groups = build_groups(&model.param_groups(), params, &cfg.train)?;
        let seed = Rng::new(cfg.train.seed);
        // a data-dependent initialisation sees one batch from its own stream, so the training
        // generator (and every family without the hook) is unaffected
        let mut init_rng = seed.fork(DATA_INIT_STREAM);
        let first = data.train_batch(cfg.train.batch_size, &mut init_rng, device)?;
        model.init_from_data(&first, &mut init_rng)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg_json = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::Config(format!("cannot serialise config: {e}")))?;
        write_atomic(&dir.join("config.json"), cfg_json.as_bytes())?;
        std::fs::write(dir.join("metrics.jsonl"), b"")
            .map_err(|e| Error::io(dir.join("metrics.jsonl"), e))?;
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
        })
    }

    /// Continue the run in `dir` from its latest checkpoint. `steps`, if given, replaces the
    /// configured total (to extend a finished run).
    pub fn resume(dir: &Path, steps: Option<usize>, device: &Device) -> Result<Self> {
        Self::resume_with(dir, steps, device, None)
    }

    /// [`Trainer::resume`] for a model built by the caller (see [`Trainer::create_with`]).
    pub fn resume_with(
        dir: &Path,
        steps: Option<usize>,
        device: &Device,
        build: Option<&ModelBuilder>,
    ) -> Result<Self> {
        let mut cfg = Config::from_run_dir(dir)?;
        if let Some(s) = steps {
            cfg.train.steps = s;
        }
        let (data, mut model, params) = open_parts_with(&cfg, device, build)?;
        let mut groups = build_groups(&model.param_groups(), params, &cfg.train)?;
        let ck_dir = dir.join("checkpoint");
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
        truncate_metrics(&dir.join("metrics.jsonl"), step)?;
        Ok(Self {
            rng: Rng::from_state(&st.rng)?,
            best: st.best_eval,
            evals_since_best: st.evals_since_best as usize,
            cfg,
            dir: dir.to_path_buf(),
            model,
            data,
            groups,
            step,
        })
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
    pub fn run_until(&mut self, stop_at: usize, progress: bool) -> Result<TrainOutcome> {
        let tc = self.cfg.train.clone();
        let stop_at = stop_at.min(tc.steps);
        let bar = progress_bar(progress, tc.steps as u64, self.step as u64);
        let mut metrics = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("metrics.jsonl"))
            .map_err(|e| Error::io(self.dir.join("metrics.jsonl"), e))?;
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
        let mut smooth = f64::NAN;
        while self.step < stop_at {
            let s = match self.train_step() {
                Ok(s) => s,
                Err(e) => {
                    bar.abandon();
                    return Err(self.explain_failure(e));
                }
            };
            self.step += 1;
            out.losses.push((self.step, s.loss));
            smooth = if smooth.is_nan() {
                s.loss
            } else {
                0.98 * smooth + 0.02 * s.loss
            };
            bar.set_position(self.step as u64);
            bar.set_message(format!("loss {smooth:.4}"));
            if self.step % tc.log_every == 0 || self.step == stop_at {
                let mut line = json!({"step": self.step, "loss": s.loss, "lr": s.lr,
                    "grad_norm": s.grad_norm, "elapsed_s": start.elapsed().as_secs_f64()});
                for (k, v) in &s.extra {
                    line[k] = json!(v);
                }
                writeln!(metrics, "{line}").map_err(|e| Error::io(&self.dir, e))?;
            }
            let eval_due = tc.eval_every > 0 && self.step % tc.eval_every == 0;
            if eval_due || self.step == tc.steps {
                let nll = self.periodic_eval(&mut metrics, &bar, smooth)?;
                out.evals.push((self.step, nll));
                if tc.patience > 0 && self.evals_since_best >= tc.patience {
                    out.stopped_early = true;
                    bar.println(format!(
                        "early stop: {} evaluations without improvement",
                        tc.patience
                    ));
                    self.save_checkpoint(&self.dir.join("checkpoint"))?;
                    break;
                }
            }
            if self.step % tc.checkpoint_every == 0 || self.step == stop_at {
                self.save_checkpoint(&self.dir.join("checkpoint"))?;
            }
        }
        bar.finish_and_clear();
        out.steps = self.step;
        out.best_eval = self.best;
        out.seconds = start.elapsed().as_secs_f64();
        Ok(out)
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

    /// A non-finite loss names what is on disk.
    fn explain_failure(&self, e: Error) -> Error {
        match e {
            Error::NonFiniteLoss { step, loss, .. } => {
                let ck = self.dir.join("checkpoint");
                let kept = match checkpoint::load(&ck, self.model.device()) {
                    Ok(l) => format!(
                        "the checkpoint of step {} in {} is kept",
                        l.state["step"],
                        ck.display()
                    ),
                    Err(_) => "no checkpoint had been written yet".to_string(),
                };
                Error::NonFiniteLoss { step, loss, kept }
            }
            other => other,
        }
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
        if self.best.is_none_or(|b| score < b) {
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
    /// validation split, with the EMA weights when EMA is on.
    pub fn evaluate(&mut self) -> Result<(f64, f64, f64)> {
        let device = self.model.device().clone();
        // model selection reads the validation split; only `elbo eval` reads the test split
        let val = self.data.val_set(&device)?;
        let n = val.dim(0)?.min(self.cfg.train.eval_examples.max(1));
        let val = val.narrow(0, 0, n)?;
        let mut rng = Rng::new(self.cfg.train.seed)
            .fork(EVAL_STREAM)
            .fork(self.step as u64);
        self.swap_ema()?;
        let res = dataset_nll(self.model.as_ref(), &val, &self.cfg.eval, &mut rng);
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

/// Keep only metric lines whose step is at most `step` (a resumed run re-does later steps).
fn truncate_metrics(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io(path, e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())
}

/// Write a file through a temporary name and a rename, so readers never see half of it.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
