//! The comparison report: every entry of a suite with its likelihood rows, sample metrics,
//! training figures and config, the machine it ran on, and the consistency checks. Written as
//! `report.json` (this struct, versioned), `report.md` and a self-contained `report.html`
//! ([`super::html`]).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::checks::{run_checks, Check};
use crate::eval::report::{format_number, ReportRow};
use crate::eval::sample_metric::MetricValue;
use crate::likelihood::NllKind;
use crate::{Error, Result};

/// The version of `report.json`'s layout; bumped when a field changes meaning.
pub const SCHEMA_VERSION: u32 = 1;

/// Where the report was made.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// CPU model (`model name` of /proc/cpuinfo), or "unknown".
    pub cpu: String,
    /// Logical cores available to the process.
    pub cores: usize,
    /// Operating system and architecture, e.g. "linux x86_64".
    pub os: String,
    /// elbo's version (`CARGO_PKG_VERSION`).
    pub elbo_version: String,
    /// `git rev-parse HEAD` of the source tree elbo was built from, read at run time when that
    /// tree is still on this machine, else "unknown".
    pub git_commit: String,
}

impl Machine {
    /// The machine this process runs on.
    pub fn current() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        // the source tree elbo was built from (when it is still there), not the working directory
        let git_commit = std::process::Command::new("git")
            .args(["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cpu,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            os: format!("{} {}", std::env::consts::OS, std::env::consts::ARCH),
            elbo_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit,
        }
    }
}

/// The unit of bits per dimension on the data set named `data`: "bits/char" for text (the
/// Shakespeare characters, `text:PATH` or a `.txt` file's bytes), else "bits/dim".
pub fn unit_of(data: &str) -> &'static str {
    if data == "shakespeare" || data.starts_with("text:") || data.ends_with(".txt") {
        "bits/char"
    } else {
        "bits/dim"
    }
}

/// Whether an entry produced its figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryStatus {
    /// Trained (or reused) and evaluated.
    Ok,
    /// Its config, training or evaluation failed: see `error`.
    Failed,
}

/// One likelihood of one entry. Numbers that are not finite (a family without a likelihood)
/// are absent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LikelihoodRow {
    /// The likelihood asked for, as the family names it ("vlb", "pf-ode", "nelbo", ...).
    pub likelihood: String,
    /// Exact, bound, estimate or none.
    pub kind: NllKind,
    /// The kind as a report prints it ("bound (upper bound on NLL)", ...).
    pub kind_label: String,
    /// Mean NLL per example, nats.
    pub nats: Option<f64>,
    /// Its standard error.
    pub stderr_nats: Option<f64>,
    /// Mean NLL in bits per dimension (bits/char for text).
    pub bits_per_dim: Option<f64>,
    /// Its standard error.
    pub stderr_bits_per_dim: Option<f64>,
    /// Held-out examples scored.
    pub n: usize,
    /// Dimensions per example.
    pub dims: usize,
    /// How the figure was computed (solver, estimator, seconds).
    pub method: String,
    /// Which weights, e.g. "ema, latest, step 3000".
    pub checkpoint: String,
    /// The split scored ("test").
    pub split: String,
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

impl LikelihoodRow {
    /// A row of `elbo eval`'s report, under the likelihood name it was asked for.
    pub fn from_eval(likelihood: &str, row: &ReportRow) -> Self {
        let s = &row.summary;
        let none = s.kind == NllKind::None;
        let f = |x: f64| if none { None } else { finite(x) };
        LikelihoodRow {
            likelihood: likelihood.to_string(),
            kind: s.kind.clone(),
            kind_label: row.likelihood_label(),
            nats: f(s.nats),
            stderr_nats: f(s.stderr_nats),
            bits_per_dim: f(s.bits_per_dim),
            stderr_bits_per_dim: f(s.stderr_bits_per_dim),
            n: s.n,
            dims: s.dims,
            method: row.method.clone(),
            checkpoint: row.checkpoint.clone(),
            split: row.split.clone(),
        }
    }
}

/// One entry of the suite.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryReport {
    /// The entry's name.
    pub name: String,
    /// Model family ("ddpm", ...), or "" when the config did not load.
    pub family: String,
    /// Data set name.
    pub data: String,
    /// Ok or failed.
    pub status: EntryStatus,
    /// Why it failed (config, training or evaluation), with the fix where known.
    #[serde(default)]
    pub error: Option<String>,
    /// Whether the run was trained now, resumed, or reused as it was.
    #[serde(default)]
    pub provenance: String,
    /// One row per likelihood asked for.
    pub rows: Vec<LikelihoodRow>,
    /// Sample metrics against the same held-out examples.
    #[serde(default)]
    pub metrics: Vec<(String, MetricValue)>,
    /// Training steps of the checkpoint.
    pub steps: Option<usize>,
    /// Wall-clock seconds of training, summed over every resumed segment (metrics.jsonl).
    pub train_seconds: Option<f64>,
    /// Trainable parameters.
    pub parameters: Option<u64>,
    /// True entropy of the data in nats per example, where known.
    pub entropy: Option<f64>,
    /// The run directory.
    pub run_dir: PathBuf,
    /// Text samples (language models), a few.
    #[serde(default)]
    pub text_samples: Vec<String>,
    /// The run's full config.
    pub config: serde_json::Value,
}

impl EntryReport {
    /// A failed entry with its error and what is known of it.
    pub fn failed(name: &str, run_dir: &Path, error: String) -> Self {
        EntryReport {
            name: name.to_string(),
            family: String::new(),
            data: String::new(),
            status: EntryStatus::Failed,
            error: Some(error),
            provenance: String::new(),
            rows: Vec::new(),
            metrics: Vec::new(),
            steps: None,
            train_seconds: None,
            parameters: None,
            entropy: None,
            run_dir: run_dir.to_path_buf(),
            text_samples: Vec::new(),
            config: serde_json::Value::Null,
        }
    }

    /// The entry's headline figure: its lowest finite bits/dim (and that row).
    pub fn best_row(&self) -> Option<&LikelihoodRow> {
        self.rows
            .iter()
            .filter(|r| r.bits_per_dim.is_some())
            .min_by(|a, b| {
                a.bits_per_dim
                    .partial_cmp(&b.bits_per_dim)
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
    }
}

/// The whole comparison.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompareReport {
    /// [`SCHEMA_VERSION`] when written.
    pub schema_version: u32,
    /// The suite's name ("runs" for `elbo report`).
    pub suite: String,
    /// Whether the suite ran at its `--quick` scale.
    pub quick: bool,
    /// Where it ran.
    pub machine: Machine,
    /// The entries in suite order.
    pub entries: Vec<EntryReport>,
    /// Consistency checks over the entries (see [`super::checks`]).
    pub checks: Vec<Check>,
}

/// One table line: an entry and one of its rows (or none for a failed entry).
pub struct TableLine<'a> {
    /// The entry.
    pub entry: &'a EntryReport,
    /// Its row.
    pub row: &'a LikelihoodRow,
}

impl CompareReport {
    /// A report of `entries`, with the checks computed.
    pub fn new(suite: &str, quick: bool, entries: Vec<EntryReport>) -> Self {
        let checks = run_checks(&entries);
        CompareReport {
            schema_version: SCHEMA_VERSION,
            suite: suite.to_string(),
            quick,
            machine: Machine::current(),
            entries,
            checks,
        }
    }

    /// Every likelihood row of every entry, sorted by bits/dim (rows without a figure last,
    /// then by entry order).
    pub fn sorted_lines(&self) -> Vec<TableLine<'_>> {
        let mut v: Vec<TableLine<'_>> = self
            .entries
            .iter()
            .flat_map(|e| e.rows.iter().map(move |row| TableLine { entry: e, row }))
            .collect();
        v.sort_by(|a, b| {
            let key = |r: &LikelihoodRow| r.bits_per_dim.unwrap_or(f64::INFINITY);
            key(a.row)
                .partial_cmp(&key(b.row))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        v
    }

    /// Entries that failed.
    pub fn failures(&self) -> impl Iterator<Item = &EntryReport> {
        self.entries
            .iter()
            .filter(|e| e.status == EntryStatus::Failed)
    }

    /// Pretty JSON.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("cannot serialise the comparison report: {e}")))
    }

    /// Parse `report.json`; a different schema version is an error saying which.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::data("report.json", e.to_string()))?;
        let version = v["schema_version"].as_u64();
        if version != Some(u64::from(SCHEMA_VERSION)) {
            return Err(Error::data(
                "report.json",
                format!(
                    "schema version {version:?}, this elbo reads {SCHEMA_VERSION}; rebuild it \
                     with `elbo report RUN_DIR...`"
                ),
            ));
        }
        serde_json::from_value(v).map_err(|e| Error::data("report.json", e.to_string()))
    }

    /// The unit of the comparable figure: "bits/char" when every entry models text (bits per
    /// token of a character-level or byte-level data set), else "bits/dim".
    pub fn unit(&self) -> &'static str {
        match self.entries.iter().all(|e| unit_of(&e.data) == "bits/char") {
            true if !self.entries.is_empty() => "bits/char",
            _ => "bits/dim",
        }
    }

    /// A Markdown document: the table sorted by bits/dim, the failures, the checks, the
    /// sample metrics and the machine.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# elbo compare: {}{}\n",
            md(&self.suite),
            if self.quick { " (--quick)" } else { "" }
        );
        let _ = writeln!(
            s,
            "| entry | family | data | likelihood | kind | {} ± s.e. | NLL nats ± s.e. | gap to entropy | n | checkpoint | steps | train s | params |",
            self.unit()
        );
        let _ = writeln!(
            s,
            "|---|---|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|"
        );
        for l in self.sorted_lines() {
            let (e, r) = (l.entry, l.row);
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                md(&e.name),
                md(&e.family),
                md(&e.data),
                md(&r.likelihood),
                md(&r.kind_label),
                pm(r.bits_per_dim, r.stderr_bits_per_dim),
                pm(r.nats, r.stderr_nats),
                opt(gap(e, r)),
                r.n,
                md(&r.checkpoint),
                e.steps.map_or("—".into(), |x| x.to_string()),
                e.train_seconds.map_or("—".into(), |x| format!("{x:.1}")),
                e.parameters.map_or("—".into(), |x| x.to_string()),
            );
        }
        let failed: Vec<&EntryReport> = self.failures().collect();
        if !failed.is_empty() {
            let _ = writeln!(s, "\n## Failed entries\n");
            for e in failed {
                let _ = writeln!(
                    s,
                    "- **{}**: {}",
                    md(&e.name),
                    md(e.error.as_deref().unwrap_or("unknown error"))
                );
            }
        }
        if !self.checks.is_empty() {
            let _ = writeln!(s, "\n## Consistency checks\n\n| check | entry | result | numbers |\n|---|---|---|---|");
            for c in &self.checks {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} |",
                    c.kind.title(),
                    md(&c.entry),
                    if c.passed { "pass" } else { "**FAIL**" },
                    md(&c.detail)
                );
            }
        }
        let metrics: Vec<String> = self
            .entries
            .iter()
            .flat_map(|e| {
                e.metrics.iter().map(move |(n, m)| {
                    format!(
                        "| {} | {} | {} | {} |",
                        md(&e.name),
                        md(n),
                        pm(Some(m.value), m.stderr),
                        m.n_samples
                    )
                })
            })
            .collect();
        if !metrics.is_empty() {
            let _ = writeln!(
                s,
                "\n## Sample metrics (lower is better)\n\n| entry | metric | value ± s.e. | samples |\n|---|---|---:|---:|\n{}",
                metrics.join("\n")
            );
        }
        if self.entries.iter().any(|e| !e.rows.is_empty()) {
            let _ = writeln!(s, "\n## Methods\n");
        }
        for e in &self.entries {
            for r in &e.rows {
                let _ = writeln!(
                    s,
                    "- {} / {}: {}",
                    md(&e.name),
                    md(&r.likelihood),
                    md(&r.method)
                );
            }
        }
        let m = &self.machine;
        let _ = writeln!(
            s,
            "\n{} ({} cores, {}); elbo {}, commit {}",
            md(&m.cpu),
            m.cores,
            md(&m.os),
            md(&m.elbo_version),
            md(&m.git_commit)
        );
        s
    }

    /// Write `report.json`, `report.md` and `report.html` into `dir` (each atomically).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        crate::atomic_file::write(&dir.join("report.json"), self.to_json()?.as_bytes())?;
        crate::atomic_file::write(&dir.join("report.md"), self.to_markdown().as_bytes())?;
        let html = super::html::render(self)?;
        crate::atomic_file::write(&dir.join("report.html"), html.as_bytes())
    }
}

/// `NLL - entropy` in nats, where both are known.
pub fn gap(e: &EntryReport, r: &LikelihoodRow) -> Option<f64> {
    Some(r.nats? - e.entropy?)
}

/// "mean ± s.e." or "—".
pub fn pm(mean: Option<f64>, se: Option<f64>) -> String {
    match (mean, se) {
        (Some(m), Some(s)) => format!("{} ± {}", format_number(m), format_number(s)),
        (Some(m), None) => format_number(m),
        _ => "—".into(),
    }
}

/// A number or "—".
pub fn opt(x: Option<f64>) -> String {
    x.map_or("—".into(), format_number)
}

/// A Markdown table cell.
fn md(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> CompareReport {
        let row = LikelihoodRow {
            likelihood: "vlb".into(),
            kind: NllKind::Bound,
            kind_label: "bound (upper bound on NLL)".into(),
            nats: Some(97.96),
            stderr_nats: Some(0.72),
            bits_per_dim: Some(2.208),
            stderr_bits_per_dim: Some(0.016),
            n: 297,
            dims: 64,
            method: "DDPM VLB".into(),
            checkpoint: "ema weights, best checkpoint, step 1000".into(),
            split: "test".into(),
        };
        let mut est = row.clone();
        est.likelihood = "pf-ode".into();
        est.kind = NllKind::Estimate { samples: 2 };
        est.kind_label = "estimate (2 samples)".into();
        let mut ok = EntryReport::failed("ddpm", Path::new("out/runs/ddpm"), String::new());
        ok.status = EntryStatus::Ok;
        ok.error = None;
        ok.family = "ddpm".into();
        ok.data = "digits".into();
        ok.rows = vec![row, est];
        ok.metrics = vec![(
            "mmd".into(),
            MetricValue {
                value: 0.01,
                stderr: None,
                n_samples: 64,
                n_data: 64,
            },
        )];
        ok.steps = Some(1500);
        ok.train_seconds = Some(101.5);
        ok.parameters = Some(123_456);
        ok.entropy = Some(1.25);
        ok.text_samples = vec!["to be".into()];
        ok.config = serde_json::json!({"model": {"name": "ddpm"}, "train": {"lr": 1e-3}});
        let bad = EntryReport::failed("broken", Path::new("out/runs/broken"), "boom".into());
        CompareReport::new("digits", true, vec![ok, bad])
    }

    #[test]
    fn text_is_reported_in_bits_per_char() {
        assert_eq!(unit_of("shakespeare"), "bits/char");
        assert_eq!(unit_of("text:plays.txt"), "bits/char");
        assert_eq!(unit_of("digits"), "bits/dim");
        let mut r = sample_report();
        assert_eq!(r.unit(), "bits/dim");
        assert!(r.to_markdown().contains("| bits/dim ± s.e. |"));
        for e in &mut r.entries {
            e.data = "shakespeare".into();
        }
        assert_eq!(r.unit(), "bits/char");
        assert!(r.to_markdown().contains("| bits/char ± s.e. |"));
        r.entries[1].data = "digits".into();
        assert_eq!(r.unit(), "bits/dim", "mixed data keeps the general unit");
    }

    #[test]
    fn json_round_trips_and_the_schema_version_is_checked() {
        let r = sample_report();
        assert!(!r.checks.is_empty());
        let back = CompareReport::from_json(&r.to_json().unwrap()).unwrap();
        assert_eq!(back, r);
        let mut v: serde_json::Value = serde_json::from_str(&r.to_json().unwrap()).unwrap();
        v["schema_version"] = serde_json::json!(SCHEMA_VERSION + 1);
        let e = CompareReport::from_json(&v.to_string()).unwrap_err();
        assert!(e.to_string().contains("schema version"), "{e}");
        v["schema_version"] = serde_json::json!(SCHEMA_VERSION);
        v["surprise"] = serde_json::json!(1);
        assert!(
            CompareReport::from_json(&v.to_string()).is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn table_is_sorted_by_bits_per_dim_and_lists_failures() {
        let mut r = sample_report();
        r.entries[0].rows[1].bits_per_dim = Some(2.1);
        let order: Vec<&str> = r
            .sorted_lines()
            .iter()
            .map(|l| l.row.likelihood.as_str())
            .collect();
        assert_eq!(order, ["pf-ode", "vlb"]);
        let md = r.to_markdown();
        let (a, b) = (md.find("| pf-ode |").unwrap(), md.find("| vlb |").unwrap());
        assert!(a < b, "{md}");
        assert!(md.contains("- **broken**: boom"), "{md}");
    }
}
