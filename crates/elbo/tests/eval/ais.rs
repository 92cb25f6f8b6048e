//! Annealed importance sampling of a log-normaliser: `log Z` of an unnormalised 2-D Gaussian
//! mixture (known in closed form) from a broad Gaussian start, within three standard errors.

use candle_core::{Device, Tensor};
use elbo::eval::ais::{log_partition, AisOptions};
use elbo::Rng;

const CPU: Device = Device::Cpu;

/// `log f(z) = log Σ_j a_j exp(-|z - m_j|² / (2 s²))` per row: a mixture of four isotropic
/// Gaussians with unnormalised weights, `Z = Σ_j a_j 2π s²`.
fn mixture(z: &Tensor) -> elbo::Result<Tensor> {
    let (centers, weights, s) = mixture_spec();
    let parts: Vec<Tensor> = centers
        .iter()
        .zip(weights)
        .map(|(m, a)| {
            let c = Tensor::new(&[m[0] as f32, m[1] as f32], &CPU)?;
            let d2 = z.broadcast_sub(&c)?.sqr()?.sum_keepdim(1)?; // [R, 1]
            d2.affine(-0.5 / (s * s), a.ln())
        })
        .collect::<candle_core::Result<_>>()?;
    let all = Tensor::cat(&parts, 1)?; // [R, 4]
    let m = all.max_keepdim(1)?.detach(); // [R, 1]
    let lse = all
        .broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(1)?
        .log()?
        .add(&m)?; // [R, 1]
    Ok(lse.squeeze(1)?)
}

fn mixture_spec() -> ([[f64; 2]; 4], [f64; 4], f64) {
    (
        [[2.0, 0.0], [-2.0, 0.5], [0.0, 2.5], [0.5, -2.0]],
        [1.0, 3.0, 0.5, 2.0],
        0.4,
    )
}

#[test]
fn ais_log_z_of_a_gaussian_mixture_matches_the_closed_form() {
    let (_, weights, s) = mixture_spec();
    let exact = (weights.iter().sum::<f64>() * 2.0 * std::f64::consts::PI * s * s).ln();
    let mean = Tensor::new(&[0f32, 0.0], &CPU).unwrap();
    let std = Tensor::new(&[2.5f32, 2.5], &CPU).unwrap();
    let opts = AisOptions {
        chains: 400,
        steps: 100,
        leapfrog: 5,
        ..AisOptions::default()
    };
    let (log_z, se, acc) = log_partition(&mixture, &mean, &std, &opts, &mut Rng::new(1)).unwrap();
    assert!(se > 0.0 && se < 0.05, "standard error {se}");
    assert!(acc > 0.4 && acc < 0.9, "HMC acceptance {acc}");
    assert!(
        (log_z - exact).abs() < 3.0 * se,
        "AIS log Z {log_z} ± {se} vs exact {exact}"
    );
    // one intermediate distribution is importance sampling from the start: still unbiased in
    // Z but far noisier
    let is = AisOptions {
        steps: 1,
        adapt_chains: 0,
        ..opts
    };
    let (_, se_is, _) = log_partition(&mixture, &mean, &std, &is, &mut Rng::new(2)).unwrap();
    assert!(se_is > 2.0 * se, "s.e. {se_is} of plain IS vs {se} of AIS");
}
