//! A run directory is never lost: one trainer at a time (the lock), no new run over any part of
//! an old one, leftovers of a crash cleaned or restored, the checkpoint written before each
//! evaluation, divergence keeping the last finite checkpoint, the data file fingerprinted, and
//! readers that see one whole checkpoint while a trainer replaces it.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{Device, Tensor};
use elbo::config::Config;
use elbo::model::{DataInfo, GenerativeModel, ModelCore};
use elbo::train::run_dir::{self, DataFingerprint, RunLock};
use elbo::train::step::{StepContext, StepOutput};
use elbo::train::{checkpoint, CheckpointChoice, LoadedRun, Trainer};
use elbo::{Error, Rng};

fn tiny(steps: usize) -> Config {
    let mut c = Config::default();
    c.data.name = "8gaussians".into();
    c.data.test_size = 200;
    c.data.val_size = 100;
    c.set("model.net.hidden=16").unwrap();
    c.set("model.net.layers=2").unwrap();
    c.train.steps = steps;
    c.train.batch_size = 64;
    c.train.warmup_steps = 2;
    c.train.eval_every = 0;
    c.train.eval_examples = 50;
    c.train.checkpoint_every = 5;
    c.train.log_every = 1;
    c.set("eval.solver=\"heun\"").unwrap();
    c.eval.steps = 4;
    c
}

fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn loss_lines(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("elapsed_s");
            v.to_string()
        })
        .collect()
}

#[test]
fn a_new_run_refuses_any_part_of_an_old_one_and_force_replaces_it() {
    let dev = Device::Cpu;
    for part in ["checkpoint.old", "best", "metrics.jsonl", "config.json"] {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(part);
        if part.contains('.') && !part.starts_with("checkpoint") {
            fs::write(&p, b"{}\n").unwrap();
        } else {
            fs::create_dir(&p).unwrap();
            fs::write(p.join("state.json"), b"precious").unwrap();
        }
        let e = Trainer::create(tiny(3), d.path(), &dev).err().unwrap();
        let msg = e.to_string();
        assert!(matches!(e, Error::RunDir(_)), "{msg}");
        for needle in [part, "--resume", "--force"] {
            assert!(msg.contains(needle), "'{needle}' missing from: {msg}");
        }
        // nothing was touched
        assert!(p.exists(), "{part} was removed");
        // --force replaces the run but keeps files that are not part of one
        fs::write(d.path().join("notes.txt"), b"mine").unwrap();
        Trainer::create_replacing(tiny(3), d.path(), &dev)
            .unwrap()
            .run(false)
            .unwrap();
        assert_eq!(fs::read(d.path().join("notes.txt")).unwrap(), b"mine");
        assert!(!d.path().join("checkpoint.old").exists());
        assert!(d.path().join("checkpoint/state.json").exists());
    }
    // unrelated files alone do not make a run
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("data.csv"), b"1,2\n").unwrap();
    Trainer::create(tiny(2), d.path(), &dev).unwrap();
}

#[test]
fn one_trainer_per_directory_and_a_dead_owner_is_taken_over() {
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    let mut t = Trainer::create(tiny(10), d.path(), &dev).unwrap();
    t.run_until(5, false).unwrap();
    // a second trainer, fresh or resuming, is refused while the first lives
    let e = Trainer::resume(d.path(), None, &dev).err().unwrap();
    assert!(e.to_string().contains("in use"), "{e}");
    assert!(
        e.to_string().contains(&std::process::id().to_string()),
        "{e}"
    );
    let e = Trainer::create_replacing(tiny(10), d.path(), &dev)
        .err()
        .unwrap();
    assert!(e.to_string().contains("in use"), "{e}");
    assert_eq!(RunLock::holder(d.path()), Some(std::process::id()));
    drop(t);
    assert_eq!(RunLock::holder(d.path()), None);
    // a lock file naming a process that died (kill -9 leaves its pid) is taken over
    fs::write(d.path().join("lock"), b"4194999\n").unwrap();
    let t = Trainer::resume(d.path(), None, &dev).unwrap();
    assert!(
        t.notes().iter().any(|n| n.contains("4194999")),
        "{:?}",
        t.notes()
    );
}

#[test]
fn leftovers_of_a_crash_are_cleaned_and_an_interrupted_save_is_restored() {
    let dev = Device::Cpu;
    let full = tempfile::tempdir().unwrap();
    Trainer::create(tiny(20), full.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();

    let d = tempfile::tempdir().unwrap();
    Trainer::create(tiny(20), d.path(), &dev)
        .unwrap()
        .run_until(10, false)
        .unwrap();
    // a crash between the two renames of a save leaves only checkpoint.old, plus the
    // temporaries of dead writers (pid 4194999 does not exist)
    fs::rename(d.path().join("checkpoint"), d.path().join("checkpoint.old")).unwrap();
    fs::create_dir(d.path().join("checkpoint.tmp-4194999")).unwrap();
    fs::write(d.path().join("samples.tmp-4194999.npy"), b"half").unwrap();
    // and a metrics line cut short
    let mut m = fs::read(d.path().join("metrics.jsonl")).unwrap();
    m.extend_from_slice(b"{\"step\": 11, \"lo");
    fs::write(d.path().join("metrics.jsonl"), m).unwrap();

    // a fresh run must not destroy it
    let e = Trainer::create(tiny(20), d.path(), &dev).err().unwrap();
    assert!(e.to_string().contains("checkpoint.old"), "{e}");

    let mut t = Trainer::resume(d.path(), None, &dev).unwrap();
    assert_eq!(t.step(), 10);
    let notes = t.notes().join("\n");
    assert!(notes.contains("restored checkpoint/"), "{notes}");
    assert!(notes.contains("checkpoint.tmp-4194999"), "{notes}");
    t.run(false).unwrap();
    drop(t);
    assert_eq!(
        names(d.path()),
        ["best", "checkpoint", "config.json", "lock", "metrics.jsonl"]
    );
    for sub in ["checkpoint", "best"] {
        assert_eq!(
            file_bytes(&d.path().join(sub)),
            file_bytes(&full.path().join(sub))
        );
    }
    assert_eq!(loss_lines(d.path()), loss_lines(full.path()));
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_step_zero() {
    let dev = Device::Cpu;
    let full = tempfile::tempdir().unwrap();
    Trainer::create(tiny(8), full.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    drop(Trainer::create(tiny(8), d.path(), &dev).unwrap());
    assert!(!d.path().join("checkpoint").exists());
    let mut t = Trainer::resume(d.path(), None, &dev).unwrap();
    assert_eq!(t.step(), 0);
    assert!(t.notes().iter().any(|n| n.contains("step 0")));
    t.run(false).unwrap();
    assert_eq!(
        file_bytes(&d.path().join("checkpoint")),
        file_bytes(&full.path().join("checkpoint"))
    );
}

#[test]
fn an_evaluation_over_budget_is_reported_and_training_keeps_its_checkpoints() {
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    let mut cfg = tiny(12);
    cfg.train.eval_every = 4;
    cfg.train.checkpoint_every = 100;
    cfg.train.eval_budget_s = 1e-9;
    let out = Trainer::create(cfg, d.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    assert_eq!(out.steps, 12);
    assert!(out.evals.is_empty(), "{:?}", out.evals);
    let m = fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    let errors: Vec<&str> = m.lines().filter(|l| l.contains("eval_error")).collect();
    assert_eq!(errors.len(), 3, "{m}");
    assert!(errors[0].contains("time budget"), "{}", errors[0]);
    // the final checkpoint was written even though the final evaluation failed; no best/
    let l = checkpoint::load(&d.path().join("checkpoint"), &dev).unwrap();
    assert_eq!(l.state["step"], 12);
    assert_eq!(l.state["eval_pending"], false);
    assert!(!d.path().join("best").exists());
}

#[test]
fn the_checkpoint_of_an_evaluation_step_is_written_before_the_evaluation() {
    // a run killed during step 4's evaluation (its checkpoint written, marked pending, best/
    // not yet written) evaluates step 4 first when resumed and ends bit-identical to an
    // uninterrupted run, best/ and metrics included
    let dev = Device::Cpu;
    let mut cfg = tiny(8);
    cfg.train.eval_every = 4;
    cfg.train.checkpoint_every = 100;
    let full = tempfile::tempdir().unwrap();
    Trainer::create(cfg.clone(), full.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    Trainer::create(cfg, d.path(), &dev)
        .unwrap()
        .run_until(4, false)
        .unwrap();
    let l = checkpoint::load(&d.path().join("checkpoint"), &dev).unwrap();
    assert_eq!(l.state["step"], 4);
    assert_eq!(l.state["eval_pending"], true);
    fs::remove_dir_all(d.path().join("best")).unwrap();
    let mut t = Trainer::resume(d.path(), None, &dev).unwrap();
    let out = t.run(false).unwrap();
    assert_eq!(out.evals.first().map(|e| e.0), Some(4), "{:?}", out.evals);
    drop(t);
    for sub in ["checkpoint", "best"] {
        assert_eq!(
            file_bytes(&d.path().join(sub)),
            file_bytes(&full.path().join(sub)),
            "{sub}/ differs"
        );
    }
    assert_eq!(loss_lines(d.path()), loss_lines(full.path()));
}

/// A tiny model whose training step poisons one weight with NaN at step `poison_at` while
/// reporting a finite loss: the weights explode before the loss does.
struct Poisoned {
    core: ModelCore,
    poison_at: usize,
}

impl GenerativeModel for Poisoned {
    fn family(&self) -> &'static str {
        "poisoned"
    }
    fn core(&self) -> &ModelCore {
        &self.core
    }
    fn loss(&self, batch: &Tensor, _rng: &mut Rng) -> elbo::Result<Tensor> {
        let w = self.core.varmap.all_vars()[0].as_tensor().clone();
        Ok(batch.broadcast_sub(&w)?.sqr()?.mean_all()?)
    }
    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> elbo::Result<StepOutput> {
        let batch = ctx.batch()?;
        let loss = self.loss(&batch, ctx.rng())?;
        let out = ctx.minimize(elbo::model::DEFAULT_GROUP, &loss)?;
        if ctx.step() + 1 == self.poison_at {
            let v = &self.core.varmap.all_vars()[0];
            v.set(&Tensor::full(f32::NAN, v.shape(), v.device())?)?;
        }
        Ok(out)
    }
    fn likelihoods(&self) -> &'static [&'static str] {
        &[]
    }
    fn sampling(&self, _: &elbo::config::SampleOptions) -> String {
        "none".into()
    }
    fn sample(
        &self,
        n: usize,
        _: &elbo::config::SampleOptions,
        rng: &mut Rng,
    ) -> elbo::Result<Tensor> {
        rng.normal_tensor(&[n, self.core.dim], &self.core.device)
    }
    fn log_likelihood(
        &self,
        _: &Tensor,
        _: &elbo::config::EvalOptions,
        _: &mut Rng,
    ) -> elbo::Result<elbo::Nll> {
        Err(Error::Config("no likelihood".into()))
    }
    fn likelihood_method(&self, _: &elbo::config::EvalOptions) -> String {
        "none".into()
    }
}

#[test]
fn divergence_keeps_the_last_checkpoint_with_finite_weights() {
    divergence_case(false);
}

/// With deferred reads (the default on GPU devices) the NaN loss of step 8 is found at the read
/// of step 10 (a checkpoint step; logs every 25 steps), and reported at step 8 all the same.
#[test]
fn deferred_reads_report_the_step_a_loss_went_bad_at() {
    divergence_case(true);
}

fn divergence_case(defer: bool) {
    let dev = Device::Cpu;
    // poisoned at step 10, a checkpoint step: the loss was still finite, the weights not
    // (Error::Diverged); poisoned at step 7: the loss of step 8 is NaN (Error::NonFiniteLoss).
    // Either way step 5's checkpoint, with finite weights, is what stays on disk.
    for (poison_at, fails_at) in [(10, 10), (7, 8)] {
        let build = move |info: &DataInfo, dev: &Device, _: &mut Rng| {
            let core = ModelCore::new(info.dim, dev);
            let init = candle_nn::Init::Const(0.0);
            core.varmap
                .get((1, info.dim), "w", init, candle_core::DType::F32, dev)?;
            Ok(Box::new(Poisoned { core, poison_at }) as Box<dyn GenerativeModel>)
        };
        let d = tempfile::tempdir().unwrap();
        let mut cfg = tiny(20);
        cfg.train.select_by = "mmd".into();
        if defer {
            cfg.train.log_every = 25;
        }
        let mut t = Trainer::create_with(cfg, d.path(), &dev, Some(&build)).unwrap();
        t.set_deferred_reads(defer);
        let e = t.run(false).err().unwrap();
        let msg = e.to_string();
        match e {
            Error::Diverged { step, .. } => {
                assert_eq!((poison_at, step), (10, fails_at));
                assert!(msg.contains("parameter 'w'"), "{msg}");
            }
            Error::NonFiniteLoss { step, .. } => assert_eq!((poison_at, step), (7, fails_at)),
            other => panic!("unexpected error {other}"),
        }
        assert!(msg.contains("finite weights (step 5"), "{msg}");
        let l = checkpoint::load(&d.path().join("checkpoint"), &dev).unwrap();
        assert_eq!(l.state["step"], 5);
        let w: Vec<f32> = l.files["model"]["w"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(w.iter().all(|x| x.is_finite()));
    }
}

#[test]
fn a_changed_data_file_is_named_on_resume_and_evaluation() {
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    let csv = d.path().join("points.csv");
    let rows: String = (0..60)
        .map(|i| format!("{},{}\n", (i as f32 * 0.37).sin(), (i as f32 * 0.11).cos()))
        .collect();
    fs::write(&csv, &rows).unwrap();
    let run = d.path().join("run");
    let mut cfg = tiny(5);
    cfg.data.name = csv.display().to_string();
    Trainer::create(cfg, &run, &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let recorded: DataFingerprint =
        serde_json::from_slice(&fs::read(run.join(run_dir::DATA_FILE)).unwrap()).unwrap();
    assert_eq!(recorded.bytes, rows.len() as u64);
    assert!(LoadedRun::open(&run, CheckpointChoice::Latest, true, &dev)
        .unwrap()
        .data_changed
        .is_none());
    // one value edited: same size, different hash
    fs::write(&csv, rows.replacen('0', "1", 1)).unwrap();
    let e = Trainer::resume(&run, Some(10), &dev).err().unwrap();
    assert!(
        e.to_string().contains("changed since this run started"),
        "{e}"
    );
    assert!(e.to_string().contains("points.csv"), "{e}");
    let r = LoadedRun::open(&run, CheckpointChoice::Latest, true, &dev).unwrap();
    assert!(r.data_changed.unwrap().contains("points.csv"));
    // a different shape would not even build the model: the error still says why
    fs::write(&csv, "1,2,3\n4,5,6\n7,8,9\n1,1,1\n2,2,2\n").unwrap();
    let e = LoadedRun::open(&run, CheckpointChoice::Latest, true, &dev)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("changed since this run started"),
        "{e}"
    );
    // restored, all is well again
    fs::write(&csv, &rows).unwrap();
    Trainer::resume(&run, Some(10), &dev)
        .unwrap()
        .run(false)
        .unwrap();
}

#[test]
fn readers_see_whole_checkpoints_while_a_trainer_replaces_them() {
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    let mut t = Trainer::create(tiny(10), d.path(), &dev).unwrap();
    t.run_until(5, false).unwrap();
    // the trainer (holding the lock) keeps replacing checkpoint/ while readers load it
    let ck = d.path().join("checkpoint");
    let loaded = checkpoint::load(&ck, &dev).unwrap();
    let files: HashMap<String, HashMap<String, Tensor>> = loaded.files;
    let state = loaded.state;
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            for _ in 0..400 {
                let f: Vec<(&str, &HashMap<String, Tensor>)> =
                    files.iter().map(|(k, v)| (k.as_str(), v)).collect();
                checkpoint::save(&ck, &f, &state).unwrap();
            }
        });
        let (mut reads, mut raw_failures) = (0, 0);
        while !writer.is_finished() || reads < 5 {
            // a plain read can catch the swap; the run's reader retries until it is whole
            if checkpoint::load(&ck, &dev).is_err() {
                raw_failures += 1;
            }
            let r = LoadedRun::open(d.path(), CheckpointChoice::Latest, true, &dev);
            assert!(r.is_ok(), "a reader saw a broken checkpoint: {:?}", r.err());
            reads += 1;
        }
        eprintln!("{reads} reads, {raw_failures} plain reads caught a save half-done");
    });
    drop(t);
}

#[test]
fn a_hand_edited_state_json_is_refused() {
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    Trainer::create(tiny(10), d.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let p = d.path().join("checkpoint/state.json");
    let text = fs::read_to_string(&p).unwrap();
    assert!(text.contains("\"step\": 10"), "{text}");
    fs::write(&p, text.replace("\"step\": 10", "\"step\": 3")).unwrap();
    let e = Trainer::resume(d.path(), Some(20), &dev).err().unwrap();
    assert!(e.to_string().contains("edited by hand"), "{e}");
    assert!(e.to_string().contains("state.json"), "{e}");
    // unchanged (re-indented) JSON still loads: the hash is over the values, not the layout
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    let t = Trainer::resume(d.path(), Some(20), &dev).unwrap();
    assert_eq!(t.step(), 10);
}

#[test]
fn a_run_that_stopped_early_stays_stopped_when_resumed() {
    let dev = Device::Cpu;
    let mut cfg = tiny(400);
    cfg.train.eval_every = 5;
    cfg.train.patience = 1;
    cfg.train.lr = 0.3;
    let d = tempfile::tempdir().unwrap();
    let out = Trainer::create(cfg, d.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    assert!(out.stopped_early && out.steps < 400, "{out:?}");
    let before = file_bytes(&d.path().join("checkpoint"));
    let again = Trainer::resume(d.path(), None, &dev)
        .unwrap()
        .run(false)
        .unwrap();
    assert!(again.stopped_early);
    assert_eq!(again.steps, out.steps);
    assert!(again.losses.is_empty());
    assert_eq!(file_bytes(&d.path().join("checkpoint")), before);
}

#[test]
fn checkpoint_state_floats_read_back_exactly_and_pass_the_state_hash() {
    // floats the fast default JSON parser may read 1 ulp off
    let dev = Device::Cpu;
    let d = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(7);
    let floats: Vec<f64> = (0..2000)
        .map(|i| rng.uniform() * 10f64.powi(i % 40 - 20) / 3.0)
        .collect();
    let state = serde_json::json!({ "step": 1, "floats": floats });
    let files: HashMap<String, Tensor> = HashMap::new();
    checkpoint::save(&d.path().join("ck"), &[("model", &files)], &state).unwrap();
    let l = checkpoint::load(&d.path().join("ck"), &dev).unwrap();
    let back: Vec<f64> = serde_json::from_value(l.state["floats"].clone()).unwrap();
    assert!(back
        .iter()
        .zip(&floats)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

/// Deferred reads (the default on GPU devices: each step's loss and gradient norm stay on the
/// device until the next log or checkpoint step) change nothing on disk or in the outcome:
/// the same losses, metrics lines and checkpoint, with gradient clipping on the device.
#[test]
fn deferred_reads_give_the_same_losses_metrics_and_checkpoint() {
    let dev = Device::Cpu;
    let run = |defer: bool| {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = tiny(12);
        cfg.train.log_every = 4;
        cfg.train.grad_clip = 0.5;
        let mut t = Trainer::create(cfg, d.path(), &dev).unwrap();
        t.set_deferred_reads(defer);
        let out = t.run(false).unwrap();
        let metrics: Vec<serde_json::Value> = fs::read_to_string(d.path().join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("elapsed_s");
                v
            })
            .collect();
        let model = fs::read(d.path().join("checkpoint/model.safetensors")).unwrap();
        (out.losses, metrics, model)
    };
    let (now, later) = (run(false), run(true));
    assert_eq!(now.0.len(), 12);
    assert_eq!(now.0, later.0, "losses");
    assert!(now.1.len() >= 3, "{:?}", now.1);
    assert_eq!(now.1, later.1, "metrics");
    assert!(now.0.iter().all(|(_, l)| l.is_finite()));
    assert!(now.2 == later.2, "checkpointed weights differ");
}
