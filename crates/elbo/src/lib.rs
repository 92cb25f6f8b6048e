//! # elbo
//!
//! Generative models of every major family, trained, sampled and evaluated under one idea: each
//! one fits the data by maximum likelihood, exactly or through a bound (the evidence lower bound).
//!
//! Layout (see `DESIGN.md` in the repository for the full picture):
//! - [`likelihood`]: `Nll` with its kind (exact / bound / estimate / none) and unit conversions.
//! - [`rng`]: the seeded, splittable generator every random draw comes from.
//! - [`data`]: 2-D toy sets (FFJORD), embedded 8x8 digits, `.npy` / CSV loaders.
//! - [`nn`]: backbones that know nothing about generative modelling.
//! - [`continuous`]: models of x in R^D: flow matching, ODE solvers, CNF likelihood.
//! - [`discrete`]: language models of token sequences: autoregressive, any-order, masked diffusion.
//! - [`train`]: the training layer candle lacks (AdamW, EMA, clipping, schedules, checkpoints, loop).
//! - [`eval`]: likelihood reports and plots.
//! - [`model`]: the `GenerativeModel` trait every family implements, and the registry of families.

pub mod config;
pub mod continuous;
pub mod data;
pub mod discrete;
pub mod error;
pub mod eval;
pub mod likelihood;
pub mod model;
pub mod nn;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
pub use likelihood::{Nll, NllKind, NllSummary};
pub use rng::Rng;
