//! Log-likelihood of a continuous normalizing flow (CNF) given by a [`VelocityField`].
//!
//! The base N(0, I) sits at t = 0 and the data at t = 1 (the flow-matching convention
//! x_t = (1 - t) x0 + t x1). By the instantaneous change of variables (Chen et al. 2018, Thm. 1;
//! FFJORD, Grathwohl et al. 2019, eqs. 3-4)
//!
//! ```text
//! log p_1(x(1)) = log N(x(0); 0, I) - ∫_0^1 div v(x(t), t) dt,
//! ```
//!
//! which is evaluated by integrating the augmented state `[x, a]` with `da/dt = div v` from
//! t = 1 (x = data, a = 0) back to t = 0, so that `log p_1(x1) = log N(x(0)) + a(0)`. The
//! divergence is exact (D backward passes per evaluation) or Hutchinson's estimate
//! E[eps^T J eps] = tr J with Rademacher probes (Hutchinson 1989), the probes being drawn once
//! and held fixed over the whole solve (FFJORD, Sec. 3).

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::ode::{integrate, OdeStats, Solver};
use super::VelocityField;
use crate::{Error, Result, Rng};

/// How the divergence of the velocity field is computed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Divergence {
    /// The exact trace of the Jacobian, one backward pass per dimension.
    Exact,
    /// Hutchinson's stochastic trace estimator (Hutchinson 1989) with `probes` Rademacher probes
    /// per example, each integrated in its own accumulator.
    Hutchinson {
        /// Number of probes K (at least 1; K >= 2 gives a per-example standard error).
        probes: usize,
    },
}

/// The divergence names [`Divergence::parse`] accepts.
pub const DIVERGENCE_NAMES: &str = "exact, hutchinson";

impl Divergence {
    /// A divergence from its name (`"exact"` or `"hutchinson"`, case-insensitive); `probes` is
    /// used by hutchinson and must be at least 1.
    pub fn parse(name: &str, probes: usize) -> Result<Divergence> {
        let div = match name.trim().to_ascii_lowercase().as_str() {
            "exact" => Divergence::Exact,
            "hutchinson" => Divergence::Hutchinson { probes },
            _ => {
                return Err(Error::Config(format!(
                    "unknown divergence '{name}'; known divergences: {DIVERGENCE_NAMES}"
                )))
            }
        };
        div.validate()?;
        Ok(div)
    }

    /// Checks that Hutchinson has at least one probe.
    pub fn validate(&self) -> Result<()> {
        match self {
            Divergence::Hutchinson { probes: 0 } => Err(Error::Config(
                "the hutchinson divergence needs at least one probe".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Settings of [`log_likelihood`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CnfOptions {
    /// The ODE solver for the augmented state.
    pub solver: Solver,
    /// Exact or Hutchinson divergence.
    pub divergence: Divergence,
}

impl Default for CnfOptions {
    /// Dopri5 with rtol = atol = 1e-5 and the exact divergence.
    fn default() -> Self {
        CnfOptions {
            solver: Solver::Dopri5 {
                rtol: 1e-5,
                atol: 1e-5,
            },
            divergence: Divergence::Exact,
        }
    }
}

/// The result of [`log_likelihood`].
#[derive(Clone, Debug)]
pub struct CnfLogLik {
    /// log p_1(x1) in nats per example (the mean over the probes for Hutchinson).
    pub logp: Vec<f64>,
    /// Per example, the standard error of `logp` over the K probes (Hutchinson with K >= 2).
    pub probe_stderr: Option<Vec<f64>>,
    /// The latent x(0) the data flows back to, `[B, D]`.
    pub z0: Tensor,
    /// Cost of the solve.
    pub stats: OdeStats,
}

/// The velocity `v(x, t)` (detached, `[B, D]`) and its divergence `[B, K]`.
///
/// With `probes: None` the divergence is exact (K = 1): x becomes a fresh [`Var`] and column i
/// of the gradient of `sum_b v[b, i]` is dv_i/dx_i, for D backward passes. With
/// `probes: Some(eps)`, `eps: [K, B, D]` (Rademacher), column k is Hutchinson's estimate
/// `eps_k^T J eps_k` from the gradient of `sum(v * eps_k)` (Hutchinson 1989), K backward passes.
/// Gradients also reach any network parameters in the graph; they are discarded.
pub fn divergence(
    field: &dyn VelocityField,
    x: &Tensor,
    t: f64,
    probes: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (b, d) = x.dims2().map_err(|_| {
        Error::Shape(format!(
            "divergence needs x of shape [B, D], got {:?}",
            x.dims()
        ))
    })?;
    if let Some(res) = forward_mode_divergence(field, x, t, probes, b, d)? {
        return Ok(res);
    }
    let xv = Var::from_tensor(&x.detach())?; // a fresh leaf, copied from x
    let xt = xv.as_tensor();
    let v = field.velocity(xt, t)?;
    if v.dims() != [b, d] {
        return Err(Error::Shape(format!(
            "velocity field returned shape {:?} for x of shape [{b}, {d}]",
            v.dims()
        )));
    }
    // Gradient of a scalar w.r.t. x; a field that ignores x has a zero gradient.
    let grad_x = |s: Tensor| -> Result<Tensor> {
        let grads = s.backward()?;
        Ok(match grads.get(xt) {
            Some(g) => g.clone(),
            None => xt.zeros_like()?,
        })
    };
    let div = match probes {
        None => {
            let mut acc = Tensor::zeros((b, 1), x.dtype(), x.device())?;
            for i in 0..d {
                let g = grad_x(v.narrow(1, i, 1)?.sum_all()?)?; // [B, D]
                acc = (acc + g.narrow(1, i, 1)?)?; // [B, 1]
            }
            acc
        }
        Some(eps) => {
            let (k, eb, ed) = eps.dims3().map_err(|_| {
                Error::Shape(format!(
                    "Hutchinson probes must be [K, B, D], got {:?}",
                    eps.dims()
                ))
            })?;
            if (eb, ed) != (b, d) || k == 0 {
                return Err(Error::Shape(format!(
                    "Hutchinson probes of shape {:?} do not fit x of shape [{b}, {d}]",
                    eps.dims()
                )));
            }
            let eps = eps.to_dtype(x.dtype())?;
            let mut cols = Vec::with_capacity(k);
            for j in 0..k {
                let e = eps.get(j)?; // [B, D]
                let g = grad_x(v.mul(&e)?.sum_all()?)?; // [B, D] = eps^T J per row
                cols.push(g.mul(&e)?.sum_keepdim(1)?); // [B, 1]
            }
            Tensor::cat(&cols, 1)? // [B, K]
        }
    };
    Ok((v.detach(), div.detach()))
}

/// The divergence from the field's forward-mode [`VelocityField::jvp`], when it has one:
/// exact with the D unit tangents (`tr J = sum_i e_i^T J e_i`), or Hutchinson with the probes.
fn forward_mode_divergence(
    field: &dyn VelocityField,
    x: &Tensor,
    t: f64,
    probes: Option<&Tensor>,
    b: usize,
    d: usize,
) -> Result<Option<(Tensor, Tensor)>> {
    let tangents = match probes {
        None => Tensor::eye(d, x.dtype(), x.device())?
            .reshape((d, 1, d))?
            .broadcast_as((d, b, d))?
            .contiguous()?, // [D, B, D]: tangent i is e_i for every row
        Some(eps) => {
            if eps.rank() != 3 || eps.dim(0)? == 0 || eps.dims()[1..] != [b, d] {
                return Err(Error::Shape(format!(
                    "Hutchinson probes of shape {:?} do not fit x of shape [{b}, {d}]",
                    eps.dims()
                )));
            }
            eps.to_dtype(x.dtype())?
        }
    };
    let Some((v, jv)) = field.jvp(&x.detach(), t, &tangents)? else {
        return Ok(None);
    };
    if v.dims() != [b, d] || jv.dims() != tangents.dims() {
        return Err(Error::Shape(format!(
            "velocity field jvp returned shapes {:?} and {:?} for x [{b}, {d}] and tangents {:?}",
            v.dims(),
            jv.dims(),
            tangents.dims()
        )));
    }
    let quad = (jv.to_dtype(x.dtype())? * &tangents)?.sum(2)?; // [K, B]: u_k^T J u_k
    let div = match probes {
        None => quad.sum_keepdim(0)?.t()?,  // [B, 1]
        Some(_) => quad.t()?.contiguous()?, // [B, K]
    };
    Ok(Some((v.to_dtype(x.dtype())?.detach(), div.detach())))
}

/// log p_1(x1) under the CNF `dx/dt = v(x, t)` with base N(0, I) at t = 0 (instantaneous change
/// of variables, Chen et al. 2018; FFJORD, Grathwohl et al. 2019, eqs. 3-4).
///
/// `x1: [B, D]` in f32 or f64; the solve runs in that dtype. Hutchinson probes (`[K, B, D]`,
/// Rademacher) are drawn once from `rng` and held fixed over the solve; each probe has its own
/// accumulator (state `[B, D + K]`), which gives the per-example spread over probes.
pub fn log_likelihood(
    field: &dyn VelocityField,
    x1: &Tensor,
    opts: &CnfOptions,
    rng: &mut Rng,
) -> Result<CnfLogLik> {
    let (b, d) = x1.dims2().map_err(|_| {
        Error::Shape(format!(
            "CNF log-likelihood needs data of shape [B, D], got {:?}",
            x1.dims()
        ))
    })?;
    if d == 0 {
        return Err(Error::Shape("CNF data has zero dimensions".into()));
    }
    if !x1.dtype().is_float() {
        return Err(Error::Config(format!(
            "CNF data must be a float tensor, got {:?}",
            x1.dtype()
        )));
    }
    opts.solver.validate()?;
    opts.divergence.validate()?;
    let probes = match opts.divergence {
        Divergence::Exact => None,
        Divergence::Hutchinson { probes } => Some(
            rng.rademacher_tensor(&[probes, b, d], x1.device())?
                .to_dtype(x1.dtype())?, // [K, B, D]
        ),
    };
    let k = match opts.divergence {
        Divergence::Exact => 1,
        Divergence::Hutchinson { probes } => probes,
    };
    let acc0 = Tensor::zeros((b, k), x1.dtype(), x1.device())?;
    let state1 = Tensor::cat(&[&x1.detach(), &acc0], 1)?; // [B, D + K]
    let mut rhs = |s: &Tensor, t: f64| -> Result<Tensor> {
        let x = s.narrow(1, 0, d)?; // [B, D]
        let (v, div) = divergence(field, &x, t, probes.as_ref())?;
        Ok(Tensor::cat(&[&v, &div], 1)?) // [B, D + K]
    };
    let (state0, stats) = integrate(&mut rhs, &state1, 1.0, 0.0, &opts.solver)?;
    let z0 = state0.narrow(1, 0, d)?; // [B, D]
    let acc = state0
        .narrow(1, d, k)?
        .to_dtype(DType::F64)?
        .to_vec2::<f64>()?; // [B, K]
    let sq = z0.to_dtype(DType::F64)?.sqr()?.sum(1)?.to_vec1::<f64>()?; // [B]
    let log_norm = 0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln();
    let mut logp = Vec::with_capacity(b);
    let mut stderr = Vec::with_capacity(b);
    for (row, s) in acc.iter().zip(&sq) {
        let base = -0.5 * s - log_norm;
        let mean = row.iter().sum::<f64>() / k as f64;
        logp.push(base + mean);
        if k >= 2 {
            let var = row.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (k - 1) as f64;
            stderr.push((var / k as f64).sqrt());
        }
    }
    if logp.iter().any(|v| !v.is_finite()) {
        return Err(Error::Numerical("CNF log-likelihood is not finite".into()));
    }
    Ok(CnfLogLik {
        logp,
        probe_stderr: (k >= 2).then_some(stderr),
        z0,
        stats,
    })
}

/// Pushes base samples `z0: [B, D]` through the flow from t = 0 to t = 1 and returns x(1).
/// Plain velocity calls on detached tensors: no autograd graph is built.
pub fn sample(
    field: &dyn VelocityField,
    z0: &Tensor,
    solver: &Solver,
) -> Result<(Tensor, OdeStats)> {
    z0.dims2().map_err(|_| {
        Error::Shape(format!(
            "CNF sampling needs z0 of shape [B, D], got {:?}",
            z0.dims()
        ))
    })?;
    let mut rhs = |x: &Tensor, t: f64| field.velocity(&x.detach(), t);
    integrate(&mut rhs, z0, 0.0, 1.0, solver)
}
