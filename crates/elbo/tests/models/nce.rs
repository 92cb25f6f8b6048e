//! Noise-contrastive estimation: the NCE optimum over a family that contains the truth (a
//! quadratic log-density) recovers the data's density and its normaliser, the InfoNCE optimum
//! recovers it up to a constant, the importance-sampled log Z matches a Gaussian mixture's
//! analytic normaliser, InfoNCE gives every network parameter a gradient and refuses the
//! learned normaliser, and a run resumes bit-identically with its fitted noise.

use candle_core::{DType, Device, Tensor, Var};
use elbo::config::EvalOptions;
use elbo::data::DataKind;
use elbo::eval::importance::importance_log_z;
use elbo::model::{DataInfo, GenerativeModel};
use elbo::models::nce::{infonce_loss, nce_loss, Config, Nce, Objective};
use elbo::train::optim::named_vars;
use elbo::Rng;

const CPU: Device = Device::Cpu;
const LOG_2PI: f64 = 1.837_877_066_409_345_5;

/// Data N(0.7, 0.6²), noise N(0, 1.5²).
const M: f64 = 0.7;
const S: f64 = 0.6;
const SN: f64 = 1.5;

/// `[a, b, k]` of `log p(x) = a x + b x² + k`, trained by full-batch Adam on `loss(G_data,
/// G_noise)` with `G = log p - log p_n`, from `nu` noise draws per data point.
fn fit_quadratic(loss: &dyn Fn(&Tensor, &Tensor) -> Tensor, nu: usize) -> [f64; 3] {
    let n = 8000;
    let mut rng = Rng::new(11);
    let x = rng.normal_tensor(&[n], &CPU).unwrap().affine(S, M).unwrap();
    let y = (rng.normal_tensor(&[n * nu], &CPU).unwrap() * SN).unwrap();
    let log_pn =
        |t: &Tensor| (t.sqr().unwrap() * (-0.5 / (SN * SN))).unwrap() - (0.5 * LOG_2PI + SN.ln());
    let (lx, ly) = (log_pn(&x).unwrap(), log_pn(&y).unwrap());
    let theta = Var::from_tensor(&Tensor::zeros(3, DType::F32, &CPU).unwrap()).unwrap();
    let g = |t: &Tensor, lp: &Tensor| -> Tensor {
        let th = theta.as_tensor();
        let a = th.narrow(0, 0, 1).unwrap();
        let b = th.narrow(0, 1, 1).unwrap();
        let k = th.narrow(0, 2, 1).unwrap();
        (t.broadcast_mul(&a).unwrap() + t.sqr().unwrap().broadcast_mul(&b).unwrap())
            .unwrap()
            .broadcast_add(&k)
            .unwrap()
            .sub(lp)
            .unwrap()
    };
    // Adam (Kingma & Ba 2015, algorithm 1) on three parameters
    let (mut m1, mut m2) = ([0.0f64; 3], [0.0f64; 3]);
    let mut th = [0.0f64; 3];
    for step in 1..=1500 {
        let l = loss(&g(&x, &lx), &g(&y, &ly));
        let grad: Vec<f32> = l
            .backward()
            .unwrap()
            .get(theta.as_tensor())
            .unwrap()
            .to_vec1()
            .unwrap();
        let lr = if step < 1000 { 0.05 } else { 0.005 };
        for i in 0..3 {
            let gi = f64::from(grad[i]);
            m1[i] = 0.9 * m1[i] + 0.1 * gi;
            m2[i] = 0.999 * m2[i] + 0.001 * gi * gi;
            let mh = m1[i] / (1.0 - 0.9f64.powi(step));
            let vh = m2[i] / (1.0 - 0.999f64.powi(step));
            th[i] -= lr * mh / (vh.sqrt() + 1e-8);
        }
        let t: Vec<f32> = th.iter().map(|v| *v as f32).collect();
        theta.set(&Tensor::from_vec(t, 3, &CPU).unwrap()).unwrap();
    }
    th
}

/// The analytic log N(x; M, S²).
fn truth(x: f64) -> f64 {
    -(x - M).powi(2) / (2.0 * S * S) - 0.5 * LOG_2PI - S.ln()
}

/// The fitted log-density minus the truth on a grid within two standard deviations.
fn errors(th: [f64; 3]) -> Vec<f64> {
    (0..=40)
        .map(|i| M - 2.0 * S + 4.0 * S * f64::from(i) / 40.0)
        .map(|x| th[0] * x + th[1] * x * x + th[2] - truth(x))
        .collect()
}

#[test]
fn the_nce_optimum_on_a_known_density_recovers_it_and_its_normaliser() {
    let nu = 4;
    let th = fit_quadratic(&|gx, gy| nce_loss(gx, gy, nu).unwrap(), nu);
    // the truth in these coordinates: b = -1/(2S²), a = M/S², k = -c with
    // c = M²/(2S²) + ½ log(2π S²), the true log-normaliser of exp(a x + b x²)
    let c_true = M * M / (2.0 * S * S) + 0.5 * LOG_2PI + S.ln();
    assert!(
        (th[1] + 1.0 / (2.0 * S * S)).abs() < 0.08,
        "precision: {th:?}"
    );
    assert!((th[0] - M / (S * S)).abs() < 0.08, "mean term: {th:?}");
    assert!(
        (-th[2] - c_true).abs() < 0.05,
        "learned c {} vs true {c_true}",
        -th[2]
    );
    let e = errors(th);
    let worst = e.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    assert!(
        worst < 0.05,
        "log p off the analytic density by up to {worst} nats"
    );
}

#[test]
fn the_infonce_optimum_recovers_the_density_up_to_a_constant() {
    let k = 4;
    let th = fit_quadratic(
        &|gx, gy| {
            let b = gx.dims1().unwrap();
            let logits = Tensor::cat(
                &[&gx.unsqueeze(1).unwrap(), &gy.reshape((b, k)).unwrap()],
                1,
            )
            .unwrap();
            infonce_loss(&logits).unwrap()
        },
        k,
    );
    let e = errors(th);
    let mean = e.iter().sum::<f64>() / e.len() as f64;
    let spread = e.iter().fold(0.0f64, |a, b| a.max((b - mean).abs()));
    assert!(
        spread < 0.06,
        "log p - truth varies by {spread} over the grid: {th:?}"
    );
}

#[test]
fn importance_sampled_log_z_matches_a_gaussian_mixtures_normaliser() {
    // f(u) = Σ_k a_k exp(-|u - m_k|² / (2 s²)) in 2-D: Z = Σ_k a_k 2π s²
    let (a, s) = ([1.0f64, 3.0], 0.7f64);
    let m = [[1.0f64, 0.0], [-0.5, 1.0]];
    let log_w = |u: &Tensor| -> elbo::Result<Tensor> {
        let mut terms = Vec::new();
        for (ak, mk) in a.iter().zip(&m) {
            let c = Tensor::new(&[mk[0] as f32, mk[1] as f32], &CPU)?;
            let d2 = u.broadcast_sub(&c)?.sqr()?.sum(1)?; // [R]
            terms.push(((d2 * (-0.5 / (s * s)))? + ak.ln())?.unsqueeze(1)?);
        }
        let lf = Tensor::cat(&terms, 1)?.log_sum_exp(1)?; // [R]
        Ok(((lf + (u.sqr()?.sum(1)? * 0.5)?)? + LOG_2PI)?)
    };
    let z_true = (a.iter().sum::<f64>() * 2.0 * std::f64::consts::PI * s * s).ln();
    for seed in [1, 2, 3] {
        let est = importance_log_z(&log_w, 2, 100_000, 8192, &CPU, &mut Rng::new(seed)).unwrap();
        assert!(est.se > 0.0 && est.se < 0.01, "s.e. {}", est.se);
        assert!(
            (est.log_z - z_true).abs() < 3.0 * est.se,
            "log Z {} ± {} vs analytic {z_true}",
            est.log_z,
            est.se
        );
        assert!(est.ess > 1000.0 && est.ess <= 100_000.0, "ESS {}", est.ess);
    }
}

fn tiny(objective: Objective) -> Nce {
    let cfg = Config {
        objective,
        hidden: 8,
        layers: 2,
        log_z_samples: 1000,
        ..Config::default()
    };
    let mut m = Nce::new(
        &cfg,
        DataInfo::flat(2, DataKind::Continuous),
        &CPU,
        &mut Rng::new(3),
    )
    .unwrap();
    let x = (Rng::new(4).normal_tensor(&[64, 2], &CPU).unwrap() * 2.0).unwrap();
    m.init_from_data(&x, &mut Rng::new(5)).unwrap();
    m
}

#[test]
fn infonce_trains_every_network_parameter_and_refuses_the_learned_normaliser() {
    let m = tiny(Objective::Infonce);
    let x = Rng::new(6).normal_tensor(&[16, 2], &CPU).unwrap();
    let grads = m.loss(&x, &mut Rng::new(7)).unwrap().backward().unwrap();
    for (name, v) in named_vars(m.varmap()).unwrap() {
        let g = grads.get(v.as_tensor());
        if name.contains("log_normaliser") {
            // c cancels from the softmax
            assert!(g.is_none_or(|g| g
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                == 0.0));
            continue;
        }
        let g = g.unwrap_or_else(|| panic!("{name} gets no gradient"));
        let n: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: |grad|² = {n}");
    }
    let opts = EvalOptions {
        likelihood: "learned".into(),
        ..EvalOptions::default()
    };
    let e = m
        .log_likelihood(&x, &opts, &mut Rng::new(8))
        .unwrap_err()
        .to_string();
    assert!(e.contains("--likelihood is"), "{e}");
    let opts = EvalOptions {
        likelihood: "is".into(),
        ..EvalOptions::default()
    };
    let nll = m.log_likelihood(&x, &opts, &mut Rng::new(8)).unwrap();
    assert!(nll.nats.iter().all(|v| v.is_finite()));
}

#[test]
fn the_noise_is_the_datas_gaussian_fit_widened() {
    let m = tiny(Objective::Nce);
    let x = (Rng::new(4).normal_tensor(&[64, 2], &CPU).unwrap() * 2.0).unwrap();
    // whitened training rows have covariance I / noise_scale²
    let u: Vec<Vec<f32>> = m.noise().whiten(&x).unwrap().to_vec2().unwrap();
    let s2 = 1.25f64.powi(2);
    for (i, j) in [(0, 0), (1, 1), (0, 1)] {
        let c = u
            .iter()
            .map(|r| f64::from(r[i]) * f64::from(r[j]))
            .sum::<f64>()
            / 64.0;
        let want = if i == j { 1.0 / s2 } else { 0.0 };
        assert!((c - want).abs() < 1e-3, "cov[{i}{j}] = {c}, want {want}");
    }
}

/// Every tensor of the latest checkpoint, the noise included.
fn checkpoint_tensors(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let l = elbo::train::checkpoint::load(&dir.join("checkpoint"), &CPU).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = l
        .files
        .iter()
        .flat_map(|(f, ts)| {
            ts.iter().map(move |(k, t)| {
                let v = t.to_dtype(DType::F32).unwrap();
                (
                    format!("{f}/{k}"),
                    v.flatten_all().unwrap().to_vec1().unwrap(),
                )
            })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[test]
fn nce_resumes_bit_identically_with_its_fitted_noise() {
    let mut cfg = elbo::config::Config::default();
    for kv in [
        "model.name=nce",
        "model.hidden=16",
        "model.log_z_samples=500",
        "data.name=8gaussians",
        "train.steps=4",
        "train.batch_size=32",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.checkpoint_every=2",
    ] {
        cfg.set(kv).unwrap();
    }
    use elbo::train::Trainer;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = Trainer::create(cfg.clone(), a.path(), &CPU)
        .unwrap()
        .run(false)
        .unwrap();
    let mut tb = Trainer::create(cfg.clone(), b.path(), &CPU).unwrap();
    tb.run_until(2, false).unwrap();
    drop(tb);
    let rest = Trainer::resume_with(b.path(), None, &CPU, None)
        .unwrap()
        .run(false)
        .unwrap();
    assert_eq!(rest.losses, full.losses[2..].to_vec(), "losses");
    let (ta, tb) = (checkpoint_tensors(a.path()), checkpoint_tensors(b.path()));
    let chol = ta
        .iter()
        .find(|(k, _)| k.contains("noise_cholesky"))
        .expect("noise in the checkpoint");
    // fitted to 8gaussians (sd about 2), not the N(0, I) placeholder
    assert!(chol.1[0] > 1.5, "noise factor {:?}", chol.1);
    assert_eq!(ta, tb, "checkpoints differ after resume");
}
