//! The `elbo-fuzz` binary: a clean run exits 0 with a report line per loader, a hang (here a
//! time limit below the watchdog's millisecond resolution, so an input crossing a clock tick
//! counts) exits 3 and leaves a reproducer that `--repro` reruns, and bad arguments exit 2.

use std::process::Command;

fn fuzz(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_elbo-fuzz"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn clean_run_reports_every_loader() {
    let o = fuzz(&["--loader", "all", "--inputs", "200", "--seed", "3"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    for l in ["npy", "csv", "text", "config", "checkpoint"] {
        let line = out.lines().find(|x| x.starts_with(l)).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[1], "200", "{line}");
        assert_eq!(cols[4], "0", "{line}");
    }
}

#[test]
fn a_hang_exits_3_with_a_reproducer() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let o = fuzz(&[
        "--loader",
        "config",
        "--inputs",
        "10000000",
        "--timeout",
        "0.0001",
        "--out",
        out,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(err.contains("HANG: loader config seed 1 input"), "{err}");
    let files: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(files.len(), 1);
    let path = files[0].as_ref().unwrap().path();
    let o = fuzz(&["--loader", "config", "--repro", path.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("config: "));
    assert_eq!(fuzz(&["--loader", "nope"]).status.code(), Some(2));
}
