//! Consistency checks of a comparison, each a pass / fail row with its numbers.
//!
//! - **Agreement.** Two estimators of the *same* quantity on the same entry must agree within
//!   3 combined standard errors, |a - b| <= 3 sqrt(se_a^2 + se_b^2). Comparable pairs are
//!   listed in [`SAME_QUANTITY`]: MDLM's `nelbo` (Sahoo et al. 2024, eq. 10, sampled times)
//!   and `llada` (Nie et al. 2025, eq. 6, sampled mask counts) both estimate the masked
//!   diffusion ELBO. DDPM's `vlb` and `pf-ode` are *not* a pair: the VLB bounds the discrete
//!   chain's likelihood (Ho et al. 2020, eq. 5), the probability-flow ODE is the likelihood of
//!   a different, deterministic model (Song et al. 2021, eq. 13), so they may differ by more
//!   than their noise. Both figures score the same examples, so their errors are positively
//!   correlated and the uncorrelated combined error used here is conservative (the check
//!   fails less often than a paired test would).
//! - **Entropy.** Where the data's true entropy H is known (the 2-D toys), no NLL can lie
//!   below it in expectation (NLL - H = KL >= 0, Cover & Thomas, Thm. 2.6.3), so a figure
//!   more than 3 s.e. below H is flagged.
//! - **Bound labels.** A figure that is a bound (a VLB / NELBO / Jensen bound, or a density
//!   of dequantized discrete data, Theis et al. 2016, sec. 3.1) must be labelled as one, and
//!   every row of kind bound must say "bound".

use serde::{Deserialize, Serialize};

use super::report::{EntryReport, LikelihoodRow};
use crate::likelihood::NllKind;

/// Pairs of likelihood names of one family that estimate the same quantity.
pub const SAME_QUANTITY: &[(&str, &str, &str)] = &[("mdlm", "nelbo", "llada")];

/// Likelihood names that are bounds on the NLL whatever the data.
const BOUND_NAMES: &[&str] = &["vlb", "nelbo", "llada", "bound"];

/// Which check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// Two estimators of the same quantity agree within 3 combined s.e.
    Agreement,
    /// No figure more than 3 s.e. below the true entropy.
    Entropy,
    /// Every bound labelled as a bound.
    BoundLabel,
}

impl CheckKind {
    /// A short title for tables.
    pub fn title(&self) -> &'static str {
        match self {
            CheckKind::Agreement => "estimators agree (3 s.e.)",
            CheckKind::Entropy => "not below the true entropy (3 s.e.)",
            CheckKind::BoundLabel => "bounds labelled as bounds",
        }
    }
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// Which check.
    pub kind: CheckKind,
    /// The entry it looked at.
    pub entry: String,
    /// Whether it passed.
    pub passed: bool,
    /// Its numbers, e.g. "nelbo 120.1 ± 0.8 vs llada 119.5 ± 1.1: |diff| 0.6 <= 4.1".
    pub detail: String,
}

/// Every check over every entry with figures.
pub fn run_checks(entries: &[EntryReport]) -> Vec<Check> {
    let mut out = Vec::new();
    for e in entries {
        agreement(e, &mut out);
        entropy(e, &mut out);
        bound_labels(e, &mut out);
    }
    out
}

fn row<'a>(e: &'a EntryReport, name: &str) -> Option<&'a LikelihoodRow> {
    e.rows.iter().find(|r| r.likelihood == name)
}

fn agreement(e: &EntryReport, out: &mut Vec<Check>) {
    for (family, a, b) in SAME_QUANTITY {
        if e.family != *family {
            continue;
        }
        let (Some(ra), Some(rb)) = (row(e, a), row(e, b)) else {
            continue;
        };
        let (Some(xa), Some(xb)) = (ra.nats, rb.nats) else {
            continue;
        };
        let (sa, sb) = (ra.stderr_nats.unwrap_or(0.0), rb.stderr_nats.unwrap_or(0.0));
        let diff = (xa - xb).abs();
        let tol = 3.0 * (sa * sa + sb * sb).sqrt();
        out.push(Check {
            kind: CheckKind::Agreement,
            entry: e.name.clone(),
            passed: diff <= tol,
            detail: format!(
                "{a} {xa:.4} ± {sa:.4} vs {b} {xb:.4} ± {sb:.4} nats: |diff| {diff:.4} {} {tol:.4}",
                if diff <= tol { "<=" } else { ">" }
            ),
        });
    }
}

fn entropy(e: &EntryReport, out: &mut Vec<Check>) {
    let Some(h) = e.entropy.filter(|h| h.is_finite()) else {
        return;
    };
    for r in &e.rows {
        let Some(x) = r.nats else { continue };
        let se = r.stderr_nats.unwrap_or(0.0);
        let floor = h - 3.0 * se;
        let passed = x >= floor;
        out.push(Check {
            kind: CheckKind::Entropy,
            entry: e.name.clone(),
            passed,
            detail: format!(
                "{} {x:.4} ± {se:.4} nats {} H - 3 s.e. = {h:.4} - {:.4} = {floor:.4}",
                r.likelihood,
                if passed { ">=" } else { "<" },
                3.0 * se
            ),
        });
    }
}

/// Whether a row's figure is a bound on the discrete or continuous NLL by what it computes.
fn is_bound_by_method(r: &LikelihoodRow) -> bool {
    BOUND_NAMES.contains(&r.likelihood.as_str()) || r.method.contains("dequantiz")
}

fn says_bound(r: &LikelihoodRow) -> bool {
    r.kind_label.contains("bound") || r.method.contains("bound")
}

fn bound_labels(e: &EntryReport, out: &mut Vec<Check>) {
    for r in &e.rows {
        if r.kind == NllKind::None {
            continue;
        }
        let should = is_bound_by_method(r) || r.kind == NllKind::Bound;
        if !should {
            continue;
        }
        let passed = says_bound(r) && r.kind != NllKind::Exact;
        out.push(Check {
            kind: CheckKind::BoundLabel,
            entry: e.name.clone(),
            passed,
            detail: format!(
                "{}: kind {}, labelled \"{}\"{}",
                r.likelihood,
                r.kind.label(),
                r.kind_label,
                if r.method.contains("bound") && !r.kind_label.contains("bound") {
                    "; its method line says it is a bound"
                } else {
                    ""
                }
            ),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::report::EntryStatus;

    fn row(name: &str, kind: NllKind, nats: f64, se: f64, label: &str) -> LikelihoodRow {
        LikelihoodRow {
            likelihood: name.into(),
            kind,
            kind_label: label.into(),
            nats: Some(nats),
            stderr_nats: Some(se),
            bits_per_dim: Some(nats),
            stderr_bits_per_dim: Some(se),
            n: 10,
            dims: 1,
            method: String::new(),
            checkpoint: String::new(),
            split: "test".into(),
        }
    }

    fn entry(family: &str, entropy: Option<f64>, rows: Vec<LikelihoodRow>) -> EntryReport {
        let mut e = EntryReport::failed("e", std::path::Path::new("x"), String::new());
        e.status = EntryStatus::Ok;
        e.error = None;
        e.family = family.into();
        e.entropy = entropy;
        e.rows = rows;
        e
    }

    #[test]
    fn agreement_uses_three_combined_standard_errors() {
        let b = "bound (upper bound on NLL)";
        // combined s.e. 5: 3 s.e. = 15
        let close = entry(
            "mdlm",
            None,
            vec![
                row("nelbo", NllKind::Bound, 100.0, 3.0, b),
                row("llada", NllKind::Bound, 114.0, 4.0, b),
            ],
        );
        let far = entry(
            "mdlm",
            None,
            vec![
                row("nelbo", NllKind::Bound, 100.0, 3.0, b),
                row("llada", NllKind::Bound, 116.0, 4.0, b),
            ],
        );
        let c = run_checks(&[close]);
        assert!(
            c.iter().any(|c| c.kind == CheckKind::Agreement && c.passed),
            "{c:?}"
        );
        let c = run_checks(&[far]);
        let a: Vec<_> = c
            .iter()
            .filter(|c| c.kind == CheckKind::Agreement)
            .collect();
        assert_eq!(a.len(), 1);
        assert!(!a[0].passed && a[0].detail.contains("15.0000"), "{a:?}");
        // vlb and pf-ode of DDPM are different quantities: no agreement check
        let d = entry(
            "ddpm",
            None,
            vec![
                row("vlb", NllKind::Bound, 100.0, 1.0, b),
                row("pf-ode", NllKind::Exact, 50.0, 1.0, "exact"),
            ],
        );
        assert!(run_checks(&[d])
            .iter()
            .all(|c| c.kind != CheckKind::Agreement));
    }

    #[test]
    fn entropy_and_bound_labels_fail_when_they_should() {
        let low = entry(
            "flow-matching",
            Some(3.0),
            vec![row("pf-ode", NllKind::Exact, 2.5, 0.1, "exact")],
        );
        let ok = entry(
            "flow-matching",
            Some(3.0),
            vec![row("pf-ode", NllKind::Exact, 2.8, 0.1, "exact")],
        );
        let c = run_checks(&[low, ok]);
        let ent: Vec<bool> = c
            .iter()
            .filter(|c| c.kind == CheckKind::Entropy)
            .map(|c| c.passed)
            .collect();
        assert_eq!(ent, vec![false, true]);
        let mislabelled = entry(
            "ddpm",
            None,
            vec![row("vlb", NllKind::Exact, 1.0, 0.1, "exact")],
        );
        let c = run_checks(&[mislabelled]);
        assert!(
            c.iter()
                .any(|c| c.kind == CheckKind::BoundLabel && !c.passed),
            "{c:?}"
        );
    }
}
