//! The `elbo` binary end to end: a tiny train -> sample -> eval cycle, and clear errors (never a
//! panic) for malformed configs, unknown data sets and corrupt checkpoints.

mod common;
use common::{assert_clean_failure, elbo, refused, stderr};

const TINY: &str = r#"
[model.net]
hidden = 32
layers = 2
[data]
name = "moons"
test_size = 200
[train]
steps = 30
batch_size = 128
eval_every = 0
eval_examples = 100
[eval]
rtol = 1e-4
atol = 1e-4
"#;

#[test]
fn train_sample_eval_cycle_writes_its_files() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tiny.toml"), TINY).unwrap();
    let o = elbo(
        &["train", "--config", "tiny.toml", "--out", "run", "--quiet"],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let run = d.path().join("run");
    for f in [
        "config.json",
        "metrics.jsonl",
        "checkpoint/model.safetensors",
        "loss.png",
    ] {
        assert!(run.join(f).exists(), "missing {f}");
    }
    let o = elbo(
        &[
            "sample", "--run", "run", "-n", "300", "--solver", "euler", "--steps", "20",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let npy = std::fs::read(run.join("samples.npy")).unwrap();
    assert_eq!(&npy[..6], b"\x93NUMPY");
    assert!(run.join("samples.png").exists());
    let o = elbo(&["eval", "--run", "run", "--examples", "100"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json")).unwrap()).unwrap();
    let text = report.to_string();
    assert!(text.contains("exact") && text.contains("moons"), "{text}");
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(md.contains('|'), "{md}");
    // sample metrics beside the likelihood, in the same report
    let o = elbo(
        &[
            "eval",
            "--run",
            "run",
            "--examples",
            "100",
            "--metrics",
            "energy,swd",
            "--set",
        ],
        d.path(),
    );
    assert!(!o.status.success(), "--set is not an eval flag");
    let o = elbo(
        &[
            "eval",
            "--run",
            "run",
            "--examples",
            "100",
            "--metrics",
            "energy,swd",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(run.join("report.md")).unwrap();
    assert!(
        md.contains("Sample metrics") && md.contains("energy-distance"),
        "{md}"
    );
    let o = elbo(&["eval", "--run", "run", "--metrics", "fid"], d.path());
    assert!(
        !o.status.success() && stderr(&o).contains("mmd"),
        "{}",
        stderr(&o)
    );
    // resume to a longer total continues from step 30
    let o = elbo(
        &["train", "--resume", "run", "--steps", "40", "--quiet"],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("step 30"), "{}", stderr(&o));
    // a run that has reached its steps says there is nothing to do
    let o = elbo(&["train", "--resume", "run", "--quiet"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("nothing to do"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("NaN"), "{}", stderr(&o));
}

#[test]
fn malformed_config_is_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("bad.toml"), "[train]\nsteps = \"many\"\n").unwrap();
    let o = elbo(&["train", "--config", "bad.toml", "--out", "r"], d.path());
    assert_clean_failure(&o, &["bad.toml", "steps"]);
    std::fs::write(d.path().join("typo.toml"), "[train]\nlearning_rate = 0.1\n").unwrap();
    let o = elbo(&["train", "--config", "typo.toml", "--out", "r"], d.path());
    assert_clean_failure(&o, &["typo.toml", "learning_rate"]);
    let o = elbo(&["train", "--config", "missing.toml"], d.path());
    assert_clean_failure(&o, &["missing.toml"]);
}

#[test]
fn unknown_dataset_lists_known_ones() {
    let d = tempfile::tempdir().unwrap();
    let o = elbo(
        &["train", "--data", "mnistt", "--steps", "1", "--out", "r"],
        d.path(),
    );
    assert_clean_failure(&o, &["mnistt", "checkerboard", "digits"]);
}

#[test]
fn corrupt_checkpoint_and_missing_run_are_named() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join("tiny.toml"),
        TINY.replace("steps = 30", "steps = 3"),
    )
    .unwrap();
    let o = elbo(
        &["train", "--config", "tiny.toml", "--out", "run", "--quiet"],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let f = d.path().join("run/checkpoint/ema.safetensors");
    std::fs::write(&f, b"not a safetensors file").unwrap();
    let o = elbo(&["eval", "--run", "run"], d.path());
    assert_clean_failure(&o, &["ema.safetensors"]);
    let o = elbo(&["sample", "--run", "nowhere"], d.path());
    assert_clean_failure(&o, &["nowhere"]);
}

#[test]
fn help_lists_every_command() {
    let d = tempfile::tempdir().unwrap();
    let o = elbo(&["--help"], d.path());
    let out = String::from_utf8_lossy(&o.stdout);
    for c in ["train", "sample", "eval", "quickstart", "bench"] {
        assert!(out.contains(c), "--help lacks {c}: {out}");
    }
}

#[test]
fn version_reports_cuda_and_a_bad_device_is_a_clean_error() {
    let d = tempfile::tempdir().unwrap();
    let o = elbo(&["--version"], d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("elbo ") && out.contains("\nCUDA: "),
        "{out}"
    );
    if !cfg!(feature = "cuda") {
        assert!(out.contains("built without CUDA"), "{out}");
    }
    let with_device = |dev: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_elbo"))
            .args([
                "train", "--model", "gaussian", "--data", "moons", "--steps", "1",
            ])
            .args(["--out", "run", "--quiet"])
            .env("ELBO_DEVICE", dev)
            .current_dir(d.path())
            .output()
            .unwrap()
    };
    refused(&with_device("tpu"), &["ELBO_DEVICE", "cpu, cuda or cuda:N"]);
    if !cfg!(feature = "cuda") {
        refused(&with_device("cuda"), &["built without CUDA"]);
    }
}
