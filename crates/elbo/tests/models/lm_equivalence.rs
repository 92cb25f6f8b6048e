//! Seeds 001/004 as tests: with a "network" whose conditionals are known exactly, the MDLM NELBO
//! equals the any-order AR expected NLL, both bound the exact NLL, and the Monte-Carlo
//! estimators (MDLM antithetic times, LLaDA, random orders) agree with the closed forms.

use candle_core::{Device, Tensor};
use elbo::discrete::any_order::{bound_and_mixture_nll, jensen_bound, MaskedAlongOrder};
use elbo::discrete::filter::TokenFilter;
use elbo::discrete::masked_diffusion::{
    llada_conditional_nll, nelbo, nelbo_by_enumeration, MaskDenoiser,
};
use elbo::discrete::sampler::{self, MaskedSampleConfig, MaskedSampler};
use elbo::{Result, Rng};

const V: usize = 3;
const L: usize = 3;

/// Conditionals over V^L: exact ones of a joint (`joint = Some`) or arbitrary (inconsistent)
/// ones drawn from a hash of the visible pattern.
struct Oracle {
    joint: Option<Vec<f64>>,
    seed: u64,
    calls: std::cell::Cell<usize>,
}

fn all_seqs() -> Vec<Vec<u32>> {
    (0..V.pow(L as u32))
        .map(|mut c| {
            (0..L)
                .map(|_| {
                    let d = (c % V) as u32;
                    c /= V;
                    d
                })
                .collect()
        })
        .collect()
}

impl Oracle {
    fn joint(seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let w: Vec<f64> = (0..V.pow(L as u32)).map(|_| 0.05 + r.uniform()).collect();
        let z: f64 = w.iter().sum();
        Self {
            joint: Some(w.iter().map(|x| x / z).collect()),
            seed,
            calls: 0.into(),
        }
    }
    fn arbitrary(seed: u64) -> Self {
        Self {
            joint: None,
            seed,
            calls: 0.into(),
        }
    }
    fn row(&self, xt: &[u32], i: usize) -> Vec<f32> {
        let mask = V as u32;
        match &self.joint {
            Some(p) => {
                let mut m = [1e-300; V];
                for (x, &px) in all_seqs().iter().zip(p) {
                    if (0..L).all(|j| xt[j] == mask || xt[j] == x[j]) {
                        m[x[i] as usize] += px;
                    }
                }
                let z: f64 = m.iter().sum();
                m.iter().map(|v| (v / z).ln() as f32).collect()
            }
            None => {
                let code = xt.iter().fold(i as u64, |a, &t| a * 7 + u64::from(t));
                let mut r = Rng::new(self.seed ^ code.wrapping_mul(0x9E37_79B9));
                let lg: Vec<f64> = (0..V).map(|_| 2.0 * r.normal()).collect();
                let lse = lg.iter().map(|v| v.exp()).sum::<f64>().ln();
                lg.iter().map(|v| (v - lse) as f32).collect()
            }
        }
    }
}

impl MaskDenoiser for Oracle {
    fn vocab(&self) -> usize {
        V
    }
    fn log_probs(&self, xt: &Tensor) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        let rows: Vec<Vec<u32>> = xt.to_vec2()?;
        let v: Vec<f32> = rows
            .iter()
            .flat_map(|r| (0..L).flat_map(|i| self.row(r, i)).collect::<Vec<_>>())
            .collect();
        Ok(Tensor::from_vec(v, (rows.len(), L, V), &Device::Cpu)?)
    }
}

#[test]
fn mdlm_nelbo_equals_any_order_bound_and_bounds_the_exact_nll() {
    let arb = Oracle::arbitrary(5);
    let mut strict = 0;
    for x in all_seqs() {
        let elbo = nelbo_by_enumeration(&arb, &x, 0).unwrap();
        let (bound, mix) = bound_and_mixture_nll(&MaskedAlongOrder(&arb), &x).unwrap();
        assert!(
            (elbo - bound).abs() < 1e-4,
            "{x:?}: NELBO {elbo} vs any-order {bound}"
        );
        assert!(bound >= mix - 1e-6, "{x:?}: bound {bound} < exact {mix}");
        if bound > mix + 1e-3 {
            strict += 1;
        }
    }
    assert!(
        strict > 20,
        "Jensen gap should be positive for inconsistent conditionals"
    );
    // exact conditionals of a joint: every order gives -log p(x), so all three coincide
    let ex = Oracle::joint(2);
    for (x, p) in all_seqs().iter().zip(ex.joint.clone().unwrap()) {
        let elbo = nelbo_by_enumeration(&ex, x, 0).unwrap();
        let (bound, mix) = bound_and_mixture_nll(&MaskedAlongOrder(&ex), x).unwrap();
        for v in [elbo, bound, mix] {
            assert!((v + p.ln()).abs() < 1e-4, "{x:?}: {v} vs {}", -p.ln());
        }
    }
}

fn ids(x: &[u32], n: usize) -> Tensor {
    Tensor::from_vec(x.to_vec(), (1, L), &Device::Cpu)
        .unwrap()
        .repeat((n, 1))
        .unwrap()
}

fn mean_se(v: &[f64]) -> (f64, f64) {
    elbo::likelihood::mean_stderr(v)
}

#[test]
fn monte_carlo_estimators_match_closed_forms() {
    let arb = Oracle::arbitrary(9);
    let x = [2u32, 0, 1];
    let exact = nelbo_by_enumeration(&arb, &x, 0).unwrap();
    let mut rng = Rng::new(0);
    // MDLM: continuous time, 4 antithetic times per example, 2000 examples
    let v = nelbo(&arb, &ids(&x, 2000), 4, 0, &mut rng).unwrap();
    let (m, se) = mean_se(&v);
    assert!(
        (m - exact).abs() < 4.0 * se + 1e-3,
        "MDLM MC {m} ± {se} vs {exact}"
    );
    // discrete T = 4: its own closed form, and different from continuous time
    let exact4 = nelbo_by_enumeration(&arb, &x, 4).unwrap();
    let v = nelbo(&arb, &ids(&x, 2000), 4, 4, &mut rng).unwrap();
    let (m4, se4) = mean_se(&v);
    assert!(
        (m4 - exact4).abs() < 4.0 * se4 + 1e-3,
        "T=4 MC {m4} ± {se4} vs {exact4}"
    );
    assert!((exact4 - exact).abs() > 1e-3);
    let exact1000 = nelbo_by_enumeration(&arb, &x, 1000).unwrap();
    assert!(
        (exact1000 - exact).abs() < 0.01 * exact,
        "T=1000 {exact1000} vs {exact}"
    );
    // LLaDA's estimator with every position an answer has the same expectation
    let v = llada_conditional_nll(&arb, &ids(&x, 1), &[true; L], 4000, &mut rng).unwrap();
    let (m, se) = v[0];
    assert!(
        se > 0.0 && (m - exact).abs() < 4.0 * se,
        "LLaDA {m} ± {se} vs {exact}"
    );
    // any-order: random orders
    let (bound, _) = bound_and_mixture_nll(&MaskedAlongOrder(&arb), &x).unwrap();
    let v = jensen_bound(&MaskedAlongOrder(&arb), &ids(&x, 3000), 1, &mut rng).unwrap();
    let (m, se) = mean_se(&v);
    assert!(
        (m - bound).abs() < 4.0 * se,
        "orders MC {m} ± {se} vs {bound}"
    );
}

#[test]
fn llada_conditional_likelihood_of_an_answer_given_a_prompt() {
    // exact conditionals: -log p(x_1, x_2 | x_0) = -log p(x) + log p(x_0)
    let ex = Oracle::joint(4);
    let p = ex.joint.clone().unwrap();
    let x = [1u32, 2, 0];
    let px: f64 = all_seqs()
        .iter()
        .zip(&p)
        .filter(|(s, _)| *s == &x)
        .map(|(_, v)| v)
        .sum();
    let p0: f64 = all_seqs()
        .iter()
        .zip(&p)
        .filter(|(s, _)| s[0] == x[0])
        .map(|(_, v)| v)
        .sum();
    let want = -(px / p0).ln();
    let mut rng = Rng::new(1);
    let v = llada_conditional_nll(&ex, &ids(&x, 1), &[false, true, true], 3000, &mut rng).unwrap();
    let (m, se) = v[0];
    assert!(
        (m - want).abs() < 4.0 * se + 1e-4,
        "LLaDA conditional {m} ± {se} vs {want}"
    );
}

fn tv_to_joint(samples: &[Vec<u32>], joint: &[f64]) -> f64 {
    let seqs = all_seqs();
    let n = samples.len() as f64;
    seqs.iter()
        .zip(joint)
        .map(|(s, p)| (samples.iter().filter(|x| *x == s).count() as f64 / n - p).abs())
        .sum::<f64>()
        / 2.0
}

#[test]
fn samplers_draw_from_the_joint_and_the_cache_saves_calls() {
    let ex = Oracle::joint(3);
    let joint = ex.joint.clone().unwrap();
    let n = 3000;
    let init = vec![vec![V as u32; L]; n];
    let mut cfg = MaskedSampleConfig {
        sampler: MaskedSampler::Ancestral,
        steps: 50,
        block_len: 0,
        filter: TokenFilter::default(),
    };
    let (a, sa) = sampler::sample(&ex, init.clone(), &cfg, &mut Rng::new(7)).unwrap();
    assert_eq!(sa.nfe, 50);
    // the cache: same samples, a call only when something unmasks (<= 4 rows x L tokens)
    let few = vec![vec![V as u32; L]; 4];
    let (a4, s4) = sampler::sample(&ex, few.clone(), &cfg, &mut Rng::new(7)).unwrap();
    cfg.sampler = MaskedSampler::Cached;
    let (c4, sc) = sampler::sample(&ex, few, &cfg, &mut Rng::new(7)).unwrap();
    assert_eq!(a4, c4, "cached sampling must give the same samples");
    assert_eq!(s4.nfe, 50);
    assert!(sc.nfe <= 4 * L, "cache: {} calls", sc.nfe);
    // one row: at most L unmasking events, so at most L calls whatever the step count
    cfg.steps = 1000;
    let (_, s1) = sampler::sample(&ex, vec![vec![V as u32; L]], &cfg, &mut Rng::new(1)).unwrap();
    assert!(s1.nfe <= L, "{} calls for {L} tokens", s1.nfe);
    let tv = tv_to_joint(&a, &joint);
    assert!(tv < 0.05, "ancestral samples: total variation {tv}");
    // remasking samplers and semi-autoregressive blocks: every mask filled, prompt kept
    for (s, block) in [
        (MaskedSampler::LowConfidence, 0),
        (MaskedSampler::Random, 1),
    ] {
        let cfg = MaskedSampleConfig {
            sampler: s,
            steps: 3,
            block_len: block,
            filter: TokenFilter::default(),
        };
        let init = vec![vec![1, V as u32, V as u32]; 200];
        let (x, st) = sampler::sample(&ex, init, &cfg, &mut Rng::new(2)).unwrap();
        assert!(x
            .iter()
            .all(|r| r[0] == 1 && r.iter().all(|&t| (t as usize) < V)));
        assert!(st.nfe <= 3, "{s:?}: {} calls", st.nfe);
    }
    // random remasking with one token per step is ancestral sampling in a random order: exact
    let cfg = MaskedSampleConfig {
        sampler: MaskedSampler::Random,
        steps: L,
        block_len: 0,
        filter: TokenFilter::default(),
    };
    let (r, _) = sampler::sample(&ex, init, &cfg, &mut Rng::new(3)).unwrap();
    let tv = tv_to_joint(&r, &joint);
    assert!(tv < 0.05, "random-order samples: total variation {tv}");
}
