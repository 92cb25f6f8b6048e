//! Gaussian diffusion shared by the DDPM, score-SDE and EDM families: the discrete chain and its
//! posterior, closed-form Gaussian terms and the discretized decoder, the full VLB, the
//! parameterizations, the probability-flow ODE of any Gaussian path, and the network.

pub mod chain;
pub mod gaussian;
pub mod net;
pub mod param;
pub mod pf_ode;
pub mod sampling;
pub mod vlb;

pub use chain::{Chain, Posterior, VarianceKind};
pub use vlb::{vlb, vlb_with_variances, Decoder, VlbTerms};
