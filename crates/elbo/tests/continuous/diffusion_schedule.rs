//! Noise schedules and parameterizations against closed forms, simulation and finite differences.

use candle_core::{DType, Device, Tensor};
use elbo::continuous::parameterization::{Coeffs, EdmPrecond, Parameterization};
use elbo::continuous::schedule::{
    ddim_timesteps, dpm_solver_timesteps, euler_timesteps, flow_match_sigmas, karras_sigmas,
    shift_sigma, uniform_t_sigmas, BetaSchedule, CondOt, DiscreteSchedule, DiscreteVp, Edm,
    Interpolation, NoiseSchedule, Precision, SubVp, TimestepSpacing, Ve, Vp,
};
use elbo::Rng;

const DEV: Device = Device::Cpu;

/// q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) against iterating the chain
/// x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z (Ho et al. 2020, eq. 2 and 4).
#[test]
fn forward_marginal_closed_form_matches_iterated_chain() {
    let n = 20_000;
    let x0 = 1.5;
    for kind in [BetaSchedule::Linear, BetaSchedule::SquaredcosCapV2] {
        let sched = DiscreteSchedule::ddpm(kind, 1000, Precision::F64).unwrap();
        let mut rng = Rng::new(7);
        let mut x = vec![x0; n];
        for (t, &beta) in sched.betas().iter().enumerate() {
            for v in x.iter_mut() {
                *v = (1.0 - beta).sqrt() * *v + beta.sqrt() * rng.normal();
            }
            if [0, 10, 100, 500, 999].contains(&t) {
                let m = x.iter().sum::<f64>() / n as f64;
                let var = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64;
                let ab = sched.alphas_cumprod()[t];
                let (m_ref, v_ref) = (ab.sqrt() * x0, 1.0 - ab);
                let se_m = (v_ref / n as f64).sqrt();
                let se_v = v_ref * (2.0 / n as f64).sqrt();
                assert!(
                    (m - m_ref).abs() < 4.0 * se_m,
                    "{kind:?} t {t}: mean {m} vs {m_ref}"
                );
                assert!(
                    (var - v_ref).abs() < 4.0 * se_v,
                    "{kind:?} t {t}: var {var} vs {v_ref}"
                );
            }
        }
    }
}

#[test]
fn beta_schedules_have_their_closed_forms() {
    let lin = DiscreteSchedule::ddpm(BetaSchedule::Linear, 1000, Precision::F64).unwrap();
    assert_eq!(lin.betas()[0], 1e-4);
    assert_eq!(lin.betas()[999], 0.02);
    assert!((lin.betas()[500] - (1e-4 + 500.0 * (0.02 - 1e-4) / 999.0)).abs() < 1e-15);
    let sl = DiscreteSchedule::ddpm(BetaSchedule::ScaledLinear, 1000, Precision::F64).unwrap();
    let r = (0.02f64.sqrt() - 0.01) / 999.0;
    assert!((sl.betas()[300] - (0.01 + 300.0 * r).powi(2)).abs() < 1e-15);
    // cosine: abar_t = f((t + 1) / N) / f(0) while no beta is clipped (Nichol & Dhariwal eq. 17)
    let cos = DiscreteSchedule::ddpm(BetaSchedule::SquaredcosCapV2, 1000, Precision::F64).unwrap();
    let f = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    for t in [0usize, 100, 500, 900] {
        let want = f((t + 1) as f64 / 1000.0) / f(0.0);
        assert!((cos.alphas_cumprod()[t] / want - 1.0).abs() < 1e-9, "t {t}");
    }
    assert_eq!(cos.betas()[999], 0.999);
    // posterior variance: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, and 1e-20 at t = 0
    let t = 300;
    let (a, ap) = (lin.alphas_cumprod()[t], lin.alphas_cumprod()[t - 1]);
    let pv = lin.posterior_variance(t).unwrap();
    assert!((pv - (1.0 - ap) / (1.0 - a) * lin.betas()[t]).abs() < 1e-15);
    assert_eq!(lin.posterior_variance(0).unwrap(), 1e-20);
    assert!(DiscreteSchedule::from_betas(vec![0.1, 1.0], Precision::F64).is_err());
    assert!(DiscreteSchedule::new(BetaSchedule::Linear, 1, 1e-4, 0.02, Precision::F64).is_err());
    assert!(BetaSchedule::parse("quadratic").is_err());
}

#[test]
fn timestep_spacings_follow_diffusers() {
    use TimestepSpacing::*;
    let lead = ddim_timesteps(Leading, 1000, 50, 1).unwrap();
    assert_eq!((lead[0], lead[49], lead.len()), (981, 1, 50));
    let trail = ddim_timesteps(Trailing, 1000, 20, 0).unwrap();
    assert_eq!((trail[0], trail[1], trail[19]), (999, 949, 49));
    let lin = ddim_timesteps(Linspace, 1000, 10, 0).unwrap();
    assert_eq!(lin, vec![999, 888, 777, 666, 555, 444, 333, 222, 111, 0]);
    let e = euler_timesteps(Linspace, 1000, 30, 0).unwrap();
    assert!((e[1] - 999.0 * 28.0 / 29.0).abs() < 1e-9 && e[29] == 0.0);
    let d = dpm_solver_timesteps(Linspace, 1000, 20, 0).unwrap();
    assert_eq!((d[0], d[10], d[19]), (999, 500, 50));
    assert!(ddim_timesteps(Leading, 1000, 0, 0).is_err());
    assert!(ddim_timesteps(Leading, 1000, 1001, 0).is_err());
    assert!(ddim_timesteps(Leading, 1000, 10, 200).is_err());
    // diffusers' DDIM step goes to t - N/n, not to the next listed timestep
    let sched = DiscreteSchedule::ddpm(BetaSchedule::Linear, 1000, Precision::F64).unwrap();
    let tr = sched.diffusers_transitions(&lin, false).unwrap();
    assert_eq!(tr[0].alpha_bar_prev, sched.alphas_cumprod()[899]);
    assert_eq!(tr[9].alpha_bar_prev, sched.alphas_cumprod()[0]);
    let tr = sched.transitions(&lin).unwrap();
    assert_eq!(tr[0].alpha_bar_prev, sched.alphas_cumprod()[888]);
    assert_eq!(tr[9].alpha_bar_prev, 1.0);
    assert!(sched.transitions(&[5, 7]).is_err());
}

fn schedules() -> Vec<(&'static str, Box<dyn NoiseSchedule>)> {
    let sched = DiscreteSchedule::ddpm(BetaSchedule::Linear, 1000, Precision::F64).unwrap();
    vec![
        ("vp", Box::new(Vp::default())),
        ("sub-vp", Box::new(SubVp::default())),
        ("ve", Box::new(Ve::default())),
        ("edm", Box::new(Edm::default())),
        ("condot", Box::new(CondOt::default())),
        (
            "discrete-log",
            Box::new(DiscreteVp::new(&sched, Interpolation::LogLinear)),
        ),
    ]
}

/// Derivatives by central differences, sigma/alpha inverse, monotone log-SNR.
#[test]
fn continuous_schedules_derivatives_and_inverse() {
    for (name, s) in schedules() {
        let (lo, hi) = (s.t_min(), s.t_max());
        let mut last = f64::INFINITY;
        for k in 1..20 {
            let t = lo + (hi - lo) * (k as f64 + 0.37) / 20.5;
            let h = 1e-6 * (hi - lo);
            let fd_a = (s.alpha(t + h) - s.alpha(t - h)) / (2.0 * h);
            let fd_s = (s.sigma(t + h) - s.sigma(t - h)) / (2.0 * h);
            let tol = |v: f64| 1e-5 * (1.0 + v.abs());
            assert!(
                (fd_a - s.d_alpha(t)).abs() < tol(fd_a),
                "{name} d_alpha at {t}"
            );
            assert!(
                (fd_s - s.d_sigma(t)).abs() < tol(fd_s),
                "{name} d_sigma at {t}"
            );
            let back = s.t_of_edm_sigma(s.edm_sigma(t)).unwrap();
            assert!(
                (back - t).abs() < 1e-8 * (1.0 + t.abs()),
                "{name}: t {t} -> {back}"
            );
            let l = s.log_snr(t);
            assert!(l < last, "{name}: log-SNR must decrease");
            last = l;
        }
        assert!(s.t_of_edm_sigma(s.edm_sigma(hi) * 1.01).is_err(), "{name}");
    }
    let vp = Vp::default();
    for t in [0.01, 0.3, 0.9] {
        assert!((vp.alpha(t).powi(2) + vp.sigma(t).powi(2) - 1.0).abs() < 1e-12);
        // Song et al. 2021b eq. 11-12: VP drift -beta/2, g^2 = beta; sub-VP g^2 = beta (1 - e^-2B)
        assert!((vp.drift(t) + 0.5 * vp.beta(t)).abs() < 1e-12);
        assert!((vp.diffusion2(t) - vp.beta(t)).abs() < 1e-10);
        let sub = SubVp(vp);
        let want = vp.beta(t) * (1.0 - (-2.0 * vp.integral(t)).exp());
        assert!((sub.diffusion2(t) - want).abs() < 1e-10);
        let ve = Ve::default();
        let want = 2.0 * ve.sigma(t).powi(2) * (ve.sigma_max / ve.sigma_min).ln();
        assert!((ve.diffusion2(t) - want).abs() < 1e-9 * want && ve.drift(t) == 0.0);
    }
}

/// The forward SDE dx = f x dt + g dW built from (alpha, sigma) reproduces the marginal
/// N(alpha x_0, sigma^2) when simulated (Euler-Maruyama, fine steps).
#[test]
fn forward_sde_simulation_matches_the_marginals() {
    let n = 20_000;
    let x0 = 2.0;
    for (name, s) in [
        ("vp", &Vp::default() as &dyn NoiseSchedule),
        ("sub-vp", &SubVp::default()),
        ("condot", &CondOt::default()),
    ] {
        let mut rng = Rng::new(11);
        let (t0, t1) = (s.t_min(), 0.8);
        let steps = 2000;
        let dt = (t1 - t0) / steps as f64;
        // start from the exact marginal at t0
        let mut x: Vec<f64> = (0..n)
            .map(|_| s.alpha(t0) * x0 + s.sigma(t0) * rng.normal())
            .collect();
        for k in 0..steps {
            let t = t0 + k as f64 * dt;
            let (f, g) = (s.drift(t), s.diffusion2(t).sqrt());
            for v in x.iter_mut() {
                *v += f * *v * dt + g * dt.sqrt() * rng.normal();
            }
        }
        let m = x.iter().sum::<f64>() / n as f64;
        let var = x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64;
        let (m_ref, v_ref) = (s.alpha(t1) * x0, s.sigma(t1).powi(2));
        let se_v = v_ref * (2.0 / n as f64).sqrt();
        assert!(
            (m - m_ref).abs() < 4.0 * (v_ref / n as f64).sqrt() + 2e-3,
            "{name} mean {m}"
        );
        assert!(
            (var - v_ref).abs() < 4.0 * se_v + 2e-3,
            "{name} var {var} vs {v_ref}"
        );
    }
}

fn rand(shape: &[usize], rng: &mut Rng) -> Tensor {
    rng.normal_tensor(shape, &DEV)
        .unwrap()
        .to_dtype(DType::F64)
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

#[test]
fn parameterization_conversions_round_trip() {
    use Parameterization::*;
    let mut rng = Rng::new(3);
    let (x0, eps) = (rand(&[8, 3], &mut rng), rand(&[8, 3], &mut rng));
    for (name, s) in schedules() {
        let t = 0.5 * (s.t_min() + s.t_max());
        let c = Coeffs::at(s.as_ref(), t);
        let x_t = ((&x0 * c.alpha).unwrap() + (&eps * c.sigma).unwrap()).unwrap();
        for p in [Eps, X0, V, Score, Velocity] {
            let out = p.from_x0_eps(&x0, &eps, &c).unwrap();
            let (a, b) = p.to_x0_eps(&out, &x_t, &c).unwrap();
            assert!(
                max_abs(&a, &x0) < 1e-9 && max_abs(&b, &eps) < 1e-9,
                "{name} {p:?}"
            );
            for q in [Eps, X0, V, Score, Velocity] {
                let direct = q.from_x0_eps(&x0, &eps, &c).unwrap();
                let conv = p.convert(q, &out, &x_t, &c).unwrap();
                assert!(max_abs(&conv, &direct) < 1e-8, "{name} {p:?} -> {q:?}");
            }
        }
    }
    // VP: diffusers' v formulas x0 = a x_t - s v, eps = a v + s x_t
    let c = Coeffs::vp_from_edm_sigma(0.7);
    let x_t = ((&x0 * c.alpha).unwrap() + (&eps * c.sigma).unwrap()).unwrap();
    let v = V.from_x0_eps(&x0, &eps, &c).unwrap();
    let x0_d = ((&x_t * c.alpha).unwrap() - (&v * c.sigma).unwrap()).unwrap();
    assert!(max_abs(&x0_d, &x0) < 1e-12);
    // the score is -eps / sigma
    let sc = Score.from_x0_eps(&x0, &eps, &c).unwrap();
    assert!(max_abs(&(sc * (-c.sigma)).unwrap(), &eps) < 1e-12);
    assert!(Parameterization::parse("noise").is_err());
    let zero = Coeffs {
        alpha: 1.0,
        sigma: 0.0,
        d_alpha: 0.0,
        d_sigma: 0.0,
    };
    assert!(X0.to_x0_eps(&x0, &x0, &zero).is_err());
}

/// Karras et al. 2022, Table 1 / App. B.6: unit-variance network input and target.
#[test]
fn edm_preconditioning_identities() {
    let p = EdmPrecond::default();
    let sd = p.sigma_data;
    for s in [0.002, 0.1, 0.5, 3.0, 80.0] {
        assert!((p.c_in(s).powi(2) * (s * s + sd * sd) - 1.0).abs() < 1e-12);
        assert!((p.c_skip(s) - sd * sd * p.c_in(s).powi(2)).abs() < 1e-15);
        assert!((p.c_out(s).powi(2) - (s * sd * p.c_in(s)).powi(2)).abs() < 1e-15);
        // Var[F target] = ((1 - c_skip)^2 sd^2 + c_skip^2 s^2) / c_out^2 = 1
        let v = ((1.0 - p.c_skip(s)).powi(2) * sd * sd + p.c_skip(s).powi(2) * s * s)
            / p.c_out(s).powi(2);
        assert!((v - 1.0).abs() < 1e-9, "sigma {s}: target variance {v}");
        assert!((p.loss_weight(s) * p.c_out(s).powi(2) - 1.0).abs() < 1e-12);
        assert!((p.c_noise(s) - 0.25 * s.ln()).abs() < 1e-15);
    }
    // D(x; sigma) applied to the target recovers x_0; empirical unit variance of the target
    let mut rng = Rng::new(9);
    let x0 = (rand(&[20_000, 1], &mut rng) * sd).unwrap();
    let s = 1.3;
    let x = (&x0 + (rand(&[20_000, 1], &mut rng) * s).unwrap()).unwrap();
    let f = p.target(&x0, &x, s).unwrap();
    assert!(max_abs(&p.denoised(&x, &f, s).unwrap(), &x0) < 1e-12);
    let var = f
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!((var - 1.0).abs() < 0.04, "target variance {var}");
}

#[test]
fn sigma_grids() {
    let k = karras_sigmas(0.002, 80.0, 18, 7.0).unwrap();
    assert_eq!(k.len(), 18);
    assert!((k[0] - 80.0).abs() < 1e-12 && (k[17] - 0.002).abs() < 1e-15);
    assert!(k.windows(2).all(|w| w[1] < w[0]));
    // rho = 1 is uniform in sigma; rho = 7 puts more steps at low noise
    let u = karras_sigmas(1.0, 10.0, 10, 1.0).unwrap();
    assert!(u.windows(2).all(|w| (w[0] - w[1] - 1.0).abs() < 1e-12));
    assert!(k[9] < 0.5 * (80.0 + 0.002) / 4.0);
    assert!(karras_sigmas(1.0, 0.5, 10, 7.0).is_err());
    let vp = Vp::default();
    let g = uniform_t_sigmas(&vp, 5).unwrap();
    assert!((g[0] - vp.edm_sigma(1.0)).abs() < 1e-12 && (g[4] - vp.edm_sigma(1e-3)).abs() < 1e-12);
    // flow matching: shift 1 is linear from 1 to 1/N; shift 3 maps s -> 3s / (1 + 2s) twice at the end
    let f = flow_match_sigmas(28, 1.0, 1000).unwrap();
    assert!((f[1] - 0.963).abs() < 1e-12 && (f[27] - 0.001).abs() < 1e-12 && f[28] == 0.0);
    let f3 = flow_match_sigmas(10, 3.0, 1000).unwrap();
    assert!((f3[9] - shift_sigma(shift_sigma(0.001, 3.0), 3.0)).abs() < 1e-12);
    // a discrete schedule's own sigmas map back to integer timesteps
    let sched = DiscreteSchedule::ddpm(BetaSchedule::Linear, 1000, Precision::F64).unwrap();
    for interp in [Interpolation::Linear, Interpolation::LogLinear] {
        let d = DiscreteVp::new(&sched, interp);
        for t in [0usize, 1, 500, 999] {
            assert_eq!(d.t_of_edm_sigma(d.sigmas()[t]).unwrap(), t as f64);
            assert!((d.alpha(t as f64) - sched.alphas_cumprod()[t].sqrt()).abs() < 1e-12);
        }
    }
}
