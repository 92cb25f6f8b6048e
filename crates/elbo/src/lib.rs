//! # elbo
//!
//! Generative models of every major family, trained, sampled and evaluated under one idea: each
//! one fits the data by maximum likelihood, exactly or through a bound (the evidence lower bound).
//!
//! Layout (`docs/architecture.md` in the repository has the full picture):
//! - [`model`]: the `GenerativeModel` trait every family implements, and its training-step hook.
//! - [`models`]: one file per family with its typed config beside it, and the registry.
//! - [`continuous`]: shared mathematics of x in R^D: noise schedules, the Gaussian chain,
//!   parameterizations, samplers, ODE solvers, the CNF likelihood, dequantization.
//! - [`discrete`]: shared mathematics of token sequences: orders, masking, token filters,
//!   masked-diffusion samplers.
//! - [`nn`]: backbones that know nothing about generative modelling.
//! - [`likelihood`]: `Nll` with its kind (exact / bound / estimate / none) and unit conversions.
//! - [`rng`]: the seeded, splittable generator every random draw comes from.
//! - [`data`]: 2-D toy sets (FFJORD), embedded 8x8 digits, MNIST, text, `.npy` / CSV loaders.
//! - [`train`]: the training layer candle lacks (AdamW, EMA, clipping, schedules, checkpoints, loop).
//! - [`eval`]: likelihood reports, sample metrics and plots.
//! - [`config`]: the run configuration.
//! - [`compare`]: suites of runs scored side by side, and their reports.
//! - [`atomic_file`]: every file elbo writes is replaced atomically (temporary, fsync, rename).
//! - [`resources`]: the memory estimate checked before any work starts.
//! - [`deadline`]: cooperative time budgets.

pub mod atomic_file;
pub mod compare;
pub mod config;
pub mod continuous;
pub mod data;
pub mod deadline;
pub mod discrete;
pub mod error;
pub mod eval;
pub mod flows;
pub mod latent;
pub mod likelihood;
pub mod model;
pub mod models;
pub mod nn;
pub mod resources;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
pub use likelihood::{Nll, NllKind, NllSummary};
pub use rng::Rng;
