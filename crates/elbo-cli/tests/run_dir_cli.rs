//! The `elbo` binary and its run directories: a second `elbo train` into a directory another
//! process trains into is refused naming that process, sampling the run meanwhile reads whole
//! checkpoints, a run killed with SIGKILL resumes (its stale lock taken over), `--out` refuses
//! every part of an old run unless `--force`, and `elbo eval` refuses a run whose data changed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::{assert_clean_failure, elbo, stderr};

const LONG: &str = r#"
[model.net]
hidden = 32
layers = 2
[data]
name = "moons"
test_size = 200
val_size = 100
[train]
steps = 1000000
batch_size = 64
eval_every = 0
checkpoint_every = 10
log_every = 10
"#;

const SHORT: &str = r#"
[model.net]
hidden = 16
layers = 2
[data]
name = "moons"
test_size = 100
val_size = 100
[train]
steps = 20
batch_size = 64
eval_every = 0
eval_examples = 50
[eval]
solver = "heun"
steps = 4
"#;

/// A child process killed when the test ends, also when it fails.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_busy_run_is_refused_read_consistently_and_resumed_after_sigkill() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("long.toml"), LONG).unwrap();
    let mut child = Killed(
        Command::new(env!("CARGO_BIN_EXE_elbo"))
            .args(["train", "--config", "long.toml", "--out", "run", "--quiet"])
            .current_dir(d.path())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id().to_string();
    let ck = d.path().join("run/checkpoint/state.json");
    let t0 = Instant::now();
    while !ck.exists() {
        assert!(t0.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(20));
    }
    // a second trainer, fresh, forced or resuming, is refused and names the owner
    for args in [
        &["train", "--config", "long.toml", "--out", "run"][..],
        &["train", "--config", "long.toml", "--out", "run", "--force"],
        &["train", "--resume", "run"],
    ] {
        assert_clean_failure(&elbo(args, d.path()), &["in use", &pid]);
    }
    // readers see whole checkpoints while it keeps replacing them
    for i in 0..3 {
        let out = format!("s{i}.npy");
        let o = elbo(
            &["sample", "--run", "run", "-n", "50", "--out", &out],
            d.path(),
        );
        assert!(o.status.success(), "{}", stderr(&o));
    }
    child.0.kill().unwrap(); // SIGKILL: no chance to clean up
    child.0.wait().unwrap();
    let o = elbo(&["train", "--resume", "run", "--steps", "120"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("took over the lock") && e.contains(&pid), "{e}");
    let names: Vec<String> = std::fs::read_dir(d.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-") || n.ends_with(".old"))
        .collect();
    assert!(names.is_empty(), "leftovers: {names:?}");
}

/// Write `short.toml` into `dir` and train it into `dir/run`.
fn train_short(dir: &std::path::Path) {
    std::fs::write(dir.join("short.toml"), SHORT).unwrap();
    let o = elbo(
        &["train", "--config", "short.toml", "--out", "run", "--quiet"],
        dir,
    );
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn out_refuses_any_part_of_a_run_unless_forced() {
    let d = tempfile::tempdir().unwrap();
    train_short(d.path());
    // a crash between the two renames of a save leaves only checkpoint.old
    let run = d.path().join("run");
    std::fs::rename(run.join("checkpoint"), run.join("checkpoint.old")).unwrap();
    std::fs::remove_dir_all(run.join("best")).unwrap();
    let before = std::fs::read(run.join("checkpoint.old/model.safetensors")).unwrap();
    let o = elbo(
        &["train", "--config", "short.toml", "--out", "run", "--quiet"],
        d.path(),
    );
    assert_clean_failure(
        &o,
        &[
            "already holds a run",
            "checkpoint.old",
            "--resume",
            "--force",
        ],
    );
    assert_eq!(
        std::fs::read(run.join("checkpoint.old/model.safetensors")).unwrap(),
        before
    );
    // resuming restores it; evaluating it works
    let o = elbo(&["train", "--resume", "run"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("restored checkpoint/"),
        "{}",
        stderr(&o)
    );
    // --force starts over
    let o = elbo(
        &[
            "train",
            "--config",
            "short.toml",
            "--out",
            "run",
            "--force",
            "--quiet",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!run.join("checkpoint.old").exists());
}

#[test]
fn eval_refuses_a_run_whose_data_file_changed() {
    let d = tempfile::tempdir().unwrap();
    let rows: String = (0..80)
        .map(|i| format!("{},{}\n", (i as f32 * 0.3).sin(), (i as f32 * 0.7).cos()))
        .collect();
    std::fs::write(d.path().join("pts.csv"), &rows).unwrap();
    std::fs::write(
        d.path().join("short.toml"),
        SHORT.replace("name = \"moons\"", "name = \"pts.csv\""),
    )
    .unwrap();
    let o = elbo(
        &["train", "--config", "short.toml", "--out", "run", "--quiet"],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(d.path().join("pts.csv"), format!("{rows}0.5,0.5\n")).unwrap();
    let o = elbo(&["eval", "--run", "run"], d.path());
    assert_clean_failure(&o, &["pts.csv", "changed since this run started"]);
    assert!(!d.path().join("run/report.json").exists());
    let o = elbo(&["sample", "--run", "run", "-n", "10"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
}

#[test]
fn sample_out_does_not_overwrite_a_file_without_force() {
    let d = tempfile::tempdir().unwrap();
    train_short(d.path());
    std::fs::write(d.path().join("mine.npy"), b"precious").unwrap();
    let o = elbo(
        &["sample", "--run", "run", "-n", "10", "--out", "mine.npy"],
        d.path(),
    );
    assert_clean_failure(&o, &["mine.npy", "exists", "--force"]);
    assert_eq!(
        std::fs::read(d.path().join("mine.npy")).unwrap(),
        b"precious"
    );
    // the run's own default file is replaced freely; --force replaces a chosen one
    for args in [
        &["sample", "--run", "run", "-n", "10"][..],
        &["sample", "--run", "run", "-n", "10"],
        &[
            "sample", "--run", "run", "-n", "10", "--out", "mine.npy", "--force",
        ],
    ] {
        let o = elbo(args, d.path());
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_ne!(
        std::fs::read(d.path().join("mine.npy")).unwrap(),
        b"precious"
    );
}
