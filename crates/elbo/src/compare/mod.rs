//! `elbo compare` and `elbo report`: several runs of any families on the same data, scored in
//! the same units, in one report.
//!
//! - [`suite`]: the suite file (entries with their config, likelihoods and metrics) and its
//!   `--quick` scale.
//! - [`report`]: the report model (`report.json`, versioned) and its Markdown.
//! - [`checks`]: consistency checks (estimator agreement, the true entropy, bound labels).
//! - [`html`]: the self-contained HTML page.

pub mod checks;
pub mod html;
pub mod report;
pub mod suite;

pub use checks::{Check, CheckKind};
pub use report::{CompareReport, EntryReport, EntryStatus, LikelihoodRow, Machine};
pub use suite::{Entry, Suite};
