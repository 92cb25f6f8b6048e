//! Probability-flow ODE of a Gaussian diffusion path, as a [`VelocityField`] for the CNF code.
//!
//! Every family here noises data as x_u = α(u) x_0 + σ(u) ε along a path parameter u (DDPM's
//! t = i/T, a score SDE's t, EDM's warped σ). The marginals p_u are transported by the
//! deterministic field (Song et al. 2021, eq. 13, written for a general affine path as in
//! Lipman et al. 2023 / Kingma et al. 2021)
//!
//! ```text
//! dx/du = α'(u) E[x_0 | x_u = x] + σ'(u) E[ε | x_u = x],   E[ε | x] = (x - α x̂_0) / σ,
//! ```
//!
//! so a network's x̂_0 prediction gives the field. The CNF code puts the base at flow time
//! s = 0 and the data at s = 1, so s runs from u_max (noise) to u_min (data):
//! u(s) = u_max - s (u_max - u_min), and the field is scaled by du/ds. The base is taken as
//! N(0, (α(u_max)² + σ(u_max)²) I) (N(0, I) for VP paths, N(0, (1 + σ_max²) I) for VE / EDM;
//! Song et al. 2021 use N(0, I) and N(0, σ_max² I)): [`log_likelihood`] corrects cnf.rs's
//! standard-normal base accordingly.

use candle_core::{DType, Tensor};

use crate::config::EvalOptions;
use crate::continuous::cnf::{self, CnfOptions, Divergence};
use crate::continuous::diffusion::net::DataScale;
use crate::continuous::ode::Solver;
use crate::continuous::parameterization::Coeffs;
use crate::continuous::VelocityField;
use crate::{Error, Result, Rng};
use crate::{Nll, NllKind};

/// The probability-flow field of a path with an x̂_0 predictor, in CNF flow time s.
pub struct PfOde<'a> {
    /// The path as a function of u: α(u), σ(u) and their derivatives in u.
    pub path: &'a dyn Fn(f64) -> Coeffs,
    /// x̂_0(x_u, u): `[B, D]` -> `[B, D]` (must record gradients w.r.t. x_u for the exact /
    /// reverse-mode Hutchinson divergence).
    pub predict_x0: &'a dyn Fn(&Tensor, f64) -> Result<Tensor>,
    /// Data end of the path (u > 0 keeps σ > 0).
    pub u_min: f64,
    /// Noise end of the path.
    pub u_max: f64,
}

impl PfOde<'_> {
    /// u at flow time s.
    pub fn u_at(&self, s: f64) -> f64 {
        self.u_max - s * (self.u_max - self.u_min)
    }

    /// The field in the path's own parameter: dx/du at u.
    pub fn velocity_u(&self, x: &Tensor, u: f64) -> Result<Tensor> {
        let p = (self.path)(u);
        let x0 = (self.predict_x0)(x, u)?.to_dtype(x.dtype())?; // [B, D]
        let eps = ((x - (&x0 * p.alpha)?)? / p.sigma)?; // [B, D]
        Ok(((x0 * p.d_alpha)? + (eps * p.d_sigma)?)?)
    }

    /// Standard deviation of the base distribution at u_max.
    pub fn base_std(&self) -> f64 {
        let p = (self.path)(self.u_max);
        (p.alpha * p.alpha + p.sigma * p.sigma).sqrt()
    }
}

impl VelocityField for PfOde<'_> {
    fn velocity(&self, x: &Tensor, s: f64) -> Result<Tensor> {
        let u = self.u_at(s);
        Ok((self.velocity_u(x, u)? * (-(self.u_max - self.u_min)))?)
    }
}

/// log p_{u_min}(x) in nats per row of `x: [B, D]` (model space) under the probability-flow
/// ODE, with the base N(0, base_std² I), and the per-example standard error over Hutchinson
/// probes when there are at least two.
pub fn log_likelihood(
    field: &PfOde<'_>,
    x: &Tensor,
    opts: &CnfOptions,
    rng: &mut Rng,
) -> Result<(Vec<f64>, Option<Vec<f64>>)> {
    if field.u_min.is_nan() || field.u_max.is_nan() || field.u_min >= field.u_max {
        return Err(Error::Config(format!(
            "the probability-flow ODE needs u_min < u_max, got {} and {}",
            field.u_min, field.u_max
        )));
    }
    let ll = cnf::log_likelihood(field, x, opts, rng)?;
    let d = x.dim(1)? as f64;
    let s = field.base_std();
    // cnf used log N(z; 0, I); replace it by log N(z; 0, s² I).
    let sq = ll
        .z0
        .to_dtype(DType::F64)?
        .sqr()?
        .sum(1)?
        .to_vec1::<f64>()?; // [B]
    let logp = ll
        .logp
        .iter()
        .zip(&sq)
        .map(|(lp, q)| lp - d * s.ln() - 0.5 * q * (1.0 / (s * s) - 1.0))
        .collect();
    Ok((logp, ll.probe_stderr))
}

/// Draw `n` samples: integrate the field from the base (flow time 0) to u_min, then return
/// the denoised x̂_0(x_{u_min}, u_min) (Song et al. 2021, "denoising" at the last step).
pub fn sample(
    field: &PfOde<'_>,
    n: usize,
    dim: usize,
    solver: &crate::continuous::ode::Solver,
    rng: &mut Rng,
    device: &candle_core::Device,
) -> Result<Tensor> {
    let z = (rng.normal_tensor(&[n, dim], device)? * field.base_std())?; // [n, D]
    let (x, _) = cnf::sample(field, &z, solver)?;
    Ok((field.predict_x0)(&x, field.u_min)?.detach())
}

/// The CNF options (solver and divergence) of an eval config: the one place that reads
/// `EvalOptions::divergence` ("auto": exact up to `exact_max_dim` dimensions, else Hutchinson
/// with `probes` probes; or exact, or hutchinson), for every continuous-time
/// likelihood (the probability-flow ODE of the diffusion families and flow matching's CNF).
pub fn cnf_options(opts: &EvalOptions, dim: usize) -> Result<CnfOptions> {
    let solver = Solver::parse(opts.solver.as_str(), opts.steps, opts.rtol, opts.atol)?;
    let divergence = if opts.divergence.is_exact(dim, opts.exact_max_dim) {
        Divergence::Exact
    } else {
        Divergence::Hutchinson {
            probes: opts.probes,
        }
    };
    divergence.validate()?;
    Ok(CnfOptions { solver, divergence })
}

/// The NLL kind of a probability-flow likelihood.
pub fn kind(div: &Divergence, discrete: bool) -> NllKind {
    match (div, discrete) {
        (Divergence::Hutchinson { probes }, _) => NllKind::Estimate { samples: *probes },
        (Divergence::Exact, false) => NllKind::Exact,
        (Divergence::Exact, true) => NllKind::Bound,
    }
}

/// "exact divergence", "Hutchinson divergence, K probe(s)" or "invalid options: ..." for the
/// divergence [`cnf_options`] picks.
pub fn divergence_label(opts: &EvalOptions, dim: usize) -> String {
    match cnf_options(opts, dim).map(|c| c.divergence) {
        Ok(Divergence::Exact) => "exact divergence".to_string(),
        Ok(Divergence::Hutchinson { probes }) => {
            format!("Hutchinson divergence, {probes} probe(s)")
        }
        Err(e) => format!("invalid options: {e}"),
    }
}

/// "dopri5 rtol 1e-5 atol 1e-5" or "heun 100 steps".
pub fn solver_label(solver: &str, steps: usize, rtol: f64, atol: f64) -> String {
    match solver {
        "dopri5" => format!("dopri5 rtol {rtol:e} atol {atol:e}"),
        s => format!("{s} {steps} steps"),
    }
}

/// Method line of a probability-flow likelihood.
pub fn method(opts: &EvalOptions, dim: usize, what: &str) -> String {
    let div = divergence_label(opts, dim);
    let solver = solver_label(opts.solver.as_str(), opts.steps, opts.rtol, opts.atol);
    format!("probability-flow ODE ({what}), {solver}, {div}")
}

/// Per-example NLL of `batch` (data units) under the probability-flow ODE: discrete data is
/// dequantized uniformly within its bins and the bin width's Jacobian added, so the result bounds
/// the discrete NLL (Theis et al. 2016); labelled an estimate when the divergence is Hutchinson's.
pub fn dequantized_nll(
    field: &PfOde<'_>,
    scale: DataScale,
    batch: &Tensor,
    opts: &EvalOptions,
    rng: &mut Rng,
) -> Result<Nll> {
    let dim = batch.dim(1)?;
    let co = cnf_options(opts, dim)?;
    let x = scale.dequantize(batch, rng)?;
    let (logp, _) = log_likelihood(field, &x, &co, rng)?;
    let off = scale.log_jacobian(dim);
    Ok(Nll {
        nats: logp.iter().map(|l| -(l + off)).collect(),
        dims: dim,
        kind: kind(&co.divergence, scale.levels.is_some()),
    })
}
