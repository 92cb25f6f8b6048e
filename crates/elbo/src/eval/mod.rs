//! Likelihood reports (JSON and Markdown) and plots (PNG).

pub mod feature_net;
pub mod frechet;
pub mod mode_coverage;
pub mod plot;
pub mod report;
pub mod sample_metric;
