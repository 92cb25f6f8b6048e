//! VQGAN's additions to the VQ-VAE against their definitions (Esser et al. 2021, eq. 7): the
//! adaptive weight is the ratio of the two losses' gradient norms at the decoder's last layer,
//! each norm checked by a central finite difference along its gradient's direction, clamped
//! and detached; the adversarial term and the discriminator's training start at `disc_start`;
//! the discriminator's settings are checked when the config loads.

use candle_core::{Device, Tensor, Var};
use elbo::config::Config;
use elbo::data::{self, DataConfig, DataSource};
use elbo::latent::vqgan::{adaptive_weight, Adversarial, MAX_WEIGHT};
use elbo::model::{DataInfo, GenerativeModel};
use elbo::models::vq_vae::{Config as VqConfig, VqVae};
use elbo::train::optim::named_vars;
use elbo::train::Trainer;
use elbo::Rng;

const CPU: Device = Device::Cpu;

fn digits() -> Box<dyn DataSource> {
    data::open("digits", &DataConfig::default()).unwrap()
}

fn tiny() -> (VqVae, Tensor) {
    let mut src = digits();
    let info = DataInfo::of(src.as_ref());
    let cfg = VqConfig {
        channels: 8,
        codebook_size: 8,
        code_dim: 4,
        downsample: 1,
        adversarial: Some(Adversarial {
            channels: 4,
            layers: 1,
            ..Adversarial::default()
        }),
        ..VqConfig::default()
    };
    let model = VqVae::new(&cfg, info, &CPU, &mut Rng::new(0)).unwrap();
    let batch = src.train_batch(6, &mut Rng::new(1), &CPU).unwrap();
    (model, batch)
}

/// The decoder's last convolution's weight (the highest-numbered `decoder.conv*`).
fn last_layer(model: &VqVae) -> Var {
    named_vars(model.varmap())
        .unwrap()
        .into_iter()
        .filter(|(n, _)| n.starts_with("decoder.conv") && n.ends_with(".weight"))
        .max_by_key(|(n, _)| {
            n["decoder.conv".len()..n.len() - ".weight".len()]
                .parse::<usize>()
                .unwrap()
        })
        .unwrap()
        .1
}

fn scalar(t: &Tensor) -> f64 {
    f64::from(t.to_scalar::<f32>().unwrap())
}

/// The reconstruction term and the adversarial loss (its `term / (weight λ)`) at the current
/// weights.
fn losses(model: &VqVae, batch: &Tensor) -> (Tensor, Tensor, Tensor) {
    let f = model.forward(batch).unwrap();
    let rec = (model
        .log_likelihood_given(&f.out, batch)
        .unwrap()
        .mean_all()
        .unwrap()
        * (-1.0 / 64.0))
        .unwrap();
    let (term, lambda, gan, _) = model.adversarial_term(&f, &rec).unwrap().unwrap();
    let _ = term;
    (rec, gan, lambda)
}

/// `|grad|` by a central difference of `loss` along `grad / |grad|`.
fn norm_by_difference(
    model: &VqVae,
    batch: &Tensor,
    last: &Var,
    grad: &Tensor,
    pick: fn(&(Tensor, Tensor, Tensor)) -> &Tensor,
) -> f64 {
    let w0 = last.as_tensor().copy().unwrap();
    let n = scalar(&grad.sqr().unwrap().sum_all().unwrap().sqrt().unwrap());
    let dir = (grad / n).unwrap();
    let h = 1e-2;
    let at = |s: f64| {
        last.set(&(&w0 + (&dir * s).unwrap()).unwrap()).unwrap();
        scalar(pick(&losses(model, batch)))
    };
    let d = (at(h) - at(-h)) / (2.0 * h);
    last.set(&w0).unwrap();
    d
}

#[test]
fn the_adaptive_weight_is_the_ratio_of_the_gradient_norms_at_the_last_layer() {
    let (model, batch) = tiny();
    let last = last_layer(&model);
    let (rec, gan, lambda) = losses(&model, &batch);
    let g_rec = rec
        .backward()
        .unwrap()
        .get(last.as_tensor())
        .unwrap()
        .clone();
    let g_gan = gan
        .backward()
        .unwrap()
        .get(last.as_tensor())
        .unwrap()
        .clone();
    let r = norm_by_difference(&model, &batch, &last, &g_rec, |l| &l.0);
    let g = norm_by_difference(&model, &batch, &last, &g_gan, |l| &l.1);
    assert!(r > 0.0 && g > 0.0, "{r} {g}");
    let want = r / (g + 1e-4);
    let got = scalar(&lambda);
    assert!(
        (got - want).abs() <= 0.02 * want,
        "lambda {got} vs ||grad rec|| / (||grad gan|| + 1e-4) = {r} / {g} = {want}"
    );
    // detached: the term's gradient at the last layer is weight * lambda * grad L_GAN
    let f = model.forward(&batch).unwrap();
    let (term, lam, _, _) = model.adversarial_term(&f, &rec).unwrap().unwrap();
    let g_term = term
        .backward()
        .unwrap()
        .get(last.as_tensor())
        .unwrap()
        .clone();
    let k = 0.8 * scalar(&lam);
    let a: Vec<f32> = g_term.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = g_gan.flatten_all().unwrap().to_vec1().unwrap();
    for (x, y) in a.iter().zip(&b) {
        let y = k * f64::from(*y);
        assert!(
            (f64::from(*x) - y).abs() <= 1e-4 * (1.0 + y.abs()),
            "{x} vs {y}"
        );
    }
    // clamped to 1e4 when the adversarial gradient vanishes
    let big = (&rec * 1e6).unwrap();
    let tiny = (&gan * 1e-30).unwrap(); // a vanishing adversarial gradient
    let w = adaptive_weight(&big, &tiny, last.as_tensor()).unwrap();
    assert_eq!(scalar(&w), MAX_WEIGHT);
}

fn vqgan_config(disc_start: usize) -> Config {
    let mut c = Config::default();
    for kv in [
        "model.name=\"vq-vae\"".to_string(),
        "model.channels=8".into(),
        "model.codebook_size=16".into(),
        "model.code_dim=4".into(),
        "model.downsample=1".into(),
        format!("model.adversarial.disc_start={disc_start}"),
        "model.adversarial.channels=8".into(),
        "data.name=digits".into(),
        "train.steps=4".into(),
        "train.batch_size=16".into(),
        "train.warmup_steps=1".into(),
        "train.eval_every=0".into(),
        "train.log_every=1".into(),
    ] {
        c.set(&kv).unwrap_or_else(|e| panic!("{kv}: {e}"));
    }
    c
}

#[test]
fn the_adversarial_term_and_the_discriminator_start_at_disc_start() {
    let d = tempfile::tempdir().unwrap();
    let mut t = Trainer::create(vqgan_config(2), d.path(), &CPU).unwrap();
    let disc = |t: &Trainer| -> Vec<f32> {
        named_vars(t.model().varmap())
            .unwrap()
            .into_iter()
            .filter(|(n, _)| n.starts_with("disc."))
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    };
    let d0 = disc(&t);
    assert!(!d0.is_empty());
    t.run_until(2, false).unwrap();
    assert_eq!(disc(&t), d0, "the discriminator moved before disc_start");
    t.run(false).unwrap();
    assert_ne!(
        disc(&t),
        d0,
        "the discriminator did not train after disc_start"
    );
    let log = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("perplexity").is_some())
        .collect();
    assert_eq!(rows.len(), 4, "{log}");
    for r in &rows {
        let step = r["step"].as_u64().unwrap();
        let w = r.get("adaptive_weight").and_then(|v| v.as_f64());
        if step <= 2 {
            assert!(w.is_none(), "{r}");
        } else {
            let w = w.unwrap_or_else(|| panic!("no adaptive weight: {r}"));
            assert!((0.0..=MAX_WEIGHT).contains(&w) && w > 0.0, "{r}");
            assert!(r["disc_loss"].as_f64().unwrap().is_finite(), "{r}");
        }
    }
}

#[test]
fn the_discriminators_settings_are_checked_when_the_config_loads() {
    let mut c = vqgan_config(0);
    let e = c
        .set("model.adversarial.beta1=1.5")
        .unwrap_err()
        .to_string();
    assert!(e.contains("model.adversarial.beta1"), "{e}");
    let e = c.set("model.adversarial.kind=1").unwrap_err().to_string();
    assert!(e.contains("kind"), "{e}");
    let e = c
        .set("model.adversarial.loss=\"wgan\"")
        .unwrap_err()
        .to_string();
    assert!(e.contains("hinge"), "{e}");
    // 8x8 digits cannot be halved 4 times
    c.set("model.adversarial.layers=4").unwrap();
    let info = DataInfo::of(digits().as_ref());
    let e = c
        .model
        .build(&info, &CPU, &mut Rng::new(0))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("model.adversarial.layers"), "{e}");
}
