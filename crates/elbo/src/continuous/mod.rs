//! Models of x in R^D: flow matching, ODE solvers and continuous-normalizing-flow likelihoods.

use candle_core::Tensor;

use crate::Result;

pub mod cnf;
pub mod flow_matching;
pub mod ode;

/// A time-dependent vector field v(x, t) on R^D: the whole contract between a network and the
/// ODE samplers / likelihood code. Samplers never know which network they drive.
pub trait VelocityField {
    /// v(x, t) for a batch `x: [B, D]` at one time `t`; returns `[B, D]`.
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor>;
}

impl<F> VelocityField for F
where
    F: Fn(&Tensor, f64) -> Result<Tensor>,
{
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self(x, t)
    }
}
