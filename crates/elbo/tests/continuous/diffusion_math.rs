//! The closed forms of Gaussian diffusion against brute force: the posterior q(x_{t-1}|x_t,x_0)
//! against numerical Bayes, the Gaussian KL against Monte Carlo, the discretized decoder's
//! probabilities, q(x_t|x_0) against iterating the chain, and, for Gaussian data with the
//! analytic optimal denoiser, the VLB against the exact NLL (above it, closing in as T grows)
//! and the probability-flow ODE likelihood equal to it.

use candle_core::{DType, Device, Tensor};
use elbo::continuous::cnf::{CnfOptions, Divergence};
use elbo::continuous::diffusion::gaussian::{
    discretized_gaussian_log_prob, level_value, normal_kl, normal_log_density,
};
use elbo::continuous::diffusion::pf_ode::{self, PfOde};
use elbo::continuous::diffusion::{vlb, vlb_with_variances, Chain, Decoder, VarianceKind};
use elbo::continuous::ode::Solver;
use elbo::continuous::parameterization::Coeffs;
use elbo::continuous::schedule::{NoiseSchedule, Vp};
use elbo::Rng;

const DEV: Device = Device::Cpu;

#[test]
fn posterior_matches_brute_force_bayes() {
    let chain = Chain::from_schedule("linear", 20).unwrap();
    let (x0, xt) = (0.7, -0.4);
    for i in [2usize, 5, 13, 20] {
        // p(x_{i-1} | x_0) p(x_i | x_{i-1}) on a fine grid
        let ab_prev = chain.alpha_bar(i - 1);
        let beta = chain.beta(i);
        let (lo, hi, n) = (-6.0, 6.0, 200_001);
        let h = (hi - lo) / (n - 1) as f64;
        let (mut z, mut m1, mut m2) = (0.0, 0.0, 0.0);
        for k in 0..n {
            let y = lo + k as f64 * h;
            let w = (normal_log_density(y, ab_prev.sqrt() * x0, 1.0 - ab_prev)
                + normal_log_density(xt, (1.0 - beta).sqrt() * y, beta))
            .exp();
            z += w;
            m1 += w * y;
            m2 += w * y * y;
        }
        let mean = m1 / z;
        let var = m2 / z - mean * mean;
        let p = chain.posterior(i);
        let cf_mean = p.coef_x0 * x0 + p.coef_xt * xt;
        assert!(
            (mean - cf_mean).abs() < 1e-6,
            "step {i}: mean {mean} vs {cf_mean}"
        );
        assert!(
            (var - p.var).abs() < 1e-6 * p.var.max(1e-3),
            "step {i}: var {var} vs {}",
            p.var
        );
    }
}

#[test]
fn gaussian_kl_matches_monte_carlo() {
    let mut rng = Rng::new(1);
    for &(m1, v1, m2, v2) in &[
        (0.3f64, 0.5f64, -0.2f64, 1.5f64),
        (1.0, 2.0, 0.0, 1.0),
        (0.0, 0.01, 0.1, 0.02),
    ] {
        let n = 200_000;
        let vals: Vec<f64> = (0..n)
            .map(|_| {
                let x = m1 + v1.sqrt() * rng.normal();
                normal_log_density(x, m1, v1) - normal_log_density(x, m2, v2)
            })
            .collect();
        let mean = vals.iter().sum::<f64>() / n as f64;
        let sd = (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64).sqrt();
        let se = sd / (n as f64).sqrt();
        let kl = normal_kl(m1, v1, m2, v2);
        assert!(
            (mean - kl).abs() < 4.0 * se + 1e-9,
            "MC {mean} ± {se} vs {kl}"
        );
    }
}

#[test]
fn discretized_decoder_sums_to_one_and_matches_integration() {
    for levels in [2usize, 17, 256] {
        for &(mean, std) in &[
            (0.0, 0.01),
            (0.93, 0.2),
            (-1.3, 0.05),
            (0.5, 3.0),
            (0.1, 1e-4),
        ] {
            let total: f64 = (0..levels)
                .map(|k| discretized_gaussian_log_prob(k, levels, mean, std).exp())
                .sum();
            assert!(
                (total - 1.0).abs() < 2e-6,
                "L={levels} mean {mean} std {std}: {total}"
            );
        }
        // an interior bin against the trapezoid rule over its edges
        let k = levels / 2;
        let half = 1.0 / (levels - 1) as f64;
        let (mean, std) = (0.05, 0.3);
        let c = level_value(k, levels);
        let n = 20_000;
        let h = 2.0 * half / n as f64;
        let mut p = 0.0;
        for j in 0..=n {
            let y = c - half + j as f64 * h;
            let w = if j == 0 || j == n { 0.5 } else { 1.0 };
            p += w * h * normal_log_density(y, mean, std * std).exp();
        }
        let got = discretized_gaussian_log_prob(k, levels, mean, std).exp();
        assert!(
            (got - p).abs() < 1e-5 * p.max(1e-3),
            "L={levels}: {got} vs {p}"
        );
    }
}

#[test]
fn q_sample_matches_iterating_the_chain() {
    let chain = Chain::from_schedule("cosine", 50).unwrap();
    let n = 100_000;
    let x0 = Tensor::full(0.8f32, (n, 1), &DEV).unwrap();
    let mut rng = Rng::new(2);
    let moments = |t: &Tensor| {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n as f64;
        (m, var)
    };
    let mut x = x0.clone();
    for i in 1..=50 {
        let z = rng.normal_tensor(&[n, 1], &DEV).unwrap();
        let b = chain.beta(i);
        x = ((&x * (1.0 - b).sqrt()).unwrap() + (z * b.sqrt()).unwrap()).unwrap();
        if [1usize, 10, 30, 50].contains(&i) {
            let eps = rng.normal_tensor(&[n, 1], &DEV).unwrap();
            let direct = chain.q_sample(&x0, i, &eps).unwrap();
            let (a, s) = chain.scales(i);
            for (m, v) in [moments(&x), moments(&direct)] {
                let tol = 4.0 * (s * s / n as f64).sqrt() + 1e-4;
                assert!(
                    (m - 0.8 * a).abs() < tol,
                    "step {i}: mean {m} vs {}",
                    0.8 * a
                );
                assert!(
                    (v - s * s).abs() < 0.02 * s * s + 1e-5,
                    "step {i}: var {v} vs {}",
                    s * s
                );
            }
        }
    }
}

/// Gaussian data N(m, s²) per coordinate.
const M: [f64; 2] = [0.5, -0.3];
const S: [f64; 2] = [0.5, 0.5];

/// The optimal x̂_0 = E[x_0 | x_t] for x_t = α x_0 + σ ε, column by column.
fn analytic_x0(x: &Tensor, alpha: f64, sigma: f64) -> elbo::Result<Tensor> {
    analytic_x0_of(x, alpha, sigma, M, S)
}

fn analytic_x0_of(
    x: &Tensor,
    alpha: f64,
    sigma: f64,
    m: [f64; 2],
    s: [f64; 2],
) -> elbo::Result<Tensor> {
    let cols: Vec<Tensor> = (0..2)
        .map(|j| {
            let g = alpha * s[j] * s[j] / (alpha * alpha * s[j] * s[j] + sigma * sigma);
            let c = x.narrow(1, j, 1)?;
            Ok((((c - alpha * m[j])? * g)? + m[j])?)
        })
        .collect::<elbo::Result<_>>()?;
    Ok(Tensor::cat(&cols, 1)?)
}

fn gaussian_data(n: usize, seed: u64) -> (Tensor, Vec<f64>) {
    gaussian_data_of(n, seed, M, S)
}

fn gaussian_data_of(n: usize, seed: u64, m: [f64; 2], s: [f64; 2]) -> (Tensor, Vec<f64>) {
    let mut rng = Rng::new(seed);
    let mut v = Vec::with_capacity(2 * n);
    let mut nll = Vec::with_capacity(n);
    for _ in 0..n {
        let mut l = 0.0;
        for j in 0..2 {
            let x = m[j] + s[j] * rng.normal();
            v.push(x as f32);
            l -= normal_log_density(x as f32 as f64, m[j], s[j] * s[j]);
        }
        nll.push(l);
    }
    (Tensor::from_vec(v, (n, 2), &DEV).unwrap(), nll)
}

fn mean_gap(vlb: &[f64], nll: &[f64]) -> (f64, f64) {
    let d: Vec<f64> = vlb.iter().zip(nll).map(|(v, n)| v - n).collect();
    let gap = d.iter().sum::<f64>() / d.len() as f64;
    let var = d.iter().map(|v| (v - gap).powi(2)).sum::<f64>() / (d.len() - 1) as f64;
    (gap, (var / d.len() as f64).sqrt())
}

/// Var(x_0 | x_i) of the Gaussian data (isotropic S).
fn posterior_x0_var(chain: &Chain, i: usize) -> f64 {
    let (a, s) = chain.scales(i);
    S[0] * S[0] * s * s / (a * a * S[0] * S[0] + s * s)
}

#[test]
fn vlb_with_the_optimal_denoiser_bounds_the_nll_and_tightens_with_t() {
    // Fixed (β̃) variances with the optimal mean: the bound sits above the exact NLL and the gap
    // shrinks as T grows; what is left is the variance mismatch of the first steps, where
    // Var(x_0 | x_t) is not negligible next to β̃ (about Σ_t 1/(4 (t-1)²) per dimension).
    let (x, nll) = gaussian_data(2000, 3);
    let mut gaps = Vec::new();
    for t in [10usize, 100, 1000] {
        let chain = Chain::from_schedule("linear", t).unwrap();
        let mut rng = Rng::new(4);
        let terms = vlb(
            &chain,
            VarianceKind::FixedSmall,
            Decoder::Gaussian,
            &x,
            |xi, i| {
                let (a, s) = chain.scales(i);
                analytic_x0(xi, a, s)
            },
            &mut rng,
        )
        .unwrap();
        let (gap, se) = mean_gap(&terms.total(), &nll);
        assert!(
            gap > -3.0 * se,
            "T={t}: VLB below the exact NLL by {gap} ± {se}"
        );
        gaps.push(gap);
    }
    assert!(
        gaps[0] > gaps[1] && gaps[1] > gaps[2],
        "gaps {gaps:?} do not shrink with T"
    );
    // With the exact reverse conditionals (variance β̃ + coef_x0² Var(x_0|x_t), the decoder's
    // Var(x_0|x_1)) the reverse chain is the true one and only the prior's mismatch remains.
    for t in [10usize, 1000] {
        let chain = Chain::from_schedule("linear", t).unwrap();
        let var = |i: usize| {
            if i == 1 {
                posterior_x0_var(&chain, 1)
            } else {
                let p = chain.posterior(i);
                p.var + p.coef_x0 * p.coef_x0 * posterior_x0_var(&chain, i)
            }
        };
        let terms = vlb_with_variances(
            &chain,
            &var,
            Decoder::Gaussian,
            &x,
            |xi, i| {
                let (a, s) = chain.scales(i);
                analytic_x0(xi, a, s)
            },
            &mut Rng::new(6),
        )
        .unwrap();
        let (gap, se) = mean_gap(&terms.total(), &nll);
        assert!(
            gap > -3.0 * se,
            "T={t}: exact-reverse VLB below the NLL: {gap} ± {se}"
        );
        assert!(
            gap.abs() < 0.01 + 3.0 * se,
            "T={t}: exact-reverse VLB gap {gap} ± {se}"
        );
    }
}

#[test]
fn pf_ode_with_the_optimal_denoiser_is_the_exact_nll() {
    // zero-mean anisotropic data: the N(0, I) base is then the exact marginal at u = 1 up to
    // α(1)² ≈ 4e-5 (a non-zero mean would shift it by α(1) m, ~3e-3 z nats per example)
    const PM: [f64; 2] = [0.0, 0.0];
    const PS: [f64; 2] = [0.4, 0.7];
    let (x, nll) = gaussian_data_of(64, 5, PM, PS);
    let opts = CnfOptions {
        solver: Solver::Dopri5 {
            rtol: 1e-8,
            atol: 1e-8,
        },
        divergence: Divergence::Exact,
    };
    // continuous VP SDE and the discrete chain read as a path
    let vp = Vp {
        t_eps: 1e-5,
        ..Vp::default()
    };
    let chain = Chain::from_schedule("linear", 1000).unwrap();
    let schedules: [(&dyn NoiseSchedule, f64); 2] = [(&vp, 1e-5), (&chain, 1e-3)];
    for (sch, u_min) in schedules {
        let path = |u: f64| Coeffs::at(sch, u);
        let pred = |x: &Tensor, u: f64| analytic_x0_of(x, sch.alpha(u), sch.sigma(u), PM, PS);
        let field = PfOde {
            path: &path,
            predict_x0: &pred,
            u_min,
            u_max: 1.0,
        };
        let xd = x.to_dtype(DType::F64).unwrap();
        let (logp, _) = pf_ode::log_likelihood(&field, &xd, &opts, &mut Rng::new(0)).unwrap();
        // p_{u_min} = N(α m, α² s² + σ²) is the model's exact density at the data end
        let p = path(u_min);
        let xv = x.to_vec2::<f32>().unwrap();
        for (row, (lp, _n)) in xv.iter().zip(logp.iter().zip(&nll)) {
            let exact: f64 = (0..2)
                .map(|j| {
                    normal_log_density(
                        row[j] as f64,
                        p.alpha * PM[j],
                        p.alpha * p.alpha * PS[j] * PS[j] + p.sigma * p.sigma,
                    )
                })
                .sum();
            assert!(
                (lp - exact).abs() < 1e-3,
                "u_min {u_min}: PF-ODE {lp} vs exact {exact}"
            );
        }
        let mean_gap: f64 = logp.iter().zip(&nll).map(|(l, n)| -l - n).sum::<f64>() / 64.0;
        assert!(mean_gap.abs() < 2e-3, "mean gap to the data NLL {mean_gap}");
    }
}
