//! `elbo train`, `elbo sample`, `elbo eval`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use elbo::config::{Config, EvalOptions};
use elbo::data::DataKind;
use elbo::eval::plot;
use elbo::eval::report::{LikelihoodReport, ReportRow};
use elbo::model::dataset_nll;
use elbo::train::{CheckpointChoice, LoadedRun, Trainer};
use elbo::Rng;

use crate::{DiffusionSampleArgs, EvalArgs, SampleArgs, TrainArgs};

/// Apply the diffusion sampler flags to sampling options.
fn apply_sampler_flags(opts: &mut elbo::config::SampleOptions, a: &DiffusionSampleArgs) {
    if let Some(s) = &a.sampler {
        opts.sampler = s.clone();
    }
    if let Some(s) = a.sample_steps {
        opts.steps = s;
    }
    if let Some(e) = a.eta {
        opts.eta = e;
    }
    if let Some(c) = a.churn {
        opts.churn = c;
    }
}

/// The compute device: CPU, or the first CUDA GPU when built with `--features cuda`.
pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::new_cuda(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

pub fn train(a: TrainArgs) -> Result<()> {
    let dev = device()?;
    if let Some(dir) = &a.resume {
        let mut t = Trainer::resume(dir, a.steps, &dev)
            .with_context(|| format!("cannot resume the run in {}", dir.display()))?;
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
    if let Some(m) = a.model {
        cfg.model.name = m;
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
    apply_sampler_flags(&mut cfg.sample, &a.diffusion);
    cfg.validate()?;
    let dir = a.out.unwrap_or_else(|| {
        let data = Path::new(&cfg.data.name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| cfg.data.name.clone());
        PathBuf::from("runs").join(format!("{}-{}", cfg.model.name, data))
    });
    let mut t = Trainer::create(cfg, &dir, &dev)?;
    eprintln!(
        "training {} on {} ({} dims) for {} steps -> {}",
        t.config().model.name,
        t.config().data.name,
        t.data().dim(),
        t.config().train.steps,
        dir.display()
    );
    let out = t.run(!a.quiet)?;
    finish_train(&dir, &out)
}

fn finish_train(dir: &Path, out: &elbo::train::TrainOutcome) -> Result<()> {
    let last = out.losses.last().map(|l| l.1).unwrap_or(f64::NAN);
    eprintln!(
        "done: step {}, last loss {:.4}, best held-out NLL {} ({:.1} s){}",
        out.steps,
        last,
        out.best_eval
            .map(|b| format!("{b:.4} nats"))
            .unwrap_or_else(|| "n/a".into()),
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
    let dev = device()?;
    let which = CheckpointChoice::parse(&a.checkpoint)?;
    let run = LoadedRun::open(&a.run, which, !a.no_ema, &dev)?;
    if a.n == 0 {
        bail!("-n must be at least 1");
    }
    let mut opts = run.config.sample.clone();
    if let Some(s) = a.solver {
        opts.solver = s;
    }
    if let Some(s) = a.steps {
        opts.steps = s;
    }
    apply_sampler_flags(&mut opts, &a.diffusion);
    let mut rng = Rng::new(a.seed);
    let t0 = std::time::Instant::now();
    let x = run.model.sample(a.n, &opts, &mut rng)?;
    let secs = t0.elapsed().as_secs_f64();
    let (n, d) = x.dims2()?;
    let flat: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let out = a.out.unwrap_or_else(|| a.run.join("samples.npy"));
    elbo::data::npy::write_npy(&out, &flat, &[n, d])?;
    let png = out.with_extension("png");
    write_sample_plot(&run, &flat, &png)?;
    eprintln!(
        "{n} samples ({}; {}) in {secs:.2} s -> {} and {}",
        run.label,
        if opts.sampler == "auto" {
            opts.solver.clone()
        } else {
            format!("sampler {}, {} steps", opts.sampler, opts.steps)
        },
        out.display(),
        png.display()
    );
    Ok(())
}

/// Data vs samples (2-D) or an image grid (image data) as PNG.
pub fn write_sample_plot(run: &LoadedRun, samples: &[f32], png: &Path) -> Result<()> {
    let dev = Device::Cpu;
    let d = run.data.dim();
    if d == 2 {
        let data: Vec<f32> = run.data.test_set(&dev)?.flatten_all()?.to_vec1()?;
        let title = format!(
            "{} on {}: data vs samples",
            run.config.model.name,
            run.data.name()
        );
        plot::scatter_compare(png, &data, samples, &title)?;
    } else if let Some((h, w)) = run.data.image_shape() {
        let n = (samples.len() / (h * w)).min(64);
        let vmax = match run.data.kind() {
            DataKind::Discrete { levels } => (levels - 1) as f32,
            DataKind::Continuous => 1.0,
        };
        plot::image_grid(png, &samples[..n * h * w], h, w, 8, 0.0, vmax, 4)?;
    }
    Ok(())
}

pub fn eval(a: EvalArgs) -> Result<()> {
    let dev = device()?;
    let which = CheckpointChoice::parse(&a.checkpoint)?;
    let run = LoadedRun::open(&a.run, which, !a.no_ema, &dev)?;
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
    let choices: Vec<String> = match &a.likelihood {
        Some(l) => l.split(',').map(|s| s.trim().to_string()).collect(),
        None => vec![opts.likelihood.clone()],
    };
    let mut rows = Vec::new();
    for c in choices {
        opts.likelihood = c;
        rows.push(evaluate(&run, &opts, a.examples, a.seed)?);
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
    Ok(ReportRow {
        model: run.config.model.name.clone(),
        dataset: run.data.name().to_string(),
        split: "test".into(),
        checkpoint: run.label.clone(),
        summary: nll.summary(),
        entropy: run.data.entropy(),
        method,
    })
}
