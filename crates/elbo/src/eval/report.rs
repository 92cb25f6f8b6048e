//! Likelihood reports: one row per (model, data set, split, checkpoint), written as JSON for
//! machines, Markdown for documents and an aligned plain-text table for the console.
//!
//! Every number carries its kind: an exact NLL, an upper bound on the NLL (negative ELBO / VLB), a
//! Monte-Carlo estimate with its sample count, or nothing at all for families without a
//! likelihood. Where the true entropy of the data is known (toy sets with an analytic density) the
//! report also shows the gap `NLL - H`, which is the KL divergence from the data to the model for
//! an exact NLL and an upper bound on it for a bound.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::sample_metric::MetricValue;

use crate::likelihood::{NllKind, NllSummary};
use crate::{Error, Result};

/// One line of a likelihood report.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportRow {
    /// Model family or run name, e.g. "cnf".
    pub model: String,
    /// Data set name, e.g. "moons".
    pub dataset: String,
    /// Split evaluated, e.g. "test".
    pub split: String,
    /// Which weights were evaluated, e.g. "ema, step 3000".
    pub checkpoint: String,
    /// Mean NLL with its standard error and kind.
    pub summary: NllSummary,
    /// True entropy of the data distribution in nats per example, if known.
    pub entropy: Option<f64>,
    /// How the number was computed, e.g. "CNF, dopri5 rtol 1e-5, exact divergence".
    pub method: String,
    /// Sample metrics against the same held-out examples (energy distance, MMD, sliced
    /// Wasserstein; lower is better), for every family, with or without a likelihood.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<(String, MetricValue)>,
}

impl ReportRow {
    /// `NLL - entropy` in nats, when the entropy is known and the row has a finite NLL.
    ///
    /// For an exact NLL this is KL(data || model); for a bound it is an upper bound on that KL.
    pub fn gap(&self) -> Option<f64> {
        if self.summary.kind == NllKind::None || !self.summary.nats.is_finite() {
            return None;
        }
        self.entropy
            .filter(|h| h.is_finite())
            .map(|h| self.summary.nats - h)
    }

    /// The kind as the report prints it: "exact", "bound (upper bound on NLL)",
    /// "estimate (K samples)" or "none".
    pub fn likelihood_label(&self) -> String {
        kind_description(&self.summary.kind)
    }

    fn has_numbers(&self) -> bool {
        self.summary.kind != NllKind::None
    }
}

/// A titled table of likelihood rows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LikelihoodReport {
    /// Heading of the report.
    pub title: String,
    /// One row per evaluated (model, data, split, checkpoint).
    pub rows: Vec<ReportRow>,
}

/// Describe a likelihood kind for readers of a report.
pub fn kind_description(kind: &NllKind) -> String {
    match kind {
        NllKind::Exact => "exact".to_string(),
        NllKind::Bound => "bound (upper bound on NLL)".to_string(),
        NllKind::Estimate { samples: 1 } => "estimate (1 sample)".to_string(),
        NllKind::Estimate { samples } => format!("estimate ({samples} samples)"),
        NllKind::None => "none".to_string(),
    }
}

/// Format a number for a report: 4 decimals, switching to scientific notation for values so small
/// or so large that 4 decimals would hide them; "—" for missing or non-finite values.
pub fn format_number(x: f64) -> String {
    if !x.is_finite() {
        return "—".to_string();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-4..1e7).contains(&a) {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    }
}

fn format_opt(x: Option<f64>) -> String {
    x.map_or_else(|| "—".to_string(), format_number)
}

fn with_stderr(mean: f64, se: f64) -> String {
    if !mean.is_finite() {
        return "—".to_string();
    }
    if se.is_finite() {
        format!("{} ± {}", format_number(mean), format_number(se))
    } else {
        format_number(mean)
    }
}

/// The cells of one row, in column order, shared by the Markdown and terminal tables.
fn cells(row: &ReportRow) -> Vec<String> {
    let s = &row.summary;
    let (nats, bpd) = if row.has_numbers() {
        (
            with_stderr(s.nats, s.stderr_nats),
            with_stderr(s.bits_per_dim, s.stderr_bits_per_dim),
        )
    } else {
        ("—".to_string(), "—".to_string())
    };
    vec![
        row.model.clone(),
        row.dataset.clone(),
        row.split.clone(),
        row.likelihood_label(),
        nats,
        bpd,
        format_opt(row.entropy),
        format_opt(row.gap()),
        s.n.to_string(),
        row.checkpoint.clone(),
    ]
}

const HEADER: [&str; 10] = [
    "model",
    "data",
    "split",
    "likelihood",
    "NLL nats ± s.e.",
    "bits/dim ± s.e.",
    "true entropy",
    "gap",
    "n",
    "checkpoint",
];

/// Columns holding numbers (right-aligned).
const NUMERIC: [bool; 10] = [
    false, false, false, false, true, true, true, true, true, false,
];

fn md_cell(s: &str) -> String {
    s.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Serialised row: the row's fields plus the derived gap and kind labels.
#[derive(Serialize)]
struct RowOut<'a> {
    #[serde(flatten)]
    row: &'a ReportRow,
    kind_label: &'static str,
    likelihood: String,
    gap: Option<f64>,
}

#[derive(Serialize)]
struct ReportOut<'a> {
    title: &'a str,
    rows: Vec<RowOut<'a>>,
}

/// A summary as read back: JSON writes non-finite numbers as `null`, read here as NaN.
#[derive(Deserialize)]
struct SummaryIn {
    kind: NllKind,
    n: usize,
    dims: usize,
    nats: Option<f64>,
    stderr_nats: Option<f64>,
    bits_per_dim: Option<f64>,
    stderr_bits_per_dim: Option<f64>,
    perplexity: Option<f64>,
}

#[derive(Deserialize)]
struct RowIn {
    model: String,
    dataset: String,
    split: String,
    #[serde(default)]
    checkpoint: String,
    summary: SummaryIn,
    #[serde(default)]
    entropy: Option<f64>,
    #[serde(default)]
    method: String,
    #[serde(default)]
    metrics: Vec<(String, MetricValue)>,
}

#[derive(Deserialize)]
struct ReportIn {
    #[serde(default)]
    title: String,
    rows: Vec<RowIn>,
}

impl LikelihoodReport {
    /// An empty report with a title.
    pub fn new(title: impl Into<String>) -> Self {
        LikelihoodReport {
            title: title.into(),
            rows: Vec::new(),
        }
    }

    /// Append a row.
    pub fn push(&mut self, row: ReportRow) {
        self.rows.push(row);
    }

    /// Pretty JSON. Each row carries its fields plus `kind_label` ("exact", "bound", ...),
    /// `likelihood` (the description used in tables) and `gap`. Non-finite numbers become `null`.
    pub fn to_json(&self) -> Result<String> {
        let out = ReportOut {
            title: &self.title,
            rows: self
                .rows
                .iter()
                .map(|row| RowOut {
                    row,
                    kind_label: row.summary.kind.label(),
                    likelihood: row.likelihood_label(),
                    gap: row.gap(),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&out)
            .map_err(|e| Error::Config(format!("cannot serialise likelihood report: {e}")))
    }

    /// Parse a report written by [`LikelihoodReport::to_json`] (derived fields are ignored and
    /// recomputed; `null` numbers in a summary read back as NaN).
    pub fn from_json(json: &str) -> Result<Self> {
        let r: ReportIn = serde_json::from_str(json)
            .map_err(|e| Error::data("likelihood report JSON", e.to_string()))?;
        let nan = |x: Option<f64>| x.unwrap_or(f64::NAN);
        let rows = r
            .rows
            .into_iter()
            .map(|row| ReportRow {
                model: row.model,
                dataset: row.dataset,
                split: row.split,
                checkpoint: row.checkpoint,
                summary: NllSummary {
                    kind: row.summary.kind,
                    n: row.summary.n,
                    dims: row.summary.dims,
                    nats: nan(row.summary.nats),
                    stderr_nats: nan(row.summary.stderr_nats),
                    bits_per_dim: nan(row.summary.bits_per_dim),
                    stderr_bits_per_dim: nan(row.summary.stderr_bits_per_dim),
                    perplexity: nan(row.summary.perplexity),
                },
                entropy: row.entropy,
                method: row.method,
                metrics: row.metrics,
            })
            .collect();
        Ok(LikelihoodReport {
            title: r.title,
            rows,
        })
    }

    /// A Markdown document: `# title`, a table with one line per row, then one footnote per row
    /// giving its method.
    pub fn to_markdown(&self) -> String {
        let mut s = String::new();
        let title = if self.title.is_empty() {
            "Likelihood report"
        } else {
            &self.title
        };
        let _ = writeln!(s, "# {}\n", md_cell(title));
        let _ = writeln!(s, "| {} |", HEADER.join(" | "));
        let rule: Vec<&str> = NUMERIC
            .iter()
            .map(|&num| if num { "---:" } else { "---" })
            .collect();
        let _ = writeln!(s, "| {} |", rule.join(" | "));
        for (i, row) in self.rows.iter().enumerate() {
            let mut c: Vec<String> = cells(row).iter().map(|c| md_cell(c)).collect();
            if !row.method.trim().is_empty() {
                c[0] = format!("{} [^{}]", c[0], i + 1);
            }
            let _ = writeln!(s, "| {} |", c.join(" | "));
        }
        let notes: Vec<String> = self
            .rows
            .iter()
            .enumerate()
            .filter(|(_, row)| !row.method.trim().is_empty())
            .map(|(i, row)| format!("[^{}]: method: {}", i + 1, md_cell(row.method.trim())))
            .collect();
        if !notes.is_empty() {
            let _ = writeln!(s, "\n{}", notes.join("\n"));
        }
        let metrics = self.metric_lines();
        if !metrics.is_empty() {
            let _ = writeln!(
                s,
                "\n## Sample metrics (lower is better)\n\n| model | metric | value ± s.e. | samples | held-out |\n|---|---|---:|---:|---:|"
            );
            for m in metrics {
                let _ = writeln!(s, "| {} |", m.join(" | "));
            }
        }
        s
    }

    /// One row of cells per (report row, metric): model, metric, value ± s.e., sample counts.
    pub fn metric_lines(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .flat_map(|row| {
                row.metrics.iter().map(move |(name, m)| {
                    let value = match m.stderr {
                        Some(se) => format!("{:.5} ± {:.5}", m.value, se),
                        None => format!("{:.5}", m.value),
                    };
                    vec![
                        md_cell(&row.model),
                        md_cell(name),
                        value,
                        m.n_samples.to_string(),
                        m.n_data.to_string(),
                    ]
                })
            })
            .collect()
    }

    /// An aligned plain-text table for the console, methods listed underneath.
    pub fn to_terminal(&self) -> String {
        let body: Vec<Vec<String>> = self.rows.iter().map(cells).collect();
        let mut widths: Vec<usize> = HEADER.iter().map(|h| h.chars().count()).collect();
        for r in &body {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cols: &[String]| -> String {
            let parts: Vec<String> = cols
                .iter()
                .zip(&widths)
                .zip(NUMERIC)
                .map(|((c, &w), num)| {
                    let pad = " ".repeat(w.saturating_sub(c.chars().count()));
                    if num {
                        format!("{pad}{c}")
                    } else {
                        format!("{c}{pad}")
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut s = String::new();
        if !self.title.is_empty() {
            let _ = writeln!(s, "{}", self.title);
        }
        let header: Vec<String> = HEADER.iter().map(|h| h.to_string()).collect();
        let _ = writeln!(s, "{}", line(&header));
        let total = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
        let _ = writeln!(s, "{}", "-".repeat(total));
        for r in &body {
            let _ = writeln!(s, "{}", line(r));
        }
        for (i, row) in self.rows.iter().enumerate() {
            if !row.method.trim().is_empty() {
                let _ = writeln!(s, "  [{}] {}: {}", i + 1, row.model, row.method.trim());
            }
        }
        for m in self.metric_lines() {
            let _ = writeln!(
                s,
                "  sample metric  {} {}: {} ({} samples vs {} held-out)",
                m[0], m[1], m[2], m[3], m[4]
            );
        }
        s
    }

    /// Write `STEM.json` and `STEM.md` into `dir`, creating it if needed.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<()> {
        if stem.is_empty() || stem.contains(['/', '\\']) || stem == "." || stem == ".." {
            return Err(Error::Config(format!(
                "report file stem '{stem}' must be a plain, non-empty file name"
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json_path = dir.join(format!("{stem}.json"));
        crate::atomic_file::write(&json_path, self.to_json()?.as_bytes())?;
        let md_path = dir.join(format!("{stem}.md"));
        crate::atomic_file::write(&md_path, self.to_markdown().as_bytes())?;
        Ok(())
    }
}
