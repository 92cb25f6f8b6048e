//! A full-covariance Gaussian N(μ, Σ) fitted to data by maximum likelihood (Bishop 2006,
//! eq. 2.121-2.122) and held through its Cholesky factor Σ = L Lᵀ (Golub & Van Loan 2013,
//! Alg. 4.2.1):
//!
//!   whitening u = L⁻¹ (x - μ),   colouring x = μ + L u,
//!   log N(x; μ, Σ) = -|u|²/2 - Σ_i log L_ii - (D/2) log 2π.
//!
//! It is the noise distribution of noise-contrastive estimation and the proposal of its
//! importance-sampled normaliser. Everything derived (the inverse, the log-determinant) is
//! computed from the stored `f32` factor alone, so a fit reloaded from a checkpoint whitens
//! bit-identically.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// N(μ, L Lᵀ) on rows of `D` values.
#[derive(Clone, Debug)]
pub struct GaussianFit {
    /// μ, `[D]`.
    pub mean: Tensor,
    /// L, lower triangular with a positive diagonal, `[D, D]`.
    pub chol: Tensor,
    /// L⁻ᵀ, so that rows whiten as `(x - μ) L⁻ᵀ`, `[D, D]`.
    inv_t: Tensor,
    /// Σ_i log L_ii.
    log_det: f64,
}

impl GaussianFit {
    /// N(0, I).
    pub fn standard(d: usize, device: &Device) -> Result<Self> {
        Self::from_parts(
            Tensor::zeros(d, DType::F32, device)?,
            Tensor::eye(d, DType::F32, device)?,
        )
    }

    /// The maximum-likelihood fit to the rows of `x: [N, D]`, `jitter` added to the
    /// covariance's diagonal, the factor then scaled by `widen` (Σ -> widen² Σ).
    pub fn fit(x: &Tensor, jitter: f64, widen: f64) -> Result<Self> {
        let (n, d) = x.dims2()?;
        if n == 0 || d == 0 {
            return Err(Error::Shape(format!(
                "a Gaussian fit needs at least one row of at least one value, got [{n}, {d}]"
            )));
        }
        let rows: Vec<Vec<f64>> = x.to_dtype(DType::F64)?.to_vec2()?;
        let mut mu = vec![0.0; d];
        for r in &rows {
            for (m, v) in mu.iter_mut().zip(r) {
                *m += v / n as f64;
            }
        }
        let mut cov = vec![0.0; d * d];
        for r in &rows {
            for i in 0..d {
                for j in 0..=i {
                    cov[i * d + j] += (r[i] - mu[i]) * (r[j] - mu[j]) / n as f64;
                }
            }
        }
        for i in 0..d {
            cov[i * d + i] += jitter;
        }
        let l: Vec<f32> = cholesky(&cov, d)?
            .iter()
            .map(|v| (v * widen) as f32)
            .collect();
        let mu: Vec<f32> = mu.iter().map(|m| *m as f32).collect();
        let dev = x.device();
        Self::from_parts(
            Tensor::from_vec(mu, d, dev)?,
            Tensor::from_vec(l, (d, d), dev)?,
        )
    }

    /// From a stored mean `[D]` and factor `[D, D]` (read as lower triangular).
    pub fn from_parts(mean: Tensor, chol: Tensor) -> Result<Self> {
        let d = mean.dims1()?;
        if chol.dims() != [d, d] {
            return Err(Error::Shape(format!(
                "a Cholesky factor for {d} dimensions must be [{d}, {d}], got {:?}",
                chol.dims()
            )));
        }
        let l: Vec<f64> = chol.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        if (0..d).any(|i| !(l[i * d + i] > 0.0 && l[i * d + i].is_finite())) {
            return Err(Error::Numerical(
                "the Gaussian's Cholesky factor has a non-positive diagonal".into(),
            ));
        }
        let inv = invert_lower(&l, d);
        let inv_t: Vec<f32> = (0..d * d)
            .map(|k| inv[(k % d) * d + k / d] as f32)
            .collect();
        let log_det = (0..d).map(|i| l[i * d + i].ln()).sum();
        let dev = mean.device().clone();
        Ok(Self {
            mean: mean.to_dtype(DType::F32)?,
            chol: chol.to_dtype(DType::F32)?,
            inv_t: Tensor::from_vec(inv_t, (d, d), &dev)?,
            log_det,
        })
    }

    /// Dimensions.
    pub fn dim(&self) -> usize {
        self.mean.dims()[0]
    }

    /// Σ_i log L_ii = ½ log det Σ.
    pub fn log_det(&self) -> f64 {
        self.log_det
    }

    /// `u = L⁻¹ (x - μ)` for rows `x: [B, D]`.
    pub fn whiten(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_sub(&self.mean)?.matmul(&self.inv_t)?) // [B, D]
    }

    /// `x = μ + L u` for rows `u: [B, D]`.
    pub fn colour(&self, u: &Tensor) -> Result<Tensor> {
        Ok(u.matmul(&self.chol.t()?)?.broadcast_add(&self.mean)?) // [B, D]
    }

    /// `log N(x; μ, Σ)` per row, given the whitened rows `u: [B, D]`.
    pub fn log_density_white(&self, u: &Tensor) -> Result<Tensor> {
        let c = self.log_det + 0.5 * self.dim() as f64 * (2.0 * std::f64::consts::PI).ln();
        Ok(((u.sqr()?.sum(1)? * -0.5)? - c)?) // [B]
    }

    /// `log N(x; μ, Σ)` per row of `x: [B, D]`.
    pub fn log_density(&self, x: &Tensor) -> Result<Tensor> {
        self.log_density_white(&self.whiten(x)?)
    }
}

/// The lower Cholesky factor of the symmetric positive-definite `a` (`[d, d]`, lower half
/// read), row-major (Golub & Van Loan 2013, Alg. 4.2.1).
pub fn cholesky(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut l = vec![0.0; d * d];
    for j in 0..d {
        let s: f64 = (0..j).map(|k| l[j * d + k] * l[j * d + k]).sum();
        let pivot = a[j * d + j] - s;
        if !(pivot > 0.0 && pivot.is_finite()) {
            return Err(Error::Numerical(format!(
                "the covariance is not positive definite at dimension {j}; raise model.jitter"
            )));
        }
        let ljj = pivot.sqrt();
        l[j * d + j] = ljj;
        for i in j + 1..d {
            let s: f64 = (0..j).map(|k| l[i * d + k] * l[j * d + k]).sum();
            l[i * d + j] = (a[i * d + j] - s) / ljj;
        }
    }
    Ok(l)
}

/// The inverse of a lower-triangular matrix with a positive diagonal, row-major.
pub fn invert_lower(l: &[f64], d: usize) -> Vec<f64> {
    let mut inv = vec![0.0; d * d];
    for c in 0..d {
        inv[c * d + c] = 1.0 / l[c * d + c];
        for i in c + 1..d {
            let s: f64 = (c..i).map(|k| l[i * d + k] * inv[k * d + c]).sum();
            inv[i * d + c] = -s / l[i * d + i];
        }
    }
    inv
}
