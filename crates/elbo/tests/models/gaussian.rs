//! The `gaussian` baseline family: the closed-form maximum-likelihood fit of samples from a
//! known correlated Gaussian scores held-out data like the true density does, the gradient fit
//! reaches the same NLL, and its samples have the fitted moments.

use candle_core::Device;
use elbo::config::{Config, SampleOptions};
use elbo::data::npy::write_npy;
use elbo::train::{CheckpointChoice, LoadedRun, Trainer};
use elbo::Rng;

const CPU: Device = Device::Cpu;
/// x = MU + L z with this lower-triangular L (row-major 3x3).
const MU: [f64; 3] = [1.0, -2.0, 0.5];
const L: [f64; 9] = [1.0, 0.0, 0.0, 0.8, 0.6, 0.0, -0.5, 0.3, 0.4];

fn draw(n: usize, rng: &mut Rng) -> Vec<f32> {
    let mut v = Vec::with_capacity(3 * n);
    for _ in 0..n {
        let z = [rng.normal(), rng.normal(), rng.normal()];
        for i in 0..3 {
            let x = MU[i] + (0..3).map(|k| L[i * 3 + k] * z[k]).sum::<f64>();
            v.push(x as f32);
        }
    }
    v
}

/// -log N(x; MU, L Lᵀ) by forward substitution.
fn true_nll(x: &[f32]) -> f64 {
    let mut y = [0.0; 3];
    for i in 0..3 {
        let s: f64 = (0..i).map(|k| L[i * 3 + k] * y[k]).sum();
        y[i] = (f64::from(x[i]) - MU[i] - s) / L[i * 3 + i];
    }
    let logdet: f64 = (0..3).map(|i| L[i * 3 + i].ln()).sum();
    0.5 * y.iter().map(|v| v * v).sum::<f64>() + logdet + 1.5 * (2.0 * std::f64::consts::PI).ln()
}

fn train(dir: &std::path::Path, data: &str, extra: &[&str]) -> LoadedRun {
    let mut c = Config::default();
    for kv in [
        "model.name=gaussian".to_string(),
        format!("data.name=\"{data}\""),
        "train.steps=40".into(),
        "train.batch_size=1000".into(),
        "train.eval_every=0".into(),
    ]
    .iter()
    .map(String::as_str)
    .chain(extra.iter().copied())
    {
        c.set(kv).unwrap();
    }
    Trainer::create(c, dir, &CPU).unwrap().run(false).unwrap();
    LoadedRun::open(dir, CheckpointChoice::Latest, true, &CPU).unwrap()
}

#[test]
fn closed_form_fit_scores_like_the_true_density() {
    let d = tempfile::tempdir().unwrap();
    let file = d.path().join("g.npy");
    let rows = 20_000;
    write_npy(&file, &draw(rows, &mut Rng::new(1)), &[rows, 3]).unwrap();
    let run = train(&d.path().join("run"), file.to_str().unwrap(), &[]);
    let test = run.data.test_set(&CPU).unwrap();
    let x: Vec<Vec<f32>> = test.to_vec2().unwrap();
    let nll = elbo::model::dataset_nll(
        run.model.as_ref(),
        &test,
        &run.config.eval,
        &mut Rng::new(2),
    )
    .unwrap();
    assert_eq!(nll.kind, elbo::NllKind::Exact);
    let model: f64 = nll.nats.iter().sum::<f64>() / x.len() as f64;
    let truth: f64 = x.iter().map(|r| true_nll(r)).sum::<f64>() / x.len() as f64;
    // 40 batches of 1000 give the MLE of ~40k draws: its excess held-out NLL is ~D(D+3)/(4N)
    assert!((model - truth).abs() < 0.01, "model {model}, truth {truth}");

    // samples have the fitted (here: nearly the true) moments
    let s = run
        .model
        .sample(40_000, &SampleOptions::default(), &mut Rng::new(3))
        .unwrap();
    let s: Vec<Vec<f32>> = s.to_vec2().unwrap();
    let n = s.len() as f64;
    for i in 0..3 {
        let m: f64 = s.iter().map(|r| f64::from(r[i])).sum::<f64>() / n;
        assert!((m - MU[i]).abs() < 0.03, "mean {i}: {m}");
    }
    let cov01: f64 = s
        .iter()
        .map(|r| (f64::from(r[0]) - MU[0]) * (f64::from(r[1]) - MU[1]))
        .sum::<f64>()
        / n;
    assert!((cov01 - 0.8).abs() < 0.03, "cov01 {cov01}"); // (L Lᵀ)_01 = 0.8
}

#[test]
fn gradient_fit_reaches_the_closed_form_nll() {
    let d = tempfile::tempdir().unwrap();
    let closed = train(&d.path().join("a"), "8gaussians", &["data.test_size=2000"]);
    let grad = train(
        &d.path().join("b"),
        "8gaussians",
        &[
            "data.test_size=2000",
            "model.fit=gradient",
            "train.steps=400",
            "train.batch_size=512",
            "train.lr=0.02",
        ],
    );
    let score = |r: &LoadedRun| {
        let t = r.data.test_set(&CPU).unwrap();
        let n = elbo::model::dataset_nll(r.model.as_ref(), &t, &r.config.eval, &mut Rng::new(4))
            .unwrap();
        n.summary().nats
    };
    let (a, b) = (score(&closed), score(&grad));
    // one Gaussian over the eight modes (the data's own entropy is 2.83 nats)
    assert!((a - b).abs() < 0.02, "closed form {a}, gradient {b}");
    assert!(a > 4.0 && a < 4.5, "{a}");
}
