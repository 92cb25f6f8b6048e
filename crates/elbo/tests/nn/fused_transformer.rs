//! The fused transformer kernels (layer norm, softmax / log-softmax, flash attention,
//! weighted cross-entropy) against the composed candle references they replace: values and the
//! gradients of every input on odd shapes (serial and parallel paths), central finite
//! differences of the fused ops themselves, the masking rules, error cases, and sampling that
//! records no autograd graph.

use candle_core::{DType, Device, Tensor, Var};
use elbo::config::SampleOptions;
use elbo::continuous::diffusion::net::NetConfig;
use elbo::data::DataKind;
use elbo::model::{DataInfo, GenerativeModel};
use elbo::models::flow_matching::{self, FlowMatching};
use elbo::nn::fused::{gelu_erf_f32, linear_gelu_erf, IGNORE_INDEX};
use elbo::nn::transformer::{
    attention, attention_cached, attention_composed, attention_qkv, cross_entropy_rows,
    cross_entropy_weighted, cross_entropy_weighted_composed, layer_norm, layer_norm_composed,
    log_softmax_last_dim, log_softmax_last_dim_composed, softmax_last_dim,
    softmax_last_dim_composed,
};
use elbo::Rng;

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference's scale (at least 1e-2, for
/// references that are exactly zero, e.g. the query gradient with a single key).
fn scaled_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-2);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn var(rng: &mut Rng, shape: &[usize], std: f64, shift: f64) -> Var {
    let t = ((rng.normal_tensor(shape, &CPU).unwrap() * std).unwrap() + shift).unwrap();
    Var::from_tensor(&t).unwrap()
}

/// Values of `f(inputs)` and the gradients of `sum(f(inputs) * r)` for every input (zeros where
/// none was recorded), `r` a fixed random cotangent.
fn run(inputs: &[&Var], f: &dyn Fn(&[Tensor]) -> Tensor, seed: u64) -> (Vec<f64>, Vec<Vec<f64>>) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = Rng::new(seed).normal_tensor(y.dims(), &CPU).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = inputs
        .iter()
        .map(|v| match g.get(v.as_tensor()) {
            Some(t) => vals(t),
            None => vec![0.0; v.elem_count()],
        })
        .collect();
    (vals(&y), grads)
}

/// The fused `f` and the composed `reference` agree in value (`tol_v`) and in every input's
/// gradient (`tol_g`), relative to the reference's scale.
fn agree(
    what: &str,
    inputs: &[&Var],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    reference: &dyn Fn(&[Tensor]) -> Tensor,
    (tol_v, tol_g): (f64, f64),
) {
    let (y, g) = run(inputs, f, 99);
    let (y_ref, g_ref) = run(inputs, reference, 99);
    let e = scaled_err(&y, &y_ref);
    assert!(e < tol_v, "{what}: value error {e:e}");
    let nonzero = g_ref.iter().flatten().filter(|x| **x != 0.0).count();
    assert!(nonzero > 0, "{what}: the reference gradients are all zero");
    for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
        let e = scaled_err(a, b);
        assert!(e < tol_g, "{what}: gradient of input {i}: error {e:e}");
    }
}

/// Backprop through the fused `f` against central differences of `sum(f * r)` (accumulated in
/// f64) at a few elements of every input, step `h`.
fn finite_differences(what: &str, inputs: &[&Var], f: &dyn Fn(&[Tensor]) -> Tensor, h: f64) {
    let (_, grads) = run(inputs, f, 7);
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().detach()).collect();
    let r = vals(&Rng::new(7).normal_tensor(f(&ts).dims(), &CPU).unwrap());
    let obj = |ts: &[Tensor]| -> f64 { vals(&f(ts)).iter().zip(&r).map(|(a, b)| a * b).sum() };
    for (k, v) in inputs.iter().enumerate() {
        let base = vals(v.as_tensor());
        let n = base.len();
        for i in [0, n / 3, n / 2, (2 * n) / 3, n - 1] {
            let at = |delta: f64| {
                let mut p = base.clone();
                p[i] += delta;
                let mut ts = ts.clone();
                ts[k] = Tensor::from_vec(p, v.dims(), &CPU)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                obj(&ts)
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            let g = grads[k][i];
            assert!(
                (fd - g).abs() < 5e-3 * (1.0 + g.abs()),
                "{what}: input {k} element {i}: backprop {g} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn layer_norm_matches_composed() {
    // (shape, parallel path?) — the last has 200 * 256 >= 2^15 elements
    for (k, shape) in [vec![1, 3], vec![7, 97], vec![2, 5, 3], vec![200, 256]]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(10 + k as u64);
        let d = *shape.last().unwrap();
        let x = var(&mut rng, &shape, 2.0, 0.5);
        let w = var(&mut rng, &[d], 0.5, 1.0);
        let b = var(&mut rng, &[d], 0.5, 0.0);
        agree(
            &format!("layer norm {shape:?}"),
            &[&x, &w, &b],
            &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            &|t| layer_norm_composed(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            (1e-5, 1e-4),
        );
    }
}

#[test]
fn gelu_erf_f32_matches_f64_erf() {
    let n = 40_001;
    let z: Vec<f64> = (0..n)
        .map(|i| -12.0 + 24.0 * i as f64 / (n - 1) as f64)
        .collect();
    let zt = Tensor::from_vec(z.clone(), n, &CPU).unwrap();
    let want = vals(&zt.gelu_erf().unwrap()); // libm's f64 erf
    for (i, &zi) in z.iter().enumerate() {
        let (g, d) = gelu_erf_f32(zi as f32);
        let err = (g as f64 - want[i]).abs();
        // relative accuracy in both tails (gelu(-8) is about -5e-15)
        assert!(
            err <= 1e-6 * want[i].abs() + 1e-7 * zi.abs().min(1.0),
            "gelu({zi}) = {g} vs {}",
            want[i]
        );
        // derivative against the closed form Phi(z) + z phi(z), Phi from the f64 gelu
        let phi = (-0.5 * zi * zi).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let cdf = if zi.abs() > 1e-3 {
            want[i] / zi
        } else {
            0.5 + zi * phi
        };
        let dw = cdf + zi * phi;
        assert!(
            (d as f64 - dw).abs() < 2e-6 * (1.0 + dw.abs()),
            "gelu'({zi}) = {d} vs {dw}"
        );
    }
}

#[test]
fn linear_gelu_matches_composed() {
    for (k, (rows, d_in, d_out)) in [(1, 1, 1), (37, 13, 29), (1500, 13, 29)]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(30 + k as u64);
        let x = var(&mut rng, &[rows, d_in], 1.0, 0.0);
        let w = var(&mut rng, &[d_out, d_in], 0.7, 0.0);
        let b = var(&mut rng, &[d_out], 0.5, 0.0);
        agree(
            &format!("linear + GELU {rows}x{d_in}->{d_out}"),
            &[&x, &w, &b],
            &|t| linear_gelu_erf(&t[0], &t[1], &t[2]).unwrap(),
            &|t| {
                let z = t[0].matmul(&t[1].t().unwrap()).unwrap();
                z.broadcast_add(&t[2]).unwrap().gelu_erf().unwrap()
            },
            (1e-5, 1e-4),
        );
    }
}

#[test]
fn softmax_and_log_softmax_match_composed() {
    for (k, shape) in [vec![1, 2], vec![7, 67], vec![3, 5, 97], vec![400, 97]]
        .into_iter()
        .enumerate()
    {
        let mut rng = Rng::new(20 + k as u64);
        let x = var(&mut rng, &shape, 3.0, 0.0);
        agree(
            &format!("softmax {shape:?}"),
            &[&x],
            &|t| softmax_last_dim(&t[0]).unwrap(),
            &|t| softmax_last_dim_composed(&t[0]).unwrap(),
            (1e-5, 1e-4),
        );
        agree(
            &format!("log-softmax {shape:?}"),
            &[&x],
            &|t| log_softmax_last_dim(&t[0]).unwrap(),
            &|t| log_softmax_last_dim_composed(&t[0]).unwrap(),
            (1e-5, 1e-4),
        );
    }
    // -inf entries (a causal mask) get probability 0 and gradient 0
    let mut rng = Rng::new(29);
    let x = var(&mut rng, &[4, 7], 2.0, 0.0);
    let mask: Vec<f32> = (0..28)
        .map(|i| {
            if i % 7 > i / 7 {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let mask = Tensor::from_vec(mask, (4, 7), &CPU).unwrap();
    agree(
        "masked softmax",
        &[&x],
        &|t| softmax_last_dim(&(&t[0] + &mask).unwrap()).unwrap(),
        &|t| softmax_last_dim_composed(&(&t[0] + &mask).unwrap()).unwrap(),
        (1e-6, 1e-5),
    );
    let y = vals(&softmax_last_dim(&(x.as_tensor() + &mask).unwrap()).unwrap());
    assert!((0..28).filter(|i| i % 7 > i / 7).all(|i| y[i] == 0.0));
}

fn qkv(rng: &mut Rng, (b, h, lq, lk, dh): (usize, usize, usize, usize, usize)) -> [Var; 3] {
    [
        var(rng, &[b, h, lq, dh], 1.0, 0.0),
        var(rng, &[b, h, lk, dh], 1.0, 0.0),
        var(rng, &[b, h, lk, dh], 1.0, 0.0),
    ]
}

#[test]
fn flash_attention_matches_composed() {
    let mut shapes = Vec::new();
    for l in [1, 7, 33, 65] {
        for dh in [5, 16] {
            shapes.push((2, 3, l, l, dh));
        }
    }
    // fewer queries than keys (cached keys), and a case large enough for the parallel path
    // with several query and key tiles, the last ones partial
    shapes.extend([(1, 2, 3, 70, 8), (1, 1, 65, 130, 4), (2, 4, 130, 130, 16)]);
    for (n, &s) in shapes.iter().enumerate() {
        for causal in [false, true] {
            let mut rng = Rng::new(100 + n as u64);
            let [q, k, v] = qkv(&mut rng, s);
            agree(
                &format!("attention {s:?} causal {causal}"),
                &[&q, &k, &v],
                &|t| attention(&t[0], &t[1], &t[2], causal).unwrap(),
                &|t| attention_composed(&t[0], &t[1], &t[2], causal).unwrap(),
                (1e-5, 1e-4),
            );
        }
    }
}

/// Attention against a preallocated KV cache (incremental decoding): `q` against the first
/// `lk` rows of `[B, H, cap, dh]` buffers whose later rows hold garbage, against the composed
/// reference on the narrowed keys, for every mask kind, on the serial and parallel paths, and
/// with one query (autoregressive decoding) and a block of queries (block diffusion).
#[test]
fn cached_attention_matches_composed() {
    use elbo::nn::attention_mask::AttentionMask;
    let masks = [
        AttentionMask::Full,
        AttentionMask::Causal,
        AttentionMask::BlockCausal { block: 3 },
    ];
    let shapes = [
        (2, 3, 1, 1, 9, 5),
        (2, 3, 1, 7, 9, 16),
        (1, 2, 4, 12, 20, 8),
        (4, 4, 4, 200, 256, 64),
    ];
    for (n, &(b, h, lq, lk, cap, dh)) in shapes.iter().enumerate() {
        let mut rng = Rng::new(300 + n as u64);
        let q = rng.normal_tensor(&[b, h, lq, dh], &CPU).unwrap();
        // the rows past `lk` are garbage that must not be read
        let kb = (rng.normal_tensor(&[b, h, cap, dh], &CPU).unwrap() * 3.0).unwrap();
        let vb = (rng.normal_tensor(&[b, h, cap, dh], &CPU).unwrap() * 3.0).unwrap();
        let (k, v) = (kb.narrow(2, 0, lk).unwrap(), vb.narrow(2, 0, lk).unwrap());
        for mask in masks {
            if mask.check(lq, lk).is_err() {
                continue;
            }
            let got = vals(&attention_cached(&q, &kb, &vb, lk, mask).unwrap());
            let want = vals(&attention_composed(&q, &k, &v, mask).unwrap());
            let err = scaled_err(&got, &want);
            assert!(
                err < 1e-5,
                "cached attention {:?} {mask:?}: error {err}",
                (b, h, lq, lk, cap, dh)
            );
        }
    }
    let q = Tensor::zeros((1, 1, 1, 4), DType::F32, &CPU).unwrap();
    let kb = Tensor::zeros((1, 1, 3, 4), DType::F32, &CPU).unwrap();
    assert!(
        attention_cached(&q, &kb, &kb, 4, AttentionMask::Full).is_err(),
        "more keys than the buffer holds"
    );
}

/// The composed reference of [`attention_qkv`]: split the heads, attend, merge the heads.
fn qkv_reference(qkv: &Tensor, heads: usize, causal: bool) -> Tensor {
    let (b, l, d3) = qkv.dims3().unwrap();
    let dh = d3 / (3 * heads);
    let x = qkv
        .reshape((b, l, 3, heads, dh))
        .unwrap()
        .permute((2, 0, 3, 1, 4))
        .unwrap(); // [3, B, H, L, dh]
    let part = |i: usize| x.get(i).unwrap().contiguous().unwrap();
    let y = attention_composed(&part(0), &part(1), &part(2), causal).unwrap();
    y.transpose(1, 2).unwrap().reshape((b, l, d3 / 3)).unwrap()
}

#[test]
fn packed_attention_matches_composed() {
    // (B, L, H, dh); the last is large enough for the parallel path with partial tiles
    for (n, (b, l, h, dh)) in [
        (2, 1, 3, 5),
        (1, 7, 2, 16),
        (2, 33, 3, 5),
        (3, 65, 2, 16),
        (2, 130, 4, 16),
    ]
    .into_iter()
    .enumerate()
    {
        for causal in [false, true] {
            let mut rng = Rng::new(200 + n as u64);
            let qkv = var(&mut rng, &[b, l, 3 * h * dh], 1.0, 0.0);
            agree(
                &format!("packed attention B{b} L{l} H{h} dh{dh} causal {causal}"),
                &[&qkv],
                &|t| attention_qkv(&t[0], h, causal).unwrap(),
                &|t| qkv_reference(&t[0], h, causal),
                (1e-5, 1e-4),
            );
        }
    }
    let qkv = Tensor::zeros((1, 4, 10), DType::F32, &CPU).unwrap();
    assert!(
        attention_qkv(&qkv, 3, false).is_err(),
        "10 is not 3 x 3 x dh"
    );
}

#[test]
fn causal_attention_ignores_later_keys() {
    let mut rng = Rng::new(3);
    let (l, dh) = (70, 8);
    let [q, k, v] = qkv(&mut rng, (1, 1, l, l, dh));
    let y0 = vals(&attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), true).unwrap());
    // changing key / value j leaves the outputs of queries i < j unchanged, bit for bit
    let j = 66;
    let bump = |t: &Tensor| {
        let mut x = vals(t);
        x[j * dh..(j + 1) * dh].iter_mut().for_each(|e| *e += 3.0);
        Tensor::from_vec(x, t.dims(), &CPU)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let y1 = vals(
        &attention(
            q.as_tensor(),
            &bump(k.as_tensor()),
            &bump(v.as_tensor()),
            true,
        )
        .unwrap(),
    );
    assert_eq!(y0[..j * dh], y1[..j * dh]);
    assert!(y0[j * dh..].iter().zip(&y1[j * dh..]).any(|(a, b)| a != b));
    // the first query sees only the first key: its output is v_0
    assert_eq!(y0[..dh], vals(v.as_tensor())[..dh]);
}

#[test]
fn cross_entropy_matches_composed() {
    for (k, (n, v)) in [(1, 1), (7, 67), (5, 1), (600, 67)].into_iter().enumerate() {
        let mut rng = Rng::new(40 + k as u64);
        let z = var(&mut rng, &[n, v], 2.0, 0.0);
        let t: Vec<u32> = (0..n).map(|_| rng.below(v) as u32).collect();
        let t = Tensor::from_vec(t, n, &CPU).unwrap();
        // weights with zeros in every third row
        let w: Vec<f32> = (0..n)
            .map(|i| {
                if i % 3 == 1 {
                    0.0
                } else {
                    0.5 + (i % 5) as f32
                }
            })
            .collect();
        let w = Var::from_tensor(&Tensor::from_vec(w, n, &CPU).unwrap()).unwrap();
        if v > 1 {
            agree(
                &format!("weighted cross-entropy {n}x{v}"),
                &[&z, &w],
                &|x| cross_entropy_weighted(&x[0], &t, Some(&x[1])).unwrap(),
                &|x| cross_entropy_weighted_composed(&x[0], &t, Some(&x[1])).unwrap(),
                (1e-5, 1e-4),
            );
            agree(
                &format!("cross-entropy {n}x{v}"),
                &[&z],
                &|x| cross_entropy_rows(&x[0], &t).unwrap(),
                &|x| cross_entropy_weighted_composed(&x[0], &t, None).unwrap(),
                (1e-5, 1e-4),
            );
        }
        // zero-weight rows: loss 0 and no gradient
        let y = cross_entropy_weighted(z.as_tensor(), &t, Some(w.as_tensor())).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gz = vals(g.get(z.as_tensor()).unwrap());
        let yv = vals(&y);
        for i in (1..n).step_by(3) {
            assert_eq!(yv[i], 0.0);
            assert!(gz[i * v..(i + 1) * v].iter().all(|&x| x == 0.0));
        }
        // one class: the loss is 0 whatever the logit
        if v == 1 {
            assert!(vals(&cross_entropy_rows(z.as_tensor(), &t).unwrap())
                .iter()
                .all(|&x| x.abs() < 1e-6));
        }
    }
}

#[test]
fn ignored_targets_give_zero_loss_and_gradient() {
    let mut rng = Rng::new(50);
    let (n, v) = (6, 11);
    let z = var(&mut rng, &[n, v], 1.5, 0.0);
    let t = Tensor::from_vec(vec![3u32, IGNORE_INDEX, 0, 10, IGNORE_INDEX, 7], n, &CPU).unwrap();
    agree(
        "cross-entropy with ignored rows",
        &[&z],
        &|x| cross_entropy_rows(&x[0], &t).unwrap(),
        &|x| cross_entropy_weighted_composed(&x[0], &t, None).unwrap(),
        (1e-6, 1e-5),
    );
    let y = cross_entropy_rows(z.as_tensor(), &t).unwrap();
    let g = vals(
        y.sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(z.as_tensor())
            .unwrap(),
    );
    let yv = vals(&y);
    for i in [1, 4] {
        assert_eq!(yv[i], 0.0);
        assert!(g[i * v..(i + 1) * v].iter().all(|&x| x == 0.0));
    }
    // a kept row's gradient is softmax - onehot: it sums to 0 and is negative only at the target
    let row = &g[..v];
    assert!(row.iter().sum::<f64>().abs() < 1e-6);
    assert!(row.iter().enumerate().all(|(j, &x)| (j == 3) == (x < 0.0)));
}

#[test]
fn fused_gradients_match_finite_differences() {
    let mut rng = Rng::new(60);
    let (x, w, b) = (
        var(&mut rng, &[3, 7], 1.5, 0.3),
        var(&mut rng, &[7], 0.5, 1.0),
        var(&mut rng, &[7], 0.5, 0.0),
    );
    finite_differences(
        "layer norm",
        &[&x, &w, &b],
        &|t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        1e-2,
    );
    let (x, w, b) = (
        var(&mut rng, &[3, 6], 1.0, 0.0),
        var(&mut rng, &[5, 6], 0.7, 0.0),
        var(&mut rng, &[5], 0.5, 0.0),
    );
    finite_differences(
        "linear + GELU",
        &[&x, &w, &b],
        &|t| linear_gelu_erf(&t[0], &t[1], &t[2]).unwrap(),
        1e-2,
    );
    let s = var(&mut rng, &[4, 9], 1.5, 0.0);
    finite_differences(
        "softmax",
        &[&s],
        &|t| softmax_last_dim(&t[0]).unwrap(),
        1e-2,
    );
    finite_differences(
        "log-softmax",
        &[&s],
        &|t| log_softmax_last_dim(&t[0]).unwrap(),
        1e-2,
    );
    for causal in [false, true] {
        let x = var(&mut rng, &[1, 67, 3 * 2 * 3], 1.0, 0.0);
        finite_differences(
            &format!("packed attention causal {causal}"),
            &[&x],
            &|t| attention_qkv(&t[0], 2, causal).unwrap(),
            1e-2,
        );
        let [q, k, v] = qkv(&mut rng, (1, 2, 67, 67, 5));
        finite_differences(
            &format!("attention causal {causal}"),
            &[&q, &k, &v],
            &|t| attention(&t[0], &t[1], &t[2], causal).unwrap(),
            1e-2,
        );
    }
    let z = var(&mut rng, &[5, 13], 2.0, 0.0);
    let t = Tensor::from_vec(vec![0u32, 12, 5, 5, 1], 5, &CPU).unwrap();
    let wt = Var::from_tensor(&Tensor::from_vec(vec![1f32, 0.0, 2.5, 0.3, 1.0], 5, &CPU).unwrap())
        .unwrap();
    finite_differences(
        "weighted cross-entropy",
        &[&z, &wt],
        &|x| cross_entropy_weighted(&x[0], &t, Some(&x[1])).unwrap(),
        1e-2,
    );
}

#[test]
fn bad_inputs_are_errors() {
    let mut rng = Rng::new(70);
    let z = rng.normal_tensor(&[4, 5], &CPU).unwrap();
    let t = Tensor::from_vec(vec![0u32, 1, 5, 2], 4, &CPU).unwrap(); // 5 is out of range
    assert!(cross_entropy_rows(&z, &t).is_err());
    let t3 = Tensor::from_vec(vec![0u32, 1, 2], 3, &CPU).unwrap();
    assert!(cross_entropy_rows(&z, &t3).is_err());
    let w3 = Tensor::ones(3, DType::F32, &CPU).unwrap();
    let t4 = Tensor::from_vec(vec![0u32, 1, 2, 3], 4, &CPU).unwrap();
    assert!(cross_entropy_weighted(&z, &t4, Some(&w3)).is_err());
    let q = rng.normal_tensor(&[1, 2, 5, 4], &CPU).unwrap();
    let k = rng.normal_tensor(&[1, 2, 3, 4], &CPU).unwrap();
    assert!(
        attention(&q, &k, &k, true).is_err(),
        "causal needs Lq <= Lk"
    );
    assert!(attention(&q, &k, &k, false).is_ok());
    let k5 = rng.normal_tensor(&[1, 2, 3, 5], &CPU).unwrap();
    assert!(attention(&q, &k5, &k5, false).is_err(), "head sizes differ");
    assert!(attention(&q, &k, &k5, false).is_err(), "k and v differ");
}

#[test]
fn f64_inputs_take_the_composed_path() {
    let mut rng = Rng::new(80);
    let x = rng.normal_tensor(&[3, 2, 9, 4], &CPU).unwrap();
    let y32 = vals(&attention(&x, &x, &x, true).unwrap());
    let x64 = x.to_dtype(DType::F64).unwrap();
    let y64 = vals(&attention(&x64, &x64, &x64, true).unwrap());
    assert!(scaled_err(&y32, &y64) < 1e-5);
}

#[test]
fn flow_matching_sampling_records_no_graph() {
    let cfg = flow_matching::Config {
        net: NetConfig {
            hidden: 16,
            layers: 2,
            ..NetConfig::default()
        },
        ..Default::default()
    };
    let data = DataInfo::flat(2, DataKind::Continuous);
    let mut rng = Rng::new(90);
    let model = FlowMatching::new(&cfg, data, &CPU, &mut rng).unwrap();
    let opts = SampleOptions {
        solver: elbo::config::SolverName::Euler,
        steps: 4,
        ..SampleOptions::default()
    };
    let x = model.sample(5, &opts, &mut rng).unwrap();
    assert_eq!(x.dims(), &[5, 2]);
    assert!(!x.track_op(), "sampling recorded an autograd graph");
    assert!(vals(&x).iter().all(|v| v.is_finite()));
}
