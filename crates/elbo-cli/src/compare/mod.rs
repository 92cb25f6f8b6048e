//! `elbo compare` (train, or reuse, every entry of a suite and score it) and `elbo report`
//! (the same report from existing runs, without training).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use elbo::compare::{CompareReport, EntryReport, EntryStatus, LikelihoodRow, Suite};
use elbo::config::{Config, EvalOptions};
use elbo::train::run_dir::RunLock;
use elbo::train::{CheckpointChoice, LoadedRun, Trainer};
use elbo::Rng;

use crate::commands::{device, evaluate, plot_losses, write_sample_plot};
use crate::{CompareArgs, ReportArgs};

mod jobs;

/// What one entry asks to be reported.
pub(crate) struct Wanted<'a> {
    likelihoods: &'a [String],
    metrics: &'a [String],
    examples: Option<usize>,
}

pub fn compare(a: CompareArgs) -> Result<()> {
    let dev = device()?;
    let mut suite = Suite::resolve(&a.suite)?;
    if a.quick {
        suite.make_quick();
    }
    // a prior over a VQ-VAE entry's codes reads that entry's run (ordered after it)
    suite.bind_codes(&a.out.join("runs"))?;
    let examples = a.quick.then_some(suite.header.quick_examples);
    if let Some(name) = &a.entry {
        return jobs::run_child(&suite, name, &a.out, examples, &dev);
    }
    if a.jobs == 0 {
        bail!("--jobs 0: give the number of entries to run side by side (1 or more)");
    }
    check_out(&a.out)?;
    let n = suite.entries.len();
    eprintln!(
        "suite {} ({}, {n} entries{}) -> {}",
        suite.header.name,
        suite.source,
        if a.quick { ", --quick" } else { "" },
        a.out.display()
    );
    std::fs::create_dir_all(a.out.join("runs"))
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    // one compare per output directory: two would train the same entries and overwrite each
    // other's report
    if let Some(pid) = RunLock::holder(&a.out) {
        bail!(
            "{} is in use: process {pid} is running a compare into it; wait for it to finish              or stop it, then run this again (it continues where that one stopped)",
            a.out.display()
        );
    }
    let _lock = RunLock::acquire(&a.out)?;
    if a.jobs > 1 {
        let entries = jobs::run_parallel(&a, &suite, &a.out)?;
        return finish(
            &CompareReport::new(&suite.header.name, a.quick, entries),
            &a.out,
        );
    }
    let started = Instant::now();
    let mut entries: Vec<EntryReport> = Vec::new();
    for (i, e) in suite.entries.iter().enumerate() {
        let dir = a.out.join("runs").join(&e.name);
        let t0 = Instant::now();
        eprintln!("[{}/{n}] {}: starting", i + 1, e.name);
        let rep = match &e.config {
            Err(msg) => EntryReport::failed(&e.name, &dir, msg.clone()),
            Ok(cfg) => {
                let wanted = Wanted {
                    likelihoods: &e.likelihoods,
                    metrics: &e.metrics,
                    examples,
                };
                run_entry(&e.name, cfg, &dir, &wanted, &dev, a.quiet)
            }
        };
        let done = i + 1;
        let elapsed = started.elapsed().as_secs_f64();
        let eta = elapsed / done as f64 * (n - done) as f64;
        eprintln!(
            "[{done}/{n}] {}: {}; entry {:.1} s, elapsed {elapsed:.0} s, ETA {eta:.0} s",
            e.name,
            outcome(&rep),
            t0.elapsed().as_secs_f64()
        );
        entries.push(rep);
        // after every entry, so an interrupt loses nothing finished
        CompareReport::new(&suite.header.name, a.quick, entries.clone()).write(&a.out)?;
    }
    finish(
        &CompareReport::new(&suite.header.name, a.quick, entries),
        &a.out,
    )
}

pub fn report(a: ReportArgs) -> Result<()> {
    let dev = device()?;
    check_out(&a.out)?;
    let likelihoods: Vec<String> = match &a.likelihood {
        Some(l) => l.split(',').map(|s| s.trim().to_string()).collect(),
        None => vec!["auto".into()],
    };
    let metrics: Vec<String> = match &a.metrics {
        Some(m) => m.split(',').map(|s| s.trim().to_string()).collect(),
        None => Vec::new(),
    };
    for m in &metrics {
        elbo::eval::sample_metric::metric_by_name(m)?;
    }
    if a.examples == Some(0) {
        bail!("--examples 0: must be at least 1");
    }
    let wanted = Wanted {
        likelihoods: &likelihoods,
        metrics: &metrics,
        examples: a.examples,
    };
    let n = a.runs.len();
    let mut entries = Vec::new();
    let mut names = std::collections::HashSet::new();
    for (i, dir) in a.runs.iter().enumerate() {
        let mut name = dir
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string());
        if !names.insert(name.clone()) {
            name = dir.display().to_string();
        }
        let rep = match Config::from_run_dir(dir) {
            Err(_) if !dir.join("config.json").is_file() => EntryReport::failed(
                &name,
                dir,
                format!(
                    "{} holds no run (no config.json): give directories written by `elbo \
                     train` or `elbo compare` (OUT/runs/NAME)",
                    dir.display()
                ),
            ),
            Err(e) => EntryReport::failed(&name, dir, format!("{e}")),
            Ok(cfg) => match score(&name, &cfg, dir, &wanted, &dev) {
                Ok(mut r) => {
                    r.provenance = "existing run".into();
                    r
                }
                Err(e) => failed_with_config(&name, &cfg, dir, format!("{e:#}")),
            },
        };
        eprintln!("[{}/{n}] {name}: {}", i + 1, outcome(&rep));
        entries.push(rep);
    }
    finish(&CompareReport::new(&a.title, false, entries), &a.out)
}

/// Write the final report, print its table, and fail (after writing) when an entry failed.
/// The report files of `out` may be replaced only when they are a comparison report: a run
/// directory (whose `report.json` is `elbo eval`'s) or any other `report.json` is refused.
fn check_out(out: &Path) -> Result<()> {
    if out.join("config.json").exists() {
        bail!(
            "{} is a run directory (its report.json is elbo eval's); choose another --out",
            out.display()
        );
    }
    let json = out.join("report.json");
    if let Ok(text) = std::fs::read_to_string(&json) {
        if CompareReport::from_json(&text).is_err() {
            bail!(
                "{} exists and is not a comparison report; choose another --out",
                json.display()
            );
        }
    }
    Ok(())
}

fn finish(report: &CompareReport, out: &Path) -> Result<()> {
    report.write(out)?;
    println!("{}", report.to_markdown());
    eprintln!(
        "wrote {0}/report.html, {0}/report.md and {0}/report.json",
        out.display()
    );
    let failed = report.failures().count();
    let checks = report.checks.iter().filter(|c| !c.passed).count();
    if checks > 0 {
        eprintln!("warning: {checks} consistency check(s) failed; see the report");
    }
    if failed > 0 {
        bail!(
            "{failed} of {} entries failed (their errors are in the report)",
            report.entries.len()
        );
    }
    Ok(())
}

/// One terminal line: the headline figure, or the error.
pub(crate) fn outcome(r: &EntryReport) -> String {
    match (&r.status, r.best_row()) {
        (EntryStatus::Failed, _) => {
            format!("FAILED: {}", r.error.as_deref().unwrap_or("unknown error"))
        }
        (EntryStatus::Ok, Some(b)) => format!(
            "{} {} {} ({}){}",
            b.likelihood,
            elbo::compare::report::pm(b.bits_per_dim, b.stderr_bits_per_dim),
            elbo::compare::report::unit_of(&r.data),
            b.kind.label(),
            if r.provenance.is_empty() {
                String::new()
            } else {
                format!(", {}", r.provenance)
            }
        ),
        (EntryStatus::Ok, None) => "no likelihood figure".into(),
    }
}

fn failed_with_config(name: &str, cfg: &Config, dir: &Path, error: String) -> EntryReport {
    let mut r = EntryReport::failed(name, dir, error);
    r.family = cfg.model.name().to_string();
    r.data = cfg.data.name.clone();
    r.config = serde_json::to_value(cfg).unwrap_or_default();
    r
}

/// Train (or reuse, or resume) then score one entry; any error becomes a failed entry.
pub(crate) fn run_entry(
    name: &str,
    cfg: &Config,
    dir: &Path,
    wanted: &Wanted<'_>,
    dev: &Device,
    quiet: bool,
) -> EntryReport {
    let trained = train_entry(cfg, dir, dev, quiet);
    let result = trained.and_then(|prov| {
        let key = score_key(cfg, dir, wanted);
        if let Some(mut r) = key.as_ref().and_then(|k| cached_score(dir, k, name)) {
            r.provenance = format!("{prov}; scores reused from {SCORE_CACHE}");
            return Ok(r);
        }
        let mut r = score(name, cfg, dir, wanted, dev)?;
        if let Some(k) = &key {
            save_score(dir, k, &r);
        }
        r.provenance = prov;
        Ok(r)
    });
    result.unwrap_or_else(|e| failed_with_config(name, cfg, dir, format!("{e:#}")))
}

/// The file in an entry's run directory that keeps its last scores, so that re-running a
/// suite (to add or retrain one entry) does not re-score the others.
const SCORE_CACHE: &str = "compare-scores.json";

/// What the scores of an entry depend on: its config, the likelihoods, metrics and example
/// count asked for, and the checkpoint scored (its `state.json`, which names the step). `None`
/// when the checkpoint cannot be read (then nothing is cached).
fn score_key(cfg: &Config, dir: &Path, wanted: &Wanted<'_>) -> Option<serde_json::Value> {
    let which = if dir.join("best").join("state.json").is_file() {
        "best"
    } else {
        "checkpoint"
    };
    let state = std::fs::read_to_string(dir.join(which).join("state.json")).ok()?;
    Some(serde_json::json!({
        "config": serde_json::to_value(cfg).ok()?,
        "likelihoods": wanted.likelihoods,
        "metrics": wanted.metrics,
        "examples": wanted.examples,
        "checkpoint": which,
        "state": state,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// The cached scores of `dir` when they were computed for `key` (an unreadable or stale cache
/// is ignored: the entry is scored again).
fn cached_score(dir: &Path, key: &serde_json::Value, name: &str) -> Option<EntryReport> {
    let text = std::fs::read_to_string(dir.join(SCORE_CACHE)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    if v.get("key")? != key {
        return None;
    }
    let mut r: EntryReport = serde_json::from_value(v.get("entry")?.clone()).ok()?;
    r.name = name.to_string();
    r.run_dir = dir.to_path_buf();
    Some(r)
}

/// Keep `r` as the scores for `key` (atomically; a failure to write only loses the cache).
fn save_score(dir: &Path, key: &serde_json::Value, r: &EntryReport) {
    let v = serde_json::json!({ "key": key, "entry": r });
    let tmp = dir.join(format!("{SCORE_CACHE}.tmp"));
    let ok = serde_json::to_vec_pretty(&v)
        .ok()
        .map(|bytes| std::fs::write(&tmp, bytes).is_ok())
        .unwrap_or(false);
    if ok {
        let _ = std::fs::rename(&tmp, dir.join(SCORE_CACHE));
    }
}

/// Whether `dir`'s latest checkpoint ends the run: all steps done and evaluated, or stopped
/// early. `None` when there is no readable checkpoint.
fn finished_step(dir: &Path, steps: usize) -> Option<(usize, bool)> {
    let text = std::fs::read_to_string(dir.join("checkpoint").join("state.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let step = v["step"].as_u64()? as usize;
    let pending = v["eval_pending"].as_bool().unwrap_or(false);
    let early = v["stopped_early"].as_bool().unwrap_or(false);
    Some((step, early || (step >= steps && !pending)))
}

/// The run of an entry: reused when finished with the same config, resumed when unfinished
/// with the same config, refused when the config differs, created otherwise. Returns what
/// was done, for the report.
fn train_entry(cfg: &Config, dir: &Path, dev: &Device, quiet: bool) -> Result<String> {
    if dir.join("config.json").is_file() {
        let saved = Config::from_run_dir(dir)?;
        if &saved != cfg {
            bail!(
                "{} holds a run with a different config ({}); move it away, or use another \
                 --out, to train this entry afresh",
                dir.display(),
                config_diff(&saved, cfg)
            );
        }
        if let Some((step, true)) = finished_step(dir, cfg.train.steps) {
            if !dir.join("loss.png").exists() {
                plot_losses(dir)?;
            }
            return Ok(format!("reused (finished at step {step})"));
        }
        let mut t = Trainer::resume(dir, None, dev)
            .with_context(|| format!("cannot resume the run in {}", dir.display()))?;
        let from = t.step();
        t.run(!quiet)?;
        plot_losses(dir)?;
        return Ok(format!("resumed from step {from}"));
    }
    let mut t = Trainer::create(cfg.clone(), dir, dev)?;
    t.run(!quiet)?;
    plot_losses(dir)?;
    Ok("trained".into())
}

/// The dotted keys whose values differ between two configs (at most 4 shown).
fn config_diff(a: &Config, b: &Config) -> String {
    fn flat(prefix: &str, v: &serde_json::Value, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, x) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    flat(&p, x, out);
                }
            }
            _ => out.push((prefix.to_string(), v.to_string())),
        }
    }
    let (mut fa, mut fb) = (Vec::new(), Vec::new());
    flat("", &serde_json::to_value(a).unwrap_or_default(), &mut fa);
    flat("", &serde_json::to_value(b).unwrap_or_default(), &mut fb);
    let mb: std::collections::BTreeMap<_, _> = fb.into_iter().collect();
    let ma: std::collections::BTreeMap<_, _> = fa.into_iter().collect();
    let keys: std::collections::BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
    let diffs: Vec<String> = keys
        .into_iter()
        .filter(|k| ma.get(*k) != mb.get(*k))
        .map(|k| {
            let show = |m: &std::collections::BTreeMap<String, String>| {
                m.get(k).cloned().unwrap_or_else(|| "absent".into())
            };
            format!("{k}: {} there, {} in the suite", show(&ma), show(&mb))
        })
        .collect();
    let more = diffs.len().saturating_sub(4);
    let mut s = diffs.into_iter().take(4).collect::<Vec<_>>().join("; ");
    if more > 0 {
        s.push_str(&format!("; and {more} more"));
    }
    s
}

/// Score a trained run: every likelihood asked for, the sample metrics, samples (a PNG, or a
/// few texts), and its training figures.
fn score(
    name: &str,
    cfg: &Config,
    dir: &Path,
    wanted: &Wanted<'_>,
    dev: &Device,
) -> Result<EntryReport> {
    // the checkpoint chosen on the validation split when there is one
    let which = if dir.join("best").join("state.json").is_file() {
        CheckpointChoice::Best
    } else {
        CheckpointChoice::Latest
    };
    let run = LoadedRun::open(dir, which, true, dev)?;
    if let Some(why) = &run.data_changed {
        bail!("cannot evaluate {}: {why}", dir.display());
    }
    let mut rows = Vec::new();
    let mut metrics = Vec::new();
    for (i, l) in wanted.likelihoods.iter().enumerate() {
        let mut opts = EvalOptions {
            likelihood: l.clone(),
            ..run.config.eval.clone()
        };
        opts.metrics = if i == 0 {
            wanted.metrics.to_vec()
        } else {
            Vec::new()
        };
        opts.validate()?;
        opts.validate_likelihood(run.config.model.name())?;
        let resolved = elbo::model::likelihood_choice_among(
            &opts,
            run.model.family(),
            run.model.likelihoods(),
            run.model.opt_in_likelihoods(),
        )
        .map(str::to_string)
        .unwrap_or_else(|_| l.clone());
        let row = evaluate(&run, &opts, wanted.examples, 0)
            .with_context(|| format!("evaluating {resolved}"))?;
        if i == 0 {
            metrics = row.metrics.clone();
        }
        rows.push(LikelihoodRow::from_eval(&resolved, &row));
    }
    let text_samples = samples(&run, dir)?;
    let parameters = run
        .model
        .varmap()
        .all_vars()
        .iter()
        .map(|v| v.elem_count() as u64)
        .sum();
    Ok(EntryReport {
        name: name.to_string(),
        family: cfg.model.name().to_string(),
        data: run.data.name().to_string(),
        status: EntryStatus::Ok,
        error: None,
        provenance: String::new(),
        rows,
        metrics,
        steps: Some(run.step),
        train_seconds: train_seconds(dir),
        parameters: Some(parameters),
        entropy: run.data.entropy(),
        run_dir: dir.to_path_buf(),
        text_samples,
        config: serde_json::to_value(&run.config)?,
    })
}

/// Samples for the report: `samples.png` (2-D scatter over the data, or an image grid), or a
/// few decoded texts for language models.
fn samples(run: &LoadedRun, dir: &Path) -> Result<Vec<String>> {
    let so = &run.config.sample;
    let mut rng = Rng::new(0);
    if let Some(tok) = run.data.tokenizer() {
        let x = run.model.sample(3, so, &mut rng)?;
        let rows: Vec<Vec<f32>> = x.to_vec2()?;
        return Ok(rows
            .iter()
            .map(|r| tok.decode(&r.iter().map(|&v| v as u32).collect::<Vec<_>>()))
            .collect());
    }
    if run.data.dim() != 2 && run.data.image_shape().is_none() {
        // no picture of other data (a .npy of D != 2 columns): the metrics carry it
        return Ok(Vec::new());
    }
    let n = if run.data.dim() == 2 { 2000 } else { 64 };
    let info = elbo::model::DataInfo::of(run.data.as_ref());
    elbo::resources::check_sampling(&run.config, &info, n)?;
    let x = elbo::model::sample_chunked(run.model.as_ref(), n, so, &mut rng, so.batch_size, false)?;
    let flat: Vec<f32> = x.flatten_all()?.to_vec1()?;
    write_sample_plot(run, &flat, &dir.join("samples.png"))?;
    Ok(Vec::new())
}

/// Training wall time from `metrics.jsonl`: `elapsed_s` restarts at each resume, so the
/// segments' last values are summed.
fn train_seconds(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).ok()?;
    let (mut total, mut last) = (0.0, 0.0);
    let mut any = false;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(t) = v["elapsed_s"].as_f64() else {
            continue;
        };
        any = true;
        if t < last {
            total += last;
        }
        last = t;
    }
    any.then_some(total + last)
}
