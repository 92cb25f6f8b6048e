//! Bad flags and settings are refused before any work, with exit code 1, a message naming the
//! flag or key, and no panic: zero steps, probes and sample counts, NaN numbers, typos of
//! evaluation options, absurd sizes and sample counts whose output cannot fit in memory.

use std::path::Path;

mod common;
use common::{elbo, refused};

const TINY: &str = r#"
[model.net]
hidden = 8
layers = 1
[data]
name = "moons"
test_size = 50
[train]
steps = 2
batch_size = 16
eval_every = 0
eval_examples = 20
"#;

#[test]
fn zero_and_nan_flags_and_huge_counts_are_errors_naming_the_flag() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tiny.toml"), TINY).unwrap();
    let o = elbo(
        &["train", "--config", "tiny.toml", "--out", "run", "--quiet"],
        d.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    for (args, flag) in [
        (
            vec!["sample", "--run", "run", "--sample-steps", "0"],
            "--sample-steps",
        ),
        (vec!["sample", "--run", "run", "--steps", "0"], "--steps"),
        (vec!["sample", "--run", "run", "--eta", "NaN"], "--eta"),
        (vec!["sample", "--run", "run", "-n", "0"], "-n"),
        (
            vec!["eval", "--run", "run", "--ode-steps", "0"],
            "--ode-steps",
        ),
        (vec!["eval", "--run", "run", "--probes", "0"], "--probes"),
        (
            vec!["eval", "--run", "run", "--lm-samples", "0"],
            "--lm-samples",
        ),
        (vec!["eval", "--run", "run", "--rtol", "NaN"], "--rtol"),
        (
            vec!["eval", "--run", "run", "--likelihood", "vlb"],
            "eval.likelihood",
        ),
    ] {
        let o = elbo(&args, d.path());
        refused(&o, &[flag]);
    }
    // no sampling took place: the run holds no samples
    assert!(!d.path().join("run/samples.npy").exists());
    // a count whose output alone cannot fit in memory (where the available memory is known)
    if Path::new("/proc/meminfo").exists() {
        let o = elbo(
            &["sample", "--run", "run", "-n", "1000000000000000"],
            d.path(),
        );
        refused(&o, &["1000000000000000 samples", "available", "-n"]);
        assert!(!d.path().join("run/samples.npy").exists());
    }
    // a sample.batch_size smaller than -n draws in chunks and writes them all
    let o = elbo(
        &[
            "sample",
            "--run",
            "run",
            "-n",
            "25",
            "--solver",
            "euler",
            "--steps",
            "2",
            "--set",
            "sample.batch_size=10",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let x = elbo::data::npy::read_npy(&d.path().join("run/samples.npy")).unwrap();
    assert_eq!(x.1, vec![25, 2]);
}

#[test]
fn train_refuses_typos_and_absurd_sizes_before_creating_the_run() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tiny.toml"), TINY).unwrap();
    let mut cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--set", "eval.divergence=exactt"], "exactt"),
        (vec!["--set", "eval.solver=rk4"], "rk4"),
        (vec!["--set", "eval.likelihood=llada"], "eval.likelihood"),
        (vec!["--steps", "0"], "--steps"),
        (vec!["--lr", "NaN"], "--lr"),
    ];
    if Path::new("/proc/meminfo").exists() {
        cases.push((vec!["--set", "model.net.hidden=10000000"], "estimated"));
        cases.push((vec!["--batch-size", "1000000000"], "train.batch_size"));
    }
    for (extra, needle) in cases {
        let mut args = vec!["train", "--config", "tiny.toml", "--out", "run", "--quiet"];
        args.extend(extra.iter().copied());
        let o = elbo(&args, d.path());
        refused(&o, &[needle]);
        assert!(!d.path().join("run").exists(), "{extra:?} created the run");
    }
}
