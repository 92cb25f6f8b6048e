//! D3PM (Austin et al. 2021) against closed forms, Bayes' rule, simulation and an oracle whose
//! joint over V^L is known exactly: cumulative products, forward marginals, posteriors, the
//! variational bound (>= the exact NLL of the model's own reverse chain; for the absorbing
//! matrix equal to MDLM's T-step ELBO and approaching its continuous-time ELBO as T grows), the
//! Monte-Carlo estimate, and ancestral samples.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use elbo::discrete::d3pm::ancestral::{self, AncestralConfig};
use elbo::discrete::d3pm::transition::{
    matmul, DenseTransition, Matrix, MatrixKind, Schedule, StructuredTransition, Transition,
};
use elbo::discrete::d3pm::vlb::{
    posterior, reverse_log_probs, reverse_step, vlb, vlb_by_enumeration, X0Denoiser,
};
use elbo::discrete::filter::{sample_categorical, TokenFilter};
use elbo::discrete::masked_diffusion::{nelbo_by_enumeration, MaskDenoiser};
use elbo::{Result, Rng};

const V: usize = 3;
const L: usize = 3;

fn absorbing(steps: usize) -> StructuredTransition {
    StructuredTransition::new(MatrixKind::Absorbing, Schedule::MutualInformation, V, steps).unwrap()
}

fn uniform(steps: usize) -> StructuredTransition {
    StructuredTransition::new(MatrixKind::Uniform, Schedule::Cosine, V, steps).unwrap()
}

/// A nearest-neighbour-like custom chain on 4 states (3 data tokens and an extra state).
fn custom(steps: usize) -> DenseTransition {
    let mut r = Rng::new(11);
    let qs: Vec<Matrix> = (0..steps)
        .map(|_| {
            (0..V + 1)
                .map(|i| {
                    let w: Vec<f64> = (0..V + 1)
                        .map(|j| if i == j { 3.0 } else { 0.2 + r.uniform() })
                        .collect();
                    let z: f64 = w.iter().sum();
                    w.iter().map(|x| x / z).collect()
                })
                .collect()
        })
        .collect();
    DenseTransition::new(qs, V, vec![0.25; V + 1]).unwrap()
}

fn all_seqs(k: usize) -> Vec<Vec<u32>> {
    (0..k.pow(L as u32))
        .map(|c| (0..L).map(|i| (c / k.pow(i as u32) % k) as u32).collect())
        .collect()
}

/// p~(x_0 | x_t): for a joint (`joint = Some`) the denoiser whose reverse step (D3PM eq. 4) is
/// the true per-token q(x_{t-1}^i | x_t), `p~(x0^i) ∝ q(x0^i | x_t) / q(x_t^i | x0^i)` (the
/// posterior itself for the absorbing matrix); otherwise arbitrary time-independent conditionals
/// from a hash of x_t.
struct Oracle<'a> {
    joint: Option<Vec<f64>>,
    tr: &'a dyn Transition,
    seed: u64,
}

impl<'a> Oracle<'a> {
    fn joint(seed: u64, tr: &'a dyn Transition) -> Self {
        let mut r = Rng::new(seed);
        let w: Vec<f64> = (0..V.pow(L as u32)).map(|_| 0.05 + r.uniform()).collect();
        let z: f64 = w.iter().sum();
        Self {
            joint: Some(w.iter().map(|x| x / z).collect()),
            tr,
            seed,
        }
    }
    fn arbitrary(seed: u64, tr: &'a dyn Transition) -> Self {
        Self {
            joint: None,
            tr,
            seed,
        }
    }
    fn p(&self, x: &[u32]) -> f64 {
        let j = self.joint.as_ref().unwrap();
        j[x.iter().rev().fold(0, |a, &d| a * V + d as usize)]
    }
    fn row(&self, xt: &[u32], t: usize) -> Vec<f32> {
        match &self.joint {
            Some(_) => {
                // q(x_t^j | x_0^j = v) for every position and value
                let lik: Vec<Vec<f64>> = (0..V)
                    .map(|v| {
                        let mut e = vec![0.0; V];
                        e[v] = 1.0;
                        self.tr.propagate(&e, t)
                    })
                    .collect();
                let mut m = [1e-300; L * V];
                for x in all_seqs(V) {
                    let w: f64 = self.p(&x)
                        * (0..L)
                            .map(|j| lik[x[j] as usize][xt[j] as usize])
                            .product::<f64>();
                    for i in 0..L {
                        m[i * V + x[i] as usize] += w;
                    }
                }
                // eq. 4 weighs p~(x0) by q(x_t | x0): divide it out so the reverse step is the
                // true q(x_{t-1} | x_t) per token
                for i in 0..L {
                    for v in 0..V {
                        let l = lik[v][xt[i] as usize];
                        m[i * V + v] = if l > 0.0 { m[i * V + v] / l } else { 1e-300 };
                    }
                }
                m.chunks(V)
                    .flat_map(|c| {
                        let z: f64 = c.iter().sum();
                        c.iter().map(move |v| (v / z).ln() as f32)
                    })
                    .collect()
            }
            None => (0..L)
                .flat_map(|i| {
                    let code = xt.iter().fold(i as u64, |a, &t| a * 7 + u64::from(t));
                    let mut r = Rng::new(self.seed ^ code.wrapping_mul(0x9E37_79B9));
                    let lg: Vec<f64> = (0..V).map(|_| 2.0 * r.normal()).collect();
                    let lse = lg.iter().map(|v| v.exp()).sum::<f64>().ln();
                    lg.into_iter().map(move |v| (v - lse) as f32)
                })
                .collect(),
        }
    }
}

impl X0Denoiser for Oracle<'_> {
    fn vocab(&self) -> usize {
        V
    }
    fn log_probs(&self, xt: &Tensor, time: &[f64]) -> Result<Tensor> {
        let rows: Vec<Vec<u32>> = xt.to_vec2()?;
        let steps = self.tr.steps() as f64;
        let v: Vec<f32> = rows
            .iter()
            .zip(time)
            .flat_map(|(r, &u)| self.row(r, (u * steps).round() as usize))
            .collect();
        Ok(Tensor::from_vec(v, (rows.len(), L, V), &Device::Cpu)?)
    }
}

impl MaskDenoiser for Oracle<'_> {
    fn vocab(&self) -> usize {
        V
    }
    fn log_probs(&self, xt: &Tensor) -> Result<Tensor> {
        let n = xt.dim(0)?;
        X0Denoiser::log_probs(self, xt, &vec![1.0; n])
    }
}

fn max_diff(a: &Matrix, b: &Matrix) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn cumulative_products_match_one_step_matrices_and_simulation() {
    let (u, a, c) = (uniform(20), absorbing(20), custom(6));
    let trs: [(&str, &dyn Transition); 3] = [("uniform", &u), ("absorbing", &a), ("custom", &c)];
    for (name, tr) in trs {
        let dense = DenseTransition::of(tr).unwrap();
        for (s, t) in [(0, 1), (0, 5), (2, 6), (3, 3), (1, tr.steps())] {
            let closed = tr.between(s, t);
            let prod = (s + 1..=t).fold(dense.between(s, s), |m, r| matmul(&m, &tr.step(r)));
            assert!(max_diff(&closed, &prod) < 1e-12, "{name} Qbar_({t}|{s})");
            for j in 0..tr.states() {
                let col: Vec<f64> = prod.iter().map(|r| r[j]).collect();
                let got = tr.column(s, t, j);
                let d = got.iter().zip(&col).map(|(x, y)| (x - y).abs());
                assert!(d.fold(0.0, f64::max) < 1e-12, "{name} column {j}");
            }
            let p = [0.2, 0.5, 0.3];
            let want: Vec<f64> = (0..tr.states())
                .map(|j| (0..V).map(|i| p[i] * tr.cumulative(s)[i][j]).sum())
                .collect();
            let got = tr.propagate(&p, s);
            assert!(got.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-12));
        }
        // the forward marginal x_0 Qbar_t against iterating the chain step by step
        let (t, n) = (tr.steps() / 2, 20_000);
        let mut rng = Rng::new(3);
        let mut freq = vec![0.0; tr.states()];
        for _ in 0..n {
            let mut x = 1usize;
            for r in 1..=t {
                x = sample_categorical(&tr.step(r)[x], &mut rng) as usize;
            }
            freq[x] += 1.0 / n as f64;
        }
        let exact = &tr.cumulative(t)[1];
        for (f, e) in freq.iter().zip(exact) {
            // 4.5 standard errors of a frequency of 20000 draws
            assert!((f - e).abs() < 4.5 * (e * (1.0 - e) / n as f64).sqrt() + 1e-9);
        }
    }
    // the mutual-information schedule is beta_t = 1/(T - t + 1) for the absorbing matrix
    for t in 1..=20 {
        let b = a.step(t)[0][V];
        assert!((b - 1.0 / (21 - t) as f64).abs() < 1e-12, "beta_{t} = {b}");
    }
    // the uniform matrix mixes to the uniform prior; absorbing ends all MASK
    assert!(u.cumulative(20)[0]
        .iter()
        .all(|x| (x - 1.0 / 3.0).abs() < 1e-9));
    assert!((a.cumulative(20)[0][V] - 1.0).abs() < 1e-12);
}

#[test]
fn posterior_is_bayes_rule_and_the_batched_reverse_matches() {
    let (u, a, c) = (uniform(12), absorbing(12), custom(5));
    let trs: [(&str, &dyn Transition); 3] = [("uniform", &u), ("absorbing", &a), ("custom", &c)];
    let mut rng = Rng::new(4);
    for (name, tr) in trs {
        let k = tr.states();
        let dense = DenseTransition::of(tr).unwrap();
        for (s, t) in [(0, 1), (2, 3), (1, 4), (0, tr.steps())] {
            let (qs, qts, qt) = (
                dense.cumulative(s),
                dense.between(s, t),
                dense.cumulative(t),
            );
            for x0 in 0..V {
                for xt in 0..k {
                    if qt[x0][xt] == 0.0 {
                        continue;
                    }
                    let got = posterior(tr, x0 as u32, xt as u32, s, t);
                    for (j, g) in got.iter().enumerate() {
                        let bayes = qs[x0][j] * qts[j][xt] / qt[x0][xt];
                        assert!((g - bayes).abs() < 1e-10, "{name} q(x_{s}={j}|{xt},{x0})");
                    }
                }
            }
        }
        // the batched, differentiable reverse step against the per-token one
        let b = 4;
        let logits: Vec<f32> = (0..b * L * V).map(|_| rng.normal() as f32).collect();
        let lp = elbo::nn::transformer::log_softmax_last_dim(
            &Tensor::from_vec(logits, (b, L, V), &Device::Cpu).unwrap(),
        )
        .unwrap();
        let xt: Vec<Vec<u32>> = (0..b)
            .map(|_| (0..L).map(|_| rng.below(k) as u32).collect())
            .collect();
        let (s, t) = (vec![0, 1, 2, 3], vec![1, 3, 4, tr.steps()]);
        let got: Vec<Vec<Vec<f32>>> = reverse_log_probs(tr, &lp, &xt, &s, &t)
            .unwrap()
            .to_vec3()
            .unwrap();
        let p0: Vec<Vec<Vec<f32>>> = lp.exp().unwrap().to_vec3().unwrap();
        for r in 0..b {
            for i in 0..L {
                let p: Vec<f64> = p0[r][i].iter().map(|&x| f64::from(x)).collect();
                let want = reverse_step(tr, &p, xt[r][i], s[r], t[r]);
                if want.iter().sum::<f64>() == 0.0 {
                    continue; // x_t unreachable at t (a data token at T, absorbing)
                }
                for (g, w) in got[r][i].iter().zip(&want) {
                    assert!((f64::from(g.exp()) - w).abs() < 1e-5, "{name}: {g} vs {w}");
                }
            }
        }
    }
}

/// The exact marginal of the model's own reverse chain over V^L: p(x_T) then every step's
/// factorised p(x_{t-1} | x_t), on all K^L states.
fn reverse_chain_marginal(tr: &dyn Transition, den: &dyn X0Denoiser) -> HashMap<Vec<u32>, f64> {
    let k = tr.states();
    let prior = tr.prior();
    let mut dist: HashMap<Vec<u32>, f64> = all_seqs(k)
        .into_iter()
        .map(|x| {
            let p = x.iter().map(|&s| prior[s as usize]).product();
            (x, p)
        })
        .filter(|(_, p)| *p > 0.0)
        .collect();
    for t in (1..=tr.steps()).rev() {
        let states: Vec<Vec<u32>> = dist.keys().cloned().collect();
        let ids = elbo::discrete::ids_tensor(&states, &Device::Cpu).unwrap();
        let time = vec![t as f64 / tr.steps() as f64; states.len()];
        let lp: Vec<Vec<Vec<f32>>> = den.log_probs(&ids, &time).unwrap().to_vec3().unwrap();
        let mut next = HashMap::new();
        for (x, l) in states.iter().zip(&lp) {
            let steps: Vec<Vec<f64>> = (0..L)
                .map(|i| {
                    let p: Vec<f64> = l[i].iter().map(|&v| f64::from(v).exp()).collect();
                    reverse_step(tr, &p, x[i], t - 1, t)
                })
                .collect();
            for y in all_seqs(k) {
                let w: f64 = (0..L).map(|i| steps[i][y[i] as usize]).product();
                if w > 0.0 {
                    *next.entry(y).or_insert(0.0) += dist[x] * w;
                }
            }
        }
        dist = next;
    }
    dist
}

#[test]
fn vlb_bounds_the_exact_nll_of_the_reverse_chain() {
    let (u, a, c) = (uniform(6), absorbing(6), custom(4));
    let trs: [(&str, &dyn Transition); 3] = [("uniform", &u), ("absorbing", &a), ("custom", &c)];
    for (name, tr) in trs {
        for exact in [false, true] {
            let den = if exact {
                Oracle::joint(2, tr)
            } else {
                Oracle::arbitrary(5, tr)
            };
            let marg = reverse_chain_marginal(tr, &den);
            let total: f64 = marg.values().sum();
            assert!(
                (total - 1.0).abs() < 1e-6,
                "{name}: reverse chain mass {total}"
            );
            let mut gaps = 0.0;
            for x in all_seqs(V) {
                let bound = vlb_by_enumeration(tr, &den, &x).unwrap();
                let nll = -marg.get(&x).copied().unwrap_or(0.0).ln();
                assert!(bound >= nll - 1e-4, "{name}/{exact} {x:?}: {bound} < {nll}");
                gaps += bound - nll;
            }
            assert!(
                gaps > 1e-3,
                "{name}/{exact}: the bound should not be tight at T = 6"
            );
        }
    }
}

#[test]
fn absorbing_vlb_is_mdlm_discrete_elbo_and_approaches_the_continuous_one() {
    let tr1 = absorbing(1);
    let den = Oracle::arbitrary(9, &tr1); // time-independent
    for x in [[2u32, 0, 1], [1, 1, 0]] {
        let continuous = nelbo_by_enumeration(&den, &x, 0).unwrap();
        // |gap| (the discrete bound may lie below the continuous one for a denoiser that is
        // not a joint's conditionals): measured 0.26 / 0.025 / 0.0025 nats of 8.6
        let mut last_gap = f64::INFINITY;
        for t in [10, 100, 1000] {
            let tr = absorbing(t);
            let d3pm = vlb_by_enumeration(&tr, &den, &x).unwrap();
            let mdlm = nelbo_by_enumeration(&den, &x, t).unwrap();
            // the same bound: weight 1/t on the masked cross-entropy (MDLM eq. 8)
            assert!((d3pm - mdlm).abs() < 1e-4, "T={t}: {d3pm} vs {mdlm}");
            let gap = d3pm - continuous;
            // first order in 1/T: each tenfold T shrinks the gap at least fivefold
            assert!(
                gap.abs() < 0.2 * last_gap,
                "T={t}: gap {gap} after {last_gap}"
            );
            last_gap = gap.abs();
        }
        assert!(
            last_gap < 1e-3 * continuous,
            "T=1000: gap {last_gap} of {continuous}"
        );
    }
}

#[test]
fn monte_carlo_vlb_agrees_with_the_exact_sum() {
    let (u, a) = (uniform(40), absorbing(40));
    let trs: [(&str, &dyn Transition); 2] = [("uniform", &u), ("absorbing", &a)];
    for (name, tr) in trs {
        let den = Oracle::arbitrary(7, tr);
        let x = [0u32, 2, 1];
        let exact = vlb_by_enumeration(tr, &den, &x).unwrap();
        let ids = Tensor::from_vec(x.to_vec(), (1, L), &Device::Cpu)
            .unwrap()
            .repeat((1500, 1))
            .unwrap();
        let v = vlb(tr, &den, &ids, 2, &mut Rng::new(1)).unwrap();
        let (m, se) = elbo::likelihood::mean_stderr(&v);
        assert!(
            (m - exact).abs() < 3.0 * se,
            "{name}: MC {m} ± {se} vs {exact}"
        );
    }
}

fn total_variation(tr: &dyn Transition, oracle: &Oracle, steps: usize, n: usize) -> f64 {
    let cfg = AncestralConfig {
        steps,
        filter: TokenFilter::default(),
    };
    let rows = ancestral::sample(
        tr,
        oracle,
        &[None; L],
        n,
        &cfg,
        &mut Rng::new(8),
        &Device::Cpu,
    )
    .unwrap();
    let mut freq: HashMap<Vec<u32>, f64> = HashMap::new();
    for r in rows {
        *freq.entry(r).or_insert(0.0) += 1.0 / n as f64;
    }
    0.5 * all_seqs(V)
        .iter()
        .map(|x| (freq.get(x).copied().unwrap_or(0.0) - oracle.p(x)).abs())
        .sum::<f64>()
}

#[test]
fn exact_reverse_chain_converges_to_the_joint() {
    // the factorised reverse step is exact only one token change at a time: TV = O(1/T)
    let (u10, u50, u200) = (uniform(10), uniform(50), uniform(200));
    let (a10, a50, a200) = (absorbing(10), absorbing(50), absorbing(200));
    for (name, trs) in [
        ("uniform", [&u10, &u50, &u200]),
        ("absorbing", [&a10, &a50, &a200]),
    ] {
        let mut last = f64::INFINITY;
        for tr in trs {
            let o = Oracle::joint(2, tr);
            let m = reverse_chain_marginal(tr, &o);
            let tv = 0.5
                * all_seqs(V)
                    .iter()
                    .map(|x| (m.get(x).copied().unwrap_or(0.0) - o.p(x)).abs())
                    .sum::<f64>();
            assert!(tv < last, "{name} T={}: TV {tv} after {last}", tr.steps());
            last = tv;
        }
        assert!(last < 0.003, "{name} T=200: TV {last}");
    }
}

#[test]
fn ancestral_samples_match_the_joint() {
    // 4000 draws over 27 outcomes: the sampling noise alone gives TV about 0.03; 50 of T = 1000
    // steps (skipping with Qbar_{t|s})
    let a = absorbing(1000);
    let tv = total_variation(&a, &Oracle::joint(2, &a), 50, 4000);
    assert!(tv < 0.06, "absorbing: TV {tv}");
    let u = uniform(1000);
    let tv = total_variation(&u, &Oracle::joint(2, &u), 50, 4000);
    assert!(tv < 0.06, "uniform: TV {tv}");
    // one step from the prior cannot reach the joint's correlations: the test can fail
    let tv1 = total_variation(&a, &Oracle::joint(2, &a), 1, 4000);
    assert!(tv1 > tv.max(0.06), "one step: TV {tv1}");
}

#[test]
fn the_uniform_model_gives_every_parameter_a_gradient_and_a_finite_bound() {
    use elbo::config::{EvalOptions, SampleOptions};
    use elbo::data::DataKind;
    use elbo::model::{DataInfo, GenerativeModel};
    use elbo::models::d3pm::{Config, D3pm};
    // the contract test covers the default (absorbing); the uniform matrix adds the time input
    let cfg = Config {
        matrix: MatrixKind::Uniform,
        schedule: Schedule::Cosine,
        diffusion_steps: 50,
        transformer: elbo::discrete::TransformerSettings {
            d_model: 16,
            n_heads: 2,
            n_layers: 1,
            ..Default::default()
        },
        ..Config::default()
    };
    let info = DataInfo::flat(6, DataKind::Discrete { levels: 5 });
    let model = D3pm::new(&cfg, info, &Device::Cpu, &mut Rng::new(0)).unwrap();
    let params: usize = elbo::train::optim::named_vars(model.varmap())
        .unwrap()
        .iter()
        .map(|(_, v)| v.as_tensor().elem_count())
        .sum();
    let est = elbo::models::FamilyConfig::memory_estimate(&cfg, &info, 8);
    assert_eq!(est.params, params as u64, "uniform: V input ids, no MASK");
    let mut rng = Rng::new(1);
    let x: Vec<f32> = (0..8 * 6).map(|_| rng.below(5) as f32).collect();
    let batch = Tensor::from_vec(x, (8, 6), &Device::Cpu).unwrap();
    let grads = model.loss(&batch, &mut rng).unwrap().backward().unwrap();
    for (name, var) in elbo::train::optim::named_vars(model.varmap()).unwrap() {
        let g = grads.get(var.as_tensor()).expect(&name);
        let n: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: gradient norm {n}");
    }
    let nll = model
        .log_likelihood(&batch, &EvalOptions::default(), &mut rng)
        .unwrap();
    assert!(nll.nats.iter().all(|v| v.is_finite() && *v > 0.0));
    let s = model
        .sample(3, &SampleOptions::default(), &mut rng)
        .unwrap();
    assert_eq!(s.dims(), [3, 6]);
    // a bad setting names its key
    let bad = Config {
        diffusion_steps: 0,
        ..Config::default()
    };
    let e = D3pm::new(&bad, info, &Device::Cpu, &mut Rng::new(0))
        .err()
        .unwrap();
    assert!(e.to_string().contains("diffusion_steps"), "{e}");
}
