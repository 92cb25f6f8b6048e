//! The Fréchet distance between Gaussians fitted to classifier features of two sample sets:
//! FID (Heusel et al. 2017, eq. 6) with the small digit classifiers of [`super::feature_net`]
//! in place of Inception-v3,
//!
//! ```text
//! d^2 = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})
//! ```
//!
//! (Dowson & Landau 1982). The trace of the matrix square root is computed as the sum of the
//! square roots of the eigenvalues of the symmetric `S_1^{1/2} S_2 S_1^{1/2}` (which has the
//! same eigenvalues as `S_1 S_2`), both by cyclic Jacobi rotations (Golub & Van Loan 2013,
//! alg. 8.5.3) in `f64`. Like FID it is biased upwards for small sample sets: compare figures
//! at the same number of samples.

use super::feature_net::{FeatureData, FeatureNet};
use super::sample_metric::{check_set, MetricValue, SampleMetric};
use crate::{Error, Result, Rng};

/// Eigenvalues of the symmetric `a` (`[d, d]`, row-major; destroyed) and its eigenvectors as
/// the columns of the returned row-major matrix.
pub fn symmetric_eigen(mut a: Vec<f64>, d: usize) -> (Vec<f64>, Vec<f64>) {
    let mut v = vec![0.0; d * d];
    for i in 0..d {
        v[i * d + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).filter(move |j| *j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] * a[i * d + j])
            .sum();
        let scale: f64 = (0..d).map(|i| a[i * d + i] * a[i * d + i]).sum::<f64>() + off;
        if off <= 1e-30 * scale.max(1e-300) {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
                for k in 0..d {
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ((0..d).map(|i| a[i * d + i]).collect(), v)
}

/// Mean `[d]` and unbiased covariance `[d, d]` of the rows of `x` (`[n, d]`, `n >= 2`).
pub fn mean_and_covariance(x: &[f64], d: usize) -> (Vec<f64>, Vec<f64>) {
    let n = x.len() / d;
    let mut mu = vec![0.0; d];
    for row in x.chunks_exact(d) {
        for (m, v) in mu.iter_mut().zip(row) {
            *m += v / n as f64;
        }
    }
    let mut cov = vec![0.0; d * d];
    for row in x.chunks_exact(d) {
        for i in 0..d {
            let ci = row[i] - mu[i];
            for j in i..d {
                cov[i * d + j] += ci * (row[j] - mu[j]);
            }
        }
    }
    let denom = (n.max(2) - 1) as f64;
    for i in 0..d {
        for j in i..d {
            cov[i * d + j] /= denom;
            cov[j * d + i] = cov[i * d + j];
        }
    }
    (mu, cov)
}

/// The Fréchet distance `d^2` between N(mu1, s1) and N(mu2, s2) in `d` dimensions.
pub fn frechet_gaussians(mu1: &[f64], s1: &[f64], mu2: &[f64], s2: &[f64], d: usize) -> f64 {
    let mean: f64 = mu1.iter().zip(mu2).map(|(a, b)| (a - b) * (a - b)).sum();
    let trace = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    // S1^{1/2} = V diag(sqrt(l)) V^T
    let (l, v) = symmetric_eigen(s1.to_vec(), d);
    let mut root = vec![0.0; d * d];
    for i in 0..d {
        for j in 0..d {
            root[i * d + j] = (0..d)
                .map(|k| v[i * d + k] * l[k].max(0.0).sqrt() * v[j * d + k])
                .sum();
        }
    }
    let mul = |a: &[f64], b: &[f64]| -> Vec<f64> {
        let mut c = vec![0.0; d * d];
        for i in 0..d {
            for k in 0..d {
                let aik = a[i * d + k];
                for j in 0..d {
                    c[i * d + j] += aik * b[k * d + j];
                }
            }
        }
        c
    };
    let mut m = mul(&mul(&root, s2), &root);
    for i in 0..d {
        for j in i + 1..d {
            let avg = 0.5 * (m[i * d + j] + m[j * d + i]);
            m[i * d + j] = avg;
            m[j * d + i] = avg;
        }
    }
    let (lm, _) = symmetric_eigen(m, d);
    let tr_sqrt: f64 = lm.iter().map(|x| x.max(0.0).sqrt()).sum();
    mean + trace(s1) + trace(s2) - 2.0 * tr_sqrt
}

/// `frechet-distance`: the Fréchet distance in the feature space of the vendored digits / MNIST
/// classifier chosen by the examples' dimension (lower is better). Inputs are in the data's
/// units and divided by its largest level (16 or 255; by 1 when every held-out value is at most
/// 1, as for binarized MNIST).
#[derive(Clone, Copy, Debug, Default)]
pub struct FrechetDistance;

impl SampleMetric for FrechetDistance {
    fn name(&self) -> &'static str {
        "frechet-distance"
    }

    fn compute(
        &self,
        samples: &[f32],
        data: &[f32],
        dim: usize,
        _rng: &mut Rng,
    ) -> Result<MetricValue> {
        let n = check_set("samples", samples, dim, 2)?;
        let m = check_set("held-out data", data, dim, 2)?;
        let net = FeatureNet::vendored(FeatureData::for_dim(dim)?)?;
        if net.dim != dim {
            return Err(Error::Shape(format!(
                "the feature classifier takes {} values, the examples have {dim}",
                net.dim
            )));
        }
        let scale = if data.iter().all(|v| *v <= 1.0) {
            1.0
        } else {
            net.max_level
        };
        let f = super::feature_net::FEATURES;
        let (mu1, s1) = mean_and_covariance(&net.features(samples, scale), f);
        let (mu2, s2) = mean_and_covariance(&net.features(data, scale), f);
        Ok(MetricValue {
            value: frechet_gaussians(&mu1, &s1, &mu2, &s2, f),
            stderr: None,
            n_samples: n,
            n_data: m,
        })
    }
}
