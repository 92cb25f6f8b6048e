//! Opening a run: a new one in a directory it will own, or the continuation of one from its
//! latest checkpoint (see [`super::run_dir`] for the directory's lock and leftovers).

use std::path::Path;

use candle_core::{Device, Var};

use super::*;

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
    pub(super) fn fresh(cfg: Config, dir: &Path, parts: Parts, lock: RunLock) -> Result<Self> {
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
            defer_reads: !device.is_cpu(),
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
            defer_reads: !device.is_cpu(),
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
