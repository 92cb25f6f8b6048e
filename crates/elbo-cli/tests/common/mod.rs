//! Helpers the CLI test files share: run the `elbo` binary and read what it said.
#![allow(dead_code)] // each test file uses its own subset

pub mod browser;

use std::path::Path;
use std::process::{Command, Output};

/// Run `elbo ARGS` in `cwd` and wait for it.
pub fn elbo(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_elbo"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("failed to start elbo")
}

/// What the process wrote to stderr.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// stdout and stderr together.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `o` failed without a panic, and its error names every needle.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(!e.contains("panicked"), "panic instead of an error: {e}");
    for n in needles {
        assert!(e.contains(n), "error does not mention '{n}': {e}");
    }
}

/// [`assert_clean_failure`] with exit code 1 (elbo's error, not clap's usage error).
pub fn refused(o: &Output, needles: &[&str]) {
    assert_eq!(
        o.status.code(),
        Some(1),
        "expected exit code 1: {}",
        stderr(o)
    );
    assert_clean_failure(o, needles);
}
