//! The VQ-VAE and the two-stage model against closed forms: the straight-through estimator
//! hands the encoder exactly the decoder's gradient at `z_q` (van den Oord et al. 2017, sec.
//! 3.2), the EMA codebook update is eq. 6-8 of appendix A.1 on a hand-made batch, unused codes
//! restart at encoder outputs, a resumed run (codebook state included) is bit-identical, the
//! two-stage bound is above the exact NLL of an oracle by exactly `-log p(z_q(x) | x)`, and a
//! prior trained on `codes:RUN` loads as the two-stage model of the images.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use elbo::config::{Config, EvalOptions, SampleOptions};
use elbo::data::{self, DataConfig, DataKind, DataSource};
use elbo::latent::codebook::{usage, Codebook};
use elbo::latent::two_stage::{CodeAutoencoder, TwoStage};
use elbo::model::{DataInfo, GenerativeModel, ModelCore};
use elbo::models::vq_vae::{Config as VqConfig, VqVae};
use elbo::train::checkpoint;
use elbo::train::optim::named_vars;
use elbo::train::{CheckpointChoice, LoadedRun, Trainer};
use elbo::{Nll, NllKind, Rng};

const CPU: Device = Device::Cpu;

fn digits() -> Box<dyn DataSource> {
    data::open("digits", &DataConfig::default()).unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn straight_through_hands_the_encoder_the_decoders_gradient_at_z_q() {
    let mut src = digits();
    let info = DataInfo::of(src.as_ref());
    let cfg = VqConfig {
        channels: 8,
        codebook_size: 8,
        code_dim: 4,
        beta: 0.0,
        ..VqConfig::default()
    };
    let model = VqVae::new(&cfg, info, &CPU, &mut Rng::new(0)).unwrap();
    let batch = src.train_batch(6, &mut Rng::new(1), &CPU).unwrap();
    let params = named_vars(model.varmap()).unwrap();
    let encoder: Vec<_> = params
        .iter()
        .filter(|(n, _)| n.starts_with("encoder."))
        .collect();
    assert!(!encoder.is_empty());

    // the reconstruction term through the straight-through estimator
    let f = model.forward(&batch).unwrap();
    let rec = model
        .log_likelihood_given(&f.out, &batch)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    let g_st = rec.backward().unwrap();

    // the decoder's gradient at z_q, then pulled back through the encoder by hand
    let z_q = Var::from_tensor(&f.z_q.detach()).unwrap();
    let rec_q = model
        .log_likelihood_given(&model.decode(z_q.as_tensor()).unwrap(), &batch)
        .unwrap()
        .sum_all()
        .unwrap()
        .neg()
        .unwrap();
    assert_eq!(
        rec.to_scalar::<f32>().unwrap(),
        rec_q.to_scalar::<f32>().unwrap(),
        "the forward value is the decoder's at z_q"
    );
    let g_zq = rec_q
        .backward()
        .unwrap()
        .get(z_q.as_tensor())
        .unwrap()
        .clone();
    let pulled = (model.encode(&batch).unwrap() * g_zq)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut total = 0f32;
    for (name, v) in encoder {
        let a = flat(g_st.get(v.as_tensor()).unwrap());
        let b = flat(pulled.get(v.as_tensor()).unwrap());
        for (x, y) in a.iter().zip(&b) {
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{name}: {x} vs {y}"
            );
            total += y.abs();
        }
    }
    assert!(total > 0.0, "the encoder received no gradient");
}

#[test]
fn nearest_code_and_the_ema_update_match_their_closed_forms() {
    // K = 3 codes in 2-D
    let e0 = vec![0.0f32, 0.0, 4.0, 0.0, 0.0, 4.0];
    let mut cb = Codebook::new(3, 2, e0.clone(), None).unwrap();
    let z = [0.5f32, -0.5, -0.25, 0.25, 0.2, 3.0, 0.0, 5.0];
    let zt = Tensor::from_vec(z.to_vec(), (4, 2), &CPU).unwrap();
    let codes: Vec<u32> = cb.nearest(&zt).unwrap().to_vec1().unwrap();
    assert_eq!(codes, [0, 0, 2, 2]);
    let g = 0.9;
    cb.ema_update(&z, &codes, g).unwrap();
    cb.ema_update(&z, &codes, g).unwrap();
    // two steps of N <- g N + (1-g) n, m <- g m + (1-g) s from N = 1, m = e
    let two = |start: f64, batch: f64| g * (g * start + (1.0 - g) * batch) + (1.0 - g) * batch;
    let n = [two(1.0, 2.0), two(1.0, 0.0), two(1.0, 2.0)];
    let s = [[0.25, -0.25], [0.0, 0.0], [0.2, 8.0]];
    for i in 0..3 {
        assert!((f64::from(cb.ema_count()[i]) - n[i]).abs() < 1e-6, "N_{i}");
        for j in 0..2 {
            let m = two(f64::from(e0[2 * i + j]), s[i][j]);
            let e = f64::from(cb.vectors()[2 * i + j]);
            assert!((e - m / n[i]).abs() < 1e-5, "e_{i}{j}: {e} vs {}", m / n[i]);
        }
    }
    // the unused code kept its vector
    assert_eq!(&cb.vectors()[2..4], &[4.0, 0.0]);
    let u = usage(&codes, 3);
    assert!((u.used - 2.0 / 3.0).abs() < 1e-12);
    assert!(
        (u.perplexity - 2.0).abs() < 1e-12,
        "two codes, equally used"
    );
}

#[test]
fn codes_unused_for_dead_after_steps_restart_at_encoder_outputs() {
    let mut cb = Codebook::new(3, 2, vec![0.0, 0.0, 9.0, 9.0, -9.0, -9.0], None).unwrap();
    let z = [0.1f32, 0.2, 0.3, 0.4];
    let codes = [0u32, 0];
    let mut rng = Rng::new(5);
    assert_eq!(cb.restart_dead(&z, &codes, 3, &mut rng).unwrap(), 0);
    assert_eq!(cb.restart_dead(&z, &codes, 3, &mut rng).unwrap(), 0);
    assert_eq!(cb.idle(), &[0.0, 2.0, 2.0]);
    assert_eq!(cb.restart_dead(&z, &codes, 3, &mut rng).unwrap(), 2);
    for i in 1..3 {
        let v = &cb.vectors()[2 * i..2 * i + 2];
        assert!(v == &z[..2] || v == &z[2..], "code {i} at {v:?}");
        assert_eq!(cb.ema_count()[i], 1.0);
    }
    assert_eq!(cb.idle(), &[0.0, 0.0, 0.0]);
    // 0 turns restarts off
    let mut off = Codebook::new(2, 2, vec![0.0; 4], None).unwrap();
    for _ in 0..5 {
        assert_eq!(off.restart_dead(&z, &codes, 0, &mut rng).unwrap(), 0);
    }
}

fn vq_config(steps: usize) -> Config {
    let mut c = Config::default();
    for kv in [
        "model.name=\"vq-vae\"".to_string(),
        "model.channels=8".into(),
        "model.codebook_size=16".into(),
        "model.code_dim=4".into(),
        "model.downsample=1".into(),
        "model.dead_after=2".into(),
        "data.name=digits".into(),
        format!("train.steps={steps}"),
        "train.batch_size=16".into(),
        "train.lr=3e-3".into(),
        "train.warmup_steps=1".into(),
        "train.eval_every=0".into(),
        "train.checkpoint_every=3".into(),
        "train.log_every=1".into(),
    ] {
        c.set(&kv).unwrap_or_else(|e| panic!("{kv}: {e}"));
    }
    c
}

fn checkpoint_tensors(dir: &Path) -> HashMap<String, Vec<f32>> {
    let l = checkpoint::load(&dir.join("checkpoint"), &CPU).unwrap();
    l.files
        .iter()
        .flat_map(|(f, ts)| {
            ts.iter().map(move |(k, t)| {
                let v = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                (format!("{f}/{k}"), v.to_vec1().unwrap())
            })
        })
        .collect()
}

#[test]
fn a_resumed_run_with_its_codebook_state_is_bit_identical_and_logs_usage() {
    let cfg = vq_config(8);
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let full = Trainer::create(cfg.clone(), a.path(), &CPU)
        .unwrap()
        .run(false)
        .unwrap();
    let mut tb = Trainer::create(cfg, b.path(), &CPU).unwrap();
    tb.run_until(3, false).unwrap();
    drop(tb);
    let rest = Trainer::resume(b.path(), None, &CPU)
        .unwrap()
        .run(false)
        .unwrap();
    assert_eq!(rest.losses, full.losses[3..].to_vec());
    let (wa, wb) = (checkpoint_tensors(a.path()), checkpoint_tensors(b.path()));
    for k in ["embedding", "ema_count", "ema_sum", "idle"] {
        assert!(
            wa.contains_key(&format!("model_state/codebook.{k}")),
            "{k} not checkpointed: {:?}",
            wa.keys().collect::<Vec<_>>()
        );
    }
    assert_eq!(wa, wb);
    // the training log carries the codebook's usage, perplexity and restarts
    let log = std::fs::read_to_string(a.path().join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v.get("perplexity").is_some())
        .collect();
    assert_eq!(rows.len(), 8, "{log}");
    for r in &rows {
        let p = r["perplexity"].as_f64().unwrap();
        let u = r["codebook_usage"].as_f64().unwrap();
        assert!((1.0..=16.0).contains(&p) && u > 0.0 && u <= 1.0, "{r}");
    }
}

/// An oracle first stage: images of two binary pixels, codes `z = x` on a 1x2 grid of 2 codes,
/// and a decoder `p(x | z) = Π_d Bernoulli(x_d; q[z_d])`.
struct OracleAe {
    core: ModelCore,
}

const Q: [f64; 2] = [0.2, 0.7];
/// The prior over the four code sequences z = (z_0, z_1), index 2 z_0 + z_1.
const PRIOR: [f64; 4] = [0.1, 0.2, 0.3, 0.4];

fn decoder_log_prob(z: [usize; 2], x: [usize; 2]) -> f64 {
    (0..2)
        .map(|d| {
            let q = Q[z[d]];
            if x[d] == 1 {
                q.ln()
            } else {
                (1.0 - q).ln()
            }
        })
        .sum()
}

fn rows(t: &Tensor) -> Vec<[usize; 2]> {
    t.to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| [r[0] as usize, r[1] as usize])
        .collect()
}

impl CodeAutoencoder for OracleAe {
    fn codebook_size(&self) -> usize {
        2
    }
    fn code_grid(&self) -> (usize, usize) {
        (1, 2)
    }
    fn encode_codes(&self, batch: &Tensor) -> elbo::Result<Tensor> {
        Ok(batch.clone())
    }
    fn decoder_nll(&self, codes: &Tensor, batch: &Tensor) -> elbo::Result<Vec<f64>> {
        Ok(rows(codes)
            .into_iter()
            .zip(rows(batch))
            .map(|(z, x)| -decoder_log_prob(z, x))
            .collect())
    }
    fn decode_sample(&self, codes: &Tensor, _rng: &mut Rng) -> elbo::Result<Tensor> {
        Ok(codes.clone())
    }
    fn decoder_label(&self) -> String {
        "oracle".into()
    }
}

impl GenerativeModel for OracleAe {
    fn family(&self) -> &'static str {
        "oracle-ae"
    }
    fn core(&self) -> &ModelCore {
        &self.core
    }
    fn loss(&self, b: &Tensor, _r: &mut Rng) -> elbo::Result<Tensor> {
        Ok(b.sum_all()?)
    }
    fn likelihoods(&self) -> &'static [&'static str] {
        &[]
    }
    fn sampling(&self, _o: &SampleOptions) -> String {
        "oracle".into()
    }
    fn sample(&self, n: usize, _o: &SampleOptions, _r: &mut Rng) -> elbo::Result<Tensor> {
        Ok(Tensor::zeros((n, 2), DType::F32, &CPU)?)
    }
    fn log_likelihood(&self, _b: &Tensor, _o: &EvalOptions, _r: &mut Rng) -> elbo::Result<Nll> {
        unreachable!()
    }
    fn likelihood_method(&self, _o: &EvalOptions) -> String {
        "none".into()
    }
    fn code_autoencoder(&self) -> Option<&dyn CodeAutoencoder> {
        Some(self)
    }
}

/// An oracle prior over the four code sequences, with its exact NLL.
struct OraclePrior {
    core: ModelCore,
}

impl GenerativeModel for OraclePrior {
    fn family(&self) -> &'static str {
        "oracle-prior"
    }
    fn core(&self) -> &ModelCore {
        &self.core
    }
    fn loss(&self, b: &Tensor, _r: &mut Rng) -> elbo::Result<Tensor> {
        Ok(b.sum_all()?)
    }
    fn likelihoods(&self) -> &'static [&'static str] {
        &["exact"]
    }
    fn sampling(&self, _o: &SampleOptions) -> String {
        "oracle".into()
    }
    fn sample(&self, n: usize, _o: &SampleOptions, _r: &mut Rng) -> elbo::Result<Tensor> {
        Ok(Tensor::ones((n, 2), DType::F32, &CPU)?)
    }
    fn log_likelihood(&self, b: &Tensor, _o: &EvalOptions, _r: &mut Rng) -> elbo::Result<Nll> {
        Ok(Nll {
            nats: rows(b)
                .into_iter()
                .map(|z| -PRIOR[2 * z[0] + z[1]].ln())
                .collect(),
            dims: 2,
            kind: NllKind::Exact,
        })
    }
    fn likelihood_method(&self, _o: &EvalOptions) -> String {
        "oracle table".into()
    }
}

#[test]
fn the_two_stage_bound_exceeds_the_exact_nll_by_the_codes_posterior() {
    let info = DataInfo::flat(2, DataKind::Discrete { levels: 2 });
    let ae = OracleAe {
        core: ModelCore::new(info.dim, &CPU),
    };
    let prior = OraclePrior {
        core: ModelCore::new(2, &CPU),
    };
    let two = TwoStage::new(Box::new(ae), Box::new(prior)).unwrap();
    let xs = [[0usize, 0], [0, 1], [1, 0], [1, 1]];
    let batch = Tensor::from_vec(
        xs.iter().flatten().map(|&v| v as f32).collect::<Vec<_>>(),
        (4, 2),
        &CPU,
    )
    .unwrap();
    let opts = EvalOptions::default();
    let nll = two.log_likelihood(&batch, &opts, &mut Rng::new(0)).unwrap();
    assert_eq!(nll.kind, NllKind::Bound, "an exact prior gives a bound");
    let mut total_px = 0.0;
    for (i, x) in xs.iter().enumerate() {
        // p(x) = Σ_z p(z) p(x | z) over the four code sequences
        let joint = |z: [usize; 2]| PRIOR[2 * z[0] + z[1]] * decoder_log_prob(z, *x).exp();
        let px: f64 = xs.iter().map(|z| joint(*z)).sum();
        total_px += px;
        let exact = -px.ln();
        let posterior = joint(*x) / px; // p(z_q(x) = x | x)
        assert!(nll.nats[i] >= exact, "{x:?}: {} < {exact}", nll.nats[i]);
        assert!(
            (nll.nats[i] - exact - (-posterior.ln())).abs() < 1e-9,
            "{x:?}: the gap is -log p(z_q | x)"
        );
    }
    assert!(
        (total_px - 1.0).abs() < 1e-12,
        "the oracle's p(x) sums to 1"
    );
}

#[test]
fn a_prior_trained_on_codes_loads_as_the_two_stage_model_of_the_images() {
    let vq = tempfile::tempdir().unwrap();
    Trainer::create(vq_config(30), vq.path(), &CPU)
        .unwrap()
        .run(false)
        .unwrap();
    let vq_run = LoadedRun::open(vq.path(), CheckpointChoice::Latest, false, &CPU).unwrap();

    // the codes data set: the run's splits, encoded
    let name = format!("codes:{}", vq.path().display());
    let codes = data::open(&name, &DataConfig::default()).unwrap();
    assert_eq!(codes.dim(), 16, "a 4x4 grid");
    assert_eq!(codes.kind(), DataKind::Discrete { levels: 16 });
    let images = vq_run.data.test_set(&CPU).unwrap();
    let ae = vq_run.model.code_autoencoder().unwrap();
    assert_eq!(
        flat(&codes.test_set(&CPU).unwrap()),
        flat(&ae.encode_codes(&images).unwrap())
    );

    let prior = tempfile::tempdir().unwrap();
    let mut c = Config::default();
    for kv in [
        "model.name=ar".to_string(),
        "model.transformer.d_model=16".into(),
        "model.transformer.n_heads=2".into(),
        "model.transformer.n_layers=1".into(),
        format!("data.name=\"{name}\""),
        "train.steps=10".into(),
        "train.batch_size=16".into(),
        "train.eval_every=0".into(),
    ] {
        c.set(&kv).unwrap_or_else(|e| panic!("{kv}: {e}"));
    }
    Trainer::create(c, prior.path(), &CPU)
        .unwrap()
        .run(false)
        .unwrap();
    let run = LoadedRun::open(prior.path(), CheckpointChoice::Latest, true, &CPU).unwrap();
    assert_eq!(
        run.data.dim(),
        64,
        "the two-stage model is a model of the images"
    );
    assert!(run.label.contains("two-stage"), "{}", run.label);
    let test = run.data.test_set(&CPU).unwrap().narrow(0, 0, 10).unwrap();
    let opts = run.config.eval.clone();
    let two = run
        .model
        .log_likelihood(&test, &opts, &mut Rng::new(1))
        .unwrap();
    assert_eq!(two.kind, NllKind::Bound);
    assert_eq!(two.dims, 64);
    // the bound is the decoder's NLL plus the prior's (positive) NLL of the codes
    let z = ae.encode_codes(&test).unwrap();
    let dec = ae.decoder_nll(&z, &test).unwrap();
    for (b, d) in two.nats.iter().zip(&dec) {
        assert!(b.is_finite() && *b > *d, "{b} vs the decoder's {d}");
    }
    let x = run
        .model
        .sample(3, &run.config.sample, &mut Rng::new(2))
        .unwrap();
    assert_eq!(x.dims(), [3, 64]);
    assert!(flat(&x)
        .iter()
        .all(|v| *v >= 0.0 && *v <= 16.0 && v.fract() == 0.0));
}
