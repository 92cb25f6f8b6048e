//! SEDD against an oracle whose joint over V^L is known exactly: the forward marginals against
//! the matrix exponential and a simulated jump process, the score entropy minimised by the
//! exact ratios, the score-entropy bound (tight for the absorbing graph with exact ratios, a
//! sub-probability for arbitrary ones), its Monte-Carlo estimate, and both samplers' samples
//! against the joint.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{Device, Tensor};
use elbo::discrete::filter::TokenFilter;
use elbo::discrete::graph::{Graph, GraphKind, NoiseKind, NoiseSchedule};
use elbo::discrete::ratio_sampler::{self, RatioSampleConfig, RatioSampler};
use elbo::discrete::score_entropy::{bound_schedule, dse_terms, elbo, prior_term, RatioModel};
use elbo::{Result, Rng};

const V: usize = 3;
const L: usize = 3;
const CPU: Device = Device::Cpu;

/// Every row of `L` states in `0..base`, position 0 fastest.
fn rows(base: usize) -> Vec<Vec<u32>> {
    (0..base.pow(L as u32))
        .map(|mut c| {
            (0..L)
                .map(|_| {
                    let d = (c % base) as u32;
                    c /= base;
                    d
                })
                .collect()
        })
        .collect()
}

fn index(row: &[u32], base: usize) -> usize {
    row.iter().rev().fold(0, |a, &d| a * base + d as usize)
}

/// Exact ratios `p_t(x^{i<-y}) / p_t(x)` of a known joint, times `exp(perturb * n(x, i, y))`
/// with a fixed pseudo-random `n` (0: exact).
struct Oracle {
    graph: Graph,
    joint: Vec<f64>,
    perturb: f64,
    seed: u64,
    /// p_t over all rows of states, per sigma_bar.
    cache: RefCell<HashMap<u64, Vec<f64>>>,
}

impl Oracle {
    fn new(kind: GraphKind, seed: u64) -> Self {
        let mut r = Rng::new(seed);
        let w: Vec<f64> = (0..V.pow(L as u32))
            .map(|_| (1.5 * r.normal()).exp())
            .collect();
        let z: f64 = w.iter().sum();
        Self {
            graph: Graph { kind, vocab: V },
            joint: w.iter().map(|x| x / z).collect(),
            perturb: 0.0,
            seed,
            cache: RefCell::new(HashMap::new()),
        }
    }

    fn perturbed(mut self, perturb: f64) -> Self {
        self.perturb = perturb;
        self
    }

    fn marginal(&self, sbar: f64) -> Vec<f64> {
        let key = sbar.to_bits();
        if let Some(p) = self.cache.borrow().get(&key) {
            return p.clone();
        }
        let g = self.graph;
        let s = g.states();
        let mut pt = vec![0.0; s.pow(L as u32)];
        for (x0, &p0) in rows(V).iter().zip(&self.joint) {
            let tr: Vec<Vec<f64>> = x0.iter().map(|&a| g.transition(a, sbar)).collect();
            for (k, x) in rows(s).iter().enumerate() {
                pt[k] += p0 * (0..L).map(|i| tr[i][x[i] as usize]).product::<f64>();
            }
        }
        self.cache.borrow_mut().insert(key, pt.clone());
        pt
    }

    fn noise(&self, x: &[u32], i: usize, y: usize) -> f64 {
        let code = x
            .iter()
            .fold((i * V + y) as u64, |a, &t| a * 11 + u64::from(t));
        let mut r = Rng::new(self.seed ^ code.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.normal()
    }
}

impl RatioModel for Oracle {
    fn graph(&self) -> Graph {
        self.graph
    }

    fn log_ratios(&self, xt: &Tensor, sigma_bar: &[f64]) -> Result<Tensor> {
        let s = self.graph.states();
        let xs: Vec<Vec<u32>> = xt.to_vec2()?;
        let mut out = Vec::with_capacity(xs.len() * L * V);
        for (x, &sb) in xs.iter().zip(sigma_bar) {
            let pt = self.marginal(sb);
            let px = pt[index(x, s)];
            for i in 0..L {
                for y in 0..V {
                    let mut z = x.clone();
                    z[i] = y as u32;
                    let r = pt[index(&z, s)] / px;
                    let lr = r.max(1e-30).ln() + self.perturb * self.noise(x, i, y);
                    out.push(lr as f32);
                }
            }
        }
        Ok(Tensor::from_vec(out, (xs.len(), L, V), &CPU)?)
    }
}

/// `E_{x_t ~ p_{t|0}(. | x0)} [DSE]` at `sbar`, exactly, for each clean row (weights `w`).
fn expected_dse(m: &dyn RatioModel, x0s: &[(Vec<u32>, f64)], sbar: f64) -> f64 {
    let g = m.graph();
    let (mut a, mut b, mut w) = (Vec::new(), Vec::new(), Vec::new());
    for (x0, wx) in x0s {
        let tr: Vec<Vec<f64>> = x0.iter().map(|&c| g.transition(c, sbar)).collect();
        for x in rows(g.states()) {
            let p: f64 = (0..L).map(|i| tr[i][x[i] as usize]).product();
            if p > 0.0 {
                a.push(x0.clone());
                b.push(x);
                w.push(wx * p);
            }
        }
    }
    let sb = vec![sbar; a.len()];
    let v: Vec<f32> = dse_terms(m, &a, &b, &sb, &w, &CPU)
        .unwrap()
        .to_vec1()
        .unwrap();
    v.iter().map(|&x| f64::from(x)).sum()
}

/// The bound of eq. 10 by composite 5-point Gauss-Legendre quadrature over t, with panels
/// graded toward both ends, and the exact expectation over x_t.
fn exact_bound(m: &dyn RatioModel, x0: &[u32], training: &NoiseSchedule) -> f64 {
    const NODES: [(f64, f64); 5] = [
        (0.0, 0.568_888_888_888_888_9),
        (-0.538_469_310_105_683_1, 0.478_628_670_499_366_5),
        (0.538_469_310_105_683_1, 0.478_628_670_499_366_5),
        (-0.906_179_845_938_664, 0.236_926_885_056_189_1),
        (0.906_179_845_938_664, 0.236_926_885_056_189_1),
    ];
    let sched = bound_schedule(&m.graph(), training);
    let mut cuts: Vec<f64> = vec![0.0];
    cuts.extend((1..=8).rev().map(|k| 10f64.powi(-k)));
    cuts.extend((2..=9).map(|k| k as f64 / 10.0));
    cuts.extend((2..=8).map(|k| 1.0 - 10f64.powi(-k)));
    cuts.push(1.0);
    let one = [(x0.to_vec(), 1.0)];
    let mut total = prior_term(&m.graph(), x0, &sched);
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1]);
        for (z, wz) in NODES {
            let t = 0.5 * (lo + hi) + 0.5 * (hi - lo) * z;
            let f = sched.rate(t) * expected_dse(m, &one, sched.total(t));
            total += 0.5 * (hi - lo) * wz * f;
        }
    }
    total
}

fn log_linear(eps: f64) -> NoiseSchedule {
    NoiseSchedule::log_linear(eps)
}

fn geometric(sigma_min: f64, sigma_max: f64) -> NoiseSchedule {
    NoiseSchedule {
        kind: NoiseKind::Geometric,
        sigma_min,
        sigma_max,
        eps: 0.0,
    }
}

/// `exp(s Q)` by scaling and squaring a Taylor series.
fn expm(q: &[Vec<f64>], s: f64) -> Vec<Vec<f64>> {
    let n = q.len();
    let mul = |a: &[Vec<f64>], b: &[Vec<f64>]| -> Vec<Vec<f64>> {
        (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| (0..n).map(|k| a[i][k] * b[k][j]).sum())
                    .collect()
            })
            .collect()
    };
    let sq = 10;
    let h = s / f64::from(1 << sq);
    let mut e: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    let mut term = e.clone();
    for k in 1..20 {
        let a: Vec<Vec<f64>> = q
            .iter()
            .map(|r| r.iter().map(|x| x * h / k as f64).collect())
            .collect();
        term = mul(&term, &a);
        for i in 0..n {
            for j in 0..n {
                e[i][j] += term[i][j];
            }
        }
    }
    for _ in 0..sq {
        e = mul(&e, &e);
    }
    e
}

#[test]
fn forward_marginals_match_the_matrix_exponential_and_a_simulated_jump_process() {
    for kind in [GraphKind::Absorbing, GraphKind::Uniform] {
        let g = Graph { kind, vocab: V };
        let s = g.states();
        let mut q: Vec<Vec<f64>> = (0..s)
            .map(|a| (0..s).map(|b| g.rate(a as u32, b as u32)).collect())
            .collect();
        for (a, row) in q.iter_mut().enumerate() {
            row[a] = -row.iter().sum::<f64>();
        }
        let mut rng = Rng::new(1);
        for sbar in [0.05, 0.7, 3.0] {
            let e = expm(&q, sbar);
            for a in 0..s as u32 {
                let p = g.transition(a, sbar);
                for b in 0..s {
                    assert!((p[b] - e[a as usize][b]).abs() < 1e-9, "{kind:?} {sbar}");
                    let col = g.transition_into(b as u32, sbar);
                    assert!((col[a as usize] - p[b]).abs() < 1e-12);
                }
                // Gillespie simulation of the chain with rates Q for total time sbar
                let n = 20_000;
                let mut freq = vec![0usize; s];
                for _ in 0..n {
                    let (mut x, mut clock) = (a, 0.0);
                    loop {
                        let out: f64 = (0..s as u32).map(|y| g.rate(x, y)).sum();
                        if out == 0.0 {
                            break;
                        }
                        clock += -(1.0 - rng.uniform()).ln() / out;
                        if clock > sbar {
                            break;
                        }
                        let w: Vec<f64> = (0..s as u32).map(|y| g.rate(x, y) / out).collect();
                        x = elbo::discrete::filter::sample_categorical(&w, &mut rng);
                    }
                    freq[x as usize] += 1;
                }
                for b in 0..s {
                    let f = freq[b] as f64 / n as f64;
                    let se = (p[b] * (1.0 - p[b]) / n as f64).sqrt();
                    assert!(
                        (f - p[b]).abs() <= 4.0 * se + 1e-9,
                        "{kind:?} sbar {sbar} {a}->{b}: simulated {f} vs {}",
                        p[b]
                    );
                }
            }
            // the staggered ratios recover p_s / p_t(x) for any p_s
            let ps: Vec<f64> = (0..s).map(|_| 0.1 + rng.uniform()).collect();
            let delta = 0.4;
            let pt: Vec<f64> = (0..s)
                .map(|z| {
                    (0..s)
                        .map(|y| ps[y] * g.transition(y as u32, delta)[z])
                        .sum()
                })
                .collect();
            let x = s - 1;
            let ratios: Vec<f64> = pt.iter().map(|p| p / pt[x]).collect();
            for (y, r) in g.staggered(&ratios, delta).iter().enumerate() {
                assert!((r - ps[y] / pt[x]).abs() < 1e-9, "{kind:?} staggered {y}");
            }
        }
        // prior terms: 0 at infinite noise, the closed form otherwise (infinite when absorbing)
        assert_eq!(g.prior_kl(1, f64::INFINITY), 0.0);
        let p = g.transition(1, 2.0);
        match kind {
            GraphKind::Absorbing => assert!(g.prior_kl(1, 2.0).is_infinite()),
            GraphKind::Uniform => {
                let kl: f64 = p.iter().map(|q| q * (q * V as f64).ln()).sum();
                assert!((g.prior_kl(1, 2.0) - kl).abs() < 1e-12 && kl > 0.0);
            }
        }
    }
    // schedules: sigma = d sigma_bar / dt, and their end points
    for sch in [log_linear(1e-3), geometric(1e-4, 20.0)] {
        for t in [0.1, 0.5, 0.9] {
            let h = 1e-6;
            let d = (sch.total(t + h) - sch.total(t - h)) / (2.0 * h);
            assert!((d - sch.rate(t)).abs() < 1e-5 * d.abs().max(1.0));
        }
    }
    assert!((log_linear(1e-3).total_max() + 1e-3f64.ln()).abs() < 1e-12);
    assert!((geometric(1e-4, 20.0).total(0.0) - 1e-4).abs() < 1e-15);
    assert!(log_linear(0.0).total_max().is_infinite());
}

#[test]
fn exact_ratios_minimise_the_denoising_score_entropy() {
    for kind in [GraphKind::Absorbing, GraphKind::Uniform] {
        let base = Oracle::new(kind, 3);
        let data: Vec<(Vec<u32>, f64)> = rows(V).into_iter().zip(base.joint.clone()).collect();
        let loss = |h: f64| expected_dse(&Oracle::new(kind, 3).perturbed(h), &data, 0.8);
        let (l0, lp, lm, l2) = (loss(0.0), loss(0.05), loss(-0.05), loss(0.1));
        let curv = lp + lm - 2.0 * l0;
        assert!(lp > l0 && lm > l0 && curv > 0.0, "{kind:?}: {l0} {lp} {lm}");
        // no first-order term: the exact ratios are a stationary point
        assert!((lp - lm).abs() < 0.1 * curv, "{kind:?}: slope {}", lp - lm);
        // and it is quadratic around them
        let ratio = (l2 - l0) / (lp - l0);
        assert!((ratio - 4.0).abs() < 0.6, "{kind:?}: {ratio}");
    }
}

#[test]
fn the_bound_is_tight_with_exact_ratios_and_a_sub_probability_otherwise() {
    // absorbing, exact ratios: the bound is -log p(x) (the continuous-time limit)
    let training = log_linear(1e-3);
    let ex = Oracle::new(GraphKind::Absorbing, 5);
    for (x, p) in rows(V).iter().zip(ex.joint.clone()) {
        let b = exact_bound(&ex, x, &training);
        assert!((b + p.ln()).abs() < 2e-3, "{x:?}: bound {b} vs {}", -p.ln());
    }
    // arbitrary ratios, both graphs: exp(-bound) sums to at most 1, and the cross-entropy of
    // the data under the bound exceeds the data's entropy
    for (kind, training) in [
        (GraphKind::Absorbing, log_linear(1e-3)),
        (GraphKind::Uniform, geometric(1e-4, 6.0)),
        (GraphKind::Uniform, log_linear(1e-3)),
    ] {
        for perturb in [0.0, 0.7] {
            let m = Oracle::new(kind, 5).perturbed(perturb);
            let mut mass = 0.0;
            let (mut ce, mut h) = (0.0, 0.0);
            for (x, p) in rows(V).iter().zip(m.joint.clone()) {
                let b = exact_bound(&m, x, &training);
                mass += (-b).exp();
                ce += p * b;
                h -= p * p.ln();
                if perturb == 0.0 {
                    assert!(b > -p.ln() - 2e-3, "{kind:?} {x:?}: {b} < {}", -p.ln());
                }
            }
            assert!(mass <= 1.0 + 1e-3, "{kind:?} {perturb}: mass {mass}");
            assert!(ce >= h - 1e-3, "{kind:?} {perturb}: {ce} < entropy {h}");
            if perturb > 0.0 {
                assert!(ce > h + 0.05, "{kind:?}: perturbed ratios should cost");
            }
        }
    }
}

#[test]
fn monte_carlo_bound_agrees_with_the_exact_bound() {
    for (kind, training) in [
        (GraphKind::Absorbing, log_linear(1e-3)),
        (GraphKind::Uniform, geometric(1e-4, 6.0)),
    ] {
        let m = Oracle::new(kind, 7).perturbed(0.5);
        let x = [2u32, 0, 1];
        let exact = exact_bound(&m, &x, &training);
        let n = 3000;
        let ids = Tensor::from_vec(x.to_vec(), (1, L), &CPU)
            .unwrap()
            .repeat((n, 1))
            .unwrap();
        let v = elbo(&m, &ids, &training, 2, &mut Rng::new(11)).unwrap();
        let (mean, se) = elbo::likelihood::mean_stderr(&v);
        assert!(
            se > 0.0 && (mean - exact).abs() < 3.0 * se,
            "{kind:?}: MC {mean} ± {se} vs exact {exact}"
        );
    }
}

/// Total variation between the empirical law of `samples` (rows over V^L) and `p`.
fn tv(samples: &[Vec<u32>], p: &[f64]) -> f64 {
    let mut f = vec![0.0; p.len()];
    for s in samples {
        f[index(s, V)] += 1.0 / samples.len() as f64;
    }
    0.5 * f.iter().zip(p).map(|(a, b)| (a - b).abs()).sum::<f64>()
}

fn run(m: &Oracle, template: &[Option<u32>], cfg: &RatioSampleConfig, n: usize) -> Vec<Vec<u32>> {
    let (x, stats) = ratio_sampler::sample(m, n, template, cfg, &mut Rng::new(21)).unwrap();
    assert_eq!(stats.nfe, cfg.steps + 1);
    x
}

#[test]
fn samplers_match_the_joint_and_keep_the_template() {
    // sampling noise of 20000 draws over 27 outcomes is about 0.015 in total variation
    let n = 8_000;
    let tol = 0.05;
    for (kind, schedule) in [
        (GraphKind::Absorbing, log_linear(1e-3)),
        (GraphKind::Uniform, geometric(1e-4, 10.0)),
    ] {
        let m = Oracle::new(kind, 9);
        let p = m.joint.clone();
        for sampler in [RatioSampler::Analytic, RatioSampler::Euler] {
            let cfg = RatioSampleConfig {
                sampler,
                steps: 32,
                schedule,
                eps: 1e-5,
                filter: TokenFilter::default(),
            };
            let d = tv(&run(&m, &[None; L], &cfg, n), &p);
            assert!(d < tol, "{kind:?} {sampler:?}: TV {d}");
        }
        // one analytic step draws every position from its marginal: the test can fail
        let one = RatioSampleConfig {
            sampler: RatioSampler::Analytic,
            steps: 1,
            schedule,
            eps: 1e-5,
            filter: TokenFilter::default(),
        };
        let d = tv(&run(&m, &[None; L], &one, n), &p);
        assert!(d > 3.0 * tol, "{kind:?}: one step TV {d} should be large");
        // a prompt and an infilling pattern stay fixed; the rest follows p(. | given)
        for template in [
            [Some(1u32), None, None],
            [None, Some(2), None],
            [Some(0), None, Some(2)],
        ] {
            let cfg = RatioSampleConfig { steps: 32, ..one };
            let xs = run(&m, &template, &cfg, n);
            assert!(xs
                .iter()
                .all(|x| (0..L).all(|i| template[i].is_none_or(|t| x[i] == t))));
            let cond: Vec<f64> = rows(V)
                .iter()
                .zip(&p)
                .map(|(x, &q)| {
                    let keep = (0..L).all(|i| template[i].is_none_or(|t| x[i] == t));
                    if keep {
                        q
                    } else {
                        0.0
                    }
                })
                .collect();
            let z: f64 = cond.iter().sum();
            let cond: Vec<f64> = cond.iter().map(|q| q / z).collect();
            let d = tv(&xs, &cond);
            // the uniform model never saw clean positions beside noisy ones: only absorbing
            // conditioning is exact
            if kind == GraphKind::Absorbing {
                assert!(d < tol, "{template:?}: conditional TV {d}");
            }
        }
    }
}

#[test]
fn the_uniform_graph_model_trains_every_parameter_and_settings_are_checked() {
    use elbo::data::DataKind;
    use elbo::model::{DataInfo, GenerativeModel};
    use elbo::models::sedd::{Config, Sedd};
    use elbo::models::FamilyConfig;
    let mut cfg = Config {
        graph: GraphKind::Uniform,
        noise: NoiseKind::Geometric,
        ..Config::default()
    };
    cfg.transformer.d_model = 16;
    cfg.transformer.n_layers = 1;
    let info = DataInfo::flat(6, DataKind::Discrete { levels: V });
    let model = Sedd::new(&cfg, info, &CPU, &mut Rng::new(0)).unwrap();
    let batch = Tensor::from_vec(
        (0..24).map(|i| (i % V) as f32).collect::<Vec<_>>(),
        (4, 6),
        &CPU,
    )
    .unwrap();
    let est = cfg.memory_estimate(&info, 4);
    let count: usize = model
        .varmap()
        .all_vars()
        .iter()
        .map(|v| v.elem_count())
        .sum();
    assert_eq!(
        est.params, count as u64,
        "memory estimate of the uniform model"
    );
    let loss = model.loss(&batch, &mut Rng::new(1)).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.varmap().data().lock().unwrap().iter() {
        let g = grads.get(var.as_tensor()).expect(name);
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(norm > 0.0 && norm.is_finite(), "{name}: |grad|^2 = {norm}");
    }
    // a log-linear schedule without its eps, or a geometric one upside down, is refused
    let bad = Config {
        eps: 0.0,
        ..Config::default()
    };
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("model.eps"), "{e}");
    let mut bad = cfg.clone();
    bad.sigma_min = 30.0;
    let e = bad.validate().unwrap_err().to_string();
    assert!(e.contains("model.sigma_min"), "{e}");
}
