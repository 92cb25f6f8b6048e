//! One short, explicit training loop: draw a batch, loss, backward, clip, AdamW step, EMA,
//! log, evaluate, checkpoint. Every family goes through it via [`GenerativeModel`].
//!
//! Determinism: the model's initial weights come from `Rng::new(seed).fork(INIT)` and every
//! batch and noise draw from one training generator whose state is saved in each checkpoint, so
//! a run interrupted and resumed with `--resume` produces the same losses as an uninterrupted
//! run. Periodic evaluation uses its own generator (forked by step) and never perturbs it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use super::checkpoint;
use super::clip::clip_grad_norm;
use super::ema::Ema;
use super::optim::{named_vars, AdamW, AdamWConfig};
use super::schedule::LrSchedule;
use crate::config::Config;
use crate::data::{self, DataSource};
use crate::model::{self, dataset_nll, DataInfo, GenerativeModel};
use crate::rng::RngState;
use crate::{Error, Result, Rng};

/// Fork tags of the run seed.
pub(crate) const INIT_STREAM: u64 = 1;
pub(crate) const TRAIN_STREAM: u64 = 2;
pub(crate) const EVAL_STREAM: u64 = 3;

/// What a finished (or stopped) training run reports.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    /// Steps completed.
    pub steps: usize,
    /// Loss of every step run in this call, `(step, loss)`.
    pub losses: Vec<(usize, f64)>,
    /// Held-out NLL (nats/example) of every evaluation in this call, `(step, nll)`.
    pub evals: Vec<(usize, f64)>,
    /// Best held-out NLL seen in the whole run.
    pub best_eval: Option<f64>,
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
    params: Vec<(String, Var)>,
    optim: AdamW,
    ema: Option<Ema>,
    rng: Rng,
    step: usize,
    best: Option<f64>,
    evals_since_best: usize,
}

impl Trainer {
    /// Start a new run in `dir` (created if needed). Refuses a directory that already holds a
    /// checkpoint, so no run is overwritten by accident.
    pub fn create(cfg: Config, dir: &Path, device: &Device) -> Result<Self> {
        cfg.validate()?;
        if dir.join("checkpoint").exists() {
            return Err(Error::Config(format!(
                "{} already holds a run; use `elbo train --resume {}` to continue it or choose another --out",
                dir.display(),
                dir.display()
            )));
        }
        let (data, model, params) = open_parts(&cfg, device)?;
        let seed = Rng::new(cfg.train.seed);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg_json = serde_json::to_string_pretty(&cfg)
            .map_err(|e| Error::Config(format!("cannot serialise config: {e}")))?;
        write_atomic(&dir.join("config.json"), cfg_json.as_bytes())?;
        std::fs::write(dir.join("metrics.jsonl"), b"")
            .map_err(|e| Error::io(dir.join("metrics.jsonl"), e))?;
        let ema = if cfg.train.ema_decay > 0.0 {
            Some(Ema::new(&params, cfg.train.ema_decay)?)
        } else {
            None
        };
        Ok(Self {
            optim: AdamW::new(adamw_config(&cfg)),
            rng: seed.fork(TRAIN_STREAM),
            cfg,
            dir: dir.to_path_buf(),
            model,
            data,
            params,
            ema,
            step: 0,
            best: None,
            evals_since_best: 0,
        })
    }

    /// Continue the run in `dir` from its latest checkpoint. `steps`, if given, replaces the
    /// configured total (to extend a finished run).
    pub fn resume(dir: &Path, steps: Option<usize>, device: &Device) -> Result<Self> {
        let mut cfg = Config::from_run_dir(dir)?;
        if let Some(s) = steps {
            cfg.train.steps = s;
        }
        let (data, model, params) = open_parts(&cfg, device)?;
        let ck_dir = dir.join("checkpoint");
        let loaded = checkpoint::load(&ck_dir, device)?;
        let st = &loaded.state;
        let file = |name: &str| {
            loaded
                .files
                .get(name)
                .ok_or_else(|| Error::checkpoint(&ck_dir, format!("{name}.safetensors missing")))
        };
        checkpoint::load_into_vars(file("model")?, &params, "model")?;
        let mut optim = AdamW::new(adamw_config(&cfg));
        optim.load_state(
            file("optim")?,
            get_u64(st, "optim_steps", &ck_dir)?,
            &params,
        )?;
        let ema = if cfg.train.ema_decay > 0.0 {
            let mut e = Ema::new(&params, cfg.train.ema_decay)?;
            e.load(file("ema")?, get_u64(st, "ema_updates", &ck_dir)?)?;
            Some(e)
        } else {
            None
        };
        let rng_state: RngState = serde_json::from_value(st["rng"].clone())
            .map_err(|e| Error::checkpoint(&ck_dir, format!("bad rng state: {e}")))?;
        let step = get_u64(st, "step", &ck_dir)? as usize;
        truncate_metrics(&dir.join("metrics.jsonl"), step)?;
        Ok(Self {
            rng: Rng::from_state(&rng_state)?,
            best: st["best_eval"].as_f64(),
            evals_since_best: st["evals_since_best"].as_u64().unwrap_or(0) as usize,
            cfg,
            dir: dir.to_path_buf(),
            model,
            data,
            params,
            optim,
            ema,
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
        let sched = LrSchedule {
            base_lr: tc.lr,
            warmup_steps: tc.warmup_steps,
            total_steps: tc.steps,
            min_lr_ratio: tc.min_lr_ratio,
        };
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
            stopped_early: false,
            seconds: 0.0,
        };
        let mut smooth = f64::NAN;
        let device = self.model.device().clone();
        while self.step < stop_at {
            let batch = self
                .data
                .train_batch(tc.batch_size, &mut self.rng, &device)?;
            let loss = self.model.loss(&batch, &mut self.rng)?;
            let loss_val = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
            if !loss_val.is_finite() {
                bar.abandon();
                let ck = self.dir.join("checkpoint");
                let kept = match checkpoint::load(&ck, &device) {
                    Ok(l) => format!(
                        "the checkpoint of step {} in {} is kept",
                        l.state["step"],
                        ck.display()
                    ),
                    Err(_) => "no checkpoint had been written yet".to_string(),
                };
                return Err(Error::NonFiniteLoss {
                    step: self.step + 1,
                    loss: loss_val,
                    kept,
                });
            }
            let mut grads = loss.backward()?;
            let gnorm = if tc.grad_clip > 0.0 {
                clip_grad_norm(&self.params, &mut grads, tc.grad_clip)?
            } else {
                super::clip::grad_norm(&self.params, &grads)?
            };
            let lr = sched.lr_at(self.step);
            self.optim.step(&self.params, &grads, lr)?;
            if let Some(ema) = self.ema.as_mut() {
                ema.update(&self.params)?;
            }
            self.step += 1;
            out.losses.push((self.step, loss_val));
            smooth = if smooth.is_nan() {
                loss_val
            } else {
                0.98 * smooth + 0.02 * loss_val
            };
            bar.set_position(self.step as u64);
            bar.set_message(format!("loss {smooth:.4}"));
            if self.step % tc.log_every == 0 || self.step == stop_at {
                let line = json!({"step": self.step, "loss": loss_val, "lr": lr,
                    "grad_norm": gnorm, "elapsed_s": start.elapsed().as_secs_f64()});
                writeln!(metrics, "{line}").map_err(|e| Error::io(&self.dir, e))?;
            }
            let eval_due = tc.eval_every > 0 && self.step % tc.eval_every == 0;
            if eval_due || self.step == tc.steps {
                let (nll, se, bpd) = self.evaluate()?;
                out.evals.push((self.step, nll));
                let line = json!({"step": self.step, "eval_nll": nll, "eval_stderr": se,
                    "eval_bits_per_dim": bpd, "examples": self.eval_examples()});
                writeln!(metrics, "{line}").map_err(|e| Error::io(&self.dir, e))?;
                bar.println(format!(
                    "step {:>6}  loss {:.4}  held-out NLL {:.4} ± {:.4} nats ({:.4} bits/dim)",
                    self.step, smooth, nll, se, bpd
                ));
                if self.best.is_none_or(|b| nll < b) {
                    self.best = Some(nll);
                    self.evals_since_best = 0;
                    self.save_checkpoint(&self.dir.join("best"))?;
                } else {
                    self.evals_since_best += 1;
                }
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

    fn eval_examples(&self) -> usize {
        self.cfg.train.eval_examples
    }

    /// Held-out NLL (mean, stderr, bits/dim) on the first `eval_examples` test examples, with
    /// the EMA weights when EMA is on.
    pub fn evaluate(&mut self) -> Result<(f64, f64, f64)> {
        let device = self.model.device().clone();
        let test = self.data.test_set(&device)?;
        let n = test.dim(0)?.min(self.cfg.train.eval_examples.max(1));
        let test = test.narrow(0, 0, n)?;
        let mut rng = Rng::new(self.cfg.train.seed)
            .fork(EVAL_STREAM)
            .fork(self.step as u64);
        if let Some(ema) = self.ema.as_mut() {
            ema.swap(&self.params)?;
        }
        let res = dataset_nll(self.model.as_ref(), &test, &self.cfg.eval, &mut rng);
        if let Some(ema) = self.ema.as_mut() {
            ema.swap(&self.params)?;
        }
        let s = res?.summary();
        Ok((s.nats, s.stderr_nats, s.bits_per_dim))
    }

    fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let model = checkpoint::vars_to_map(&self.params);
        let optim = self.optim.state_tensors();
        let ema = self.ema.as_ref().map(|e| e.tensors());
        let mut files: Vec<(
            &str,
            &std::collections::HashMap<String, candle_core::Tensor>,
        )> = vec![("model", &model), ("optim", &optim)];
        if let Some(e) = ema.as_ref() {
            files.push(("ema", e));
        }
        let state = json!({
            "step": self.step,
            "rng": self.rng.state(),
            "optim_steps": self.optim.steps_taken(),
            "ema_updates": self.ema.as_ref().map(|e| e.updates()).unwrap_or(0),
            "best_eval": self.best,
            "evals_since_best": self.evals_since_best,
            "family": self.model.family(),
        });
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
    let data = data::open(&cfg.data.name, &cfg.data.options())?;
    let info = DataInfo {
        dim: data.dim(),
        kind: data.kind(),
    };
    let mut init = Rng::new(cfg.train.seed).fork(INIT_STREAM);
    let model = model::build(&cfg.model, info, device, &mut init)?;
    let params = named_vars(model.varmap())?;
    Ok((data, model, params))
}

fn adamw_config(cfg: &Config) -> AdamWConfig {
    AdamWConfig {
        lr: cfg.train.lr,
        beta1: cfg.train.beta1,
        beta2: cfg.train.beta2,
        eps: 1e-8,
        weight_decay: cfg.train.weight_decay,
    }
}

fn get_u64(st: &serde_json::Value, key: &str, path: &Path) -> Result<u64> {
    st[key]
        .as_u64()
        .ok_or_else(|| Error::checkpoint(path, format!("state.json has no integer '{key}'")))
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
