//! The Gaussian-diffusion families end to end: every parameter of every family and
//! parameterization gets a gradient, every family samples under every sampler, and short seeded
//! trainings reach stated held-out numbers (DDPM's VLB on digits in bits/dim, the PF-ODE NLL of
//! the score SDE and EDM on 8gaussians in nats).

use candle_core::Device;
use elbo::config::{Config, EvalOptions, SampleOptions};
use elbo::data::DataKind;
use elbo::model::{dataset_nll, DataInfo};
use elbo::train::optim::named_vars;
use elbo::train::Trainer;
use elbo::{NllKind, Rng};

fn set(c: &mut Config, kv: &str) {
    c.set(kv).unwrap_or_else(|e| panic!("{kv}: {e}"));
}

fn cfg(name: &str, tweak: impl Fn(&mut Config)) -> Config {
    let mut c = Config::default();
    set(&mut c, &format!("model.name={name}"));
    set(&mut c, "model.net.hidden=32");
    set(&mut c, "model.net.layers=2");
    if name == "ddpm" {
        set(&mut c, "model.timesteps=50");
    }
    tweak(&mut c);
    c
}

fn variants() -> Vec<(&'static str, Config, DataInfo)> {
    let cont = DataInfo::flat(2, DataKind::Continuous);
    let disc = DataInfo::flat(4, DataKind::Discrete { levels: 5 });
    let mut v = Vec::new();
    for p in ["eps", "x0", "v"] {
        for obj in ["simple", "hybrid"] {
            v.push((
                "ddpm",
                cfg("ddpm", |c| {
                    set(c, &format!("model.parameterization={p}"));
                    set(c, &format!("model.objective={obj}"));
                }),
                cont,
            ));
        }
    }
    for obj in ["simple", "vlb"] {
        v.push((
            "ddpm levels",
            cfg("ddpm", |c| set(c, &format!("model.objective={obj}"))),
            disc,
        ));
    }
    for sde in ["vp", "subvp", "ve"] {
        v.push((
            "sde",
            cfg("sde", |c| set(c, &format!("model.sde={sde}"))),
            cont,
        ));
    }
    v.push(("sde discrete", cfg("sde", |_| {}), disc));
    v.push(("edm", cfg("edm", |_| {}), cont));
    v.push(("edm discrete", cfg("edm", |_| {}), disc));
    v.push((
        "ddim",
        cfg("ddpm", |c| set(c, "model.sampling.sampler=ddim")),
        disc,
    ));
    v
}

#[test]
fn every_parameter_of_every_family_gets_a_gradient() {
    let dev = Device::Cpu;
    for (label, c, info) in variants() {
        let model = c.model.build(&info, &dev, &mut Rng::new(0)).unwrap();
        let mut rng = Rng::new(1);
        let batch = match info.kind {
            DataKind::Continuous => rng.normal_tensor(&[64, info.dim], &dev).unwrap(),
            DataKind::Discrete { levels } => (rng.uniform_tensor(&[64, info.dim], &dev).unwrap()
                * levels as f64)
                .unwrap()
                .floor()
                .unwrap(),
        };
        let loss = model.loss(&batch, &mut rng).unwrap();
        let grads = loss.backward().unwrap();
        let params = named_vars(model.varmap()).unwrap();
        assert!(!params.is_empty());
        for (name, var) in &params {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{label}: no gradient for {name}"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{label} {name}: |grad|^2 = {norm}"
            );
        }
    }
}

#[test]
fn every_family_samples_under_every_sampler_and_scores() {
    let dev = Device::Cpu;
    let samplers = [
        "auto", "ddpm", "ddim", "euler", "heun", "dpm++2m", "em", "pc", "ode",
    ];
    for (label, c, info) in variants() {
        for s in samplers {
            let mut cs = c.clone();
            set(&mut cs, &format!("model.sampling.sampler=\"{s}\""));
            set(&mut cs, "model.sampling.eta=0.5");
            set(&mut cs, "model.sampling.churn=1.0");
            let model = cs.model.build(&info, &dev, &mut Rng::new(0)).unwrap();
            let opts = SampleOptions {
                steps: 4,
                solver: elbo::config::SolverName::Heun,
                ..SampleOptions::default()
            };
            let x = model.sample(5, &opts, &mut Rng::new(2)).unwrap();
            assert_eq!(x.dims(), [5, info.dim], "{label} / {s}");
            let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{label} / {s}: {v:?}");
            if let DataKind::Discrete { levels } = info.kind {
                assert!(
                    v.iter()
                        .all(|x| *x >= 0.0 && *x < levels as f32 && x.fract() == 0.0),
                    "{label} / {s}: not levels {v:?}"
                );
            }
        }
        let mut cd = c.clone();
        set(&mut cd, "model.sampling.sampler=ddim");
        let model = cd.model.build(&info, &dev, &mut Rng::new(0)).unwrap();
        let batch = model
            .sample(
                6,
                &SampleOptions {
                    steps: 3,
                    ..Default::default()
                },
                &mut Rng::new(3),
            )
            .unwrap();
        let ev = EvalOptions {
            solver: elbo::config::SolverName::Heun,
            steps: 8,
            ..EvalOptions::default()
        };
        let nll = dataset_nll(model.as_ref(), &batch, &ev, &mut Rng::new(4)).unwrap();
        assert_eq!(nll.nats.len(), 6);
        assert!(
            nll.nats.iter().all(|v| v.is_finite()),
            "{label}: {:?}",
            nll.nats
        );
    }
    // the VLB only exists for DDPM
    let (_, c, info) = &variants()[9];
    let m = c.model.build(info, &dev, &mut Rng::new(0)).unwrap();
    let ev = EvalOptions {
        likelihood: "vlb".into(),
        ..EvalOptions::default()
    };
    let e = m
        .log_likelihood(
            &Rng::new(0).normal_tensor(&[2, 2], &dev).unwrap(),
            &ev,
            &mut Rng::new(0),
        )
        .unwrap_err();
    assert!(e.to_string().contains("pf-ode"), "{e}");
}

fn train(c: Config) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let mut t = Trainer::create(c, dir.path(), &Device::Cpu).unwrap();
    t.run(false).unwrap();
    let (nats, _se, bpd) = t.evaluate().unwrap();
    (nats, bpd)
}

#[test]
fn ddpm_levels_on_digits_reaches_a_vlb_below_3_3_bits_per_dim() {
    // 17-level digits; uniform is log2(17) = 4.09 bits/dim
    let c = cfg("ddpm", |c| {
        c.data.name = "digits".into();
        set(c, "model.net.hidden=256");
        set(c, "model.net.layers=2");
        set(c, "model.net.time_embed_dim=32");
        set(c, "model.timesteps=200");
        c.train.steps = 300;
        c.train.batch_size = 64;
        c.train.lr = 2e-3;
        c.train.warmup_steps = 30;
        c.train.ema_decay = 0.99;
        c.train.eval_every = 0;
        c.train.eval_examples = 100;
        c.train.checkpoint_every = 1000;
    });
    let (nats, bpd) = train(c);
    eprintln!("ddpm digits: {nats:.2} nats, {bpd:.3} bits/dim");
    assert!(bpd < 3.3, "VLB {bpd} bits/dim");
}

#[test]
fn sde_and_edm_on_8gaussians_reach_a_pf_ode_nll() {
    for (name, bound) in [("sde", 3.6), ("edm", 3.6)] {
        let c = cfg(name, |c| {
            c.data.name = "8gaussians".into();
            c.data.test_size = 300;
            set(c, "model.net.hidden=64");
            set(c, "model.net.layers=3");
            c.train.steps = 600;
            c.train.batch_size = 256;
            c.train.lr = 3e-3;
            c.train.warmup_steps = 30;
            c.train.ema_decay = 0.99;
            c.train.eval_every = 0;
            c.train.eval_examples = 300;
            c.train.checkpoint_every = 1000;
            c.eval.rtol = 1e-4;
            c.eval.atol = 1e-4;
        });
        let (nats, _) = train(c);
        eprintln!("{name} 8gaussians: {nats:.3} nats");
        assert!(nats < bound, "{name}: {nats} nats");
    }
    let _ = NllKind::Exact;
}
