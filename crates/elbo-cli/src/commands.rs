//! `elbo train`, `elbo sample`, `elbo eval`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use elbo::config::{Config, EvalOptions};
use elbo::data::DataKind;
use elbo::eval::plot;
use elbo::eval::report::{LikelihoodReport, ReportRow};
use elbo::model::{dataset_nll, sample_chunked};
use elbo::train::{CheckpointChoice, LoadedRun, Trainer};
use elbo::Rng;

use crate::{DiffusionSampleArgs, EvalArgs, SampleArgs, TrainArgs};

/// The sampler flags as `--set` assignments: every family keeps its sampler and knobs in
/// `[model.sampling]`, so a flag a family does not have is an error naming the ones it has.
fn sampler_overrides(a: &DiffusionSampleArgs) -> Vec<String> {
    let mut v = Vec::new();
    if let Some(s) = &a.sampler {
        v.push(format!("model.sampling.sampler={}", toml_string(s)));
    }
    if let Some(s) = a.sample_steps {
        v.push(format!("sample.steps={s}"));
    }
    if let Some(e) = a.eta {
        v.push(format!("model.sampling.eta={e:?}"));
    }
    if let Some(c) = a.churn {
        v.push(format!("model.sampling.churn={c:?}"));
    }
    v
}

/// A string as a quoted TOML literal.
fn toml_string(s: &str) -> String {
    format!("{:?}", s)
}

/// The compute device: `ELBO_DEVICE` (`cpu`, `cuda`, `cuda:N`), by default the first CUDA GPU
/// when built with `--features cuda` and the CPU otherwise ([`crate::cuda_libs::device`]).
pub fn device() -> Result<Device> {
    crate::cuda_libs::device()
}

pub fn train(a: TrainArgs) -> Result<()> {
    crate::flags::check_train(&a)?;
    let dev = device()?;
    if let Some(dir) = &a.resume {
        let mut t = Trainer::resume(dir, a.steps, &dev)
            .with_context(|| format!("cannot resume the run in {}", dir.display()))?;
        print_notes(&t);
        eprintln!(
            "resuming {} at step {} of {}",
            dir.display(),
            t.step(),
            t.config().train.steps
        );
        let out = t.run(!a.quiet)?;
        return finish_train(dir, &out);
    }
    let mut cfg = match &a.config {
        Some(p) => Config::from_toml_file(p)?,
        None => Config::default(),
    };
    if let Some(m) = &a.model {
        cfg.set(&format!("model.name={}", toml_string(m)))?;
    }
    if let Some(d) = a.data {
        cfg.data.name = d;
    }
    if let Some(s) = a.steps {
        cfg.train.steps = s;
        cfg.train.eval_every = cfg.train.eval_every.min(s);
        cfg.train.checkpoint_every = cfg.train.checkpoint_every.min(s);
    }
    if let Some(b) = a.batch_size {
        cfg.train.batch_size = b;
    }
    if let Some(lr) = a.lr {
        cfg.train.lr = lr;
    }
    if let Some(s) = a.seed {
        cfg.train.seed = s;
    }
    cfg.set_all(&sampler_overrides(&a.diffusion))?;
    cfg.set_all(&a.set)?;
    cfg.validate()?;
    let dir = a.out.unwrap_or_else(|| {
        let data = Path::new(&cfg.data.name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| cfg.data.name.clone());
        PathBuf::from("runs").join(format!("{}-{}", cfg.model.name(), data))
    });
    let mut t = if a.force {
        Trainer::create_replacing(cfg, &dir, &dev)?
    } else {
        Trainer::create(cfg, &dir, &dev)?
    };
    print_notes(&t);
    eprintln!(
        "training {} on {} ({} dims) for {} steps -> {}",
        t.config().model.name(),
        t.config().data.name,
        t.data().dim(),
        t.config().train.steps,
        dir.display()
    );
    let out = t.run(!a.quiet)?;
    finish_train(&dir, &out)
}

/// What opening the run directory did (a stale lock, leftovers of a crash, a restart).
fn print_notes(t: &Trainer) {
    for n in t.notes() {
        eprintln!("note: {n}");
    }
}

fn finish_train(dir: &Path, out: &elbo::train::TrainOutcome) -> Result<()> {
    let Some(last) = out.losses.last().map(|l| l.1) else {
        if out.stopped_early {
            eprintln!(
                "nothing to do: the run in {} stopped early at step {}",
                dir.display(),
                out.steps
            );
        } else {
            eprintln!(
                "nothing to do: the run in {} already has {} steps (extend it with --steps N)",
                dir.display(),
                out.steps
            );
        }
        // a run killed while plotting gets its plot back
        plot_losses(dir)?;
        return Ok(());
    };
    let best = match (out.best_eval, out.selected_by.as_str()) {
        (None, _) => "n/a".to_string(),
        (Some(b), "nll") => format!("{b:.4} nats"),
        (Some(b), metric) => format!("{b:.5} ({metric})"),
    };
    eprintln!(
        "done: step {}, last loss {:.4}, best validation score {best} ({:.1} s){}",
        out.steps,
        last,
        out.seconds,
        if out.stopped_early {
            ", stopped early"
        } else {
            ""
        }
    );
    plot_losses(dir)?;
    eprintln!(
        "next: elbo eval --run {0}   |   elbo sample --run {0}",
        dir.display()
    );
    Ok(())
}

/// Loss curve PNG from a run's metrics.jsonl.
pub fn plot_losses(dir: &Path) -> Result<()> {
    let path = dir.join("metrics.jsonl");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut train = Vec::new();
    let mut eval = Vec::new();
    for line in text.lines() {
        let v: serde_json::Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) => continue,
        };
        let Some(step) = v["step"].as_f64() else {
            continue;
        };
        if let Some(l) = v["loss"].as_f64() {
            train.push((step, l));
        }
        if let Some(e) = v["eval_nll"].as_f64() {
            eval.push((step, e));
        }
    }
    if train.is_empty() {
        return Ok(());
    }
    plot::loss_curve(
        &dir.join("loss.png"),
        &train,
        &eval,
        "training loss and held-out NLL (EMA weights)",
        "train: model loss / held-out: NLL (nats)",
    )?;
    Ok(())
}

pub fn sample(a: SampleArgs) -> Result<()> {
    crate::flags::check_sample(&a)?;
    let dev = device()?;
    let which = CheckpointChoice::parse(&a.checkpoint)?;
    let mut overrides = sampler_overrides(&a.diffusion);
    for (key, v) in [("temperature", a.temperature), ("top_p", a.top_p)] {
        if let Some(v) = v {
            overrides.push(format!("model.sampling.{key}={v:?}"));
        }
    }
    for (key, v) in [("top_k", a.top_k), ("block_len", a.block_len)] {
        if let Some(v) = v {
            overrides.push(format!("model.sampling.{key}={v}"));
        }
    }
    if let Some(s) = &a.solver {
        overrides.push(format!("sample.solver={}", toml_string(s)));
    }
    if let Some(s) = a.steps {
        overrides.push(format!("sample.steps={s}"));
    }
    overrides.extend(a.set.iter().cloned());
    let run = LoadedRun::open_with(&a.run, which, !a.no_ema, &dev, &overrides)?;
    if let Some(why) = &run.data_changed {
        eprintln!("warning: {why}");
    }
    let tokenizer = run.data.tokenizer().cloned();
    let n_samples = a.n.unwrap_or(if tokenizer.is_some() { 4 } else { 2000 });
    if n_samples == 0 {
        bail!("-n must be at least 1");
    }
    let opts = run.config.sample.clone();
    let mut rng = Rng::new(a.seed);
    let t0 = std::time::Instant::now();
    let info = elbo::model::DataInfo::of(run.data.as_ref());
    elbo::resources::check_sampling(&run.config, &info, n_samples)?;
    let chunk = opts.batch_size;
    let x = match (&a.prompt, &tokenizer) {
        (Some(p), Some(tok)) => {
            let template = prompt_template(p, tok, run.data.dim())?;
            elbo::model::in_chunks(n_samples, chunk, true, |m| {
                run.model.sample_conditional(m, &template, &opts, &mut rng)
            })?
        }
        (Some(_), None) => bail!("--prompt needs a text data set (shakespeare or a .txt file)"),
        (None, _) => sample_chunked(run.model.as_ref(), n_samples, &opts, &mut rng, chunk, true)?,
    };
    let secs = t0.elapsed().as_secs_f64();
    if let Some(tok) = &tokenizer {
        let rows: Vec<Vec<f32>> = x.to_vec2()?;
        let mut all = String::new();
        for (i, r) in rows.iter().enumerate() {
            let ids: Vec<u32> = r.iter().map(|&v| v as u32).collect();
            let text = tok.decode(&ids);
            println!("--- sample {} ---\n{text}", i + 1);
            all.push_str(&format!("--- sample {} ---\n{text}\n", i + 1));
        }
        let txt = a.run.join("samples.txt");
        elbo::atomic_file::write(&txt, all.as_bytes())?;
        eprintln!("wrote {}", txt.display());
    }
    let (n, d) = x.dims2()?;
    let flat: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let out = a.out.clone().unwrap_or_else(|| a.run.join("samples.npy"));
    let png = out.with_extension("png");
    if a.out.is_some() && !a.force {
        // the default files in the run are elbo's own; a path the user chose may hold data
        for p in [&out, &png] {
            if p.exists() {
                bail!(
                    "{} exists; elbo does not overwrite a file it was pointed at: choose another \
                     --out, or add --force to replace it",
                    p.display()
                );
            }
        }
    }
    elbo::data::npy::write_npy(&out, &flat, &[n, d])?;
    let wrote_png = write_sample_plot(&run, &flat, &png)?;
    let method = run.model.sampling(&opts);
    let files = if wrote_png {
        format!("{} and {}", out.display(), png.display())
    } else {
        out.display().to_string()
    };
    eprintln!(
        "{n} samples ({}; {method}) in {secs:.2} s -> {files}",
        run.label
    );
    Ok(())
}

/// A prompt as a template of `len` positions: `_` is a blank (None), other characters are
/// fixed tokens; the positions after the prompt are generated.
pub fn prompt_template(
    prompt: &str,
    tok: &elbo::data::text::Tokenizer,
    len: usize,
) -> Result<Vec<Option<u32>>> {
    let mut t = Vec::with_capacity(len);
    for part in prompt.split('_').enumerate() {
        if part.0 > 0 {
            t.push(None);
        }
        t.extend(tok.encode(part.1)?.into_iter().map(Some));
    }
    if t.len() > len {
        bail!(
            "the prompt has {} tokens but the model generates {len} (data.seq_len)",
            t.len()
        );
    }
    t.resize(len, None);
    Ok(t)
}

/// Data vs samples (2-D) or an image grid (image data) as PNG; returns whether a PNG was
/// written (other data, e.g. text, gets none).
pub fn write_sample_plot(run: &LoadedRun, samples: &[f32], png: &Path) -> Result<bool> {
    let dev = Device::Cpu;
    let d = run.data.dim();
    if d == 2 {
        let data: Vec<f32> = run.data.test_set(&dev)?.flatten_all()?.to_vec1()?;
        let title = format!(
            "{} on {}: data vs samples",
            run.config.model.name(),
            run.data.name()
        );
        plot::scatter_compare(png, &data, samples, &title)?;
        return Ok(true);
    }
    if let Some((h, w)) = run.data.image_shape() {
        let n = (samples.len() / (h * w)).min(64);
        let vmax = match run.data.kind() {
            DataKind::Discrete { levels } => (levels - 1) as f32,
            DataKind::Continuous => 1.0,
        };
        plot::image_grid(png, &samples[..n * h * w], h, w, 8, 0.0, vmax, 4)?;
        return Ok(true);
    }
    Ok(false)
}

pub fn eval(a: EvalArgs) -> Result<()> {
    crate::flags::check_eval(&a)?;
    let dev = device()?;
    let which = CheckpointChoice::parse(&a.checkpoint)?;
    let run = LoadedRun::open(&a.run, which, !a.no_ema, &dev)?;
    if let Some(why) = &run.data_changed {
        bail!("cannot evaluate {}: {why}", a.run.display());
    }
    let mut opts = run.config.eval.clone();
    if let Some(v) = a.divergence {
        opts.divergence = v;
    }
    if let Some(v) = a.probes {
        opts.probes = v;
    }
    if let Some(v) = a.solver {
        opts.solver = v;
    }
    if let Some(v) = a.rtol {
        opts.rtol = v;
    }
    if let Some(v) = a.atol {
        opts.atol = v;
    }
    if let Some(v) = a.ode_steps {
        opts.steps = v;
    }
    if let Some(v) = a.lm_samples {
        opts.lm_samples = v;
    }
    if let Some(v) = a.importance_samples {
        opts.importance_samples = v;
    }
    if let Some(v) = a.ais_chains {
        opts.ais_chains = v;
    }
    if let Some(v) = a.ais_steps {
        opts.ais_steps = v;
    }
    if let Some(v) = a.ais_leapfrog {
        opts.ais_leapfrog = v;
    }
    if let Some(v) = a.prompt_len {
        opts.prompt_len = v;
    }
    if let Some(m) = &a.metrics {
        opts.metrics = m.split(',').map(|s| s.trim().to_string()).collect();
        for name in &opts.metrics {
            elbo::eval::sample_metric::metric_by_name(name)?;
        }
    }
    if let Some(n) = a.metric_samples {
        if n == 0 {
            bail!("--metric-samples must be at least 1");
        }
        opts.metric_samples = n;
    }
    let choices: Vec<String> = match &a.likelihood {
        Some(l) => l.split(',').map(|s| s.trim().to_string()).collect(),
        None => vec![opts.likelihood.clone()],
    };
    // the final options, each likelihood, checked before any is computed
    opts.validate()?;
    for c in &choices {
        let o = EvalOptions {
            likelihood: c.clone(),
            ..opts.clone()
        };
        o.validate_likelihood(run.config.model.name())?;
    }
    if let Some(path) = &a.score {
        for c in choices {
            opts.likelihood = c;
            score_file(&run, &opts, path, a.seed)?;
        }
        return Ok(());
    }
    let mut rows = Vec::new();
    for c in choices {
        opts.likelihood = c;
        let row = evaluate(&run, &opts, a.examples, a.seed)?;
        if run.data.tokenizer().is_some() {
            let s = &row.summary;
            let scored = match opts.prompt_len {
                0 => format!("windows of {} characters", s.dims),
                p => format!(
                    "windows: the last {} characters given the first {p}",
                    s.dims
                ),
            };
            println!(
                "{}: {:.4} ± {:.4} bits/char ({}) on {} held-out {scored}",
                row.model,
                s.bits_per_dim,
                s.stderr_bits_per_dim,
                s.kind.label(),
                s.n,
            );
        }
        rows.push(row);
    }
    let report = LikelihoodReport {
        title: format!("Held-out likelihood of {}", a.run.display()),
        rows,
    };
    report.write(&a.run, "report")?;
    println!("{}", report.to_terminal());
    eprintln!("wrote {0}/report.json and {0}/report.md", a.run.display());
    Ok(())
}

/// `elbo eval --score FILE`: the run's likelihood of the rows of an `.npy` file, in bits per
/// dimension (per character for text), with its standard error over the rows.
fn score_file(run: &LoadedRun, opts: &EvalOptions, path: &Path, seed: u64) -> Result<()> {
    let (vals, shape) = elbo::data::npy::read_npy(path)?;
    let d = run.data.dim();
    if shape.len() != 2 || shape[1] != d {
        bail!(
            "{}: shape {shape:?}, but the run models examples of {d} values: give an [n, {d}] \
             array (elbo sample --out FILE.npy writes one)",
            path.display()
        );
    }
    let n = shape[0];
    if n == 0 {
        bail!("{}: no rows to score", path.display());
    }
    let x = candle_core::Tensor::from_vec(vals, (n, d), run.model.device())?; // [n, D]
    let mut rng = Rng::new(seed);
    let (mut nats, mut kind, mut dims) = (Vec::with_capacity(n), None, d);
    for start in (0..n).step_by(opts.batch_size.max(1)) {
        let len = opts.batch_size.max(1).min(n - start);
        let nll = run
            .model
            .log_likelihood(&x.narrow(0, start, len)?, opts, &mut rng)?;
        nats.extend(nll.nats);
        kind = Some(nll.kind);
        dims = nll.dims;
    }
    let (mean, se) = elbo::likelihood::mean_stderr(&nats);
    let bits = mean / (dims as f64 * std::f64::consts::LN_2);
    let se_bits = se / (dims as f64 * std::f64::consts::LN_2);
    let unit = if run.data.tokenizer().is_some() {
        "bits/char"
    } else {
        "bits/dim"
    };
    println!(
        "{} ({}) scores the {n} rows of {}: {bits:.4} ± {se_bits:.4} {unit} ({})",
        run.config.model.name(),
        opts.likelihood,
        path.display(),
        kind.map_or("none", |k| k.label())
    );
    Ok(())
}

/// Evaluate a loaded run on (the first `examples` of) its held-out set.
pub fn evaluate(
    run: &LoadedRun,
    opts: &EvalOptions,
    examples: Option<usize>,
    seed: u64,
) -> Result<ReportRow> {
    let dev = run.model.device().clone();
    let test = run.data.test_set(&dev)?;
    let n = examples.unwrap_or(usize::MAX).min(test.dim(0)?);
    if n == 0 {
        bail!("--examples must be at least 1");
    }
    let test = test.narrow(0, 0, n)?;
    let mut rng = Rng::new(seed);
    let t0 = std::time::Instant::now();
    let nll = dataset_nll(run.model.as_ref(), &test, opts, &mut rng)?;
    let method = format!(
        "{} ({:.1} s)",
        run.model.likelihood_method(opts),
        t0.elapsed().as_secs_f64()
    );
    let metrics = if opts.metrics.is_empty() {
        Vec::new()
    } else {
        let m = opts.metric_samples.min(n);
        let mut srng = Rng::new(seed).fork(1);
        let so = &run.config.sample;
        let info = elbo::model::DataInfo::of(run.data.as_ref());
        elbo::resources::check_sampling(&run.config, &info, m)?;
        let samples = sample_chunked(run.model.as_ref(), m, so, &mut srng, so.batch_size, true)?;
        let samples: Vec<f32> = samples.flatten_all()?.to_vec1()?;
        let held: Vec<f32> = test.narrow(0, 0, m)?.flatten_all()?.to_vec1()?;
        elbo::eval::sample_metric::compute_all(
            &opts.metrics,
            &samples,
            &held,
            run.model.dim(),
            &mut srng,
        )?
    };
    Ok(ReportRow {
        model: run.config.model.name().to_string(),
        dataset: run.data.name().to_string(),
        split: "test".into(),
        checkpoint: run.label.clone(),
        summary: nll.summary(),
        entropy: run.data.entropy(),
        method,
        metrics,
    })
}
