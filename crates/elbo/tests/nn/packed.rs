//! The packed inference GEMM ([`PackedLinear`]) and the packed MLP against plain references:
//! odd shapes (partial panels, partial row groups, several passes over `k`), every activation
//! and its derivative, thread-count independence, and the sampling paths built on them.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use elbo::continuous::diffusion::net::{BackboneChoice, NetConfig};
use elbo::models::flow_matching::VelocityMlp;
use elbo::nn::fused::{gelu_erf_f32, silu_f32, PackedLinear, RowAct};
use elbo::nn::{sinusoidal_embedding, sinusoidal_row, Activation, Mlp, PackedMlp, ParamInit};
use elbo::Rng;

/// `act(x W^T + b)` and `act'` in f64 from the same f32 inputs.
fn reference(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    rows: usize,
    k: usize,
    act: RowAct,
) -> (Vec<f64>, Vec<f64>) {
    let n = b.len();
    let (mut y, mut d) = (vec![0.0; rows * n], vec![0.0; rows * n]);
    for r in 0..rows {
        for o in 0..n {
            let z: f64 = (0..k)
                .map(|p| x[r * k + p] as f64 * w[o * k + p] as f64)
                .sum::<f64>()
                + b[o] as f64;
            let (v, dv) = match act {
                RowAct::Identity => (z, 1.0),
                RowAct::Silu => {
                    let s = 1.0 / (1.0 + (-z).exp());
                    (z * s, s * (1.0 + z * (1.0 - s)))
                }
                RowAct::GeluErf => {
                    let (g, gd) = gelu_erf_f32(z as f32);
                    (g as f64, gd as f64)
                }
            };
            y[r * n + o] = v;
            d[r * n + o] = dv;
        }
    }
    (y, d)
}

fn random(n: usize, rng: &mut Rng, scale: f32) -> Vec<f32> {
    rng.normal_vec(n).into_iter().map(|v| v * scale).collect()
}

fn max_abs_diff(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn packed_linear_matches_the_reference_on_odd_shapes() {
    let mut rng = Rng::new(7);
    // (rows, in, out): single elements, partial panels (out % 16), partial row groups
    // (rows % 6), several 256-deep passes over k, no inputs at all, more rows than a cache block
    let shapes = [
        (1, 1, 1),
        (7, 5, 3),
        (13, 300, 17),
        (50, 513, 33),
        (6, 16, 16),
        (200, 64, 40),
        (3, 0, 5),
        (301, 37, 70),
    ];
    for &(rows, k, n) in &shapes {
        let x = random(rows * k, &mut rng, 1.0);
        let w = random(n * k, &mut rng, 1.0 / (k.max(1) as f32).sqrt());
        let b = random(n, &mut rng, 0.5);
        let p = PackedLinear::new(&w, &b, n, k).unwrap();
        for act in [RowAct::Identity, RowAct::Silu, RowAct::GeluErf] {
            let (want, want_d) = reference(&x, &w, &b, rows, k, act);
            let mut y = vec![f32::NAN; rows * n];
            p.forward(&x, &mut y, act, None);
            let err = max_abs_diff(&y, &want);
            assert!(err < 2e-5, "{rows}x{k}x{n} {act:?}: max error {err}");
            let (y2, d) = p.forward_new(&x, rows, act, true);
            assert_eq!(
                y, y2,
                "{rows}x{k}x{n} {act:?}: forward and forward_new differ"
            );
            match (act, d) {
                (RowAct::Identity, d) => assert!(d.is_none()),
                (_, Some(d)) => {
                    let err = max_abs_diff(&d, &want_d);
                    assert!(err < 2e-5, "{rows}x{k}x{n} {act:?}: derivative error {err}");
                }
                (_, None) => panic!("no derivative for {act:?}"),
            }
        }
        // a bias given per call replaces the packed one
        let b2 = random(n, &mut rng, 2.0);
        let (want, _) = reference(&x, &w, &b2, rows, k, RowAct::Identity);
        let mut y = vec![0f32; rows * n];
        p.forward(&x, &mut y, RowAct::Identity, Some(&b2));
        assert!(max_abs_diff(&y, &want) < 2e-5);
    }
    assert!(PackedLinear::new(&[0.0; 5], &[0.0; 2], 2, 3).is_err());
}

#[test]
fn packed_linear_does_not_depend_on_the_thread_count() {
    let mut rng = Rng::new(8);
    for &(rows, k, n) in &[(1000, 300, 70), (20, 700, 300)] {
        let x = random(rows * k, &mut rng, 1.0);
        let w = random(n * k, &mut rng, 0.1);
        let b = random(n, &mut rng, 0.1);
        let p = PackedLinear::new(&w, &b, n, k).unwrap();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| p.forward_new(&x, rows, RowAct::Silu, true))
        };
        let one = run(1);
        for t in [2, 3] {
            assert_eq!(run(t), one, "{rows}x{k}x{n}: {t} threads differ from 1");
        }
    }
}

fn mlp(d_in: usize, act: Activation) -> (VarMap, Mlp) {
    let vm = VarMap::new();
    let mut rng = Rng::new(3);
    let m = {
        let mut p = ParamInit::new(&vm, &mut rng, &Device::Cpu);
        Mlp::new(&mut p, d_in, 48, 3, 5, act).unwrap()
    };
    (vm, m)
}

#[test]
fn packed_mlp_matches_the_mlp_with_the_shared_inputs_concatenated() {
    let (rows, own, shared) = (37, 6, 8);
    let (_vm, m) = mlp(own + shared, Activation::Silu);
    let mut rng = Rng::new(4);
    let x = random(rows * own, &mut rng, 1.0);
    let s = random(shared, &mut rng, 1.0);
    let mut full = Vec::new();
    for r in 0..rows {
        full.extend_from_slice(&x[r * own..(r + 1) * own]);
        full.extend_from_slice(&s);
    }
    let want = m
        .forward_inference(&Tensor::from_vec(full, (rows, own + shared), &Device::Cpu).unwrap())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for shared_cols in [shared, 0] {
        let p = PackedMlp::new(&m, shared_cols).unwrap().unwrap();
        let got = if shared_cols == 0 {
            // everything per row
            let mut full = Vec::new();
            for r in 0..rows {
                full.extend_from_slice(&x[r * own..(r + 1) * own]);
                full.extend_from_slice(&s);
            }
            p.forward(&full, &[]).unwrap()
        } else {
            p.forward(&x, &s).unwrap()
        };
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-5, "shared {shared_cols}: max error {err}");
        // the scratch buffers are reused: a second call gives the same
        let again = if shared_cols == 0 {
            None
        } else {
            Some(p.forward(&x, &s).unwrap())
        };
        if let Some(a) = again {
            assert_eq!(a, got);
        }
    }
    let p = PackedMlp::new(&m, shared).unwrap().unwrap();
    assert!(p.forward(&x, &s[..3]).is_err(), "wrong shared width");
    assert!(
        p.forward(&x[..7], &s).is_err(),
        "rows not a multiple of the width"
    );
    assert!(
        PackedMlp::new(&m, 100).is_err(),
        "more shared inputs than inputs"
    );
    let (_vm, tanh) = mlp(4, Activation::Tanh);
    assert!(
        PackedMlp::new(&tanh, 0).unwrap().is_none(),
        "tanh has no packed path"
    );
}

#[test]
fn the_packed_velocity_matches_the_unpacked_one() {
    let cfg = NetConfig {
        hidden: 64,
        layers: 3,
        time_embed_dim: 16,
        time_scale: 1000.0,
        ..NetConfig::default()
    };
    let vm = VarMap::new();
    let mut rng = Rng::new(5);
    let net = {
        let mut p = ParamInit::new(&vm, &mut rng, &Device::Cpu);
        VelocityMlp::new(&mut p, 2, &cfg).unwrap()
    };
    let x = rng.normal_tensor(&[33, 2], &Device::Cpu).unwrap();
    let packed = net.packed().unwrap().unwrap();
    for t in [0.0, 0.37, 1.0] {
        let tt = Tensor::full(t as f32, 33, &Device::Cpu).unwrap();
        let want = net.forward_inference(&x, &tt).unwrap();
        let got = net.forward_packed(&packed, &x, t).unwrap();
        let err = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        // the time embedding's argument is rounded once in f32 either way
        assert!(err < 1e-4, "t = {t}: max error {err}");
    }
}

#[test]
fn sinusoidal_row_is_one_row_of_the_batch_embedding() {
    let t = Tensor::new(&[0.25f32], &Device::Cpu).unwrap();
    let want = sinusoidal_embedding(&t, 9, 10000.0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(sinusoidal_row(0.25, 9, 10000.0).unwrap(), want);
    assert!(silu_f32(0.0).abs() < 1e-12);
}

/// `DenoiserNet::with_packed`: inside the scope a no-grad forward whose rows share one time
/// runs through the packed MLP and matches the unpacked values; rows at different times, and
/// gradient passes, keep the unpacked path bit for bit; the scope ends with the call.
#[test]
fn denoiser_pack_scope_matches_and_ends() {
    use elbo::continuous::diffusion::net::DenoiserNet;
    use elbo::data::DataKind;
    use elbo::model::DataInfo;
    let dev = Device::Cpu;
    let mut rng = Rng::new(11);
    let vm = VarMap::new();
    let cfg = NetConfig {
        hidden: 40,
        layers: 3,
        time_embed_dim: 12,
        time_scale: 0.7,
        backbone: BackboneChoice::Mlp,
        ..NetConfig::default()
    };
    let data = DataInfo::flat(5, DataKind::Continuous);
    let net = {
        let mut p = ParamInit::new(&vm, &mut rng, &dev);
        DenoiserNet::new(&mut p, &data, 3, &cfg).unwrap()
    };
    let x = rng.normal_tensor(&[13, 5], &dev).unwrap();
    let same = Tensor::full(417f32, 13, &dev).unwrap();
    let mixed = Tensor::arange(0f32, 13f32, &dev).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let plain = flat(&net.forward(&x, &same, false).unwrap());
    let plain_mixed = flat(&net.forward(&x, &mixed, false).unwrap());
    let plain_grad = flat(&net.forward(&x, &same, true).unwrap());
    let (packed, mixed_in, grad_in) = net
        .with_packed(|| {
            Ok((
                flat(&net.forward(&x, &same, false)?),
                flat(&net.forward(&x, &mixed, false)?),
                flat(&net.forward(&x, &same, true)?),
            ))
        })
        .unwrap();
    assert_eq!(packed.len(), 13 * 15);
    let scale = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = plain
        .iter()
        .zip(&packed)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err <= 1e-5 * scale.max(1.0), "packed vs unpacked: {err}");
    assert_ne!(plain, packed, "the scope did not take the packed path");
    assert_eq!(
        mixed_in, plain_mixed,
        "rows at different times must not use the pack"
    );
    assert_eq!(grad_in, plain_grad, "a gradient pass must not use the pack");
    // after the scope, and after a scope that failed, the unpacked path again
    assert_eq!(flat(&net.forward(&x, &same, false).unwrap()), plain);
    let failed: elbo::Result<()> = net.with_packed(|| Err(elbo::Error::Config("inside".into())));
    assert!(failed.is_err());
    assert_eq!(flat(&net.forward(&x, &same, false).unwrap()), plain);
}
