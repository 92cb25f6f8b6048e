//! The energy-based model: MALA samples of a known energy match its moments, the denoising
//! score-matching loss (which differentiates the score, a second derivative) has the gradient
//! central finite differences give, every parameter receives a gradient, and a PCD run resumes
//! bit-identically with its replay buffer.

use candle_core::{Device, Tensor};
use elbo::continuous::langevin::{langevin, Energy};
use elbo::data::DataKind;
use elbo::model::{DataInfo, GenerativeModel};
use elbo::models::ebm::{Config, Ebm};
use elbo::train::optim::named_vars;
use elbo::Rng;

const CPU: Device = Device::Cpu;

/// `E(x) = (x - m)ᵀ diag(1/v) (x - m) / 2`: a Gaussian with mean m and variances v.
struct Quadratic;

impl Energy for Quadratic {
    fn energy(&self, x: &Tensor) -> elbo::Result<Tensor> {
        let m = Tensor::new(&[1.0f32, -2.0], &CPU)?;
        let iv = Tensor::new(&[1.0f32 / 0.25, 1.0 / 4.0], &CPU)?;
        Ok((x.broadcast_sub(&m)?.sqr()?.broadcast_mul(&iv)?.sum(1)? * 0.5)?)
    }
}

#[test]
fn mala_samples_of_a_gaussian_energy_match_its_moments() {
    let x0 = Tensor::zeros((4000, 2), candle_core::DType::F32, &CPU).unwrap();
    let (x, acc) = langevin(&Quadratic, &x0, 0.4, 300, true, &mut Rng::new(1)).unwrap();
    assert!(acc > 0.5 && acc < 1.0, "MALA acceptance {acc}");
    let rows: Vec<Vec<f32>> = x.to_vec2().unwrap();
    let n = rows.len() as f64;
    for (j, (m, v)) in [(1.0, 0.25), (-2.0, 4.0)].iter().enumerate() {
        let mean = rows.iter().map(|r| f64::from(r[j])).sum::<f64>() / n;
        let var = rows
            .iter()
            .map(|r| (f64::from(r[j]) - mean).powi(2))
            .sum::<f64>()
            / n;
        let se_m = (v / n).sqrt();
        assert!((mean - m).abs() < 4.0 * se_m, "mean {mean} vs {m}");
        assert!(
            (var - v).abs() < 4.0 * v * (2.0 / n).sqrt(),
            "variance {var} vs {v}"
        );
    }
}

fn tiny_ebm() -> Ebm {
    let cfg = Config {
        hidden: 8,
        layers: 2,
        sigmas: vec![0.3],
        ..Config::default()
    };
    Ebm::new(
        &cfg,
        DataInfo::flat(2, DataKind::Continuous),
        &CPU,
        &mut Rng::new(3),
    )
    .unwrap()
}

#[test]
fn the_dsm_loss_gradient_matches_finite_differences() {
    let ebm = tiny_ebm();
    let x = Rng::new(4).normal_tensor(&[16, 2], &CPU).unwrap();
    let loss = |e: &Ebm| -> f64 {
        f64::from(
            e.dsm_loss(&x, &mut Rng::new(9))
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        )
    };
    let l = ebm.dsm_loss(&x, &mut Rng::new(9)).unwrap();
    let grads = l.backward().unwrap();
    let mut nonzero = 0;
    for (name, v) in named_vars(ebm.varmap()).unwrap() {
        let g = grads
            .get(v.as_tensor())
            .expect("a gradient for every parameter");
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().any(|x| *x != 0.0), "{name} gets no gradient");
        let orig: Vec<f32> = v.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        for i in (0..orig.len()).step_by(3) {
            let h = 1e-2f32;
            let set = |d: f32| {
                let mut w = orig.clone();
                w[i] += d;
                v.set(&Tensor::from_vec(w, v.as_tensor().shape(), &CPU).unwrap())
                    .unwrap();
            };
            set(h);
            let up = loss(&ebm);
            set(-h);
            let down = loss(&ebm);
            set(0.0);
            let fd = (up - down) / (2.0 * f64::from(h));
            let an = f64::from(g[i]);
            assert!(
                (fd - an).abs() < 2e-3 + 0.03 * an.abs(),
                "{name}[{i}]: autograd {an} vs finite differences {fd}"
            );
            nonzero += 1;
        }
    }
    assert!(nonzero > 10);
}

/// Every tensor of the latest checkpoint, the replay buffer included.
fn checkpoint_tensors(dir: &std::path::Path) -> Vec<(String, Vec<f32>)> {
    let l = elbo::train::checkpoint::load(&dir.join("checkpoint"), &CPU).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = l
        .files
        .iter()
        .flat_map(|(f, ts)| {
            ts.iter().map(move |(k, t)| {
                let v = t.to_dtype(candle_core::DType::F32).unwrap();
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
fn pcd_resumes_bit_identically_with_its_replay_buffer() {
    let mut cfg = elbo::config::Config::default();
    for kv in [
        "model.name=ebm",
        "model.objective=\"pcd\"",
        "model.hidden=16",
        "model.buffer_size=64",
        "model.train_langevin_steps=3",
        "data.name=8gaussians",
        "train.steps=4",
        "train.batch_size=16",
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
    assert!(
        ta.iter().any(|(k, _)| k.contains("replay_buffer")),
        "no buffer in {:?}",
        ta.iter().map(|t| &t.0).collect::<Vec<_>>()
    );
    assert_eq!(ta, tb, "checkpoints differ after resume");
}
