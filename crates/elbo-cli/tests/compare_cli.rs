//! `elbo compare` and `elbo report` end to end on tiny suites: failing entries are reported
//! with their errors beside the others' figures, a re-run reuses finished entries untouched and
//! resumes the rest, a changed config is refused, and the HTML is self-contained.

use std::path::Path;

use elbo::compare::{CompareReport, EntryStatus};

mod common;
use common::{browser, elbo, stderr};

/// A flow-matching entry on moons small enough to train and score in about a second.
fn fm_entry(name: &str, hidden: usize) -> String {
    format!(
        r#"
[[entry]]
name = "{name}"
metrics = ["energy-distance"]
[entry.config.model]
name = "flow-matching"
[entry.config.model.net]
hidden = {hidden}
layers = 2
[entry.config.data]
test_size = 150
[entry.config.train]
steps = 40
batch_size = 128
eval_every = 0
eval_examples = 50
checkpoint_every = 20
[entry.config.eval]
rtol = 1e-3
atol = 1e-3
"#
    )
}

const GAUSSIAN: &str = r#"
[[entry]]
name = "gauss"
[entry.config.model]
name = "gaussian"
[entry.config.data]
test_size = 150
[entry.config.train]
steps = 5
batch_size = 256
eval_every = 0
"#;

const HEADER: &str =
    "[suite]\nname = \"tiny\"\ndata = \"moons\"\nquick_steps = 10\nquick_examples = 100\n";

fn read_report(dir: &Path) -> CompareReport {
    let text = std::fs::read_to_string(dir.join("report.json")).unwrap();
    CompareReport::from_json(&text).unwrap()
}

/// Standard base64 (RFC 4648) decoding, for checking the embedded images.
fn b64decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes = s.trim_end_matches('=').as_bytes();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        for i in 0..chunk.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

/// Every `<img>` of the page is an inline PNG; returns how many there are.
fn check_images(html: &str) -> usize {
    let mut n = 0;
    for part in html.split("<img ").skip(1) {
        let src = part
            .split("src=\"data:image/png;base64,")
            .nth(1)
            .expect("an <img> that is not an inline PNG");
        let data = &src[..src.find('"').unwrap()];
        let bytes = b64decode(data);
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
            "image {n} is not a PNG"
        );
        n += 1;
    }
    n
}

/// The report in a real headless Chromium: it loads with no console errors, every image
/// decodes, the likelihood table has one row per likelihood row (one per failed entry) naming
/// every entry, and a laptop-sized screenshot is written. A copy with one corrupted image must be
/// caught, so the probe itself is tested.
fn check_in_browser(dir: &Path, report: &Path, html: &str) {
    let Some(b) = browser::find_browser() else {
        return;
    };
    let p = browser::probe_page(&b, report);
    assert!(p.errors.is_empty(), "console errors: {:?}", p.errors);
    assert_eq!(p.images, 4, "{p:?}");
    assert!(p.bad_images.is_empty(), "images that did not decode: {p:?}");
    assert_eq!(
        p.row_entries,
        ["gauss", "fm", "bad-likelihood", "missing-data"],
        "one table row per entry, sorted by bits/dim, failures last"
    );
    let broken_dir = dir.join("broken");
    std::fs::create_dir_all(&broken_dir).unwrap();
    let broken = broken_dir.join("report.html");
    std::fs::write(&broken, html.replacen("base64,iVBOR", "base64,AAAAA", 1)).unwrap();
    let p = browser::probe_page(&b, &broken);
    assert_eq!(
        p.bad_images.len(),
        1,
        "the probe must catch a corrupt image: {p:?}"
    );

    let png = browser::screenshot(&b, report, &dir.join("report.png"));
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "the screenshot is a PNG");
    let (w, h) = (
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        u32::from_be_bytes(png[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1280, 1300), "laptop-sized screenshot");
    assert!(
        png.len() > 20_000,
        "a blank page compresses to far less: {} bytes",
        png.len()
    );
}

#[test]
fn failing_entries_are_reported_beside_the_others_and_report_rebuilds_the_table() {
    let d = tempfile::tempdir().unwrap();
    let bad_likelihood = "\n[[entry]]\nname = \"bad-likelihood\"\nlikelihoods = [\"vlb\"]\n[entry.config.model]\nname = \"flow-matching\"\n";
    let missing_data = "\n[[entry]]\nname = \"missing-data\"\n[entry.config.model]\nname = \"gaussian\"\n[entry.config.data]\nname = \"no/such/file.npy\"\n";
    let suite = format!(
        "{HEADER}{}{bad_likelihood}{missing_data}{GAUSSIAN}",
        fm_entry("fm", 16)
    );
    std::fs::write(d.path().join("suite.toml"), suite).unwrap();
    let o = elbo(
        &[
            "compare",
            "--suite",
            "suite.toml",
            "--out",
            "out",
            "--quick",
            "--quiet",
        ],
        d.path(),
    );
    let err = stderr(&o);
    assert!(
        !o.status.success(),
        "failed entries must fail the command: {err}"
    );
    assert!(err.contains("2 of 4 entries failed"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let out = d.path().join("out");
    let r = read_report(&out);
    let names: Vec<&str> = r.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["fm", "bad-likelihood", "missing-data", "gauss"]);
    let st: Vec<EntryStatus> = r.entries.iter().map(|e| e.status).collect();
    use EntryStatus::*;
    assert_eq!(st, [Ok, Failed, Failed, Ok]);
    let e1 = r.entries[1].error.as_deref().unwrap();
    assert!(e1.contains("bad-likelihood") && e1.contains("vlb"), "{e1}");
    let e2 = r.entries[2].error.as_deref().unwrap();
    assert!(e2.contains("no/such/file.npy"), "{e2}");
    assert_eq!(r.entries[2].family, "gaussian");
    for e in [&r.entries[0], &r.entries[3]] {
        assert_eq!(e.rows.len(), 1, "{}", e.name);
        let bpd = e.rows[0].bits_per_dim.unwrap();
        assert!(bpd.is_finite() && bpd > 0.0, "{}: {bpd}", e.name);
        assert_eq!(e.rows[0].n, 100, "--quick scores quick_examples");
        assert!(e.parameters.unwrap() > 0);
        assert!(e.entropy.is_none(), "moons has no known entropy");
    }
    assert_eq!(r.entries[0].steps, Some(10), "--quick trains quick_steps");
    assert_eq!(r.entries[0].metrics[0].0, "energy-distance");
    // Markdown lists the failures with their errors and the others' rows
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("## Failed entries") && md.contains("no/such/file.npy"),
        "{md}"
    );
    assert!(
        md.contains("| fm | flow-matching | moons | pf-ode | exact |"),
        "{md}"
    );
    // HTML: one table row per likelihood row and per failed entry, inline PNGs only, no scripts
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert_eq!(html.matches("<tr class=\"row").count(), 4);
    assert_eq!(html.matches("<tr class=\"row failed\"").count(), 2);
    // fm and gauss each have a samples.png and a loss.png
    assert_eq!(check_images(&html), 4);
    assert!(!html.contains("<script") && !html.contains("src=\"http"));
    assert!(html.contains("<svg id=\"chart\"") && html.contains("@media print"));
    check_in_browser(d.path(), &out.join("report.html"), &html);

    // `elbo report` on the two finished runs rebuilds the same figures without training
    let before = std::fs::read(out.join("runs/fm/checkpoint/model.safetensors")).unwrap();
    let o = elbo(
        &[
            "report",
            "out/runs/fm",
            "out/runs/gauss",
            "--out",
            "rep",
            "--examples",
            "100",
            "--metrics",
            "energy-distance",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let again = read_report(&d.path().join("rep"));
    assert_eq!(again.entries.len(), 2);
    for (a, b) in again.entries.iter().zip([&r.entries[0], &r.entries[3]]) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.rows, b.rows, "{}", a.name);
        assert_eq!(a.steps, b.steps);
    }
    assert_eq!(
        std::fs::read(out.join("runs/fm/checkpoint/model.safetensors")).unwrap(),
        before
    );
}

#[test]
fn a_rerun_reuses_finished_entries_resumes_the_rest_and_refuses_a_changed_config() {
    let d = tempfile::tempdir().unwrap();
    let suite = format!("{HEADER}{}{GAUSSIAN}", fm_entry("fm", 16));
    std::fs::write(d.path().join("suite.toml"), &suite).unwrap();
    let args = [
        "compare",
        "--suite",
        "suite.toml",
        "--out",
        "out",
        "--quiet",
    ];
    let o = elbo(&args, d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.path().join("out");
    let first = read_report(&out);
    let ck = out.join("runs/fm/checkpoint/model.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    let mtime = std::fs::metadata(&ck).unwrap().modified().unwrap();
    // an interrupted compare: no report yet, the second entry's checkpoint not written
    for f in ["report.json", "report.md", "report.html"] {
        std::fs::remove_file(out.join(f)).unwrap();
    }
    std::fs::remove_dir_all(out.join("runs/gauss/checkpoint")).unwrap();
    let o = elbo(&args, d.path());
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(std::fs::read(&ck).unwrap(), bytes, "fm was retrained");
    assert_eq!(std::fs::metadata(&ck).unwrap().modified().unwrap(), mtime);
    let r = read_report(&out);
    assert_eq!(r.entries.len(), 2);
    assert!(r.entries.iter().all(|e| e.status == EntryStatus::Ok));
    assert!(
        r.entries[0].provenance.starts_with("reused"),
        "{:?}",
        r.entries[0].provenance
    );
    assert!(
        r.entries[1].provenance.starts_with("resumed"),
        "{:?}",
        r.entries[1].provenance
    );
    assert!(out.join("runs/gauss/checkpoint/state.json").is_file());
    // the reused entry scores the same as before, from the scores it kept
    assert_eq!(r.entries[0].rows, first.entries[0].rows);
    assert!(
        r.entries[0].provenance.contains("scores reused"),
        "{:?}",
        r.entries[0].provenance
    );
    // an unreadable score cache is ignored: the entry is scored again, to the same figures
    let cache = out.join("runs/fm/compare-scores.json");
    assert!(cache.is_file());
    std::fs::write(&cache, "{ not json").unwrap();
    let o = elbo(&args, d.path());
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_report(&out);
    assert!(
        !r.entries[0].provenance.contains("scores reused"),
        "{:?}",
        r.entries[0].provenance
    );
    assert_eq!(r.entries[0].rows, first.entries[0].rows);
    // a different config under the same name is refused, naming the key, and nothing is lost
    let changed = format!("{HEADER}{}{GAUSSIAN}", fm_entry("fm", 24));
    std::fs::write(d.path().join("suite.toml"), changed).unwrap();
    let o = elbo(&args, d.path());
    assert!(!o.status.success());
    let r = read_report(&out);
    let e = r.entries[0].error.as_deref().unwrap();
    assert!(
        e.contains("different config") && e.contains("model.net.hidden"),
        "{e}"
    );
    assert_eq!(std::fs::read(&ck).unwrap(), bytes);
}

#[test]
fn a_second_compare_into_the_same_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let suite = format!("{HEADER}{GAUSSIAN}");
    std::fs::write(d.path().join("suite.toml"), &suite).unwrap();
    let out = d.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    // this test process holds the lock, as a running compare would
    let lock = std::fs::File::create(out.join("lock")).unwrap();
    lock.try_lock().unwrap();
    std::fs::write(out.join("lock"), format!("{}\n", std::process::id())).unwrap();
    let compare = || {
        elbo(
            &[
                "compare",
                "--suite",
                "suite.toml",
                "--out",
                "out",
                "--quiet",
            ],
            d.path(),
        )
    };
    let o = compare();
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("is in use") && err.contains(&std::process::id().to_string()),
        "{err}"
    );
    assert!(!out.join("runs/gauss").exists(), "nothing trained");
    drop(lock);
    let o = compare();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn report_out_never_replaces_a_runs_own_report_or_a_foreign_file() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir(&run).unwrap();
    std::fs::write(run.join("config.json"), "{}").unwrap();
    std::fs::write(run.join("report.json"), "{\"eval\": 1}").unwrap();
    let o = elbo(&["report", "run", "--out", "run"], d.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("is a run directory"), "{}", stderr(&o));
    let other = d.path().join("other");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("report.json"), "{\"mine\": true}").unwrap();
    let o = elbo(&["report", "run", "--out", "other"], d.path());
    assert!(
        stderr(&o).contains("not a comparison report"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(other.join("report.json")).unwrap(),
        "{\"mine\": true}"
    );
    assert_eq!(
        std::fs::read_to_string(run.join("report.json")).unwrap(),
        "{\"eval\": 1}"
    );
}

#[test]
fn jobs_run_entries_side_by_side_with_the_same_figures_as_one_after_the_other() {
    let d = tempfile::tempdir().unwrap();
    let bad = "\n[[entry]]\nname = \"bad\"\nlikelihoods = [\"vlb\"]\n[entry.config.model]\nname = \"flow-matching\"\n";
    let suite = format!("{HEADER}{}{bad}{GAUSSIAN}", fm_entry("fm", 16));
    std::fs::write(d.path().join("suite.toml"), &suite).unwrap();
    let run = |out: &str, jobs: &str| {
        let args = [
            "compare",
            "--suite",
            "suite.toml",
            "--out",
            out,
            "--quick",
            "--quiet",
            "--jobs",
            jobs,
        ];
        let o = elbo(&args, d.path());
        assert!(!o.status.success(), "the bad entry fails the command");
        let err = stderr(&o);
        assert!(err.contains("1 of 3 entries failed"), "{err}");
        read_report(&d.path().join(out))
    };
    let one = run("one", "1");
    let two = run("two", "2");
    let names: Vec<&str> = two.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        ["fm", "bad", "gauss"],
        "suite order, whatever finished first"
    );
    for (a, b) in one.entries.iter().zip(&two.entries) {
        assert_eq!(a.status, b.status, "{}", a.name);
        assert_eq!(a.rows, b.rows, "{}", a.name);
        assert_eq!(a.error, b.error, "{}", a.name);
        assert_eq!(a.steps, b.steps, "{}", a.name);
    }
    // (`bad` is refused when the suite is read, so it never gets a process)
    for name in ["fm", "gauss"] {
        let dir = d.path().join("two/runs").join(name);
        assert!(dir.join("compare.log").is_file(), "{name}");
        assert!(dir.join("entry.json").is_file(), "{name}");
    }
    // a re-run with --jobs reuses every finished entry
    let again = run("two", "2");
    assert!(again.entries[0].provenance.starts_with("reused"));
    assert_eq!(again.entries[0].rows, two.entries[0].rows);
    // --jobs 0 is refused
    let o = elbo(
        &[
            "compare",
            "--suite",
            "suite.toml",
            "--out",
            "z",
            "--jobs",
            "0",
        ],
        d.path(),
    );
    common::assert_clean_failure(&o, &["--jobs 0"]);
}
