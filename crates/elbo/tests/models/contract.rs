//! The contract every registered family keeps, driven by the registry (a new family is tested
//! by adding its registry line): on the 8x8 digits with its default settings, every parameter
//! of every group receives a non-zero gradient, samples have the data's shape and levels, each
//! declared likelihood is finite and labelled, an unknown one is an error, the checkpoint
//! round-trips, and an interrupted run resumes bit-identically. A test-only two-group model
//! proves the training-step hook (two optimisers with their own settings, a critic stepped
//! twice per step, checkpointed state) before any GAN uses it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use elbo::config::{Config, EvalOptions, SampleOptions};
use elbo::data::{self, DataConfig, DataKind};
use elbo::model::{
    dataset_nll, DataInfo, GenerativeModel, GroupSettings, ModelCore, ParamGroup, StepContext,
    StepOutput,
};
use elbo::models::FAMILIES;
use elbo::nn::ParamInit;
use elbo::train::checkpoint;
use elbo::train::optim::named_vars;
use elbo::train::{CheckpointChoice, LoadedRun, ModelBuilder, Trainer};
use elbo::{Error, Nll, NllKind, Rng};

const CPU: Device = Device::Cpu;

/// A small, quick run of `family` on digits with the family's own default model settings.
fn contract_config(family: &str, dataset: &str) -> Config {
    let mut c = Config::default();
    for kv in [
        format!("model.name={family}"),
        format!("data.name={dataset}"),
        "data.test_size=8".into(),
        "data.val_size=8".into(),
        "train.steps=4".into(),
        "train.batch_size=8".into(),
        "train.warmup_steps=1".into(),
        "train.eval_every=0".into(),
        "train.eval_examples=4".into(),
        "train.checkpoint_every=2".into(),
        "train.ema_decay=0.9".into(),
        "sample.solver=\"euler\"".into(),
        "sample.steps=4".into(),
        "eval.solver=\"euler\"".into(),
        "eval.steps=4".into(),
        "eval.batch_size=4".into(),
        "eval.lm_samples=1".into(),
    ] {
        c.set(&kv).unwrap_or_else(|e| panic!("{family}: {kv}: {e}"));
    }
    c
}

/// Every tensor of the latest checkpoint (weights, optimiser and EMA state, model state).
fn weights(dir: &Path) -> HashMap<String, Vec<f64>> {
    let l = checkpoint::load(&dir.join("checkpoint"), &CPU).unwrap();
    l.files
        .iter()
        .flat_map(|(f, ts)| {
            ts.iter().map(move |(k, t)| {
                let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                (format!("{f}/{k}"), v.to_vec1().unwrap())
            })
        })
        .collect()
}

fn check_gradients(label: &str, model: &dyn GenerativeModel, batch: &Tensor) {
    let loss = model.loss(batch, &mut Rng::new(1)).unwrap();
    let grads = loss.backward().unwrap();
    let params = named_vars(model.varmap()).unwrap();
    assert!(!params.is_empty(), "{label}: no parameters");
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

/// Train 4 steps at once, and 2 + resume 2; both must end bit-identical.
fn check_resume(label: &str, cfg: &Config, build: Option<&ModelBuilder>) {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut ta = Trainer::create_with(cfg.clone(), a.path(), &CPU, build).unwrap();
    let full = ta.run(false).unwrap();
    let mut tb = Trainer::create_with(cfg.clone(), b.path(), &CPU, build).unwrap();
    tb.run_until(2, false).unwrap();
    drop(tb);
    let mut tb = Trainer::resume_with(b.path(), None, &CPU, build).unwrap();
    assert_eq!(tb.step(), 2, "{label}");
    let rest = tb.run(false).unwrap();
    assert_eq!(rest.losses, full.losses[2..].to_vec(), "{label}: losses");
    assert_eq!(weights(a.path()), weights(b.path()), "{label}: weights");
    // the checkpoint round-trips into a model that scores like the trainer's own
    if build.is_none() {
        let run = LoadedRun::open(a.path(), CheckpointChoice::Latest, true, &CPU).unwrap();
        let test = run.data.test_set(&CPU).unwrap().narrow(0, 0, 4).unwrap();
        let opts = run.config.eval.clone();
        let nll = |m: &dyn GenerativeModel| dataset_nll(m, &test, &opts, &mut Rng::new(7));
        let first = nll(run.model.as_ref()).unwrap();
        let again = LoadedRun::open(b.path(), CheckpointChoice::Latest, true, &CPU).unwrap();
        assert_eq!(
            first.nats,
            nll(again.model.as_ref()).unwrap().nats,
            "{label}"
        );
    }
}

#[test]
fn every_registered_family_keeps_the_contract() {
    assert!(FAMILIES.len() >= 8);
    for fam in FAMILIES {
        let label = fam.name;
        let mut cfg = contract_config(fam.name, "digits");
        if fam.likelihoods.is_empty() {
            // no likelihood: the end-of-run validation scores samples
            cfg.set("train.select_by=energy-distance").unwrap();
        }
        let src = data::open("digits", &DataConfig::default()).unwrap();
        let info = DataInfo::of(src.as_ref());
        let model = cfg.model.build(&info, &CPU, &mut Rng::new(0)).unwrap();
        assert_eq!(model.family(), fam.name, "family() is the registered name");
        assert_eq!(
            model.likelihoods(),
            fam.likelihoods,
            "{label}: declared likelihoods"
        );
        assert!(!fam.about.is_empty());
        assert!(!model.sampling(&cfg.sample).is_empty());
        let mut rng = Rng::new(3);
        let mut src = src;
        let batch = src.train_batch(8, &mut rng, &CPU).unwrap();
        check_gradients(label, model.as_ref(), &batch);

        let x = model.sample(3, &cfg.sample, &mut Rng::new(4)).unwrap();
        assert_eq!(x.dims(), [3, info.dim], "{label}: sample shape");
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let DataKind::Discrete { levels } = info.kind else {
            unreachable!()
        };
        assert!(
            v.iter()
                .all(|x| *x >= 0.0 && *x < levels as f32 && x.fract() == 0.0),
            "{label}: samples are not levels"
        );

        let test = src.test_set(&CPU).unwrap().narrow(0, 0, 3).unwrap();
        for lik in model.likelihoods() {
            let opts = EvalOptions {
                likelihood: lik.to_string(),
                ..cfg.eval.clone()
            };
            let nll: Nll = model
                .log_likelihood(&test, &opts, &mut Rng::new(5))
                .unwrap();
            assert_eq!(nll.nats.len(), 3, "{label}/{lik}");
            assert!(nll.nats.iter().all(|v| v.is_finite()), "{label}/{lik}");
            assert_ne!(nll.kind, NllKind::None, "{label}/{lik}: unlabelled");
            // on discrete data nothing is exact but the families with an exact chain rule
            if nll.kind == NllKind::Exact {
                assert!(["ar", "gaussian"].contains(&label), "{label}/{lik}: exact?");
            }
        }
        let bad = EvalOptions {
            likelihood: "no-such-likelihood".into(),
            ..cfg.eval.clone()
        };
        let e = model
            .log_likelihood(&test, &bad, &mut Rng::new(5))
            .unwrap_err();
        assert!(e.to_string().contains("no-such-likelihood"), "{label}: {e}");

        check_resume(label, &cfg, None);
    }
}

#[test]
fn every_family_config_rejects_unknown_keys() {
    // serde does not enforce deny_unknown_fields through the tagged enum: check each variant
    for fam in FAMILIES {
        let toml = format!("[model]\nname = \"{}\"\nno_such_key = 1\n", fam.name);
        let e = Config::from_toml_str(&toml, "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no_such_key"), "{}: {e}", fam.name);
        for alias in fam.aliases {
            let c =
                Config::from_toml_str(&format!("[model]\nname = \"{alias}\"\n"), "c.toml").unwrap();
            assert_eq!(c.model.name(), fam.name);
        }
    }
    let e = Config::from_toml_str("[model]\nname = \"ddim\"\n", "c.toml").unwrap_err();
    assert!(e.to_string().contains("ddpm"), "{e}");
}

/// A test-only "GAN-shaped" model: a generator group `gen.*` and a critic group `critic.*`
/// with their own optimiser settings, the critic minimised twice per step, and a step counter
/// kept as checkpointed state.
struct TwoPlayer {
    core: ModelCore,
    gen: Var,
    critic: Var,
    calls: f64,
}

impl TwoPlayer {
    fn new(info: &DataInfo, dev: &Device, rng: &mut Rng) -> elbo::Result<Self> {
        let core = ModelCore::new(info.dim, dev);
        let (gen, critic) = {
            let mut p = ParamInit::new(&core.varmap, rng, dev);
            (
                p.push("gen").normal("w", &[info.dim], 1.0)?,
                p.push("critic").normal("w", &[info.dim], 1.0)?,
            )
        };
        Ok(Self {
            core,
            gen,
            critic,
            calls: 0.0,
        })
    }

    fn gen_loss(&self, batch: &Tensor) -> elbo::Result<Tensor> {
        Ok(batch
            .broadcast_sub(self.gen.as_tensor())?
            .sqr()?
            .mean_all()?)
    }

    fn critic_loss(&self, batch: &Tensor) -> elbo::Result<Tensor> {
        Ok(
            (batch.broadcast_mul(self.critic.as_tensor())?.sum(1)? - 1.0)?
                .sqr()?
                .mean_all()?,
        )
    }
}

impl GenerativeModel for TwoPlayer {
    fn family(&self) -> &'static str {
        "two-player-test"
    }
    fn core(&self) -> &ModelCore {
        &self.core
    }
    fn loss(&self, batch: &Tensor, _rng: &mut Rng) -> elbo::Result<Tensor> {
        Ok((self.gen_loss(batch)? + self.critic_loss(batch)?)?)
    }
    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> elbo::Result<StepOutput> {
        let mut critic = 0.0;
        for _ in 0..2 {
            let b = ctx.batch()?;
            critic = ctx.minimize("critic", &self.critic_loss(&b)?)?.loss;
        }
        let b = ctx.batch()?;
        let mut out = ctx.minimize("gen", &self.gen_loss(&b)?)?;
        out.extra.push(("critic_loss".into(), critic));
        self.calls += 1.0;
        Ok(out)
    }
    fn param_groups(&self) -> Vec<ParamGroup> {
        vec![
            ParamGroup::with_prefixes("gen", &["gen."]),
            ParamGroup::with_prefixes("critic", &["critic."]).settings(GroupSettings {
                lr: Some(0.05),
                beta1: Some(0.0),
                ema: Some(false),
                ..GroupSettings::default()
            }),
        ]
    }
    fn state_tensors(&self) -> elbo::Result<HashMap<String, Tensor>> {
        Ok(HashMap::from([(
            "calls".to_string(),
            Tensor::new(&[self.calls], &self.core.device)?,
        )]))
    }
    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> elbo::Result<()> {
        let c = t
            .get("calls")
            .ok_or_else(|| Error::Config("calls missing".into()))?;
        self.calls = c.to_vec1::<f64>()?[0];
        Ok(())
    }
    fn likelihoods(&self) -> &'static [&'static str] {
        &[]
    }
    fn sampling(&self, _opts: &SampleOptions) -> String {
        "the generator's weights".into()
    }
    fn sample(&self, n: usize, _opts: &SampleOptions, _rng: &mut Rng) -> elbo::Result<Tensor> {
        Ok(self.gen.as_tensor().unsqueeze(0)?.repeat((n, 1))?)
    }
    fn log_likelihood(&self, b: &Tensor, _o: &EvalOptions, _r: &mut Rng) -> elbo::Result<Nll> {
        Ok(Nll {
            nats: vec![0.0; b.dim(0)?],
            dims: self.core.dim,
            kind: NllKind::None,
        })
    }
    fn likelihood_method(&self, _opts: &EvalOptions) -> String {
        "none".into()
    }
}

#[test]
fn a_two_group_model_trains_through_the_step_hook_and_resumes_exactly() {
    let build: &ModelBuilder = &|info, dev, rng| Ok(Box::new(TwoPlayer::new(info, dev, rng)?));
    let mut cfg = contract_config("flow-matching", "moons");
    // no likelihood: the end-of-run validation scores samples
    cfg.set("train.select_by=energy-distance").unwrap();
    let src = data::open("moons", &DataConfig::default()).unwrap();
    let info = DataInfo::of(src.as_ref());
    let m = TwoPlayer::new(&info, &CPU, &mut Rng::new(0)).unwrap();
    let b = src.test_set(&CPU).unwrap();
    check_gradients("two-player", &m, &b);
    check_resume("two-player", &cfg, Some(build));

    let d = tempfile::tempdir().unwrap();
    let mut t = Trainer::create_with(cfg.clone(), d.path(), &CPU, Some(build)).unwrap();
    t.run(false).unwrap();
    let l = checkpoint::load(&d.path().join("checkpoint"), &CPU).unwrap();
    // one optimiser state per group; the critic keeps no EMA; the state tensor is saved
    assert!(l.files.contains_key("optim-gen") && l.files.contains_key("optim-critic"));
    let ema = &l.files["ema"];
    assert!(ema.contains_key("gen.w") && !ema.contains_key("critic.w"));
    let calls: Vec<f64> = l.files["model_state"]["calls"].to_vec1().unwrap();
    assert_eq!(calls, vec![4.0]);
    let groups = &l.state["groups"];
    assert_eq!(
        groups["critic"]["optim_steps"], 8,
        "two critic steps per step"
    );
    assert_eq!(groups["gen"]["optim_steps"], 4);
    let metrics = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    assert!(metrics.contains("critic_loss"), "{metrics}");
}

#[test]
fn a_sample_metric_can_choose_the_best_checkpoint() {
    let mut cfg = contract_config("flow-matching", "moons");
    cfg.set("train.eval_every=2").unwrap();
    cfg.set("train.eval_examples=64").unwrap();
    cfg.set("train.select_by=sliced-wasserstein").unwrap();
    let d = tempfile::tempdir().unwrap();
    let out = Trainer::create(cfg.clone(), d.path(), &CPU)
        .unwrap()
        .run(false)
        .unwrap();
    assert_eq!(out.selected_by, "sliced-wasserstein");
    let best = out.best_eval.unwrap();
    let metrics = std::fs::read_to_string(d.path().join("metrics.jsonl")).unwrap();
    let scores: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["eval_sliced-wasserstein"].as_f64())
        .collect();
    assert_eq!(scores.len(), 2, "{metrics}");
    assert_eq!(best, scores.iter().cloned().fold(f64::INFINITY, f64::min));
    assert!(d.path().join("best").is_dir());
    let e = cfg.set("train.select_by=fid").unwrap_err().to_string();
    assert!(
        e.contains("select_by") && e.contains("energy-distance"),
        "{e}"
    );
    // a family without a likelihood cannot be selected by NLL: the error says what to use
    let build: &ModelBuilder = &|info, dev, rng| Ok(Box::new(TwoPlayer::new(info, dev, rng)?));
    let mut c = contract_config("flow-matching", "moons");
    c.set("train.eval_every=2").unwrap();
    let d = tempfile::tempdir().unwrap();
    let e = Trainer::create_with(c, d.path(), &CPU, Some(build))
        .unwrap()
        .run(false)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("select_by"), "{e}");
}

#[test]
fn flow_matching_runs_on_the_unet() {
    let mut cfg = contract_config("flow-matching", "digits");
    cfg.set("model.net.backbone=unet").unwrap();
    let src = data::open("digits", &DataConfig::default()).unwrap();
    // the U-Net zero-initialises its residual branches' last convolutions (so nothing upstream
    // of them has a gradient at step 0): check the gradients after two steps
    let d = tempfile::tempdir().unwrap();
    let mut t = Trainer::create(cfg.clone(), d.path(), &CPU).unwrap();
    t.run_until(2, false).unwrap();
    let model = t.model();
    let names: Vec<String> = named_vars(model.varmap())
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.iter().any(|n| n.contains("down")), "{names:?}");
    let test = src.test_set(&CPU).unwrap().narrow(0, 0, 4).unwrap();
    check_gradients("flow-matching unet", model, &test);
    let x = model.sample(2, &cfg.sample, &mut Rng::new(1)).unwrap();
    assert_eq!(x.dims(), [2, 64]);
    let nll = model
        .log_likelihood(&test, &cfg.eval, &mut Rng::new(2))
        .unwrap();
    assert!(nll.nats.iter().all(|v| v.is_finite()));
    assert!(
        matches!(nll.kind, NllKind::Estimate { .. }),
        "{:?}",
        nll.kind
    );
    // on flat data the U-Net is refused with the fix in the message
    let mut c = contract_config("flow-matching", "moons");
    c.set("model.net.backbone=unet").unwrap();
    let moons = DataInfo::flat(2, DataKind::Continuous);
    let e = c.model.build(&moons, &CPU, &mut Rng::new(0)).err().unwrap();
    assert!(e.to_string().contains("backbone = \"mlp\""), "{e}");
}

#[test]
fn one_dequantization_convention_with_its_jacobian() {
    use elbo::continuous::diffusion::net::{Bins, DataScale};
    let l = 5;
    let levels: Vec<f32> = (0..l).map(|k| k as f32).collect();
    let k = Tensor::from_vec(levels.repeat(200), (200, l), &CPU).unwrap(); // [200, L]
    for (bins, width) in [
        (Bins::Centred, 2.0 / (l - 1) as f64),
        (Bins::Tiled, 2.0 / l as f64),
    ] {
        let s = DataScale::with_bins(DataKind::Discrete { levels: l }, bins).unwrap();
        // the Jacobian is the log of one bin's width, per dimension
        assert!(
            (s.log_jacobian(3) - 3.0 * width.ln()).abs() < 1e-12,
            "{bins:?}"
        );
        let x = s.dequantize(&k, &mut Rng::new(1)).unwrap();
        let back: Vec<f32> = s
            .to_data(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(
            back,
            levels.repeat(200),
            "{bins:?}: decode(dequantize(k)) != k"
        );
        let grid: Vec<f32> = s
            .to_data(&s.to_grid(&k).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(grid, levels.repeat(200), "{bins:?}: decode(centre(k)) != k");
        // each level's dequantized values fill (nearly all of) a bin of that width, and the
        // bins of neighbouring levels do not overlap
        let xs: Vec<Vec<f32>> = x.to_vec2().unwrap();
        let mut prev_hi = f64::NEG_INFINITY;
        for j in 0..l {
            let col: Vec<f64> = xs.iter().map(|r| f64::from(r[j])).collect();
            let (lo, hi) = col
                .iter()
                .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
            assert!(
                hi - lo <= width + 1e-6 && hi - lo > 0.9 * width,
                "{bins:?} level {j}"
            );
            assert!(lo >= prev_hi - 1e-6, "{bins:?}: bins overlap at level {j}");
            prev_hi = hi;
        }
    }
    // flow-matching runs of earlier releases keep their tiled bins; new ones use the shared ones
    let old =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../elbo-cli/tests/fixtures/legacy/run-flow");
    let c = Config::from_run_dir(&old).unwrap();
    let elbo::config::ModelConfig::FlowMatching(f) = &c.model else {
        panic!("{:?}", c.model)
    };
    assert_eq!(f.bins, Bins::Tiled);
    let elbo::config::ModelConfig::FlowMatching(f) = Config::default().model else {
        unreachable!()
    };
    assert_eq!(f.bins, Bins::Centred);
}

/// The VQ-VAE as a VQGAN: every parameter of the autoencoder's group (encoder, decoder, and the
/// codebook when it learns by loss) and of the discriminator's group `disc` receives a non-zero
/// gradient from the objective past `disc_start`, and a run whose discriminator trains from
/// step 1 resumes bit-identically, the discriminator's optimiser state included.
#[test]
fn the_vqgan_option_keeps_the_contract() {
    for codebook in ["ema", "loss"] {
        let label = format!("vqgan ({codebook} codebook)");
        let mut cfg = contract_config("vq-vae", "digits");
        cfg.set(&format!("model.codebook=\"{codebook}\"")).unwrap();
        cfg.set("model.adversarial.disc_start=1").unwrap();
        let mut src = data::open("digits", &DataConfig::default()).unwrap();
        let info = DataInfo::of(src.as_ref());
        let model = cfg.model.build(&info, &CPU, &mut Rng::new(0)).unwrap();
        let groups: Vec<String> = model.param_groups().into_iter().map(|g| g.name).collect();
        assert_eq!(groups, ["model", "disc"], "{label}");
        let names: Vec<String> = named_vars(model.varmap())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for prefix in ["encoder.", "decoder.", "disc."] {
            assert!(
                names.iter().any(|n| n.starts_with(prefix)),
                "{label}: {prefix}"
            );
        }
        assert_eq!(
            names.iter().any(|n| n.starts_with("codebook.")),
            codebook == "loss"
        );
        let batch = src.train_batch(8, &mut Rng::new(3), &CPU).unwrap();
        check_gradients(&label, model.as_ref(), &batch);
        check_resume(&label, &cfg, None);
        let d = tempfile::tempdir().unwrap();
        Trainer::create(cfg.clone(), d.path(), &CPU)
            .unwrap()
            .run(false)
            .unwrap();
        let w = weights(d.path());
        assert!(
            w.keys().any(|k| k.starts_with("optim-disc")),
            "{label}: no discriminator optimiser state in {:?}",
            w.keys().collect::<Vec<_>>()
        );
    }
}
