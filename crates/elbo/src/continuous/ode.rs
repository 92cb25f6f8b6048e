//! Explicit ODE solvers over tensors: dy/dt = f(y, t) from `t0` to `t1` (either direction).
//!
//! - [`Solver::Euler`]: forward Euler, first order, `steps` evaluations.
//! - [`Solver::Heun`]: Heun's method (explicit trapezoid rule), second order, `2 * steps`
//!   evaluations.
//! - [`Solver::Dopri5`]: the Dormand-Prince 5(4) embedded Runge-Kutta pair (Dormand & Prince
//!   1980) with first-same-as-last, adaptive step-size control and the initial-step heuristic of
//!   Hairer, Nørsett & Wanner (Solving Ordinary Differential Equations I, 2nd ed., Sec. II.4).
//!
//! The state may have any shape and any float dtype. The solvers never keep an autograd graph
//! between steps: every value returned by `f` is detached before it is used.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Most step attempts (accepted + rejected) an adaptive solve may take before giving up.
pub const MAX_STEPS: usize = 100_000;

/// Which ODE solver to use, with its settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Solver {
    /// Forward Euler with a fixed number of equal steps (global error O(h)).
    Euler {
        /// Number of steps between `t0` and `t1`.
        steps: usize,
    },
    /// Heun's method (explicit trapezoid rule) with fixed steps (global error O(h^2)).
    Heun {
        /// Number of steps between `t0` and `t1`.
        steps: usize,
    },
    /// Adaptive Dormand-Prince 5(4) (Dormand & Prince 1980).
    Dopri5 {
        /// Relative tolerance.
        rtol: f64,
        /// Absolute tolerance.
        atol: f64,
    },
}

/// The solver names [`Solver::parse`] accepts.
pub const SOLVER_NAMES: &str = "euler, heun, dopri5";

impl Solver {
    /// A solver from its name (`"euler"`, `"heun"` or `"dopri5"`, case-insensitive). `steps` is
    /// used by the fixed-step solvers, `rtol` / `atol` by dopri5; the settings are validated.
    pub fn parse(name: &str, steps: usize, rtol: f64, atol: f64) -> Result<Solver> {
        let solver = match name.trim().to_ascii_lowercase().as_str() {
            "euler" => Solver::Euler { steps },
            "heun" => Solver::Heun { steps },
            "dopri5" => Solver::Dopri5 { rtol, atol },
            _ => {
                return Err(Error::Config(format!(
                    "unknown ODE solver '{name}'; known solvers: {SOLVER_NAMES}"
                )))
            }
        };
        solver.validate()?;
        Ok(solver)
    }

    /// The solver's name as [`Solver::parse`] accepts it.
    pub fn name(&self) -> &'static str {
        match self {
            Solver::Euler { .. } => "euler",
            Solver::Heun { .. } => "heun",
            Solver::Dopri5 { .. } => "dopri5",
        }
    }

    /// Checks the settings: at least one fixed step; finite, non-negative tolerances that are
    /// not both zero.
    pub fn validate(&self) -> Result<()> {
        match *self {
            Solver::Euler { steps } | Solver::Heun { steps } if steps == 0 => Err(Error::Config(
                format!("{} needs at least one step", self.name()),
            )),
            Solver::Dopri5 { rtol, atol } => {
                let ok = |v: f64| v.is_finite() && v >= 0.0;
                if !ok(rtol) || !ok(atol) || rtol + atol <= 0.0 {
                    Err(Error::Config(format!(
                        "dopri5 needs finite, non-negative tolerances, not both zero \
                         (rtol {rtol}, atol {atol})"
                    )))
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        }
    }
}

/// What a solve cost.
#[derive(Clone, Debug, Default, Serialize)]
pub struct OdeStats {
    /// Number of evaluations of the right-hand side f.
    pub nfe: usize,
    /// Accepted steps.
    pub steps: usize,
    /// Rejected steps (adaptive solvers only).
    pub rejected: usize,
}

/// Integrates dy/dt = f(y, t) from `t0` to `t1` starting at `y0` and returns y(t1) with the cost.
///
/// `t1 < t0` integrates backward in time. `f` must return a tensor of the shape and dtype of its
/// input. Fails with [`Error::Numerical`] if the state becomes non-finite, the adaptive step size
/// underflows, or more than [`MAX_STEPS`] step attempts are made.
pub fn integrate(
    f: &mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    y0: &Tensor,
    t0: f64,
    t1: f64,
    solver: &Solver,
) -> Result<(Tensor, OdeStats)> {
    solver.validate()?;
    if !t0.is_finite() || !t1.is_finite() {
        return Err(Error::Config(format!(
            "ODE time span must be finite, got {t0} -> {t1}"
        )));
    }
    if !y0.dtype().is_float() {
        return Err(Error::Config(format!(
            "ODE state must be a float tensor, got {:?}",
            y0.dtype()
        )));
    }
    let y0 = y0.detach();
    if t0 == t1 || y0.elem_count() == 0 {
        return Ok((y0, OdeStats::default()));
    }
    let mut eval = Rhs {
        f,
        stats: OdeStats::default(),
    };
    let y = match *solver {
        Solver::Euler { steps } => fixed_steps(&mut eval, y0, t0, t1, steps, false)?,
        Solver::Heun { steps } => fixed_steps(&mut eval, y0, t0, t1, steps, true)?,
        Solver::Dopri5 { rtol, atol } => dopri5(&mut eval, y0, t0, t1, rtol, atol)?,
    };
    Ok((y, eval.stats))
}

/// The right-hand side with its evaluation counter; detaches and shape-checks every output.
struct Rhs<'a> {
    f: &'a mut dyn FnMut(&Tensor, f64) -> Result<Tensor>,
    stats: OdeStats,
}

impl Rhs<'_> {
    fn call(&mut self, y: &Tensor, t: f64) -> Result<Tensor> {
        self.stats.nfe += 1;
        let dy = (self.f)(y, t)?.detach();
        if dy.dims() != y.dims() {
            return Err(Error::Shape(format!(
                "ODE right-hand side returned shape {:?} for a state of shape {:?}",
                dy.dims(),
                y.dims()
            )));
        }
        Ok(dy)
    }
}

/// `y + h * sum_j c_j k_j`, skipping zero coefficients.
fn lin_comb(y: &Tensor, h: f64, terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc = y.clone();
    for &(c, k) in terms {
        if c != 0.0 {
            acc = (acc + k.affine(h * c, 0.0)?)?;
        }
    }
    Ok(acc)
}

/// Whether every element is finite (NaN and ±inf propagate through an f64 sum).
fn all_finite(x: &Tensor) -> Result<bool> {
    Ok(x.to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?
        .is_finite())
}

/// RMS over all elements of `x / (atol + rtol * max(|a|, |b|))`, computed in f64 (torchdiffeq's
/// mixed error norm; Hairer, Nørsett & Wanner Sec. II.4).
fn rms_norm(x: &Tensor, a: &Tensor, b: &Tensor, rtol: f64, atol: f64) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?.abs()?;
    let b = b.to_dtype(DType::F64)?.abs()?;
    let scale = a.maximum(&b)?.affine(rtol, atol)?;
    let ratio = x.to_dtype(DType::F64)?.div(&scale)?;
    Ok(ratio.sqr()?.mean_all()?.to_scalar::<f64>()?.sqrt())
}

/// Euler (`heun == false`) or Heun's explicit trapezoid rule with `steps` equal steps.
fn fixed_steps(
    f: &mut Rhs<'_>,
    mut y: Tensor,
    t0: f64,
    t1: f64,
    steps: usize,
    heun: bool,
) -> Result<Tensor> {
    let h = (t1 - t0) / steps as f64;
    for i in 0..steps {
        let t = t0 + i as f64 * h;
        let k1 = f.call(&y, t)?;
        y = if heun {
            let y_pred = lin_comb(&y, h, &[(1.0, &k1)])?;
            let k2 = f.call(&y_pred, t + h)?;
            lin_comb(&y, h, &[(0.5, &k1), (0.5, &k2)])?
        } else {
            lin_comb(&y, h, &[(1.0, &k1)])?
        };
        f.stats.steps += 1;
    }
    if !all_finite(&y)? {
        return Err(Error::Numerical(format!(
            "{} produced non-finite values integrating {t0} -> {t1}",
            if heun { "heun" } else { "euler" }
        )));
    }
    Ok(y)
}

// Dormand-Prince 5(4) tableau (Dormand & Prince 1980; Hairer, Nørsett & Wanner Table II.5.2).
/// Nodes c2..c5 (c6 = c7 = 1).
const C: [f64; 4] = [1.0 / 5.0, 3.0 / 10.0, 4.0 / 5.0, 8.0 / 9.0];
const A2: [f64; 1] = [1.0 / 5.0];
const A3: [f64; 2] = [3.0 / 40.0, 9.0 / 40.0];
const A4: [f64; 3] = [44.0 / 45.0, -56.0 / 15.0, 32.0 / 9.0];
const A5: [f64; 4] = [
    19372.0 / 6561.0,
    -25360.0 / 2187.0,
    64448.0 / 6561.0,
    -212.0 / 729.0,
];
const A6: [f64; 5] = [
    9017.0 / 3168.0,
    -355.0 / 33.0,
    46732.0 / 5247.0,
    49.0 / 176.0,
    -5103.0 / 18656.0,
];
/// Fifth-order weights (also the last stage's row: first-same-as-last).
const B5: [f64; 7] = [
    35.0 / 384.0,
    0.0,
    500.0 / 1113.0,
    125.0 / 192.0,
    -2187.0 / 6784.0,
    11.0 / 84.0,
    0.0,
];
/// Embedded fourth-order weights.
const B4: [f64; 7] = [
    5179.0 / 57600.0,
    0.0,
    7571.0 / 16695.0,
    393.0 / 640.0,
    -92097.0 / 339200.0,
    187.0 / 2100.0,
    1.0 / 40.0,
];
const SAFETY: f64 = 0.9;
const MIN_FACTOR: f64 = 0.2;
const MAX_FACTOR: f64 = 10.0;

/// Initial step size (Hairer, Nørsett & Wanner Sec. II.4, "starting step size"; order 5).
/// Returns a positive magnitude; `k1 = f(t0, y0)` is given.
fn initial_step(
    f: &mut Rhs<'_>,
    y0: &Tensor,
    k1: &Tensor,
    t0: f64,
    dir: f64,
    rtol: f64,
    atol: f64,
) -> Result<f64> {
    let d0 = rms_norm(y0, y0, y0, rtol, atol)?;
    let d1 = rms_norm(k1, y0, y0, rtol, atol)?;
    if !d0.is_finite() || !d1.is_finite() {
        return Err(Error::Numerical(format!(
            "dopri5: non-finite initial state or velocity at t = {t0}"
        )));
    }
    let h0 = if d0 < 1e-5 || d1 < 1e-5 {
        1e-6
    } else {
        0.01 * d0 / d1
    };
    let y1 = lin_comb(y0, dir * h0, &[(1.0, k1)])?;
    let k2 = f.call(&y1, t0 + dir * h0)?;
    let d2 = rms_norm(&(k2 - k1)?, y0, y0, rtol, atol)? / h0;
    let dmax = d1.max(d2);
    let h1 = if !dmax.is_finite() || dmax <= 1e-15 {
        (h0 * 1e-3).max(1e-6)
    } else {
        (0.01 / dmax).powf(1.0 / 5.0)
    };
    Ok((100.0 * h0).min(h1))
}

/// Adaptive Dormand-Prince 5(4) with FSAL, I-controller (safety 0.9, factor in [0.2, 10]) and the
/// last step clipped to land exactly on `t1`.
fn dopri5(
    f: &mut Rhs<'_>,
    mut y: Tensor,
    t0: f64,
    t1: f64,
    rtol: f64,
    atol: f64,
) -> Result<Tensor> {
    let dir = (t1 - t0).signum();
    let span = (t1 - t0).abs();
    let mut t = t0;
    let mut k1 = f.call(&y, t)?;
    let mut h = initial_step(f, &y, &k1, t0, dir, rtol, atol)?.min(span);
    loop {
        let attempts = f.stats.steps + f.stats.rejected;
        crate::deadline::check(|| {
            format!("dopri5 stopped at t = {t} integrating {t0} -> {t1} after {attempts} steps")
        })?;
        if attempts >= MAX_STEPS {
            return Err(Error::Numerical(format!(
                "dopri5: more than {MAX_STEPS} steps integrating {t0} -> {t1} (stopped at t = {t})"
            )));
        }
        if h.is_nan() || h <= 16.0 * f64::EPSILON * t.abs().max(span) {
            return Err(Error::Numerical(format!(
                "dopri5: step size underflow ({h:e}) at t = {t} integrating {t0} -> {t1}"
            )));
        }
        let remaining = (t1 - t).abs();
        let last = h >= remaining;
        let hs = if last { remaining } else { h };
        let hd = dir * hs; // signed step
        let k2 = f.call(&lin_comb(&y, hd, &[(A2[0], &k1)])?, t + C[0] * hd)?;
        let k3 = f.call(
            &lin_comb(&y, hd, &[(A3[0], &k1), (A3[1], &k2)])?,
            t + C[1] * hd,
        )?;
        let k4 = f.call(
            &lin_comb(&y, hd, &[(A4[0], &k1), (A4[1], &k2), (A4[2], &k3)])?,
            t + C[2] * hd,
        )?;
        let k5 = f.call(
            &lin_comb(
                &y,
                hd,
                &[(A5[0], &k1), (A5[1], &k2), (A5[2], &k3), (A5[3], &k4)],
            )?,
            t + C[3] * hd,
        )?;
        let y5_in = [
            (A6[0], &k1),
            (A6[1], &k2),
            (A6[2], &k3),
            (A6[3], &k4),
            (A6[4], &k5),
        ];
        let t_new = if last { t1 } else { t + hd };
        let k6 = f.call(&lin_comb(&y, hd, &y5_in)?, t_new)?; // c6 = 1
        let ks = [&k1, &k2, &k3, &k4, &k5, &k6];
        let b5: Vec<(f64, &Tensor)> = B5.iter().zip(ks).map(|(&b, k)| (b, k)).collect();
        let y_new = lin_comb(&y, hd, &b5)?;
        let k7 = f.call(&y_new, t_new)?; // c7 = 1: k7 = f(t_new, y_new), reused as next k1
        let ks = [&k1, &k2, &k3, &k4, &k5, &k6, &k7];
        let e: Vec<(f64, &Tensor)> = (0..7).map(|i| (B5[i] - B4[i], ks[i])).collect();
        let err = lin_comb(&y.zeros_like()?, hd, &e)?; // local error estimate, shape of y
        let en = rms_norm(&err, &y, &y_new, rtol, atol)?;
        if !en.is_finite() || !all_finite(&y_new)? {
            if !all_finite(&k1)? {
                return Err(Error::Numerical(format!(
                    "dopri5: non-finite velocity at t = {t} integrating {t0} -> {t1}"
                )));
            }
            // The step left the region where f is finite: retry with a smaller one.
            f.stats.rejected += 1;
            h = hs * MIN_FACTOR;
            continue;
        }
        let mut factor = if en == 0.0 {
            MAX_FACTOR
        } else {
            (SAFETY * en.powf(-1.0 / 5.0)).clamp(MIN_FACTOR, MAX_FACTOR)
        };
        if en <= 1.0 {
            f.stats.steps += 1;
            t = t_new;
            y = y_new;
            k1 = k7;
            if last {
                return Ok(y);
            }
        } else {
            f.stats.rejected += 1;
            factor = factor.min(1.0);
        }
        h = hs * factor;
    }
}
