//! Block diffusion (Arriola et al. 2025) against oracles whose joint over V^L is known exactly:
//! the per-block NELBO with blocks of 1 is the autoregressive NLL, with one block of L the MDLM
//! NELBO; it bounds the exact NLL of the model's own block-by-block sampler for arbitrary
//! (inconsistent) conditionals; its Monte-Carlo estimate agrees with the enumeration; and the
//! block-by-block sampler with the exact conditionals reproduces the joint.

use std::cell::RefCell;

use candle_core::{Device, Tensor};
use elbo::discrete::block_diffusion::{
    nelbo, nelbo_by_enumeration, sample_blocks, BlockDecoder, BlockDenoiser,
};
use elbo::discrete::filter::TokenFilter;
use elbo::discrete::masked_diffusion::{self, MaskDenoiser};
use elbo::discrete::sampler::{MaskedSampleConfig, MaskedSampler};
use elbo::{Result, Rng};

const V: usize = 3;
const L: usize = 4;
const MASK: u32 = V as u32;

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

/// Conditionals of x_i given a visible pattern (MASK = hidden): exact ones of a joint, or
/// arbitrary ones from a hash of the pattern.
struct Oracle {
    joint: Option<Vec<f64>>,
    seed: u64,
    block: usize,
}

impl Oracle {
    fn joint(seed: u64, block: usize) -> Self {
        let mut r = Rng::new(seed);
        let w: Vec<f64> = (0..V.pow(L as u32))
            .map(|_| (2.0 * r.normal()).exp())
            .collect();
        let z: f64 = w.iter().sum();
        Self {
            joint: Some(w.iter().map(|x| x / z).collect()),
            seed,
            block,
        }
    }

    fn arbitrary(seed: u64, block: usize) -> Self {
        Self {
            joint: None,
            seed,
            block,
        }
    }

    /// log p(x_i = . | the visible tokens of `vis`), `vis` of length <= L (a prefix view).
    fn row(&self, vis: &[u32], i: usize) -> Vec<f32> {
        match &self.joint {
            Some(p) => {
                let mut m = [1e-300; V];
                for (x, &px) in all_seqs().iter().zip(p) {
                    if vis.iter().enumerate().all(|(j, &t)| t == MASK || t == x[j]) {
                        m[x[i] as usize] += px;
                    }
                }
                let z: f64 = m.iter().sum();
                m.iter().map(|v| (v / z).ln() as f32).collect()
            }
            None => {
                let code = vis.iter().fold(i as u64, |a, &t| a * 7 + u64::from(t) + 1);
                let mut r = Rng::new(self.seed ^ code.wrapping_mul(0x9E37_79B9));
                let lg: Vec<f64> = (0..V).map(|_| 2.0 * r.normal()).collect();
                let lse = lg.iter().map(|v| v.exp()).sum::<f64>().ln();
                lg.iter().map(|v| (v - lse) as f32).collect()
            }
        }
    }

    /// What position `i` sees: x_0 before its block, x_t within it, nothing after.
    fn view(&self, xt: &[u32], x0: &[u32], i: usize) -> Vec<u32> {
        let b = i / self.block;
        let end = ((b + 1) * self.block).min(L);
        (0..end)
            .map(|j| if j < b * self.block { x0[j] } else { xt[j] })
            .collect()
    }
}

fn logp_tensor(rows: Vec<Vec<Vec<f32>>>) -> Result<Tensor> {
    Ok(Tensor::new(rows, &Device::Cpu)?)
}

impl BlockDenoiser for Oracle {
    fn vocab(&self) -> usize {
        V
    }
    fn block(&self) -> usize {
        self.block
    }
    fn log_probs(&self, xt: &Tensor, x0: &Tensor) -> Result<Tensor> {
        let (xt, x0): (Vec<Vec<u32>>, Vec<Vec<u32>>) = (xt.to_vec2()?, x0.to_vec2()?);
        let rows = xt
            .iter()
            .zip(&x0)
            .map(|(a, b)| (0..L).map(|i| self.row(&self.view(a, b, i), i)).collect())
            .collect();
        logp_tensor(rows)
    }
}

/// The oracle with one block of L as an MDLM denoiser.
struct Whole<'a>(&'a Oracle);

impl MaskDenoiser for Whole<'_> {
    fn vocab(&self) -> usize {
        V
    }
    fn log_probs(&self, xt: &Tensor) -> Result<Tensor> {
        let xt: Vec<Vec<u32>> = xt.to_vec2()?;
        logp_tensor(
            xt.iter()
                .map(|a| (0..L).map(|i| self.0.row(a, i)).collect())
                .collect(),
        )
    }
}

/// The oracle as a block decoder: the finished blocks are its state.
struct Decoder<'a> {
    oracle: &'a Oracle,
    done: RefCell<Vec<Vec<u32>>>,
}

impl BlockDecoder for Decoder<'_> {
    fn vocab(&self) -> usize {
        V
    }
    fn block_log_probs(&self, xt: &Tensor) -> Result<Tensor> {
        let xt: Vec<Vec<u32>> = xt.to_vec2()?;
        let done = self.done.borrow();
        let rows = xt
            .iter()
            .enumerate()
            .map(|(r, cur)| {
                let prefix = done.get(r).cloned().unwrap_or_default();
                let vis: Vec<u32> = prefix.iter().chain(cur).copied().collect();
                (0..cur.len())
                    .map(|j| self.oracle.row(&vis, prefix.len() + j))
                    .collect()
            })
            .collect();
        logp_tensor(rows)
    }
    fn commit(&mut self, x0: &Tensor) -> Result<()> {
        let x0: Vec<Vec<u32>> = x0.to_vec2()?;
        let mut done = self.done.borrow_mut();
        done.resize(x0.len(), Vec::new());
        done.iter_mut().zip(x0).for_each(|(d, b)| d.extend(b));
        Ok(())
    }
}

fn joint_nll(o: &Oracle, x: &[u32]) -> f64 {
    let p = o.joint.as_ref().unwrap();
    let k = all_seqs().iter().position(|s| s == x).unwrap();
    -p[k].ln()
}

/// -log of the probability the continuous-time block-by-block sampler gives `x` under the
/// oracle's (possibly inconsistent) conditionals: within a block tokens are revealed one at a
/// time in a uniformly random order, each drawn from its conditional given everything visible.
fn sampler_nll(o: &Oracle, x: &[u32]) -> f64 {
    let mut p = 1.0;
    for s in (0..L).step_by(o.block) {
        let lb = o.block.min(L - s);
        let perms = permutations(lb);
        let mut acc = 0.0;
        for perm in &perms {
            let mut vis: Vec<u32> = x[..s].to_vec();
            vis.extend(std::iter::repeat_n(MASK, lb));
            let mut q = 1.0;
            for &j in perm {
                q *= f64::from(o.row(&vis, s + j)[x[s + j] as usize]).exp();
                vis[s + j] = x[s + j];
            }
            acc += q;
        }
        p *= acc / perms.len() as f64;
    }
    -p.ln()
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for at in 0..=p.len() {
            let mut q = p.clone();
            q.insert(at, n - 1);
            out.push(q);
        }
    }
    out
}

#[test]
fn blocks_of_one_are_autoregressive_and_one_block_is_mdlm() {
    for seed in [1, 2] {
        // exact conditionals: the bound is the exact NLL for every block size
        for block in [1, 2, 4] {
            let o = Oracle::joint(seed, block);
            for x in all_seqs().iter().step_by(7) {
                let b = nelbo_by_enumeration(&o, x).unwrap();
                let e = joint_nll(&o, x);
                assert!((b - e).abs() < 1e-4, "exact, block {block}: {b} vs {e}");
            }
        }
        // arbitrary conditionals: blocks of 1 = the chain rule of the conditionals given a
        // clean prefix; one block of L = the MDLM NELBO
        let o1 = Oracle::arbitrary(seed, 1);
        let ol = Oracle::arbitrary(seed, L);
        for x in all_seqs().iter().step_by(5) {
            let ar: f64 = (0..L)
                .map(|i| {
                    let mut vis = x[..i].to_vec();
                    vis.push(MASK);
                    -f64::from(o1.row(&vis, i)[x[i] as usize])
                })
                .sum();
            let b1 = nelbo_by_enumeration(&o1, x).unwrap();
            assert!((b1 - ar).abs() < 1e-4, "block 1: {b1} vs AR {ar}");
            let bl = nelbo_by_enumeration(&ol, x).unwrap();
            let mdlm = masked_diffusion::nelbo_by_enumeration(&Whole(&ol), x, 0).unwrap();
            assert!((bl - mdlm).abs() < 1e-4, "block L: {bl} vs MDLM {mdlm}");
        }
    }
}

#[test]
fn the_bound_holds_for_arbitrary_conditionals() {
    for (seed, block) in [(3, 2), (4, 3), (5, 4)] {
        let o = Oracle::arbitrary(seed, block);
        let seqs = all_seqs();
        let total: f64 = seqs.iter().map(|x| (-sampler_nll(&o, x)).exp()).sum();
        assert!(
            (total - 1.0).abs() < 1e-5,
            "the sampler's joint sums to {total}"
        );
        let mut gap = 0.0f64;
        for x in &seqs {
            let b = nelbo_by_enumeration(&o, x).unwrap();
            let nll = sampler_nll(&o, x);
            assert!(
                b >= nll - 1e-5,
                "block {block} {x:?}: bound {b} < NLL {nll}"
            );
            gap = gap.max(b - nll);
        }
        assert!(
            gap > 1e-2,
            "inconsistent conditionals should leave a gap (max {gap})"
        );
    }
}

#[test]
fn monte_carlo_nelbo_matches_enumeration() {
    // the 1/t-weighted estimator is heavy-tailed (its second moment diverges logarithmically at
    // t -> 0), so the check is on the mean over all 81 sequences, with 2000 stratified draws each
    let o = Oracle::arbitrary(6, 2);
    let seqs = all_seqs();
    let ids = Tensor::new(seqs.clone(), &Device::Cpu).unwrap();
    let mut rng = Rng::new(11);
    let mc = nelbo(&o, &ids, 2000, &mut rng).unwrap();
    let mut diff = 0.0;
    for (x, m) in seqs.iter().zip(&mc) {
        let e = nelbo_by_enumeration(&o, x).unwrap();
        assert!((m - e).abs() < 1.5, "{x:?}: Monte Carlo {m} vs exact {e}");
        diff += (m - e) / seqs.len() as f64;
    }
    assert!(diff.abs() < 0.15, "mean Monte Carlo error {diff}");
}

fn tv(counts: &[usize], n: usize, p: &[f64]) -> f64 {
    0.5 * counts
        .iter()
        .zip(p)
        .map(|(&c, &q)| (c as f64 / n as f64 - q).abs())
        .sum::<f64>()
}

#[test]
fn block_samples_match_the_joint() {
    let n = 4000;
    for (sampler, block) in [(MaskedSampler::Cached, 2), (MaskedSampler::Ancestral, 3)] {
        let o = Oracle::joint(8, block);
        let p = o.joint.clone().unwrap();
        let cfg = MaskedSampleConfig {
            sampler,
            steps: 48,
            block_len: 0,
            filter: TokenFilter::default(),
        };
        let mut dec = Decoder {
            oracle: &o,
            done: RefCell::new(Vec::new()),
        };
        let mut rng = Rng::new(21);
        let init = vec![vec![MASK; L]; n];
        let (rows, stats) = sample_blocks(&mut dec, init, block, None, &cfg, &mut rng).unwrap();
        assert!(stats.nfe > 0);
        let seqs = all_seqs();
        let mut counts = vec![0usize; seqs.len()];
        for r in &rows {
            counts[seqs.iter().position(|s| s == r).unwrap()] += 1;
        }
        // 81 outcomes, 4000 draws: sampling noise alone gives TV about 0.05
        let d = tv(&counts, n, &p);
        assert!(d < 0.08, "{sampler:?} block {block}: TV {d}");
        // a sampler that ignored the finished blocks would be far off
        let mut indep = vec![0.0; seqs.len()];
        for (k, s) in seqs.iter().enumerate() {
            indep[k] = (0..L)
                .map(|i| {
                    seqs.iter()
                        .zip(&p)
                        .filter(|(t, _)| t[i] == s[i])
                        .map(|(_, q)| q)
                        .sum::<f64>()
                })
                .product();
        }
        assert!(
            tv(&counts, n, &indep) > 0.15,
            "the joint is too close to independent"
        );
    }
    // variable length and prompts: one block only, and the first block given
    let o = Oracle::joint(9, 2);
    let cfg = MaskedSampleConfig {
        sampler: MaskedSampler::Cached,
        steps: 32,
        block_len: 0,
        filter: TokenFilter::default(),
    };
    let mut dec = Decoder {
        oracle: &o,
        done: RefCell::new(Vec::new()),
    };
    let mut rng = Rng::new(5);
    let (rows, _) = sample_blocks(
        &mut dec,
        vec![vec![MASK; L]; 10],
        2,
        Some(1),
        &cfg,
        &mut rng,
    )
    .unwrap();
    assert!(rows.iter().all(|r| r.len() == 2));
    let mut dec = Decoder {
        oracle: &o,
        done: RefCell::new(Vec::new()),
    };
    let init = vec![vec![1, 2, MASK, MASK]; 2000];
    let (rows, _) = sample_blocks(&mut dec, init, 2, None, &cfg, &mut rng).unwrap();
    assert!(rows.iter().all(|r| r[..2] == [1, 2]), "the prompt is kept");
    let p = o.joint.clone().unwrap();
    let seqs = all_seqs();
    let z: f64 = seqs
        .iter()
        .zip(&p)
        .filter(|(s, _)| s[..2] == [1, 2])
        .map(|(_, q)| q)
        .sum();
    let cond: Vec<f64> = seqs
        .iter()
        .zip(&p)
        .map(|(s, q)| if s[..2] == [1, 2] { q / z } else { 0.0 })
        .collect();
    let mut counts = vec![0usize; seqs.len()];
    for r in &rows {
        counts[seqs.iter().position(|s| s == r).unwrap()] += 1;
    }
    let d = tv(&counts, rows.len(), &cond);
    assert!(d < 0.06, "prompted: TV {d} to the conditional");
}

/// Generation past the trained length with a real (untrained) network: the KV cache slides
/// instead of running out of positions, every token is a data token, the given tokens stay,
/// and with the same seed a longer generation begins with the shorter one (the slide only
/// changes what later blocks see).
#[test]
fn generation_slides_past_the_trained_length() -> Result<()> {
    use elbo::data::DataKind;
    use elbo::model::{DataInfo, GenerativeModel};
    use elbo::models::bd3lm::{Bd3lm, Config};

    let dev = Device::Cpu;
    let mut cfg = Config::default();
    cfg.transformer.d_model = 16;
    cfg.transformer.n_heads = 2;
    cfg.transformer.n_layers = 1;
    cfg.block_size = 2;
    let info = DataInfo::flat(6, DataKind::Discrete { levels: 5 });
    let model = Bd3lm::new(&cfg, info, &dev, &mut Rng::new(3))?;
    let opts = elbo::config::SampleOptions {
        steps: 6,
        ..Default::default()
    };
    let sample = |len: usize, template: &[Option<u32>]| -> Result<Vec<Vec<f32>>> {
        let mut t = template.to_vec();
        t.resize(len, None);
        let x = model.sample_conditional(3, &t, &opts, &mut Rng::new(11))?;
        Ok(x.to_vec2::<f32>()?)
    };
    let short = sample(6, &[])?;
    for len in [7, 13, 20] {
        let long = sample(len, &[])?;
        assert_eq!(long.len(), 3);
        for (s, l) in short.iter().zip(&long) {
            assert_eq!(l.len(), len);
            assert_eq!(&l[..6], &s[..], "length {len}: the first L tokens changed");
            assert!(l
                .iter()
                .all(|&t| (0.0..5.0).contains(&t) && t.fract() == 0.0));
        }
    }
    // a template reaching past the trained length keeps its tokens
    let mut t = vec![None; 16];
    t[9] = Some(4);
    t[15] = Some(1);
    for row in sample(16, &t)? {
        assert_eq!((row[9], row[15]), (4.0, 1.0));
    }
    Ok(())
}
