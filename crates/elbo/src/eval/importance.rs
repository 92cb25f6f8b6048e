//! The log-normaliser of an unnormalised density by simple importance sampling from a
//! standard Gaussian proposal (e.g. Owen 2013, "Monte Carlo theory, methods and examples",
//! eq. 9.3): for `f` unnormalised and `q = N(0, I)`,
//!
//!   Z = E_q[ f(u) / q(u) ],   Ẑ = (1/M) Σ_m w_m,   w_m = f(u_m) / q(u_m),   u_m ~ q,
//!
//! reported as `log Ẑ` with its delta-method standard error `sd(w) / (√M · mean(w))`
//! (the relative standard error of Ẑ). `Ẑ` is unbiased; `log Ẑ` is biased low by about half
//! its variance (Jensen), negligible once the standard error is small. The effective sample size
//! `(Σ w)² / Σ w²` (Kong 1992) says how well the proposal covers `f`.
//!
//! Noise-contrastive estimation checks its learned normaliser with it (`models/nce.rs`).

use candle_core::{Device, Tensor};

use crate::{Error, Result, Rng};

/// `log Ẑ` with its standard error and effective sample size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogZEstimate {
    /// log Ẑ.
    pub log_z: f64,
    /// Delta-method standard error of log Ẑ.
    pub se: f64,
    /// Effective sample size (Σ w)² / Σ w².
    pub ess: f64,
    /// Proposal draws M.
    pub samples: usize,
}

/// `log mean exp(log_w)` with its delta-method standard error and effective sample size,
/// computed in `f64` relative to the largest weight.
pub fn log_mean_exp_with_se(log_w: &[f64]) -> Result<LogZEstimate> {
    let m = log_w.len();
    let max = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if m == 0 || !max.is_finite() || log_w.iter().any(|w| w.is_nan()) {
        return Err(Error::Numerical(format!(
            "importance sampling needs finite log-weights; got {m} with maximum {max}"
        )));
    }
    let w: Vec<f64> = log_w.iter().map(|l| (l - max).exp()).collect();
    let mean = w.iter().sum::<f64>() / m as f64;
    let sq = w.iter().map(|x| x * x).sum::<f64>();
    let var = w.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (m.max(2) - 1) as f64;
    Ok(LogZEstimate {
        log_z: mean.ln() + max,
        se: var.sqrt() / (mean * (m as f64).sqrt()),
        ess: (mean * m as f64).powi(2) / sq,
        samples: m,
    })
}

/// `log Z` of `f` by `samples` draws `u ~ N(0, I_d)`, `chunk` rows at a time. `log_w(u)`
/// returns `log f(u) - log N(u; 0, I)` per row, `[R]`, for `u: [R, d]`.
pub fn importance_log_z(
    log_w: &dyn Fn(&Tensor) -> Result<Tensor>,
    d: usize,
    samples: usize,
    chunk: usize,
    device: &Device,
    rng: &mut Rng,
) -> Result<LogZEstimate> {
    if samples < 2 || chunk == 0 {
        return Err(Error::Config(format!(
            "importance sampling of log Z needs at least 2 samples in chunks of at least 1 \
             (got {samples} and {chunk})"
        )));
    }
    let mut all = Vec::with_capacity(samples);
    while all.len() < samples {
        let r = chunk.min(samples - all.len());
        let u = rng.normal_tensor(&[r, d], device)?; // [R, d]
        let lw: Vec<f32> = log_w(&u)?.detach().to_vec1()?;
        all.extend(lw.iter().map(|x| f64::from(*x)));
    }
    log_mean_exp_with_se(&all)
}
