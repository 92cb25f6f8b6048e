//! The three language-model families on real transformers: gradients reach every parameter, the
//! KV cache reproduces the full forward pass, token filters are exact, prompts are respected,
//! and a short seeded training reaches a stated bits/char on a synthetic corpus.

use candle_core::{Device, Tensor};
use elbo::config::{Config, EvalOptions, ModelConfig, SampleOptions};
use elbo::data::text::{TextSource, Tokenizer};
use elbo::data::{DataKind, DataSource};
use elbo::discrete::filter::TokenFilter;
use elbo::model::{DataInfo, GenerativeModel};
use elbo::nn::rotary::RotaryAt;
use elbo::nn::transformer::{Positions, Transformer, TransformerConfig};
use elbo::nn::ParamInit;
use elbo::train::optim::named_vars;
use elbo::Rng;

fn small_cfg(name: &str) -> ModelConfig {
    sized_cfg(name, 16)
}

fn sized_cfg(name: &str, d_model: usize) -> ModelConfig {
    let mut c = Config::default();
    for kv in [
        format!("model.name={name}"),
        format!("model.transformer.d_model={d_model}"),
        "model.transformer.n_heads=2".into(),
        "model.transformer.n_layers=2".into(),
    ] {
        c.set(&kv).unwrap();
    }
    c.model
}

const INFO: DataInfo = DataInfo::flat(8, DataKind::Discrete { levels: 5 });

fn batch(rng: &mut Rng) -> Tensor {
    let v: Vec<f32> = (0..4 * 8).map(|_| rng.below(5) as f32).collect();
    Tensor::from_vec(v, (4, 8), &Device::Cpu).unwrap()
}

#[test]
fn every_parameter_gets_a_gradient() {
    for name in ["ar", "ao-ar", "mdlm"] {
        let mut rng = Rng::new(0);
        let m = small_cfg(name)
            .build(&INFO, &Device::Cpu, &mut rng)
            .unwrap();
        let loss = m.loss(&batch(&mut rng), &mut rng).unwrap();
        let grads = loss.backward().unwrap();
        for (n, v) in named_vars(m.varmap()).unwrap() {
            let g = grads.get(v.as_tensor());
            let norm = g
                .map(|g| {
                    g.sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap()
                })
                .unwrap_or(0.0);
            assert!(norm > 0.0, "{name}: parameter {n} has no gradient");
        }
    }
}

#[test]
fn kv_cache_matches_the_full_forward_pass() {
    for positions in [Positions::Learned, Positions::Rotary] {
        kv_cache_matches_with(positions);
    }
}

fn kv_cache_matches_with(positions: Positions) {
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let mut rng = Rng::new(3);
    let cfg = TransformerConfig {
        vocab_in: 7,
        vocab_out: 6,
        max_len: 10,
        d_model: 16,
        n_layers: 2,
        n_heads: 4,
        mask: elbo::nn::transformer::AttentionMask::Causal,
        positions,
    };
    let net = Transformer::new(&mut ParamInit::new(&varmap, &mut rng, &dev), cfg).unwrap();
    let ids: Vec<u32> = (0..2 * 9).map(|_| rng.below(7) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 9), &dev).unwrap();
    let extra = rng.normal_tensor(&[2, 9, 16], &dev).unwrap();
    let full = net.forward_with(&ids, Some(&extra)).unwrap();
    let plain = net.forward(&ids).unwrap();
    let none = net.forward_with(&ids, None).unwrap();
    let d0 = (plain - none)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d0, 0.0);
    let mut cache = net.new_cache();
    let mut parts = Vec::new();
    for (s, len) in [(0, 1), (1, 3), (4, 1), (5, 4)] {
        let e = extra.narrow(1, s, len).unwrap();
        parts.push(
            net.forward_cached(&ids.narrow(1, s, len).unwrap(), Some(&e), &mut cache)
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), 9);
    let cached = Tensor::cat(&parts, 1).unwrap();
    let d = (full - cached)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(d < 1e-4, "cached logits differ by {d} ({positions:?})");
    if positions != Positions::Rotary {
        assert!(net
            .forward_at(
                &ids,
                None,
                Some(RotaryAt::Rows {
                    q: &[0; 18],
                    k: &[0; 18]
                })
            )
            .is_err());
        return;
    }
    // per-token rotary positions (an any-order model's targets and sources), full vs cached
    let q: Vec<u32> = (0..18).map(|_| rng.below(10) as u32).collect();
    let k: Vec<u32> = (0..18).map(|_| rng.below(10) as u32).collect();
    let at = |v: &[u32], s: usize, len: usize| -> Vec<u32> {
        (0..2)
            .flat_map(|b| v[b * 9 + s..b * 9 + s + len].to_vec())
            .collect()
    };
    let full = net
        .forward_at(&ids, Some(&extra), Some(RotaryAt::Rows { q: &q, k: &k }))
        .unwrap();
    let mut cache = net.new_cache();
    let mut parts = Vec::new();
    for (s, len) in [(0, 2), (2, 1), (3, 6)] {
        let e = extra.narrow(1, s, len).unwrap();
        let (qs, ks) = (at(&q, s, len), at(&k, s, len));
        let rows = RotaryAt::Rows { q: &qs, k: &ks };
        let ids_s = ids.narrow(1, s, len).unwrap();
        parts.push(
            net.forward_cached_at(&ids_s, Some(&e), Some(rows), &mut cache)
                .unwrap(),
        );
    }
    let cached = Tensor::cat(&parts, 1).unwrap();
    let d = (&full - cached)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        d < 1e-4,
        "cached logits with per-token positions differ by {d}"
    );
    // and the positions matter
    let shifted: Vec<u32> = q.iter().map(|p| (p + 1) % 10).collect();
    let other = net
        .forward_at(
            &ids,
            Some(&extra),
            Some(RotaryAt::Rows { q: &shifted, k: &k }),
        )
        .unwrap();
    let moved = (full - other)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(moved > 1e-4, "query positions had no effect");
}

#[test]
fn top_k_and_top_p_filters_are_exact() {
    let logits = [2f32.ln(), 1f32.ln(), 4f32.ln(), 1f32.ln()]; // p = 2/8, 1/8, 4/8, 1/8
    let f = |temperature, top_k, top_p| {
        TokenFilter {
            temperature,
            top_k,
            top_p,
        }
        .probs(&logits)
    };
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9);
    assert!(close(&f(1.0, 0, 1.0), &[0.25, 0.125, 0.5, 0.125]));
    assert!(close(&f(1.0, 2, 1.0), &[1.0 / 3.0, 0.0, 2.0 / 3.0, 0.0]));
    assert!(close(&f(1.0, 1, 1.0), &[0.0, 0.0, 1.0, 0.0]));
    // nucleus 0.6: 0.5 < 0.6, then 0.75 >= 0.6 -> {2, 0}
    assert!(close(&f(1.0, 0, 0.6), &[1.0 / 3.0, 0.0, 2.0 / 3.0, 0.0]));
    assert!(close(&f(1.0, 0, 0.5), &[0.0, 0.0, 1.0, 0.0]));
    // temperature 2: p ∝ sqrt(p)
    let s: f64 = [2f64, 1.0, 4.0, 1.0].iter().map(|v| v.sqrt()).sum();
    assert!(close(
        &f(2.0, 0, 1.0),
        &[2f64.sqrt() / s, 1.0 / s, 2.0 / s, 1.0 / s]
    ));
    // empirical draws follow the filtered distribution
    let filt = TokenFilter {
        temperature: 1.0,
        top_k: 3,
        top_p: 1.0,
    };
    let mut rng = Rng::new(0);
    let mut counts = [0usize; 4];
    for _ in 0..20000 {
        counts[filt.sample(&logits, &mut rng) as usize] += 1;
    }
    let p = filt.probs(&logits);
    for k in 0..4 {
        assert!(
            (counts[k] as f64 / 20000.0 - p[k]).abs() < 0.015,
            "{counts:?} vs {p:?}"
        );
    }
    assert!(TokenFilter {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0
    }
    .validate()
    .is_err());
}

#[test]
fn prompts_are_kept_and_samples_are_valid() {
    let mut rng = Rng::new(1);
    let opts = SampleOptions {
        steps: 8,
        ..SampleOptions::default()
    };
    let prefix = [Some(1), Some(4), None, None, None, None, None, None];
    let infill = [Some(2), None, None, Some(3), None, None, None, Some(0)];
    for name in ["ar", "ao-ar", "mdlm"] {
        let m = small_cfg(name)
            .build(&INFO, &Device::Cpu, &mut rng)
            .unwrap();
        let x: Vec<Vec<f32>> = m
            .sample_conditional(5, &prefix, &opts, &mut rng)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert!(
            x.iter().all(|r| r[0] == 1.0 && r[1] == 4.0),
            "{name}: {x:?}"
        );
        assert!(x
            .iter()
            .flatten()
            .all(|&v| (0.0..5.0).contains(&v) && v.fract() == 0.0));
        let y = m.sample_conditional(3, &infill, &opts, &mut rng);
        if name == "ar" {
            assert!(y.is_err(), "ar cannot fill in blanks");
        } else {
            let y: Vec<Vec<f32>> = y.unwrap().to_vec2().unwrap();
            assert!(
                y.iter().all(|r| r[0] == 2.0 && r[3] == 3.0 && r[7] == 0.0),
                "{name}: {y:?}"
            );
        }
        let s = m.sample(2, &opts, &mut rng).unwrap();
        assert_eq!(s.dims(), [2, 8]);
        // labels: AR exact, the others bounds
        let nll = m
            .log_likelihood(&batch(&mut rng), &EvalOptions::default(), &mut rng)
            .unwrap();
        let want = if name == "ar" { "exact" } else { "bound" };
        assert_eq!(nll.kind.label(), want);
        assert!(nll.nats.iter().all(|v| v.is_finite() && *v > 0.0));
        // bad data is an error, not a panic
        let bad = Tensor::from_vec(vec![7f32; 8], (1, 8), &Device::Cpu).unwrap();
        assert!(m.loss(&bad, &mut rng).is_err());
    }
    let cont = DataInfo::flat(8, DataKind::Continuous);
    assert!(small_cfg("mdlm")
        .build(&cont, &Device::Cpu, &mut rng)
        .is_err());
}

/// A Markov chain over 4 symbols: next = prev + 1 (mod 4) w.p. 0.9, else one of the other 3.
/// Entropy rate 0.9 log2(1/0.9) + 0.1 log2(30) = 0.627 bits/char.
fn markov_corpus(n: usize, seed: u64) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    let mut x = vec![0u32];
    for _ in 1..n {
        let p = x[x.len() - 1];
        let next = if rng.uniform() < 0.9 {
            (p + 1) % 4
        } else {
            (p + 2 + rng.below(3) as u32) % 4
        };
        x.push(next);
    }
    x
}

fn train_bpc(name: &str, steps: usize) -> f64 {
    let (m, test, mut rng) = train_markov(name, steps);
    let opts = EvalOptions {
        lm_samples: 2,
        ..EvalOptions::default()
    };
    m.log_likelihood(&test, &opts, &mut rng)
        .unwrap()
        .summary()
        .bits_per_dim
}

/// A `name` model trained `steps` steps on the Markov corpus, its held-out windows and an RNG.
fn train_markov(name: &str, steps: usize) -> (Box<dyn GenerativeModel>, Tensor, Rng) {
    let tok = Tokenizer::Chars("abcd".chars().collect());
    let mut data = TextSource::new(
        "markov",
        tok,
        vec![markov_corpus(20000, 1)],
        &[markov_corpus(4000, 2)],
        16,
        64,
    )
    .unwrap();
    let cfg = Config {
        model: sized_cfg(name, 32),
        ..Config::default()
    };
    let dev = Device::Cpu;
    let info = DataInfo::flat(data.dim(), data.kind());
    let mut rng = Rng::new(0);
    let m = cfg.model.build(&info, &dev, &mut rng).unwrap();
    let params = named_vars(m.varmap()).unwrap();
    let mut opt = elbo::train::optim::AdamW::new(elbo::train::optim::AdamWConfig {
        lr: 3e-3,
        beta1: 0.9,
        beta2: 0.99,
        eps: 1e-8,
        weight_decay: 0.0,
    });
    for _ in 0..steps {
        let b = data.train_batch(32, &mut rng, &dev).unwrap();
        let g = m.loss(&b, &mut rng).unwrap().backward().unwrap();
        opt.step(&params, &g, 3e-3).unwrap();
    }
    let test = data.test_set(&dev).unwrap();
    (m, test, rng)
}

#[test]
fn short_training_reaches_the_stated_bits_per_char() {
    // entropy rate 0.63 bits/char, uniform 2 bits/char
    let ar = train_bpc("ar", 150);
    assert!(ar < 0.9, "AR {ar} bits/char");
    let md = train_bpc("mdlm", 150);
    assert!(md < 1.3, "MDLM {md} bits/char");
    eprintln!("AR {ar:.3}  MDLM {md:.3} bits/char");
}

#[test]
fn conditional_and_llada_likelihoods() {
    let opts = |likelihood: &str, prompt_len: usize| EvalOptions {
        lm_samples: 4,
        likelihood: likelihood.into(),
        prompt_len,
        ..EvalOptions::default()
    };
    // AR: -log p(rest | prompt) drops exactly the prompt's (positive) token NLLs
    let (ar, test, mut rng) = train_markov("ar", 60);
    let full = ar
        .log_likelihood(&test, &opts("auto", 0), &mut rng)
        .unwrap();
    let cond = ar
        .log_likelihood(&test, &opts("exact", 4), &mut rng)
        .unwrap();
    assert_eq!((full.dims, cond.dims), (16, 12));
    for (f, c) in full.nats.iter().zip(&cond.nats) {
        assert!(*c < *f && *c > 0.0, "conditional {c} vs full {f}");
    }
    assert!(ar.log_likelihood(&test, &opts("vlb", 0), &mut rng).is_err());
    assert!(ar
        .log_likelihood(&test, &opts("auto", 16), &mut rng)
        .is_err());
    // MDLM: LLaDA's estimator and the NELBO estimate the same bound
    let (md, test, mut rng) = train_markov("mdlm", 60);
    let nelbo = md
        .log_likelihood(&test, &opts("nelbo", 0), &mut rng)
        .unwrap()
        .summary();
    let llada = md
        .log_likelihood(&test, &opts("llada", 0), &mut rng)
        .unwrap()
        .summary();
    let se = (nelbo.stderr_nats.powi(2) + llada.stderr_nats.powi(2)).sqrt();
    assert!(
        (nelbo.nats - llada.nats).abs() < 4.0 * se,
        "NELBO {} vs LLaDA {} (se {se})",
        nelbo.nats,
        llada.nats
    );
    let cond = md
        .log_likelihood(&test, &opts("llada", 8), &mut rng)
        .unwrap();
    assert_eq!(cond.dims, 8);
    let bpc = cond.summary().bits_per_dim;
    assert!(
        bpc > 0.0 && bpc < 2.0,
        "conditional {bpc} bits/char (uniform is 2)"
    );
    assert!(md
        .log_likelihood(&test, &opts("nelbo", 8), &mut rng)
        .is_err());
    assert!(md
        .log_likelihood(&test, &opts("exact", 0), &mut rng)
        .is_err());
    let info = DataInfo::flat(16, DataKind::Discrete { levels: 4 });
    let ao = small_cfg("ao-ar")
        .build(&info, &Device::Cpu, &mut rng)
        .unwrap();
    assert!(ao
        .log_likelihood(&test, &opts("auto", 8), &mut rng)
        .is_err());
}
