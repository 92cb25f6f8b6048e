//! Tests of the pre-LN transformer: gradients reach every parameter, causal masking, the
//! differentiable layer norm and softmax against candle's fused kernels and finite differences,
//! and the parameter count of the benchmark shapes.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use elbo::nn::transformer::{
    cross_entropy_rows, layer_norm, softmax_last_dim, Positions, Transformer, TransformerConfig,
};
use elbo::nn::ParamInit;
use elbo::train::optim::named_vars;
use elbo::Rng;

const CPU: Device = Device::Cpu;

fn small(causal: bool) -> TransformerConfig {
    small_with(causal, Positions::Learned)
}

fn small_with(causal: bool, positions: Positions) -> TransformerConfig {
    TransformerConfig {
        vocab_in: 11,
        vocab_out: 10,
        max_len: 8,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        mask: causal.into(),
        positions,
    }
}

fn build(cfg: TransformerConfig, seed: u64) -> (VarMap, Transformer) {
    let vm = VarMap::new();
    let mut rng = Rng::new(seed);
    let net = {
        let mut p = ParamInit::new(&vm, &mut rng, &CPU);
        Transformer::new(&mut p, cfg).unwrap()
    };
    (vm, net)
}

fn ids(v: &[u32], b: usize, l: usize) -> Tensor {
    Tensor::from_slice(v, (b, l), &CPU).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn every_parameter_gets_a_gradient() {
    for (causal, positions) in [
        (true, Positions::Learned),
        (false, Positions::Learned),
        (true, Positions::Rotary),
        (false, Positions::Rotary),
    ] {
        let cfg = small_with(causal, positions);
        let (vm, net) = build(cfg.clone(), 3);
        let mut rng = Rng::new(4);
        let (b, l) = (3, 8);
        // every input id appears, so every embedding row is used
        let x: Vec<u32> = (0..b * l).map(|i| (i % cfg.vocab_in) as u32).collect();
        let y: Vec<u32> = (0..b * l)
            .map(|_| rng.below(cfg.vocab_out) as u32)
            .collect();
        let logits = net.forward(&ids(&x, b, l)).unwrap(); // [B, L, V]
        assert_eq!(logits.dims(), &[b, l, cfg.vocab_out]);
        let ce = cross_entropy_rows(
            &logits.reshape((b * l, cfg.vocab_out)).unwrap(),
            &Tensor::from_slice(&y, b * l, &CPU).unwrap(),
        )
        .unwrap();
        let grads = ce.mean_all().unwrap().backward().unwrap();
        let params = named_vars(&vm).unwrap();
        let tables = usize::from(positions == Positions::Learned);
        assert_eq!(params.len(), 5 + tables + 12 * cfg.n_layers);
        let count: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        assert_eq!(count, cfg.num_params());
        for (name, v) in &params {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name} ({causal}, {positions:?})"));
            let norm: f64 = vals(g).iter().map(|x| x * x).sum::<f64>().sqrt();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: gradient norm {norm}"
            );
        }
    }
}

#[test]
fn causal_logits_ignore_later_tokens() {
    for positions in [Positions::Learned, Positions::Rotary] {
        causal_logits_ignore_later_tokens_with(positions);
    }
}

fn causal_logits_ignore_later_tokens_with(positions: Positions) {
    let cfg = small_with(true, positions);
    let (_vm, net) = build(cfg.clone(), 5);
    let l = cfg.max_len;
    let base: Vec<u32> = (0..l as u32).map(|i| (3 * i + 1) % 11).collect();
    let y0 = net.forward(&ids(&base, 1, l)).unwrap();
    for j in 1..l {
        let mut alt = base.clone();
        alt[j] = (alt[j] + 5) % 11;
        let y1 = net.forward(&ids(&alt, 1, l)).unwrap();
        let before = |y: &Tensor| vals(&y.narrow(1, 0, j).unwrap());
        let at = |y: &Tensor| vals(&y.narrow(1, j, 1).unwrap());
        let d_before = before(&y0)
            .iter()
            .zip(before(&y1))
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        let d_at = at(&y0)
            .iter()
            .zip(at(&y1))
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            d_before < 1e-6,
            "token {j} changed earlier logits by {d_before}"
        );
        assert!(d_at > 1e-4, "token {j} did not change its own logits");
    }
    // bidirectional: a later token does change earlier logits
    let (_vm, bi) = build(small_with(false, positions), 5);
    let mut alt = base.clone();
    alt[l - 1] = (alt[l - 1] + 5) % 11;
    let a = vals(
        &bi.forward(&ids(&base, 1, l))
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap(),
    );
    let b = vals(
        &bi.forward(&ids(&alt, 1, l))
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap(),
    );
    assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-4));
}

#[test]
fn differentiable_norm_and_softmax_match_candle_fused() {
    let mut rng = Rng::new(7);
    let x = (rng.normal_tensor(&[4, 6, 32], &CPU).unwrap() * 3.0).unwrap();
    let w = (rng.normal_tensor(&[32], &CPU).unwrap() + 1.0).unwrap();
    let b = rng.normal_tensor(&[32], &CPU).unwrap();
    let ours = vals(&layer_norm(&x, &w, &b, 1e-5).unwrap());
    let fused = vals(&candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap());
    for (a, f) in ours.iter().zip(&fused) {
        assert!((a - f).abs() < 1e-5, "layer norm {a} vs {f}");
    }
    let ours = vals(&softmax_last_dim(&x).unwrap());
    let fused = vals(&candle_nn::ops::softmax_last_dim(&x).unwrap());
    for (a, f) in ours.iter().zip(&fused) {
        assert!((a - f).abs() < 1e-5, "softmax {a} vs {f}");
    }
}

/// Gradient of `sum(f(vars) * r)` by backprop against central differences (f64).
fn check_fd(vars: &[Var], f: &dyn Fn(&[Tensor]) -> Tensor, seed: u64) {
    let mut rng = Rng::new(seed);
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&ts);
    let r = rng
        .normal_tensor(out.dims(), &CPU)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let obj = |ts: &[Tensor]| -> f64 {
        (f(ts) * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let grads = (out * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-6;
    for (k, v) in vars.iter().enumerate() {
        let g = vals(grads.get(v.as_tensor()).expect("gradient"));
        let base = vals(v.as_tensor());
        for i in 0..base.len() {
            let at = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                let mut ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().detach()).collect();
                ts[k] = Tensor::from_vec(p, v.dims(), &CPU).unwrap();
                obj(&ts)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                "input {k} element {i}: backprop {} vs finite difference {fd}",
                g[i]
            );
        }
    }
}

fn f64_var(rng: &mut Rng, shape: &[usize], scale: f64, shift: f64) -> Var {
    let t = ((rng.normal_tensor(shape, &CPU).unwrap() * scale).unwrap() + shift).unwrap();
    Var::from_tensor(&t.to_dtype(DType::F64).unwrap()).unwrap()
}

#[test]
fn layer_norm_gradient_matches_finite_differences() {
    let mut rng = Rng::new(11);
    let vars = [
        f64_var(&mut rng, &[3, 5], 2.0, 0.5),
        f64_var(&mut rng, &[5], 1.0, 1.0),
        f64_var(&mut rng, &[5], 1.0, 0.0),
    ];
    check_fd(
        &vars,
        &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        12,
    );
}

#[test]
fn softmax_gradient_matches_finite_differences() {
    let mut rng = Rng::new(13);
    let vars = [f64_var(&mut rng, &[4, 7], 3.0, 0.0)];
    check_fd(&vars, &|t| softmax_last_dim(&t[0]).unwrap(), 14);
    // with -inf entries, as under a causal mask
    let mask = Tensor::from_vec(
        (0..28)
            .map(|i| {
                if i % 7 > i / 7 {
                    f64::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect::<Vec<f64>>(),
        (4, 7),
        &CPU,
    )
    .unwrap();
    check_fd(
        &vars,
        &|t| softmax_last_dim(&(&t[0] + &mask).unwrap()).unwrap(),
        15,
    );
}

#[test]
fn parameter_count_of_the_benchmark_shapes() {
    // W3 (masked diffusion: 96 symbols + mask in, 96 out) and W4 (autoregressive: 96 / 96).
    for (vocab_in, causal, expected) in [(97, false, 3_274_592usize), (96, true, 3_274_336)] {
        let cfg = TransformerConfig {
            vocab_in,
            vocab_out: 96,
            max_len: 256,
            d_model: 256,
            n_layers: 4,
            n_heads: 4,
            mask: causal.into(),
            positions: Positions::Learned,
        };
        assert_eq!(cfg.num_params(), expected);
        let (vm, _net) = build(cfg, 0);
        let n: usize = named_vars(&vm)
            .unwrap()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(n, expected);
    }
}

#[test]
fn bad_shapes_are_errors() {
    let mut cfg = small(true);
    cfg.n_heads = 3;
    let vm = VarMap::new();
    let mut rng = Rng::new(0);
    assert!(Transformer::new(&mut ParamInit::new(&vm, &mut rng, &CPU), cfg).is_err());
    let (_vm, net) = build(small(true), 0);
    assert!(net.forward(&ids(&[0; 9], 1, 9)).is_err(), "too long");
    assert!(
        net.forward(&ids(&[11; 4], 1, 4)).is_err(),
        "id out of range"
    );
}
