//! The GAN family: the WGAN-GP penalty's gradient against central finite differences on small
//! MLP and convolutional critics (and the fused layers' failure to give it), every parameter of
//! both players receiving a gradient under every objective, weight clipping and the critic's
//! step count, two optimisers (RMSProp, AdamW) resuming bit-identically, RMSProp's update, and
//! the errors of bad settings.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use elbo::config::Config;
use elbo::continuous::adversarial::gradient_penalty;
use elbo::data::{self, DataConfig, DataKind};
use elbo::latent::LatentDecoder;
use elbo::model::{DataInfo, GenerativeModel};
use elbo::models::gan::{Config as GanConfig, Gan, Objective};
use elbo::nn::dcgan::{Critic, Shape};
use elbo::nn::plain::PlainLinear;
use elbo::nn::{Linear, ParamInit};
use elbo::train::checkpoint;
use elbo::train::optim::named_vars;
use elbo::train::Trainer;
use elbo::Rng;

#[path = "../latent/ppca.rs"]
mod ppca;

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The penalty's autograd gradient for every parameter in `vars` against central differences
/// of the penalty itself (step `h`, f32 weights), entry by entry; returns the largest error
/// relative to the largest gradient entry.
fn penalty_fd_error(
    vars: &[(String, Var)],
    penalty: &dyn Fn() -> Tensor,
    h: f64,
    max_entries: usize,
) -> f64 {
    let grads = penalty().backward().unwrap();
    let mut worst: f64 = 0.0;
    let mut scale: f64 = 0.0;
    let (mut checked, mut skipped) = (0usize, 0usize);
    for (name, var) in vars {
        let base = vals(var.as_tensor());
        // a bias reaches the input gradient only through the LeakyReLU masks (piecewise
        // constant): no recorded gradient means zero, which the differences must confirm
        let g = grads
            .get(var.as_tensor())
            .map(vals)
            .unwrap_or_else(|| vec![0.0; base.len()]);
        let step = (base.len() / max_entries).max(1);
        for i in (0..base.len()).step_by(step) {
            let at = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, var.shape(), &CPU).unwrap();
                var.set(&t.to_dtype(DType::F32).unwrap()).unwrap();
                let p = vals(&penalty())[0];
                var.set(
                    &Tensor::from_vec(base.clone(), var.shape(), &CPU)
                        .unwrap()
                        .to_dtype(DType::F32)
                        .unwrap(),
                )
                .unwrap();
                p
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let fd_half = (at(h / 2.0) - at(-h / 2.0)) / h;
            assert!(fd.is_finite(), "{name}[{i}]");
            scale = scale.max(g[i].abs());
            // the penalty jumps where a LeakyReLU unit changes sides (its input gradient is
            // piecewise constant in the masks): a difference quotient across such a jump
            // changes with the step, and is skipped
            if (fd - fd_half).abs() > 1e-2 * (fd.abs() + 1e-2) {
                skipped += 1;
                continue;
            }
            checked += 1;
            worst = worst.max((fd - g[i]).abs());
        }
    }
    assert!(scale > 0.0, "the penalty has no gradient");
    assert!(
        checked >= 4 * skipped.max(1),
        "{checked} entries checked, {skipped} skipped at kinks"
    );
    worst / scale
}

fn rows(seed: u64, n: usize, d: usize) -> Tensor {
    Rng::new(seed).normal_tensor(&[n, d], &CPU).unwrap()
}

#[test]
fn penalty_gradient_matches_finite_differences_on_an_mlp_critic() {
    let vm = candle_nn::VarMap::new();
    let mut rng = Rng::new(1);
    let shape = Shape::Mlp {
        dim: 2,
        hidden: 6,
        depth: 2,
    };
    let critic = Critic::new(&mut ParamInit::new(&vm, &mut rng, &CPU), shape, 0.2).unwrap();
    let (real, fake) = (rows(2, 5, 2), rows(3, 5, 2));
    let eps = Rng::new(4).uniform_tensor(&[5, 1], &CPU).unwrap();
    let pen = || gradient_penalty(|x| critic.forward(x), &real, &fake, &eps).unwrap();
    let err = penalty_fd_error(&named_vars(&vm).unwrap(), &pen, 2e-3, 64);
    assert!(err < 2e-2, "relative error {err}");
}

#[test]
fn penalty_gradient_matches_finite_differences_on_a_conv_critic() {
    let vm = candle_nn::VarMap::new();
    let mut rng = Rng::new(5);
    let shape = Shape::Conv {
        channels: 1,
        height: 4,
        width: 4,
        base: 2,
    };
    let critic = Critic::new(&mut ParamInit::new(&vm, &mut rng, &CPU), shape, 0.2).unwrap();
    let (real, fake) = (rows(6, 3, 16), rows(7, 3, 16));
    let eps = Rng::new(8).uniform_tensor(&[3, 1], &CPU).unwrap();
    let pen = || gradient_penalty(|x| critic.forward(x), &real, &fake, &eps).unwrap();
    let err = penalty_fd_error(&named_vars(&vm).unwrap(), &pen, 2e-3, 12);
    assert!(err < 2e-2, "relative error {err}");
}

/// The same two-layer SiLU critic through the fused `nn::Linear::forward_silu`, whose backward
/// multiplies by the activation's derivative saved as a constant: the penalty's gradient with
/// respect to the first layer's weight misses the second-order path through that derivative,
/// while the plain composition with the same weights matches finite differences. This is why
/// the critic is built from [`elbo::nn::plain`].
#[test]
fn a_fused_layer_gives_the_wrong_penalty_gradient() {
    let vm = candle_nn::VarMap::new();
    let mut rng = Rng::new(9);
    let (first, out) = {
        let mut p = ParamInit::new(&vm, &mut rng, &CPU);
        (
            Linear::new(&mut p.push("first"), 2, 6, true).unwrap(),
            PlainLinear::new(&mut p.push("out"), 6, 1).unwrap(),
        )
    };
    let (real, fake) = (rows(10, 6, 2), rows(11, 6, 2));
    let eps = Rng::new(12).uniform_tensor(&[6, 1], &CPU).unwrap();
    let w = first.weight().clone();
    let b = first.bias().unwrap().clone();
    let plain = |x: &Tensor| -> elbo::Result<Tensor> {
        let h = x.matmul(&w.t()?)?.broadcast_add(&b)?;
        Ok(out.forward(&h.silu()?)?.squeeze(1)?)
    };
    let fused = |x: &Tensor| -> elbo::Result<Tensor> {
        Ok(out.forward(&first.forward_silu(x)?)?.squeeze(1)?)
    };
    // both give the same penalty value
    let p_plain = gradient_penalty(plain, &real, &fake, &eps).unwrap();
    let p_fused = gradient_penalty(fused, &real, &fake, &eps).unwrap();
    let (a, c) = (vals(&p_plain)[0], vals(&p_fused)[0]);
    assert!((a - c).abs() < 1e-5 * a.abs().max(1.0), "{a} vs {c}");
    let vars = named_vars(&vm).unwrap();
    let first_w: Vec<(String, Var)> = vars
        .iter()
        .filter(|(n, _)| n == "first.weight")
        .cloned()
        .collect();
    let pen = || gradient_penalty(plain, &real, &fake, &eps).unwrap();
    let err = penalty_fd_error(&first_w, &pen, 2e-3, 64);
    assert!(err < 2e-2, "plain: relative error {err}");
    // the fused path: the same finite differences, but autograd misses the second-order path
    let fd_scale: f64 = {
        let g = p_plain.backward().unwrap();
        vals(g.get(first_w[0].1.as_tensor()).unwrap())
            .iter()
            .map(|v| v * v)
            .sum::<f64>()
            .sqrt()
    };
    let g = p_fused.backward().unwrap();
    let fused_w = g
        .get(first_w[0].1.as_tensor())
        .map(vals)
        .unwrap_or_else(|| vec![0.0; 12]);
    let g_plain = vals(
        p_plain
            .backward()
            .unwrap()
            .get(first_w[0].1.as_tensor())
            .unwrap(),
    );
    let diff: f64 = fused_w
        .iter()
        .zip(&g_plain)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt();
    assert!(
        diff > 0.1 * fd_scale,
        "the fused layer's penalty gradient matched ({diff} vs {fd_scale}): if nn::Linear became \
         twice differentiable, this test and the plain-layer requirement can go"
    );
}

fn gan_config(objective: &str, dataset: &str) -> Config {
    let mut c = Config::default();
    for kv in [
        "model.name=gan".to_string(),
        format!("model.objective=\"{objective}\""),
        format!("data.name={dataset}"),
        "model.hidden=16".into(),
        "model.depth=2".into(),
        "model.latent=4".into(),
        "model.channels=4".into(),
        "data.test_size=16".into(),
        "data.val_size=16".into(),
        "train.steps=4".into(),
        "train.batch_size=8".into(),
        "train.eval_every=0".into(),
        "train.eval_examples=16".into(),
        "train.checkpoint_every=2".into(),
        "train.ema_decay=0.9".into(),
        "train.select_by=energy-distance".into(),
    ] {
        c.set(&kv).unwrap_or_else(|e| panic!("{kv}: {e}"));
    }
    c
}

fn build(cfg: &Config, dataset: &str) -> (Box<dyn GenerativeModel>, Tensor) {
    let mut src = data::open(dataset, &DataConfig::default()).unwrap();
    let info = DataInfo::of(src.as_ref());
    let model = cfg.model.build(&info, &CPU, &mut Rng::new(0)).unwrap();
    let batch = src.train_batch(8, &mut Rng::new(1), &CPU).unwrap();
    (model, batch)
}

#[test]
fn every_parameter_of_both_players_gets_a_gradient_under_every_objective() {
    for dataset in ["8gaussians", "digits"] {
        for obj in ["minimax", "non-saturating", "wgan", "wgan-gp"] {
            let cfg = gan_config(obj, dataset);
            let (model, batch) = build(&cfg, dataset);
            let loss = model.loss(&batch, &mut Rng::new(2)).unwrap();
            let grads = loss.backward().unwrap();
            let params = named_vars(model.varmap()).unwrap();
            assert!(params.iter().any(|(n, _)| n.starts_with("gen.")));
            assert!(params.iter().any(|(n, _)| n.starts_with("critic.")));
            for (name, var) in &params {
                assert!(
                    name.starts_with("gen.") || name.starts_with("critic."),
                    "{name} is in no player's group"
                );
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{dataset}/{obj}: no gradient for {name}"));
                let n: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert!(n > 0.0 && n.is_finite(), "{dataset}/{obj} {name}: {n}");
            }
        }
    }
}

fn weights(dir: &Path) -> HashMap<String, Vec<f64>> {
    let l = checkpoint::load(&dir.join("checkpoint"), &CPU).unwrap();
    l.files
        .iter()
        .flat_map(|(f, ts)| ts.iter().map(move |(k, t)| (format!("{f}/{k}"), vals(t))))
        .collect()
}

#[test]
fn wgan_and_wgan_gp_resume_bit_identically_with_two_optimisers() {
    for obj in ["wgan", "wgan-gp"] {
        let cfg = gan_config(obj, "8gaussians");
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let full = Trainer::create(cfg.clone(), a.path(), &CPU)
            .unwrap()
            .run(false)
            .unwrap();
        let mut tb = Trainer::create(cfg.clone(), b.path(), &CPU).unwrap();
        tb.run_until(2, false).unwrap();
        drop(tb);
        let rest = Trainer::resume(b.path(), None, &CPU)
            .unwrap()
            .run(false)
            .unwrap();
        assert_eq!(rest.losses, full.losses[2..].to_vec(), "{obj}: losses");
        let (wa, wb) = (weights(a.path()), weights(b.path()));
        assert_eq!(wa, wb, "{obj}: weights and optimiser state");
        // one optimiser file per player; WGAN's are RMSProp's squared averages
        assert!(wa.keys().any(|k| k.starts_with("optim-critic/")), "{obj}");
        assert!(wa.keys().any(|k| k.starts_with("optim-gen/")), "{obj}");
        let rms = wa.keys().any(|k| k.starts_with("optim-critic/s."));
        assert_eq!(rms, obj == "wgan", "{obj}: RMSProp state");
        // five critic steps per generator step
        let l = checkpoint::load(&a.path().join("checkpoint"), &CPU).unwrap();
        assert_eq!(l.state["groups"]["critic"]["optim_steps"], 20, "{obj}");
        assert_eq!(l.state["groups"]["gen"]["optim_steps"], 4, "{obj}");
        if obj == "wgan" {
            // weight clipping: every critic weight within [-0.01, 0.01]
            for (k, v) in wa.iter().filter(|(k, _)| k.starts_with("model/critic.")) {
                assert!(v.iter().all(|x| x.abs() <= 0.01 + 1e-9), "{k}");
            }
        }
    }
}

/// One RMSProp step by hand: `s = (1 - alpha) g^2`, `p -= lr g / (sqrt(s) + eps)`, and a second
/// step from the saved state.
#[test]
fn rmsprop_matches_its_update_by_hand() {
    use elbo::train::rmsprop::{RmsProp, RmsPropConfig};
    let p = Var::new(&[1.0f32, -2.0], &CPU).unwrap();
    let params = vec![("p".to_string(), p.clone())];
    let mut opt = RmsProp::new(RmsPropConfig {
        alpha: 0.9,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    let loss = |p: &Var| {
        (p.as_tensor().sqr().unwrap() * 0.5)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    // g = p
    opt.step(&params, &loss(&p).backward().unwrap(), 0.1)
        .unwrap();
    let want: Vec<f64> = [1.0f64, -2.0]
        .iter()
        .map(|g| g - 0.1 * g / ((0.1 * g * g).sqrt() + 1e-8))
        .collect();
    let got = vals(p.as_tensor());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
    }
    let state = opt.state_tensors();
    let mut again = RmsProp::new(RmsPropConfig {
        alpha: 0.9,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    again.load_state(&state, 1, &params).unwrap();
    let snapshot = p.as_tensor().copy().unwrap();
    opt.step(&params, &loss(&p).backward().unwrap(), 0.1)
        .unwrap();
    let first = vals(p.as_tensor());
    p.set(&snapshot).unwrap();
    again
        .step(&params, &loss(&p).backward().unwrap(), 0.1)
        .unwrap();
    assert_eq!(first, vals(p.as_tensor()));
    let e = again
        .load_state(&HashMap::from([("m.p".to_string(), snapshot)]), 1, &params)
        .unwrap_err();
    assert!(e.to_string().contains("m.p"), "{e}");
}

#[test]
fn samples_have_the_data_shape_and_the_decoder_density_is_a_gaussian() {
    let cfg = gan_config("wgan-gp", "digits");
    let src = data::open("digits", &DataConfig::default()).unwrap();
    let info = DataInfo::of(src.as_ref());
    let elbo::config::ModelConfig::Gan(gc) = &cfg.model else {
        panic!()
    };
    let gan = Gan::new(gc, info, &CPU, &mut Rng::new(0)).unwrap();
    let x = gan.sample(5, &cfg.sample, &mut Rng::new(1)).unwrap();
    assert_eq!(x.dims(), [5, 64]);
    let v = vals(&x);
    assert!(v
        .iter()
        .all(|x| (0.0..=16.0).contains(x) && x.fract() == 0.0));
    // log p(x | z) at x = the level nearest g(z): the Gaussian density in model space plus
    // the Jacobian 64 log(2/16) of the map to levels
    let z = Rng::new(2).normal_tensor(&[3, 4], &CPU).unwrap();
    let mean = vals(&gan.generate(&z).unwrap());
    let xs = gan.sample(3, &cfg.sample, &mut Rng::new(3)).unwrap();
    let lp = vals(&gan.log_likelihood_given(&z, &xs).unwrap());
    let s = gc.obs_sigma;
    for (i, lp) in lp.iter().enumerate() {
        let xv = &vals(&xs)[i * 64..(i + 1) * 64];
        let want: f64 = (0..64)
            .map(|j| {
                let r = xv[j] / 8.0 - 1.0 - mean[i * 64 + j];
                -0.5 * r * r / (s * s) - s.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
            })
            .sum::<f64>()
            + 64.0 * (2.0f64 / 16.0).ln();
        assert!((lp - want).abs() < 1e-3 * want.abs(), "{lp} vs {want}");
    }
    assert_eq!(gan.latent_dim(), 4);
    assert!(gan.observation_label().contains("0.1"));
}

#[test]
fn bad_settings_are_refused_with_the_fix() {
    let err = |toml: &str| {
        Config::from_toml_str(toml, "c.toml")
            .and_then(|c| {
                let src = data::open(&c.data.name, &DataConfig::default())?;
                c.model
                    .build(&DataInfo::of(src.as_ref()), &CPU, &mut Rng::new(0))
                    .map(|_| ())
            })
            .unwrap_err()
            .to_string()
    };
    let e = err("[model]\nname = \"gan\"\nobjective = \"wgan-pg\"\n");
    assert!(e.contains("wgan-gp") && e.contains("non-saturating"), "{e}");
    let e = err("[model]\nname = \"gan\"\narch = \"dcgan\"\n[data]\nname = \"8gaussians\"\n");
    assert!(e.contains("image") && e.contains("mlp"), "{e}");
    let e = err("[model]\nname = \"gan\"\nslope = 1.5\n");
    assert!(e.contains("slope"), "{e}");
    let e = err("[model]\nname = \"gan\"\ngp_lambda = -1\n");
    assert!(e.contains("gp_lambda"), "{e}");
    let e = err("[model]\nname = \"gan\"\nobs_sigma = 0\n");
    assert!(e.contains("obs_sigma"), "{e}");
    // the DCGAN layout needs sides divisible by 4
    let c = GanConfig {
        arch: elbo::models::gan::Arch::Dcgan,
        ..GanConfig::default()
    };
    let info = DataInfo {
        dim: 36,
        kind: DataKind::Discrete { levels: 2 },
        layout: elbo::data::Layout::Image {
            channels: 1,
            height: 6,
            width: 6,
        },
    };
    let e = Gan::new(&c, info, &CPU, &mut Rng::new(0))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("divisible by 4") && e.contains("mlp"), "{e}");
    assert_eq!(c.critic_steps(), 1);
    let w = GanConfig {
        objective: Objective::WganGp,
        ..GanConfig::default()
    };
    assert_eq!(w.critic_steps(), 5);
    // a GAN has no likelihood: a named one is refused, selecting by NLL is refused
    let cfg = gan_config("non-saturating", "8gaussians");
    let (model, batch) = build(&cfg, "8gaussians");
    let opts = elbo::config::EvalOptions {
        likelihood: "iwae".into(),
        ..cfg.eval.clone()
    };
    let e = model
        .log_likelihood(&batch, &opts, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("iwae") && e.contains("sample metrics") && e.contains("ais"),
        "{e}"
    );
    // `ais` is accepted only when named: `auto` stays none, the validator lists it
    let named = |l: &str| elbo::config::EvalOptions {
        likelihood: l.into(),
        ..cfg.eval.clone()
    };
    assert!(named("ais").validate_likelihood("gan").is_ok());
    let e = named("iwae")
        .validate_likelihood("gan")
        .unwrap_err()
        .to_string();
    assert!(e.contains("auto or ais"), "{e}");
    let auto = model
        .log_likelihood(&batch, &named("auto"), &mut Rng::new(0))
        .unwrap();
    assert_eq!(auto.kind, elbo::NllKind::None);
    assert!(model.likelihoods().is_empty() && model.opt_in_likelihoods() == ["ais"]);
    let mut c = gan_config("non-saturating", "8gaussians");
    c.set("train.select_by=nll").unwrap();
    c.set("train.eval_every=2").unwrap();
    let d = tempfile::tempdir().unwrap();
    let e = Trainer::create(c, d.path(), &CPU)
        .unwrap()
        .run(false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("select_by"), "{e}");
}

/// A GAN whose generator is linear, `g(z) = W z + b` (depth 0), with `obs_sigma` = sigma: the
/// probabilistic-PCA model of [`ppca`], whose marginal is known in closed form.
fn linear_gan() -> Gan {
    let cfg = GanConfig {
        objective: Objective::WganGp,
        latent: 2,
        depth: 0,
        hidden: 4,
        obs_sigma: ppca::SIGMA,
        ..GanConfig::default()
    };
    let info = DataInfo::flat(ppca::D, DataKind::Continuous);
    let gan = Gan::new(&cfg, info, &CPU, &mut Rng::new(0)).unwrap();
    let w: Vec<f32> = ppca::W.iter().flatten().map(|v| *v as f32).collect();
    let b: Vec<f32> = ppca::B.iter().map(|v| *v as f32).collect();
    for (name, v) in named_vars(gan.varmap()).unwrap() {
        match name.as_str() {
            "gen.out.weight" => v.set(&Tensor::from_vec(w.clone(), (ppca::D, 2), &CPU).unwrap()),
            "gen.out.bias" => v.set(&Tensor::from_vec(b.clone(), ppca::D, &CPU).unwrap()),
            _ => Ok(()),
        }
        .unwrap();
    }
    gan
}

#[test]
fn ais_through_a_linear_generator_matches_the_ppca_marginal() {
    let gan = linear_gan();
    // x = g(z) + sigma e, drawn here (the GAN's sampler returns g(z) without the noise)
    let n = 40;
    let mut rng = Rng::new(5);
    let z = rng.normal_tensor(&[n, 2], &CPU).unwrap();
    let e = (rng.normal_tensor(&[n, ppca::D], &CPU).unwrap() * ppca::SIGMA).unwrap();
    let x = (gan.generate(&z).unwrap() + e).unwrap(); // [n, D]
    let rows: Vec<Vec<f64>> = x
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect();
    let exact = ppca::exact_nll(&rows);
    let (err, se) = ppca::ais_error(&gan, &x, &exact, 200, 3);
    assert!(se > 0.0 && se < 0.05, "standard error {se}");
    assert!(err.abs() < 3.0 * se, "AIS - exact = {err} ± {se}");
    // through `elbo eval --likelihood ais`'s path: an estimate with its chains, and the method
    // names the observation model and its sigma
    let opts = elbo::config::EvalOptions {
        likelihood: "ais".into(),
        ais_chains: 8,
        ais_steps: 100,
        ais_leapfrog: 5,
        ..elbo::config::EvalOptions::default()
    };
    let nll = gan.log_likelihood(&x, &opts, &mut Rng::new(4)).unwrap();
    assert_eq!(nll.kind, elbo::NllKind::Estimate { samples: 8 });
    let gap = ppca::mean(&nll.nats) - ppca::mean(&exact);
    assert!(gap.abs() < 0.1, "AIS NLL - exact = {gap}");
    let method = gan.likelihood_method(&opts);
    assert!(
        method.contains("sigma = 0.5") && method.contains("not of the GAN"),
        "{method}"
    );
}

#[test]
fn a_packed_critic_scores_pack_examples_jointly() {
    let mut cfg = gan_config("wgan-gp", "8gaussians");
    cfg.set("model.pack=2").unwrap();
    let (model, batch) = build(&cfg, "8gaussians");
    let shapes: HashMap<String, Vec<usize>> = named_vars(model.varmap())
        .unwrap()
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    // the critic's first layer reads two 2-D examples side by side
    assert_eq!(shapes["critic.h0.weight"], [16, 4]);
    assert_eq!(shapes["gen.out.weight"], [2, 16]);
    let elbo::config::ModelConfig::Gan(gc) = &cfg.model else {
        panic!()
    };
    let src = data::open("8gaussians", &DataConfig::default()).unwrap();
    let gan = Gan::new(gc, DataInfo::of(src.as_ref()), &CPU, &mut Rng::new(0)).unwrap();
    let x = rows(3, 4, 2); // [4, 2]
    let s = vals(&gan.critic_score(&x).unwrap());
    assert_eq!(s.len(), 2);
    // swapping the two members of a pack changes its score; swapping whole packs permutes them
    let swapped = Tensor::cat(
        &[
            x.narrow(0, 1, 1).unwrap(),
            x.narrow(0, 0, 1).unwrap(),
            x.narrow(0, 2, 2).unwrap(),
        ],
        0,
    )
    .unwrap();
    let t = vals(&gan.critic_score(&swapped).unwrap());
    assert!((t[0] - s[0]).abs() > 1e-6 && (t[1] - s[1]).abs() < 1e-6);
    let e = gan.critic_score(&rows(4, 3, 2)).unwrap_err().to_string();
    assert!(
        e.contains("batch_size") && e.contains("multiple of 2"),
        "{e}"
    );
    // every parameter of both players still gets a gradient
    let loss = model.loss(&batch, &mut Rng::new(2)).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in named_vars(model.varmap()).unwrap() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(vals(g).iter().any(|x| *x != 0.0), "{name}: zero gradient");
    }
    // the DCGAN critic takes one image: packing it is refused with the fix
    let e = GanConfig {
        pack: 2,
        arch: elbo::models::gan::Arch::Dcgan,
        ..GanConfig::default()
    }
    .packed(Shape::Conv {
        channels: 1,
        height: 8,
        width: 8,
        base: 4,
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("pack = 1") && e.contains("mlp"), "{e}");
}
