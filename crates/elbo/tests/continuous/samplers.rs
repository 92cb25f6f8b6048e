//! Samplers on analytic fields: Gaussian data N(mu, s^2) per dimension, whose optimal denoiser is
//! D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu) and whose probability-flow ODE maps x(sigma_a)
//! to mu + sqrt((s^2 + sigma_b^2) / (s^2 + sigma_a^2)) (x - mu) exactly. Deterministic samplers
//! are checked pathwise against that map (order of accuracy), stochastic ones by the moments of
//! their samples (within Monte-Carlo error), and the adapters by running one network under every
//! sampler.

use candle_core::{DType, Device, Tensor};
use elbo::continuous::diffusion::VarianceKind;
use elbo::continuous::ode::Solver;
use elbo::continuous::parameterization::Parameterization;
use elbo::continuous::sampler::{
    ddim, ddim_invert, ddpm, dpmpp_2m, euler, euler_maruyama, flow_euler, heun, pf_ode,
    predictor_corrector, Churn, Denoiser, DenoiserFlow, DenoiserNetwork, ScheduledDenoiser,
    TimeFlip, VelocityFieldDenoiser,
};
use elbo::continuous::schedule::{
    karras_sigmas, uniform_times, with_final_zero, BetaSchedule, CondOt, DiscreteSchedule,
    DiscreteVp, Interpolation, NoiseSchedule, Precision, SubVp, Transition, Ve, Vp,
};
use elbo::{Result, Rng};

const DEV: Device = Device::Cpu;
const MU: [f64; 2] = [1.0, -0.5];
const S: [f64; 2] = [0.5, 0.8];

fn row(v: [f64; 2]) -> Tensor {
    Tensor::new(&[v], &DEV).unwrap() // [1, 2]
}

/// The optimal denoiser of N(MU, diag(S^2)).
fn gauss_denoiser(x: &Tensor, sigma: f64) -> Result<Tensor> {
    let k = row([
        S[0] * S[0] / (S[0] * S[0] + sigma * sigma),
        S[1] * S[1] / (S[1] * S[1] + sigma * sigma),
    ]);
    let mu = row(MU);
    Ok(x.broadcast_sub(&mu)?
        .broadcast_mul(&k)?
        .broadcast_add(&mu)?)
}

/// Samples of the EDM marginal at sigma: N(MU, S^2 + sigma^2).
fn marginal(n: usize, sigma: f64, rng: &mut Rng) -> Tensor {
    let z = rng
        .normal_tensor(&[n, 2], &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let sd = row([
        (S[0] * S[0] + sigma * sigma).sqrt(),
        (S[1] * S[1] + sigma * sigma).sqrt(),
    ]);
    z.broadcast_mul(&sd)
        .unwrap()
        .broadcast_add(&row(MU))
        .unwrap()
}

/// The exact PF-ODE map from sigma_a to sigma_b.
fn exact_flow(x: &Tensor, sa: f64, sb: f64) -> Tensor {
    let k = row([
        ((S[0] * S[0] + sb * sb) / (S[0] * S[0] + sa * sa)).sqrt(),
        ((S[1] * S[1] + sb * sb) / (S[1] * S[1] + sa * sa)).sqrt(),
    ]);
    let mu = row(MU);
    x.broadcast_sub(&mu)
        .unwrap()
        .broadcast_mul(&k)
        .unwrap()
        .broadcast_add(&mu)
        .unwrap()
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Per-dimension (mean, variance) of `[N, 2]` samples.
fn moments(x: &Tensor) -> Vec<(f64, f64)> {
    let v = x.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let n = v.len() as f64;
    (0..2)
        .map(|d| {
            let m = v.iter().map(|r| r[d]).sum::<f64>() / n;
            let var = v.iter().map(|r| (r[d] - m).powi(2)).sum::<f64>() / (n - 1.0);
            (m, var)
        })
        .collect()
}

/// Mean within 4 standard errors and variance within 4 standard errors plus `bias` (relative).
fn assert_gaussian(name: &str, x: &Tensor, bias: f64) {
    let n = x.dim(0).unwrap() as f64;
    for (d, (m, var)) in moments(x).into_iter().enumerate() {
        let s2 = S[d] * S[d];
        let se_m = (s2 / n).sqrt();
        let se_v = s2 * (2.0 / n).sqrt();
        assert!(
            (m - MU[d]).abs() < 4.0 * se_m,
            "{name}: dim {d} mean {m} vs {} (se {se_m})",
            MU[d]
        );
        assert!(
            (var - s2).abs() < 4.0 * se_v + bias * s2,
            "{name}: dim {d} variance {var} vs {s2} (se {se_v})"
        );
    }
}

fn linear_schedule() -> DiscreteSchedule {
    DiscreteSchedule::ddpm(BetaSchedule::Linear, 1000, Precision::F64).unwrap()
}

/// Transitions through abar = 1 / (1 + sigma^2) of a sigma grid (no final step to 0).
fn transitions_of(sigmas: &[f64]) -> Vec<Transition> {
    sigmas
        .windows(2)
        .map(|w| Transition {
            alpha_bar: 1.0 / (1.0 + w[0] * w[0]),
            alpha_bar_prev: 1.0 / (1.0 + w[1] * w[1]),
        })
        .collect()
}

/// log2 of the error ratio between n and 2n steps.
fn observed_order(err: &dyn Fn(usize) -> f64, n: usize) -> f64 {
    (err(n) / err(2 * n)).log2()
}

#[test]
fn deterministic_samplers_converge_at_their_order() {
    let mut rng = Rng::new(1);
    let (smax, smin) = (80.0, 0.05);
    let x_t = marginal(64, smax, &mut rng);
    let exact = exact_flow(&x_t, smax, smin);
    let grid = |n: usize| karras_sigmas(smin, smax, n + 1, 7.0).unwrap();
    let den: &dyn Denoiser = &gauss_denoiser;
    let e_euler = |n: usize| {
        max_abs(
            &euler(den, &grid(n), &Churn::default(), &x_t, &mut Rng::new(0)).unwrap(),
            &exact,
        )
    };
    let e_heun = |n: usize| {
        max_abs(
            &heun(den, &grid(n), &Churn::default(), &x_t, &mut Rng::new(0)).unwrap(),
            &exact,
        )
    };
    let e_dpm = |n: usize| max_abs(&dpmpp_2m(den, &grid(n), false, &x_t).unwrap(), &exact);
    // DDIM runs on VP-scaled samples x_VP = x / sqrt(1 + sigma^2)
    let e_ddim = |n: usize| {
        let g = grid(n);
        let xv = x_t.affine(1.0 / (1.0 + smax * smax).sqrt(), 0.0).unwrap();
        let out = ddim(den, &transitions_of(&g), 0.0, &xv, &mut Rng::new(0)).unwrap();
        max_abs(
            &out.affine((1.0 + smin * smin).sqrt(), 0.0).unwrap(),
            &exact,
        )
    };
    for (name, err, lo, hi) in [
        ("euler", &e_euler as &dyn Fn(usize) -> f64, 0.8, 1.3),
        ("ddim", &e_ddim, 0.8, 1.3),
        ("heun", &e_heun, 1.7, 2.6),
        ("dpm-solver++(2m)", &e_dpm, 1.6, 2.6),
    ] {
        let p = observed_order(err, 32);
        println!(
            "{name}: err(32) {:.3e} err(64) {:.3e} order {p:.2}",
            err(32),
            err(64)
        );
        assert!(
            p > lo && p < hi,
            "{name}: observed order {p}, expected in ({lo}, {hi})"
        );
    }
    // DDIM (eta = 0) is Euler in the EDM variable: same numbers
    assert!((e_ddim(16) - e_euler(16)).abs() < 1e-9 * (1.0 + e_euler(16)));
    // second-order methods are far more accurate at equal steps
    assert!(e_heun(32) < 0.2 * e_euler(32) && e_dpm(32) < 0.2 * e_euler(32));
}

#[test]
fn probability_flow_ode_matches_the_exact_map() {
    let mut rng = Rng::new(2);
    for (name, sch) in [
        ("vp", &Vp::default() as &dyn NoiseSchedule),
        ("sub-vp", &SubVp::default()),
        ("ve", &Ve::default()),
    ] {
        let (t0, t1) = (sch.t_max(), sch.t_min());
        let (s0, s1) = (sch.edm_sigma(t0), sch.edm_sigma(t1));
        let x_edm = marginal(32, s0, &mut rng);
        let x = x_edm.affine(sch.alpha(t0), 0.0).unwrap(); // native variable
        let exact = exact_flow(&x_edm, s0, s1);
        let solver = Solver::Dopri5 {
            rtol: 1e-8,
            atol: 1e-8,
        };
        let (out, stats) = pf_ode(&gauss_denoiser, sch, &solver, false, &x).unwrap();
        let err = max_abs(&out, &exact);
        println!("pf-ode {name}: err {err:.2e}, nfe {}", stats.nfe);
        assert!(err < 1e-5, "{name}: PF-ODE error {err}");
        let heun20 = Solver::Heun { steps: 20 };
        let heun40 = Solver::Heun { steps: 40 };
        let e20 = max_abs(
            &pf_ode(&gauss_denoiser, sch, &heun20, false, &x).unwrap().0,
            &exact,
        );
        let e40 = max_abs(
            &pf_ode(&gauss_denoiser, sch, &heun40, false, &x).unwrap().0,
            &exact,
        );
        assert!(e40 < e20 / 3.0, "{name}: heun PF-ODE errors {e20} -> {e40}");
    }
}

#[test]
fn ddim_inversion_round_trip() {
    let sched = linear_schedule();
    let dvp = DiscreteVp::new(&sched, Interpolation::Linear);
    // an eps-network standing in for a trained DDPM: the optimal one, through the adapters
    let eps_net = DenoiserNetwork::new(&gauss_denoiser, &dvp, Parameterization::Eps, 1.0);
    let den = ScheduledDenoiser::new(&eps_net, &dvp, Parameterization::Eps, 1.0);
    let mut rng = Rng::new(3);
    let a0 = sched.alphas_cumprod()[0];
    let x = marginal(64, ((1.0 - a0) / a0).sqrt(), &mut rng)
        .affine(a0.sqrt(), 0.0)
        .unwrap();
    let err = |n: usize| {
        let ts: Vec<usize> = (0..n).rev().map(|i| i * (1000 / n)).collect();
        let mut tr = sched.transitions(&ts).unwrap();
        tr.pop(); // stay at timestep 0: inversion needs a noisy start
        let x_t = ddim_invert(&den, &tr, &x).unwrap();
        let back = ddim(&den, &tr, 0.0, &x_t, &mut Rng::new(0)).unwrap();
        max_abs(&back, &x)
    };
    let (e50, e200) = (err(50), err(200));
    println!("ddim inversion round trip: 50 steps {e50:.2e}, 200 steps {e200:.2e}");
    assert!(e200 < 5e-2, "round-trip error {e200}");
    assert!(
        e200 < e50 / 3.0,
        "round-trip error does not shrink: {e50} -> {e200}"
    );
    // inversion itself follows the exact probability-flow map to x_T, at first order
    let s0 = ((1.0 - a0) / a0).sqrt();
    let a_t = sched.alphas_cumprod()[999];
    let exact = exact_flow(
        &x.affine(1.0 / a0.sqrt(), 0.0).unwrap(),
        s0,
        sched.sigmas()[999],
    )
    .affine(a_t.sqrt(), 0.0)
    .unwrap();
    let inv_err = |n: usize| {
        let ts: Vec<usize> = (0..n).rev().map(|i| i * (999 / (n - 1))).collect();
        let mut tr = sched.transitions(&ts).unwrap();
        tr.pop();
        max_abs(&ddim_invert(&den, &tr, &x).unwrap(), &exact)
    };
    let (i1, i2) = (inv_err(112), inv_err(334));
    println!("ddim inversion vs exact map: {i1:.2e} -> {i2:.2e}");
    assert!(i2 < i1 / 2.0 && i2 < 0.05, "inversion errors {i1} -> {i2}");
    let clean = vec![Transition {
        alpha_bar: 0.5,
        alpha_bar_prev: 1.0,
    }];
    assert!(ddim_invert(&den, &clean, &x).is_err());
}

#[test]
fn stochastic_samplers_reproduce_gaussian_moments() {
    let n = 4000;
    let sched = linear_schedule();
    let dvp = DiscreteVp::new(&sched, Interpolation::Linear);
    let eps_net = DenoiserNetwork::new(&gauss_denoiser, &dvp, Parameterization::Eps, 1.0);
    let den = ScheduledDenoiser::new(&eps_net, &dvp, Parameterization::Eps, 1.0);
    let s_top = sched.sigmas()[999];
    let a_top = sched.alphas_cumprod()[999];
    let mut rng = Rng::new(4);
    let x_vp = marginal(n, s_top, &mut rng)
        .affine(a_top.sqrt(), 0.0)
        .unwrap();
    let all: Vec<usize> = (0..1000).rev().collect();
    let tr = sched.transitions(&all).unwrap();
    for var in [VarianceKind::FixedSmall, VarianceKind::FixedLarge] {
        let out = ddpm(&den, &tr, var, &x_vp, &mut rng).unwrap();
        assert_gaussian(&format!("ddpm {var:?}"), &out, 0.03);
    }
    let ts: Vec<usize> = (0..250).rev().map(|i| i * 4).collect();
    let out = ddim(&den, &sched.transitions(&ts).unwrap(), 1.0, &x_vp, &mut rng).unwrap();
    assert_gaussian("ddim eta=1", &out, 0.03);
    let out2 = ddim(&den, &sched.transitions(&ts).unwrap(), 1.0, &x_vp, &mut rng).unwrap();
    assert!(
        max_abs(&out, &out2) > 0.1,
        "eta = 1 must inject fresh noise"
    );

    // EDM Heun with churn on a Karras grid
    let smax = 80.0;
    let x_edm = marginal(n, smax, &mut rng);
    let g = with_final_zero(karras_sigmas(0.002, smax, 64, 7.0).unwrap());
    let churn = Churn {
        s_churn: 40.0,
        s_tmin: 0.05,
        s_tmax: 50.0,
        s_noise: 1.0,
    };
    let out = heun(&gauss_denoiser, &g, &churn, &x_edm, &mut rng).unwrap();
    assert_gaussian("heun churn", &out, 0.03);
    let g256 = with_final_zero(karras_sigmas(0.002, smax, 256, 7.0).unwrap());
    let out = euler(&gauss_denoiser, &g256, &churn, &x_edm, &mut rng).unwrap();
    assert_gaussian("euler churn", &out, 0.05);

    // reverse SDE: Euler-Maruyama and predictor-corrector on VP, sub-VP and VE
    for (name, sch, snr) in [
        ("vp", &Vp::default() as &dyn NoiseSchedule, 0.16),
        ("sub-vp", &SubVp::default(), 0.16),
        ("ve", &Ve::default(), 0.16),
    ] {
        let t0 = sch.t_max();
        let x = marginal(n, sch.edm_sigma(t0), &mut rng)
            .affine(sch.alpha(t0), 0.0)
            .unwrap();
        let times = uniform_times(sch, 501);
        let out = euler_maruyama(&gauss_denoiser, sch, &times, true, &x, &mut rng).unwrap();
        assert_gaussian(&format!("euler-maruyama {name}"), &out, 0.03);
        let times = uniform_times(sch, 201);
        let out =
            predictor_corrector(&gauss_denoiser, sch, &times, 1, snr, true, &x, &mut rng).unwrap();
        assert_gaussian(&format!("predictor-corrector {name}"), &out, 0.04);
    }
}

/// The crate's flow-matching velocity field of the Gaussian data (t = 1 data): v = (x1^ - x_t) /
/// (1 - t) with x1^ the optimal denoiser at sigma = (1 - t) / t.
fn gauss_velocity(x: &Tensor, t: f64) -> Result<Tensor> {
    let x1 = gauss_denoiser(&x.affine(1.0 / t, 0.0)?, (1.0 - t) / t)?;
    Ok(((x1 - x)? / (1.0 - t))?)
}

#[test]
fn every_network_under_every_sampler() {
    let sched = linear_schedule();
    let dvp = DiscreteVp::new(&sched, Interpolation::Linear);
    let (vp, cot) = (Vp::default(), CondOt::default());
    let mut rng = Rng::new(5);
    let x = marginal(16, 3.0, &mut rng);
    let exact = |s: f64| gauss_denoiser(&x, s).unwrap();
    // every parameterization on every schedule round-trips through the adapters
    use Parameterization::*;
    for (sname, sch, scale) in [
        ("discrete", &dvp as &dyn NoiseSchedule, 1.0),
        ("vp", &vp, 1.0),
        ("condot", &cot, 1000.0),
    ] {
        for p in [Eps, X0, V, Score, Velocity] {
            let net = DenoiserNetwork::new(&gauss_denoiser, sch, p, scale);
            let den = ScheduledDenoiser::new(&net, sch, p, scale);
            for s in [0.05, 0.7, 3.0, 40.0] {
                if s > sch.edm_sigma(sch.t_max()) {
                    continue;
                }
                let err = max_abs(&den.denoise(&x, s).unwrap(), &exact(s));
                assert!(err < 1e-8, "{sname} {p:?} sigma {s}: {err}");
            }
        }
    }
    let fm = VelocityFieldDenoiser(&gauss_velocity);
    for s in [0.05, 0.7, 3.0, 40.0] {
        assert!(max_abs(&fm.denoise(&x, s).unwrap(), &exact(s)) < 1e-9);
    }
    let (f1, f2) = (TimeFlip(&gauss_velocity), DenoiserFlow(&gauss_denoiser));
    use elbo::continuous::VelocityField;
    let v1 = f1.velocity(&x, 0.3).unwrap();
    assert!(max_abs(&v1, &f2.velocity(&x, 0.3).unwrap()) < 1e-9);
    assert!(f2.velocity(&x, 1.0).is_err());

    // one DDPM eps-network, sampled by DDPM, DDIM, Heun, DPM-Solver++, Euler-Maruyama on its own
    // schedule and rectified-flow Euler; a flow-matching network by Heun and an SDE sampler
    let n = 4000;
    let eps_net = DenoiserNetwork::new(&gauss_denoiser, &dvp, Eps, 1.0);
    let den = ScheduledDenoiser::new(&eps_net, &dvp, Eps, 1.0);
    let s_top = dvp.sigmas()[999];
    let x_edm = marginal(n, s_top, &mut rng);
    let x_vp = x_edm
        .affine(1.0 / (1.0 + s_top * s_top).sqrt(), 0.0)
        .unwrap();
    let ts: Vec<usize> = (0..50).rev().map(|i| i * 20 + 19).collect();
    let tr = sched.transitions(&ts).unwrap();
    let karras = with_final_zero(karras_sigmas(dvp.sigmas()[0], s_top, 25, 7.0).unwrap());
    let outs = [
        (
            "ddpm",
            ddpm(
                &den,
                &sched
                    .transitions(&(0..1000).rev().collect::<Vec<_>>())
                    .unwrap(),
                VarianceKind::FixedSmall,
                &x_vp,
                &mut rng,
            )
            .unwrap(),
        ),
        ("ddim", ddim(&den, &tr, 0.0, &x_vp, &mut rng).unwrap()),
        (
            "heun",
            heun(&den, &karras, &Churn::default(), &x_edm, &mut rng).unwrap(),
        ),
        ("dpm++", dpmpp_2m(&den, &karras, true, &x_edm).unwrap()),
        (
            "em",
            euler_maruyama(
                &den,
                &dvp,
                &uniform_times(&dvp, 1000),
                true,
                &x_vp,
                &mut rng,
            )
            .unwrap(),
        ),
        ("flow euler", {
            // flow times s = sigma / (1 + sigma) within the network's sigma range, then 0
            let s0 = s_top / (1.0 + s_top);
            let s1 = dvp.sigmas()[0] / (1.0 + dvp.sigmas()[0]);
            let mut grid: Vec<f64> = (0..400)
                .map(|i| s0 + (s1 - s0) * i as f64 / 399.0)
                .collect();
            grid.push(0.0);
            let xf = x_edm.affine(1.0 - s0, 0.0).unwrap();
            flow_euler(&DenoiserFlow(&den), &grid, &xf).unwrap()
        }),
    ];
    for (name, out) in &outs {
        assert_gaussian(&format!("eps-network under {name}"), out, 0.04);
    }
    let fm_den = VelocityFieldDenoiser(&gauss_velocity);
    let out = heun(&fm_den, &karras, &Churn::default(), &x_edm, &mut rng).unwrap();
    assert_gaussian("flow network under heun", &out, 0.03);
    let t0 = cot.t_max();
    let xc = marginal(n, cot.edm_sigma(t0), &mut rng)
        .affine(cot.alpha(t0), 0.0)
        .unwrap();
    let out = euler_maruyama(
        &fm_den,
        &cot,
        &uniform_times(&cot, 1000),
        true,
        &xc,
        &mut rng,
    )
    .unwrap();
    assert_gaussian("flow network under euler-maruyama", &out, 0.04);
}

#[test]
fn bad_sampler_inputs_are_errors() {
    let x = Tensor::zeros((2, 2), DType::F64, &DEV).unwrap();
    let mut rng = Rng::new(0);
    let tr = vec![Transition {
        alpha_bar: 0.5,
        alpha_bar_prev: 1.0,
    }];
    assert!(ddim(&gauss_denoiser, &tr, 1.5, &x, &mut rng).is_err());
    assert!(ddim(&gauss_denoiser, &[], 0.0, &x, &mut rng).is_err());
    let up = vec![Transition {
        alpha_bar: 0.5,
        alpha_bar_prev: 0.4,
    }];
    assert!(ddpm(&gauss_denoiser, &up, VarianceKind::FixedSmall, &x, &mut rng).is_err());
    assert!(euler(
        &gauss_denoiser,
        &[1.0, 2.0],
        &Churn::default(),
        &x,
        &mut rng
    )
    .is_err());
    assert!(heun(&gauss_denoiser, &[1.0], &Churn::default(), &x, &mut rng).is_err());
    assert!(dpmpp_2m(&gauss_denoiser, &[1.0, f64::NAN], false, &x).is_err());
    assert!(flow_euler(&DenoiserFlow(&gauss_denoiser), &[1.5, 0.0], &x).is_err());
    let vp = Vp::default();
    assert!(euler_maruyama(&gauss_denoiser, &vp, &[1.0, 2.0], true, &x, &mut rng).is_err());
    assert!(predictor_corrector(
        &gauss_denoiser,
        &vp,
        &[1.0, 0.5],
        1,
        0.0,
        true,
        &x,
        &mut rng
    )
    .is_err());
    let bad_churn = Churn {
        s_churn: -1.0,
        ..Churn::default()
    };
    assert!(heun(&gauss_denoiser, &[2.0, 0.0], &bad_churn, &x, &mut rng).is_err());
}
