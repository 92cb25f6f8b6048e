//! Likelihood reports (JSON and Markdown), plots (PNG), sample metrics and annealed importance
//! sampling (the likelihood estimator of decoders and energies).

pub mod ais;
pub mod feature_net;
pub mod frechet;
pub mod importance;
pub mod mode_coverage;
pub mod plot;
pub mod report;
pub mod sample_metric;
