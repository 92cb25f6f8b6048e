//! The shared mathematics of models of x in R^D: dequantization of discrete data, ODE solvers,
//! continuous-normalizing-flow likelihoods, and Gaussian-diffusion noise schedules, chains, parameterizations and samplers.
//! The families built on them (flow matching, DDPM, score SDE, EDM) live in [`crate::models`].

use candle_core::Tensor;

use crate::Result;

pub mod adversarial;
pub mod cnf;
pub mod dequantization;
pub mod diffusion;
pub mod gaussian_fit;
pub mod langevin;
pub mod ode;
pub mod parameterization;
pub mod sampler;
pub mod schedule;

/// A time-dependent vector field v(x, t) on R^D: the whole contract between a network and the
/// ODE samplers / likelihood code. Samplers never know which network they drive.
pub trait VelocityField {
    /// v(x, t) for a batch `x: [B, D]` at one time `t`; returns `[B, D]`.
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor>;

    /// Forward-mode Jacobian-vector products: `v(x, t)` (`[B, D]`) and `J_v(x, t) u_k` for
    /// tangents `u: [K, B, D]` (returns `[K, B, D]`), computed without autograd. Fields without
    /// a forward mode return `None`, and the CNF code falls back to reverse-mode autograd
    /// (one backward pass per dimension or probe).
    fn jvp(&self, _x: &Tensor, _t: f64, _tangents: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        Ok(None)
    }
}

impl<F> VelocityField for F
where
    F: Fn(&Tensor, f64) -> Result<Tensor>,
{
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        self(x, t)
    }
}
