//! `elbo train` killed with SIGKILL at several points and resumed with `--resume` ends bit for bit
//! where an uninterrupted run ends: the same checkpoint/ and best/ files, byte for byte, and the
//! same metrics (issue 13; scripts/crash_test.sh does the same at random moments, many times).
#![cfg(unix)]

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// DDPM with EMA and AdamW on the digits, a checkpoint every 2 steps, an evaluation (and a
/// `best/` write) every 20: about 2 s uninterrupted on one thread.
const CONFIG: &str = r#"
[model]
name = "ddpm"
timesteps = 100
parameterization = "levels"
[model.net]
backbone = "mlp"
hidden = 64
layers = 2
time_embed_dim = 16
[data]
name = "digits"
[train]
steps = 60
batch_size = 64
lr = 1e-3
warmup_steps = 5
ema_decay = 0.9
seed = 3
eval_every = 20
eval_examples = 20
checkpoint_every = 2
log_every = 1
"#;

fn fresh(out: &str) -> [&str; 5] {
    ["train", "--config", "c.toml", "--out", out]
}

fn start(args: &[&str], cwd: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .arg("--quiet")
        .current_dir(cwd)
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("failed to start elbo")
}

/// Wait for `child` to exit; panic with its stderr unless it succeeded. Returns its stderr.
fn finish(child: Child, what: &str) -> String {
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{what} failed ({}): {err}", o.status);
    err
}

/// The largest step of a complete line of `run/metrics.jsonl` (0 if none).
fn logged_step(run: &Path) -> u64 {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["step"].as_u64())
        .max()
        .unwrap_or(0)
}

/// Poll until `ready()` holds, then SIGKILL `child` and check that the kill hit a live process.
fn kill_when(mut child: Child, what: &str, ready: impl Fn() -> bool) {
    let t = Instant::now();
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                std::io::Read::read_to_string(&mut e, &mut err).unwrap();
            }
            panic!("{what}: the run exited ({status}) before the kill point: {err}");
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "{what}: kill point never reached"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(9),
        "{what}: the kill did not land ({status})"
    );
}

/// The step a resume started from, read from its "resuming DIR at step K of N" line.
fn resumed_at(stderr: &str) -> u64 {
    let rest = stderr
        .split("at step ")
        .nth(1)
        .unwrap_or_else(|| panic!("no 'resuming ... at step' line: {stderr}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

fn assert_same_dir(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap_or_else(|e| panic!("{}: {e}", d.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let files = names(a);
    assert!(
        files.iter().any(|f| f.ends_with(".safetensors")),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f == "state.json"), "{files:?}");
    assert_eq!(files, names(b), "{} and {}", a.display(), b.display());
    for f in &files {
        let (x, y) = (
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
        );
        assert!(
            x == y,
            "{} differs from the uninterrupted run's {}",
            b.join(f).display(),
            a.join(f).display()
        );
    }
}

/// metrics.jsonl without the wall-clock `elapsed_s`.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("bad metrics line '{l}' in {}: {e}", run.display()));
            v.as_object_mut().unwrap().remove("elapsed_s");
            v
        })
        .collect()
}

#[test]
fn killed_and_resumed_training_matches_the_uninterrupted_run_bit_for_bit() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("c.toml"), CONFIG).unwrap();
    finish(start(&fresh("ref"), d.path()), "the uninterrupted run");

    let run = d.path().join("crash");
    let resume = ["train", "--resume", "crash"];
    // 1: as soon as the first checkpoint exists (mid-step or in the next checkpoint write);
    // then, each time, once the resumed process has logged a step well past the last kill:
    // past the first evaluation and best/ write (step 20), mid-run, past the second evaluation
    kill_when(start(&fresh("crash"), d.path()), "kill 1", || {
        run.join("checkpoint/state.json").exists()
    });
    for (kill, step) in [(2, 21), (3, 32), (4, 43)] {
        kill_when(start(&resume, d.path()), &format!("kill {kill}"), || {
            logged_step(&run) >= step
        });
    }
    let err = finish(start(&resume, d.path()), "the last resume");
    let at = resumed_at(&err);
    assert!(
        (40..60).contains(&at),
        "the last resume started at step {at}, not after kill 4: {err}"
    );

    let reference = d.path().join("ref");
    assert_same_dir(&reference.join("checkpoint"), &run.join("checkpoint"));
    assert_same_dir(&reference.join("best"), &run.join("best"));
    let (m_ref, m_run) = (metrics(&reference), metrics(&run));
    assert_eq!(m_ref.len(), 60 + 3, "60 step lines and 3 evaluations");
    assert_eq!(m_run.len(), m_ref.len(), "metrics.jsonl line count");
    for (i, (x, y)) in m_ref.iter().zip(&m_run).enumerate() {
        assert_eq!(x, y, "metrics.jsonl line {} differs", i + 1);
    }
}
