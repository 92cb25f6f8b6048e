//! A probabilistic-PCA (linear-Gaussian) decoder `x = W z + b + sigma e`, `z, e ~ N(0, I)`,
//! whose marginal `N(x; b, W Wᵀ + sigma² I)` is known in closed form (Tipping and Bishop 1999),
//! and the error of an AIS estimate of it through any [`LatentDecoder`]: shared by the VAE's
//! and the GAN's AIS tests.

#![allow(dead_code)]

use candle_core::Tensor;
use elbo::eval::ais::{self, AisOptions};
use elbo::latent::LatentDecoder;
use elbo::Rng;

pub const D: usize = 4;
pub const SIGMA: f64 = 0.5;
pub const W: [[f64; 2]; D] = [[2.0, 0.0], [0.0, 1.5], [0.0, 0.0], [0.0, 0.0]];
pub const B: [f64; D] = [0.3, -0.2, 0.1, 0.0];

/// `-log N(x; b, W Wᵀ + σ² I)` per row (Cholesky in f64).
pub fn exact_nll(x: &[Vec<f64>]) -> Vec<f64> {
    let mut s = [[0.0; D]; D];
    for i in 0..D {
        for j in 0..D {
            s[i][j] =
                W[i][0] * W[j][0] + W[i][1] * W[j][1] + if i == j { SIGMA * SIGMA } else { 0.0 };
        }
    }
    let mut l = [[0.0; D]; D];
    for i in 0..D {
        for j in 0..=i {
            let sum: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            l[i][j] = if i == j {
                (s[i][i] - sum).sqrt()
            } else {
                (s[i][j] - sum) / l[j][j]
            };
        }
    }
    let logdet: f64 = (0..D).map(|i| 2.0 * l[i][i].ln()).sum();
    x.iter()
        .map(|row| {
            let mut y = [0.0; D];
            for i in 0..D {
                let r = row[i] - B[i] - (0..i).map(|k| l[i][k] * y[k]).sum::<f64>();
                y[i] = r / l[i][i];
            }
            let q: f64 = y.iter().map(|v| v * v).sum();
            0.5 * (D as f64 * (2.0 * std::f64::consts::PI).ln() + logdet + q)
        })
        .collect()
}

/// The mean of `v`.
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Per-example `AIS log p(x) - exact log p(x)` with the delta-method standard errors.
pub fn ais_errors(
    decoder: &dyn LatentDecoder,
    x: &Tensor,
    exact: &[f64],
    steps: usize,
    seed: u64,
) -> (Vec<f64>, Vec<f64>) {
    let opts = AisOptions {
        chains: 16,
        steps,
        leapfrog: 5,
        ..AisOptions::default()
    };
    let est = ais::log_marginal(decoder, x, &opts, &mut Rng::new(seed)).unwrap();
    assert!(
        steps < 50 || (est.acceptance > 0.4 && est.acceptance < 0.9),
        "HMC acceptance {} far from the 0.65 target",
        est.acceptance
    );
    let err = est.log_z.iter().zip(exact).map(|(a, e)| a + e).collect();
    (err, est.stderr)
}

/// Mean over examples of `AIS log p(x) - exact log p(x)` with its standard error from the
/// per-example delta-method errors.
pub fn ais_error(
    decoder: &dyn LatentDecoder,
    x: &Tensor,
    exact: &[f64],
    steps: usize,
    seed: u64,
) -> (f64, f64) {
    let (err, se) = ais_errors(decoder, x, exact, steps, seed);
    let n = exact.len() as f64;
    (mean(&err), se.iter().map(|s| s * s).sum::<f64>().sqrt() / n)
}
