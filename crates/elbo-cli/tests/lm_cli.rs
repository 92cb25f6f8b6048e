//! The language-model paths of the `elbo` binary end to end on a tiny byte-level text file:
//! train, the likelihood choices (`--likelihood nelbo,llada`, `--prompt-len`), prompted
//! sampling, and clear errors for choices a family does not have.

mod common;
use common::{elbo, text};

fn tiny(model: &str) -> String {
    format!(
        r#"
[model]
name = "{model}"
[model.transformer]
d_model = 16
n_heads = 2
n_layers = 1
[data]
name = "corpus.txt"
seq_len = 16
test_windows = 8
[train]
steps = 10
batch_size = 8
eval_every = 0
[eval]
lm_samples = 2
"#
    )
}

/// Trains a tiny `model` in a fresh directory; returns it.
fn trained(model: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let corpus = "to be, or not to be, that is the question. ".repeat(60);
    std::fs::write(d.path().join("corpus.txt"), corpus).unwrap();
    std::fs::write(d.path().join("tiny.toml"), tiny(model)).unwrap();
    let o = elbo(
        &["train", "--config", "tiny.toml", "--out", "run", "--quiet"],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    d
}

#[test]
fn mdlm_reports_both_bound_estimators_and_a_conditional_one() {
    let d = trained("mdlm");
    let o = elbo(
        &["eval", "--run", "run", "--likelihood", "nelbo,llada"],
        d.path(),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("MDLM NELBO") && out.contains("LLaDA Monte-Carlo"),
        "{out}"
    );
    let o = elbo(
        &[
            "eval",
            "--run",
            "run",
            "--likelihood",
            "llada",
            "--prompt-len",
            "4",
        ],
        d.path(),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("the last 12 characters given the first 4"),
        "{out}"
    );
    // the NELBO cannot condition, and diffusion names are not MDLM's
    for args in [
        vec!["eval", "--run", "run", "--prompt-len", "4"],
        vec!["eval", "--run", "run", "--likelihood", "vlb"],
        vec![
            "eval",
            "--run",
            "run",
            "--likelihood",
            "llada",
            "--prompt-len",
            "16",
        ],
    ] {
        let o = elbo(&args, d.path());
        let out = text(&o);
        assert!(!o.status.success(), "{args:?} succeeded: {out}");
        assert!(!out.contains("panicked"), "{out}");
        assert!(
            out.contains("prompt_len") || out.contains("likelihood"),
            "{out}"
        );
    }
    let o = elbo(
        &["sample", "--run", "run", "-n", "2", "--prompt", "to be"],
        d.path(),
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.matches("to be").count() >= 2, "{out}");
}

#[test]
fn ar_scores_a_continuation_given_its_prompt() {
    let d = trained("ar");
    let o = elbo(&["eval", "--run", "run", "--prompt-len", "8"], d.path());
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.contains("the last 8 characters given the first 8"),
        "{out}"
    );
    assert!(out.contains("(exact)"), "{out}");
}

#[test]
fn eval_scores_another_models_samples_from_a_file() {
    let d = trained("ar");
    let o = elbo(
        &["sample", "--run", "run", "-n", "6", "--out", "s.npy"],
        d.path(),
    );
    assert!(o.status.success(), "{}", text(&o));
    let report = d.path().join("run/report.json");
    let before = std::fs::read(&report).ok();
    let o = elbo(&["eval", "--run", "run", "--score", "s.npy"], d.path());
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("scores the 6 rows of s.npy"), "{out}");
    let bits: f64 = out
        .split("s.npy: ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    // a byte-level model after 10 steps: well below uniform over 256 bytes, above 0
    assert!(bits > 0.0 && bits < 8.0, "{out}");
    assert!(out.contains("bits/char (exact)"), "{out}");
    assert_eq!(
        std::fs::read(&report).ok(),
        before,
        "the run's report is untouched"
    );
    // a file of the wrong width is refused, naming both shapes
    let o = elbo(
        &["sample", "--run", "run", "-n", "2", "--out", "t.npy"],
        d.path(),
    );
    assert!(o.status.success());
    let mut bytes = std::fs::read(d.path().join("t.npy")).unwrap();
    // reinterpret [2, 16] as [4, 8] by editing the header's shape (same length)
    let at = bytes
        .windows(7)
        .position(|w| w == b"(2, 16)")
        .expect("the header names the shape");
    bytes[at..at + 7].copy_from_slice(b"(4, 8) ");
    std::fs::write(d.path().join("t.npy"), bytes).unwrap();
    let o = elbo(&["eval", "--run", "run", "--score", "t.npy"], d.path());
    common::assert_clean_failure(&o, &["t.npy", "[4, 8]", "16 values"]);
}
