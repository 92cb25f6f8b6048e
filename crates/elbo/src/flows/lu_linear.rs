//! An invertible linear map through its LU decomposition (Glow's invertible 1x1 convolution;
//! Kingma & Dhariwal 2018, sec. 3.2, eq. 10): `W = P L (U + diag(sign ⊙ exp(log|s|)))` with a
//! fixed permutation `P`, a unit lower-triangular `L` and a strictly upper-triangular `U`, so
//!
//!   z = x Wᵀ,   log |det J| = Σ_j log |s_j|,
//!
//! costs no determinant. On channels-last images `[B, H, W, C]` it mixes the channels of each
//! pixel alike, which is the 1x1 convolution, and `log |det J| = H W Σ_j log |s_j|`. `W` starts as a random rotation (its LU factors with partial
//! pivoting); `P` and the signs stay fixed and are kept in checkpoints.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};

use super::{positions, Bijector};
use crate::nn::ParamInit;
use crate::{Error, Result};

/// `z = x Wᵀ` along the last axis (`[B, D]` rows or `[B, H, W, C]` images) with `W = P L U`.
pub struct LuLinear {
    d: usize,
    /// Strictly lower entries of `L` (the rest masked off), `[D, D]`.
    lower: Var,
    /// Strictly upper entries of `U`, `[D, D]`.
    upper: Var,
    /// `log |s|`, `[D]`.
    log_s: Var,
    /// `sign(s)`, `[D]` (fixed).
    sign: Tensor,
    /// Row `j` of `W` is row `perm[j]` of `L U` (fixed), `[D]` u32.
    perm: Tensor,
    lower_mask: Tensor,
    upper_mask: Tensor,
}

impl LuLinear {
    /// A random rotation on `d` dimensions, drawn from the factory's generator. Parameters:
    /// `lower`, `upper`, `log_s`.
    pub fn new(p: &mut ParamInit, d: usize, rng_draws: &[f64]) -> Result<Self> {
        if rng_draws.len() != d * d {
            return Err(Error::Shape(format!(
                "LuLinear needs {} normal draws, got {}",
                d * d,
                rng_draws.len()
            )));
        }
        let q = gram_schmidt(rng_draws, d)?;
        let (piv, l, u) = lu_partial_pivoting(&q, d)?;
        let mut perm = vec![0u32; d];
        for (i, &pi) in piv.iter().enumerate() {
            perm[pi] = i as u32; // Q[piv[i]] = (LU)[i]
        }
        let dev = p.device().clone();
        let lower: Vec<f32> = (0..d * d)
            .map(|k| if k % d < k / d { l[k] as f32 } else { 0.0 })
            .collect();
        let upper: Vec<f32> = (0..d * d)
            .map(|k| if k % d > k / d { u[k] as f32 } else { 0.0 })
            .collect();
        let diag: Vec<f64> = (0..d).map(|i| u[i * d + i]).collect();
        let log_s: Vec<f32> = diag.iter().map(|v| v.abs().ln() as f32).collect();
        let sign: Vec<f32> = diag.iter().map(|v| v.signum() as f32).collect();
        let mask = |f: fn(usize, usize) -> bool| -> Result<Tensor> {
            let m: Vec<f32> = (0..d * d)
                .map(|k| if f(k / d, k % d) { 1.0 } else { 0.0 })
                .collect();
            Ok(Tensor::from_vec(m, (d, d), &dev)?)
        };
        Ok(Self {
            d,
            lower: p.insert("lower", Tensor::from_vec(lower, (d, d), &dev)?)?,
            upper: p.insert("upper", Tensor::from_vec(upper, (d, d), &dev)?)?,
            log_s: p.insert("log_s", Tensor::from_vec(log_s, d, &dev)?)?,
            sign: Tensor::from_vec(sign, d, &dev)?,
            perm: Tensor::from_vec(perm, d, &dev)?,
            lower_mask: mask(|i, j| j < i)?,
            upper_mask: mask(|i, j| j > i)?,
        })
    }

    /// `W = P L U`, `[D, D]`.
    pub fn weight(&self) -> Result<Tensor> {
        let dev = self.lower.device();
        let eye = Tensor::eye(self.d, DType::F32, dev)?;
        let l = ((self.lower.as_tensor() * &self.lower_mask)? + &eye)?;
        let s = (self.log_s.exp()? * &self.sign)?; // [D]
        let u = ((self.upper.as_tensor() * &self.upper_mask)? + eye.broadcast_mul(&s)?)?;
        Ok(l.matmul(&u)?.index_select(&self.perm, 0)?)
    }
}

impl Bijector for LuLinear {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let z = x
            .reshape(((), self.d))?
            .matmul(&self.weight()?.t()?)?
            .reshape(x.shape())?; // shaped as x
        let ld = (self.log_s.sum_all()? * positions(x)? as f64)?
            .broadcast_as(x.dim(0)?)?
            .contiguous()?; // [B]
        Ok((z, ld))
    }

    fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        let w: Vec<f64> = self
            .weight()?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let inv = invert(&w, self.d)?;
        let inv: Vec<f32> = inv.iter().map(|v| *v as f32).collect();
        let inv = Tensor::from_vec(inv, (self.d, self.d), z.device())?;
        Ok(z.detach()
            .reshape(((), self.d))?
            .matmul(&inv.t()?)?
            .reshape(z.shape())?)
    }

    fn state(&self, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
        out.insert(format!("{prefix}perm"), self.perm.clone());
        out.insert(format!("{prefix}sign"), self.sign.clone());
        Ok(())
    }

    fn load_state(&mut self, prefix: &str, t: &HashMap<String, Tensor>) -> Result<()> {
        let dev = self.lower.device().clone();
        for (key, dst, dtype) in [
            ("perm", &mut self.perm, DType::U32),
            ("sign", &mut self.sign, DType::F32),
        ] {
            if let Some(v) = t.get(&format!("{prefix}{key}")) {
                if v.dims() != [self.d] {
                    return Err(Error::Config(format!(
                        "flow state '{prefix}{key}' has shape {:?}, expected [{}]",
                        v.dims(),
                        self.d
                    )));
                }
                *dst = v.to_dtype(dtype)?.to_device(&dev)?;
            }
        }
        Ok(())
    }
}

/// An orthogonal matrix from `d x d` normal draws (modified Gram-Schmidt on the rows).
fn gram_schmidt(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut q = a.to_vec();
    for i in 0..d {
        for j in 0..i {
            let dot: f64 = (0..d).map(|k| q[i * d + k] * q[j * d + k]).sum();
            for k in 0..d {
                q[i * d + k] -= dot * q[j * d + k];
            }
        }
        let n: f64 = (0..d).map(|k| q[i * d + k].powi(2)).sum::<f64>().sqrt();
        if n.is_nan() || n <= 1e-12 {
            return Err(Error::Numerical(
                "random rotation: degenerate draw, try another seed".into(),
            ));
        }
        for k in 0..d {
            q[i * d + k] /= n;
        }
    }
    Ok(q)
}

/// `P A = L U` with partial pivoting (Golub & Van Loan 2013, Alg. 3.4.1): returns `piv` with
/// `(P A)[i] = A[piv[i]]`, the unit lower `L` and upper `U`, row-major.
fn lu_partial_pivoting(a: &[f64], d: usize) -> Result<(Vec<usize>, Vec<f64>, Vec<f64>)> {
    let mut u = a.to_vec();
    let mut l = vec![0.0; d * d];
    let mut piv: Vec<usize> = (0..d).collect();
    for k in 0..d {
        let p = (k..d)
            .max_by(|&i, &j| u[i * d + k].abs().total_cmp(&u[j * d + k].abs()))
            .unwrap_or(k);
        if u[p * d + k].abs() < 1e-12 {
            return Err(Error::Numerical("LU: singular matrix".into()));
        }
        if p != k {
            for c in 0..d {
                u.swap(k * d + c, p * d + c);
                l.swap(k * d + c, p * d + c);
            }
            piv.swap(k, p);
        }
        for i in k + 1..d {
            let f = u[i * d + k] / u[k * d + k];
            l[i * d + k] = f;
            for c in k..d {
                u[i * d + c] -= f * u[k * d + c];
            }
        }
    }
    for i in 0..d {
        l[i * d + i] = 1.0;
    }
    Ok((piv, l, u))
}

/// The inverse of a `d x d` matrix by Gauss-Jordan elimination with partial pivoting.
pub(crate) fn invert(a: &[f64], d: usize) -> Result<Vec<f64>> {
    let mut m = a.to_vec();
    let mut inv = vec![0.0; d * d];
    for i in 0..d {
        inv[i * d + i] = 1.0;
    }
    for k in 0..d {
        let p = (k..d)
            .max_by(|&i, &j| m[i * d + k].abs().total_cmp(&m[j * d + k].abs()))
            .unwrap_or(k);
        let pivot = m[p * d + k];
        if !pivot.is_finite() || pivot.abs() <= 1e-300 {
            return Err(Error::Numerical(
                "the flow's linear layer is singular and cannot be inverted".into(),
            ));
        }
        for c in 0..d {
            m.swap(k * d + c, p * d + c);
            inv.swap(k * d + c, p * d + c);
        }
        for c in 0..d {
            m[k * d + c] /= pivot;
            inv[k * d + c] /= pivot;
        }
        for i in 0..d {
            if i != k {
                let f = m[i * d + k];
                if f != 0.0 {
                    for c in 0..d {
                        m[i * d + c] -= f * m[k * d + c];
                        inv[i * d + c] -= f * inv[k * d + c];
                    }
                }
            }
        }
    }
    Ok(inv)
}
