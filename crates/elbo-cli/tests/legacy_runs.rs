//! Run directories written by the release before the typed per-family layout (flat `[model]`,
//! sampler knobs in `[sample]`, the `flow` and `ddim` family names) still sample to the same
//! numbers, evaluate to the same figures and resume (fixtures in tests/fixtures/legacy).

use std::path::{Path, PathBuf};

mod common;
use common::{elbo, text};

/// A writable copy of the fixture run `name`.
fn copy_run(name: &str, to: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/legacy")
        .join(name);
    let dst = to.join(name);
    copy_dir(&src, &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let to = dst.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to);
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

#[test]
fn legacy_runs_sample_identically_evaluate_the_same_and_resume() {
    let d = tempfile::tempdir().unwrap();
    // what the old release printed for `elbo eval --run R --examples 5 --seed 2`
    for (name, family, nll) in [
        ("run-flow", "flow-matching", "4.3028 ± 0.7604"),
        ("run-ddim", "ddpm", "396.0816 ± 26.8271"),
        ("run-mdlm", "mdlm", "221.5414 ± 8.3746"),
    ] {
        let run = copy_run(name, d.path());
        let r = run.to_str().unwrap();
        let out = run.join("s.npy");
        let o = elbo(
            &[
                "sample",
                "--run",
                r,
                "-n",
                "3",
                "--seed",
                "5",
                "--out",
                out.to_str().unwrap(),
            ],
            d.path(),
        );
        assert!(o.status.success(), "{name}: {}", text(&o));
        let got = elbo::data::npy::read_npy(&out).unwrap();
        let want = elbo::data::npy::read_npy(&run.join("expected_samples.npy")).unwrap();
        assert_eq!(got, want, "{name}: samples differ from the old release's");
        let o = elbo(
            &["eval", "--run", r, "--examples", "5", "--seed", "2"],
            d.path(),
        );
        let t = text(&o);
        assert!(o.status.success(), "{name}: {t}");
        assert!(t.contains(nll) && t.contains(family), "{name}: {t}");
        let o = elbo(
            &["train", "--resume", r, "--steps", "8", "--quiet"],
            d.path(),
        );
        let t = text(&o);
        assert!(o.status.success(), "{name}: {t}");
        assert!(t.contains("step 8"), "{name}: {t}");
    }
}
