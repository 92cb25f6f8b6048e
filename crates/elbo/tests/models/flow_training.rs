//! Flow matching end to end: gradients reach every parameter, a short seeded training reaches a
//! stated held-out NLL, and an interrupted + resumed run reproduces an uninterrupted one.

use candle_core::Device;
use elbo::config::Config;
use elbo::data::DataKind;
use elbo::model::DataInfo;
use elbo::train::optim::named_vars;
use elbo::train::{CheckpointChoice, LoadedRun, Trainer};
use elbo::{NllKind, Rng};

fn small_config(data: &str, steps: usize) -> Config {
    let mut c = Config::default();
    c.data.name = data.into();
    c.data.test_size = 1000;
    c.set("model.net.hidden=64").unwrap();
    c.set("model.net.layers=3").unwrap();
    c.train.steps = steps;
    c.train.batch_size = 256;
    c.train.lr = 3e-3;
    c.train.warmup_steps = 20;
    c.train.eval_every = 0;
    c.train.eval_examples = 200;
    c.train.checkpoint_every = 1000;
    c.train.log_every = 1;
    c.eval.rtol = 1e-4;
    c.eval.atol = 1e-4;
    c
}

#[test]
fn every_parameter_gets_a_nonzero_gradient() {
    let dev = Device::Cpu;
    let cfg = Config::default();
    let info = DataInfo::flat(2, DataKind::Continuous);
    let model = cfg.model.build(&info, &dev, &mut Rng::new(0)).unwrap();
    let mut rng = Rng::new(1);
    let batch = rng.normal_tensor(&[64, 2], &dev).unwrap();
    let loss = model.loss(&batch, &mut rng).unwrap();
    let grads = loss.backward().unwrap();
    let params = named_vars(model.varmap()).unwrap();
    assert_eq!(params.len(), 2 * (4 + 1)); // the default MLP: 4 hidden layers and the output
    for (name, var) in &params {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: |grad|^2 = {norm}");
    }
}

#[test]
fn loss_gradient_matches_finite_differences() {
    // d loss / d b for one output bias entry, by central differences on the same noise.
    let dev = Device::Cpu;
    let mut cfg = Config::default();
    cfg.set("model.net.hidden=16").unwrap();
    cfg.set("model.net.layers=2").unwrap();
    let info = DataInfo::flat(2, DataKind::Continuous);
    let model = cfg.model.build(&info, &dev, &mut Rng::new(3)).unwrap();
    let batch = Rng::new(4).normal_tensor(&[32, 2], &dev).unwrap();
    let params = named_vars(model.varmap()).unwrap();
    let (_, bias) = params.iter().find(|(n, _)| n == "net.out.bias").unwrap();
    let loss = model.loss(&batch, &mut Rng::new(5)).unwrap();
    let g: Vec<f32> = loss
        .backward()
        .unwrap()
        .get(bias.as_tensor())
        .unwrap()
        .to_vec1()
        .unwrap();
    let orig: Vec<f32> = bias.as_tensor().to_vec1().unwrap();
    let h = 1e-2f32;
    let at = |delta: f32| {
        let mut v = orig.clone();
        v[0] += delta;
        bias.set(&candle_core::Tensor::new(v, &dev).unwrap())
            .unwrap();
        let l: f32 = model
            .loss(&batch, &mut Rng::new(5))
            .unwrap()
            .to_scalar()
            .unwrap();
        l
    };
    let fd = (at(h) - at(-h)) / (2.0 * h);
    assert!(
        (fd - g[0]).abs() < 1e-3 * (1.0 + g[0].abs()),
        "fd {fd} vs autograd {}",
        g[0]
    );
}

#[test]
fn interrupted_and_resumed_run_reproduces_uninterrupted_losses() {
    let dev = Device::Cpu;
    let cfg = small_config("8gaussians", 40);
    let a = tempfile::tempdir().unwrap();
    let full = Trainer::create(cfg.clone(), a.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let b = tempfile::tempdir().unwrap();
    let first = Trainer::create(cfg, b.path(), &dev)
        .unwrap()
        .run_until(17, false)
        .unwrap();
    assert_eq!(first.steps, 17);
    let mut t = Trainer::resume(b.path(), None, &dev).unwrap();
    assert_eq!(t.step(), 17);
    let second = t.run(false).unwrap();
    let resumed: Vec<(usize, f64)> = first.losses.iter().chain(&second.losses).cloned().collect();
    assert_eq!(full.losses.len(), 40);
    assert_eq!(
        resumed, full.losses,
        "resumed losses differ from the uninterrupted run"
    );
    // the saved metrics agree too: one line per step, 40 in all
    let m = std::fs::read_to_string(b.path().join("metrics.jsonl")).unwrap();
    assert_eq!(m.lines().filter(|l| l.contains("\"loss\"")).count(), 40);
}

#[test]
fn short_training_on_8gaussians_reaches_stated_nll() {
    // 8gaussians has entropy 2.833 nats; a standard normal fit of it would score ~4.1.
    let dev = Device::Cpu;
    let mut cfg = small_config("8gaussians", 800);
    cfg.set("model.net.hidden=128").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = Trainer::create(cfg, dir.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    assert_eq!(out.steps, 800);
    let run = LoadedRun::open(dir.path(), CheckpointChoice::Latest, true, &dev).unwrap();
    let test = run.data.test_set(&dev).unwrap().narrow(0, 0, 500).unwrap();
    let nll = elbo::model::dataset_nll(
        run.model.as_ref(),
        &test,
        &run.config.eval,
        &mut Rng::new(0),
    )
    .unwrap();
    assert_eq!(nll.kind, NllKind::Exact);
    let s = nll.summary();
    assert!(
        s.nats > 2.833 - 4.0 * s.stderr_nats,
        "NLL {} below the entropy",
        s.nats
    );
    assert!(
        s.nats < 3.35,
        "NLL {} ± {} after 800 steps",
        s.nats,
        s.stderr_nats
    );
    // samples land near the 8 modes (radius 4/1.414 ≈ 2.83)
    let x = run
        .model
        .sample(500, &run.config.sample, &mut Rng::new(1))
        .unwrap();
    let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let near = v
        .chunks(2)
        .filter(|p| ((p[0] * p[0] + p[1] * p[1]).sqrt() - 2.83).abs() < 0.8)
        .count();
    assert!(near > 450, "only {near}/500 samples near the ring of modes");
}

#[test]
fn corrupt_checkpoint_is_a_clear_error() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    Trainer::create(small_config("moons", 5), dir.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let f = dir.path().join("checkpoint").join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0xFF;
    std::fs::write(&f, &bytes).unwrap();
    let err = Trainer::resume(dir.path(), None, &dev)
        .err()
        .expect("corrupt checkpoint accepted");
    let msg = err.to_string();
    assert!(msg.contains("model.safetensors"), "{msg}");
    let err = LoadedRun::open(dir.path(), CheckpointChoice::Latest, true, &dev)
        .err()
        .unwrap();
    assert!(err.to_string().contains("checkpoint"), "{err}");
}

#[test]
fn existing_run_is_not_overwritten_and_unknown_names_are_errors() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    Trainer::create(small_config("moons", 2), dir.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let e = Trainer::create(small_config("moons", 2), dir.path(), &dev)
        .err()
        .unwrap();
    assert!(e.to_string().contains("--resume"), "{e}");
    let d2 = tempfile::tempdir().unwrap();
    let e = Trainer::create(small_config("9gaussians", 2), d2.path(), &dev)
        .err()
        .unwrap();
    assert!(
        e.to_string().contains("9gaussians") && e.to_string().contains("8gaussians"),
        "{e}"
    );
    let mut c = small_config("moons", 2);
    let e = c.set("model.name=glowworm").unwrap_err();
    assert!(
        e.to_string().contains("glowworm") && e.to_string().contains("flow-matching"),
        "{e}"
    );
    let e = elbo::config::Config::from_toml_str("[model]\nname = \"glowworm\"\n", "c.toml")
        .unwrap_err();
    assert!(e.to_string().contains("glowworm"), "{e}");
    let _ = (&d2, &dev);
}

#[test]
fn discrete_digits_are_dequantized_into_a_bound() {
    let dev = Device::Cpu;
    let mut cfg = small_config("digits", 30);
    cfg.eval.divergence = elbo::config::DivergenceChoice::Hutchinson;
    cfg.eval.probes = 2;
    let dir = tempfile::tempdir().unwrap();
    Trainer::create(cfg, dir.path(), &dev)
        .unwrap()
        .run(false)
        .unwrap();
    let run = LoadedRun::open(dir.path(), CheckpointChoice::Latest, true, &dev).unwrap();
    let test = run.data.test_set(&dev).unwrap().narrow(0, 0, 20).unwrap();
    let nll = elbo::model::dataset_nll(
        run.model.as_ref(),
        &test,
        &run.config.eval,
        &mut Rng::new(0),
    )
    .unwrap();
    assert_eq!(nll.kind, NllKind::Estimate { samples: 2 });
    let bpd = nll.summary().bits_per_dim;
    // a barely trained model: finite, and above the 0 floor of any discrete likelihood
    assert!(bpd.is_finite() && bpd > 0.0, "{bpd}");
    let mut opts = run.config.eval.clone();
    opts.divergence = elbo::config::DivergenceChoice::Exact;
    opts.exact_max_dim = 64;
    let one = test.narrow(0, 0, 2).unwrap();
    let exact = run
        .model
        .log_likelihood(&one, &opts, &mut Rng::new(0))
        .unwrap();
    assert_eq!(exact.kind, NllKind::Bound);
    // samples are levels 0..16
    let s: Vec<f32> = run
        .model
        .sample(4, &run.config.sample, &mut Rng::new(0))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(s
        .iter()
        .all(|v| (0.0..=16.0).contains(v) && v.fract() == 0.0));
}

#[test]
fn forward_mode_divergence_matches_autograd() {
    use elbo::continuous::cnf::divergence;
    use elbo::continuous::VelocityField;
    use elbo::models::flow_matching::VelocityMlp;
    use elbo::nn::ParamInit;
    let dev = Device::Cpu;
    for act in [elbo::nn::Activation::Silu, elbo::nn::Activation::Tanh] {
        let cfg = elbo::continuous::diffusion::net::NetConfig {
            hidden: 32,
            layers: 3,
            activation: act,
            ..Default::default()
        };
        let vm = candle_nn::VarMap::new();
        let mut rng = Rng::new(9);
        let net = {
            let mut p = ParamInit::new(&vm, &mut rng, &dev);
            VelocityMlp::new(&mut p, 3, &cfg).unwrap()
        };
        let x = Rng::new(10).normal_tensor(&[16, 3], &dev).unwrap();
        // a closure has no forward mode, so it takes the reverse-mode autograd path
        let reverse = |x: &candle_core::Tensor, t: f64| net.velocity(x, t);
        let probes = Rng::new(11).rademacher_tensor(&[4, 16, 3], &dev).unwrap();
        for p in [None, Some(&probes)] {
            let (v1, d1) = divergence(&net, &x, 0.37, p).unwrap();
            let (v2, d2) = divergence(&reverse, &x, 0.37, p).unwrap();
            let dv = (v1 - v2)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let dd = (d1 - d2)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(dv < 1e-5 && dd < 1e-4, "{act:?}: |dv| {dv}, |ddiv| {dd}");
        }
    }
}

#[test]
fn diverging_run_stops_with_a_clear_error_and_keeps_its_checkpoint() {
    let dev = Device::Cpu;
    let mut cfg = small_config("moons", 200);
    cfg.train.lr = 1e6;
    cfg.train.grad_clip = 0.0;
    cfg.train.warmup_steps = 0;
    cfg.train.ema_decay = 0.0;
    cfg.train.checkpoint_every = 1;
    let dir = tempfile::tempdir().unwrap();
    let err = Trainer::create(cfg, dir.path(), &dev)
        .unwrap()
        .run(false)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(matches!(err, elbo::Error::NonFiniteLoss { .. }), "{msg}");
    assert!(
        msg.contains("non-finite loss") && msg.contains("is kept"),
        "{msg}"
    );
    // the last checkpoint on disk is a good one: it loads and has finite weights
    let run = LoadedRun::open(dir.path(), CheckpointChoice::Latest, false, &dev).unwrap();
    for (name, v) in named_vars(run.model.varmap()).unwrap() {
        let s: f32 = v
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(s.is_finite(), "{name} is not finite in the kept checkpoint");
    }
}
