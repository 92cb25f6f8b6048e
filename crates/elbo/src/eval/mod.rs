//! Likelihood reports (JSON and Markdown) and plots (PNG).

pub mod mode_coverage;
pub mod plot;
pub mod report;
pub mod sample_metric;
