//! Dequantization bounds on a tiny discrete distribution (2 values of 4 levels): for a RealNVP
//! on the dequantized grid, the uniform and the variational dequantization bounds are at least
//! the exact NLL of the discrete distribution the flow induces (its density integrated over
//! each bin on a fine grid), and the variational dequantizer's q(u | x) is a normalised density
//! on the unit square whose log-density matches what its sampler reports.

use candle_core::{Device, Tensor};
use elbo::config::Config;
use elbo::continuous::dequantization::{DataScale, Dequantization, VariationalDequantizer};
use elbo::data::DataKind;
use elbo::model::{DataInfo, GenerativeModel};
use elbo::models::normalizing_flow::{Config as NfConfig, NormalizingFlow, Variant};
use elbo::nn::{Activation, ParamInit};
use elbo::train::optim::named_vars;
use elbo::{NllKind, Rng};

const CPU: Device = Device::Cpu;
const LEVELS: usize = 4;

fn randomize(vm: &candle_nn::VarMap, std: f64, rng: &mut Rng) {
    for (_, v) in named_vars(vm).unwrap() {
        v.set(&(rng.normal_tensor(v.dims(), &CPU).unwrap() * std).unwrap())
            .unwrap();
    }
}

/// A randomized RealNVP on two values of 4 levels.
fn flow(dequantization: Dequantization) -> NormalizingFlow {
    let cfg = NfConfig {
        variant: Variant::Realnvp,
        layers: 4,
        hidden: 16,
        dequantization,
        ..NfConfig::default()
    };
    let data = DataInfo::flat(2, DataKind::Discrete { levels: LEVELS });
    let nf = NormalizingFlow::new(&cfg, data, &CPU, &mut Rng::new(41)).unwrap();
    randomize(&nf.core().varmap, 0.3, &mut Rng::new(42));
    nf
}

/// `-log P(k)` for every pair of levels: the flow's density in level units integrated over
/// the bin `k + [0, 1)²` by the midpoint rule on an `n x n` grid.
fn exact_discrete_nll(nf: &NormalizingFlow, n: usize) -> Vec<f64> {
    let w = 2.0 / (LEVELS - 1) as f64; // the bin width in model space
    let mut out = Vec::new();
    for k0 in 0..LEVELS {
        for k1 in 0..LEVELS {
            let mut pts = Vec::with_capacity(2 * n * n);
            for i in 0..n {
                for j in 0..n {
                    for (k, c) in [(k0, i), (k1, j)] {
                        let v = k as f64 + (c as f64 + 0.5) / n as f64; // level units
                        pts.push(((v - 0.5) * w - 1.0) as f32);
                    }
                }
            }
            let y = Tensor::from_vec(pts, (n * n, 2), &CPU).unwrap();
            let nll: Vec<f32> = nf.flow().unwrap().nll(&y).unwrap().to_vec1().unwrap();
            let p: f64 =
                nll.iter().map(|l| (-f64::from(*l)).exp()).sum::<f64>() * w * w / (n * n) as f64;
            out.push(-p.ln());
        }
    }
    out
}

/// The family's reported NLL of each pair of levels, averaged over `reps` dequantizations:
/// (mean, standard error).
fn bound(nf: &NormalizingFlow, reps: usize) -> Vec<(f64, f64)> {
    let mut rows = Vec::new();
    for k0 in 0..LEVELS {
        for k1 in 0..LEVELS {
            for _ in 0..reps {
                rows.extend([k0 as f32, k1 as f32]);
            }
        }
    }
    let batch = Tensor::from_vec(rows, (LEVELS * LEVELS * reps, 2), &CPU).unwrap();
    let opts = Config::default().eval;
    let nll = nf.log_likelihood(&batch, &opts, &mut Rng::new(43)).unwrap();
    assert_eq!(nll.kind, NllKind::Bound);
    nll.nats
        .chunks(reps)
        .map(|c| {
            let m = c.iter().sum::<f64>() / reps as f64;
            let var = c.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (reps - 1) as f64;
            (m, (var / reps as f64).sqrt())
        })
        .collect()
}

#[test]
fn dequantized_bounds_are_at_least_the_exact_discrete_nll() {
    for deq in [Dequantization::Uniform, Dequantization::Variational] {
        let nf = flow(deq);
        let method = nf.likelihood_method(&Config::default().eval);
        let name = match deq {
            Dequantization::Uniform => "uniform dequantization",
            Dequantization::Variational => "variational dequantization",
        };
        assert!(method.contains(name), "{method}");
        let exact = exact_discrete_nll(&nf, 60);
        let mass: f64 = exact.iter().map(|l| (-l).exp()).sum();
        assert!(
            mass > 0.2 && mass <= 1.0 + 1e-3,
            "{deq:?}: mass in the bins {mass}"
        );
        let b = bound(&nf, 2000);
        let mut gap = 0.0;
        for (k, ((m, se), e)) in b.iter().zip(&exact).enumerate() {
            assert!(
                *m >= e - 4.0 * se - 1e-3,
                "{deq:?} level pair {k}: bound {m} ± {se} below the exact NLL {e}"
            );
            gap += (m - e) / exact.len() as f64;
        }
        // Jensen's gap is positive but not absurd for a smooth density
        assert!(gap > 0.0 && gap < 3.0, "{deq:?}: mean gap {gap}");
    }
}

#[test]
fn the_variational_dequantizer_is_a_normalised_density_matching_its_sampler() {
    let vm = candle_nn::VarMap::new();
    let scale = DataScale::new(DataKind::Discrete { levels: LEVELS }).unwrap();
    let q = VariationalDequantizer::new(
        &mut ParamInit::new(&vm, &mut Rng::new(44), &CPU),
        scale,
        2,
        16,
        1,
        Activation::Tanh,
    )
    .unwrap();
    randomize(&vm, 0.5, &mut Rng::new(45));
    let n = 300;
    for x in [[0f32, 3.0], [2.0, 1.0]] {
        // ∫ q(u | x) du over (0, 1)² by the midpoint rule
        let mut u = Vec::with_capacity(2 * n * n);
        for i in 0..n {
            for j in 0..n {
                u.extend([(i as f32 + 0.5) / n as f32, (j as f32 + 0.5) / n as f32]);
            }
        }
        let u = Tensor::from_vec(u, (n * n, 2), &CPU).unwrap();
        let xs = Tensor::new(&x, &CPU)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((n * n, 2))
            .unwrap()
            .contiguous()
            .unwrap();
        let lq: Vec<f32> = q.log_density(&xs, &u).unwrap().to_vec1().unwrap();
        let mass = lq.iter().map(|l| f64::from(*l).exp()).sum::<f64>() / (n * n) as f64;
        assert!((mass - 1.0).abs() < 2e-2, "x = {x:?}: ∫ q = {mass}");
        // the sampler's log q is the density at the offsets it drew
        let xs = xs.narrow(0, 0, 64).unwrap();
        let (y, lq) = q.dequantize(&xs, &mut Rng::new(46)).unwrap();
        let w = 2.0 / (LEVELS - 1) as f64;
        let u = ((((y + 1.0).unwrap() / w).unwrap() + 0.5).unwrap() - &xs).unwrap();
        let again: Vec<f32> = q.log_density(&xs, &u).unwrap().to_vec1().unwrap();
        for (a, b) in lq.to_vec1::<f32>().unwrap().iter().zip(&again) {
            assert!((a - b).abs() < 1e-2 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}
