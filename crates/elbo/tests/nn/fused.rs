//! The fused CPU kernels against their references: the linear + bias + SiLU op (values,
//! gradients, finite differences), the MLP paths built on it, in-place AdamW against the
//! tensor-op AdamW, and in-place EMA against its formula.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use elbo::nn::fused::{exp_f32, linear_act, linear_act_inference, FusedAct};
use elbo::nn::{Activation, Mlp, ParamInit};
use elbo::train::ema::Ema;
use elbo::train::optim::{AdamW, AdamWConfig};
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

/// max |a - b| / (|b| + floor).
fn max_rel(a: &[f64], b: &[f64], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + floor))
        .fold(0.0, f64::max)
}

/// max |a - b| / max |b|: error relative to the tensor's scale.
fn scaled_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn normal(rng: &mut Rng, shape: &[usize], std: f64) -> Tensor {
    (rng.normal_tensor(shape, &CPU).unwrap() * std).unwrap()
}

fn composed(x: &Tensor, w: &Tensor, b: &Tensor, act: FusedAct) -> Tensor {
    let z = x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap();
    match act {
        FusedAct::Identity => z,
        FusedAct::Silu => z.silu().unwrap(),
    }
}

#[test]
fn exp_f32_is_accurate_over_its_range() {
    let mut worst = 0.0f64;
    let n = 200_001;
    for i in 0..n {
        let x = -87.0 + 175.0 * i as f64 / (n - 1) as f64;
        let x = x as f32;
        let got = exp_f32(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 3e-7, "worst relative error {worst:e}");
    assert!(exp_f32(f32::NAN).is_nan());
    assert_eq!(exp_f32(0.0), 1.0);
    assert!(exp_f32(-1000.0) < 1e-37 && exp_f32(-1000.0) >= 0.0);
    assert!(exp_f32(1000.0).is_finite() && exp_f32(1000.0) > 1e38);
}

/// Random `x [rows, d_in]`, `W [d_out, d_in]`, `b [d_out]` as variables, and a cotangent.
struct Case {
    x: Var,
    w: Var,
    b: Var,
    r: Tensor,
}

fn case(rows: usize, d_in: usize, d_out: usize, seed: u64) -> Case {
    let mut rng = Rng::new(seed);
    Case {
        x: Var::from_tensor(&normal(&mut rng, &[rows, d_in], 1.5)).unwrap(),
        w: Var::from_tensor(&normal(&mut rng, &[d_out, d_in], 0.6)).unwrap(),
        b: Var::from_tensor(&normal(&mut rng, &[d_out], 0.5)).unwrap(),
        r: normal(&mut rng, &[rows, d_out], 1.0),
    }
}

impl Case {
    /// `sum(r * y)`, so the gradient of y is `r`.
    fn loss_grads(&self, y: &Tensor) -> GradStore {
        (y * &self.r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    }

    /// The gradients of x, W and b (zeros where candle recorded none: its composed ops give
    /// no bias gradient for an empty batch).
    fn grads(&self, g: &GradStore) -> [Vec<f64>; 3] {
        [&self.x, &self.w, &self.b].map(|v| match g.get(v.as_tensor()) {
            Some(t) => vals(t),
            None => vec![0.0; v.elem_count()],
        })
    }
}

fn check_against_composed(rows: usize, d_in: usize, d_out: usize, act: FusedAct) {
    let c = case(rows, d_in, d_out, 7 + rows as u64);
    let (x, w, b) = (c.x.as_tensor(), c.w.as_tensor(), c.b.as_tensor());
    let y = linear_act(x, w, b, act).unwrap();
    let y_ref = composed(x, w, b, act);
    assert_eq!(y.dims(), &[rows, d_out]);
    let err = max_rel(&vals(&y), &vals(&y_ref), 1e-6);
    assert!(
        err < 1e-5,
        "{act:?} {rows}x{d_in}->{d_out}: value error {err:e}"
    );
    let y_inf = linear_act_inference(x, w, b, act).unwrap();
    assert!(
        !y_inf.track_op(),
        "the inference path must not record a graph"
    );
    assert_eq!(
        vals(&y_inf),
        vals(&y),
        "inference and training paths agree exactly"
    );

    let got = c.grads(&c.loss_grads(&y));
    let want = c.grads(&c.loss_grads(&y_ref));
    for (name, (g, r)) in ["x", "W", "b"].iter().zip(got.iter().zip(&want)) {
        let err = scaled_err(g, r);
        assert!(
            err < 1e-4,
            "{act:?} {rows}x{d_in}->{d_out}: d{name} error {err:e}"
        );
    }
}

#[test]
fn fused_linear_silu_matches_composed_ops_on_odd_shapes() {
    check_against_composed(37, 13, 29, FusedAct::Silu);
    check_against_composed(1, 1, 1, FusedAct::Silu);
    check_against_composed(0, 3, 4, FusedAct::Silu); // empty batch
    check_against_composed(5, 64, 3, FusedAct::Silu);
    // Large enough for the multi-threaded kernels (>= 32768 outputs, several row chunks).
    check_against_composed(1500, 13, 29, FusedAct::Silu);
}

#[test]
fn fused_linear_identity_matches_composed_ops() {
    check_against_composed(37, 13, 29, FusedAct::Identity);
    check_against_composed(1500, 7, 31, FusedAct::Identity);
}

/// sum_ij r_ij act(sum_k x_ik W_jk + b_j) in f64.
fn loss_f64(x: &[f64], w: &[f64], b: &[f64], r: &[f64], d_in: usize, silu: bool) -> f64 {
    let d_out = b.len();
    let rows = x.len() / d_in;
    let mut total = 0.0;
    for i in 0..rows {
        for j in 0..d_out {
            let z: f64 = (0..d_in)
                .map(|k| x[i * d_in + k] * w[j * d_in + k])
                .sum::<f64>()
                + b[j];
            let a = if silu { z / (1.0 + (-z).exp()) } else { z };
            total += r[i * d_out + j] * a;
        }
    }
    total
}

#[test]
fn fused_gradients_match_central_finite_differences_in_f64() {
    let (rows, d_in, d_out) = (37, 13, 29);
    for act in [FusedAct::Silu, FusedAct::Identity] {
        let c = case(rows, d_in, d_out, 99);
        let y = linear_act(c.x.as_tensor(), c.w.as_tensor(), c.b.as_tensor(), act).unwrap();
        let analytic = c.grads(&c.loss_grads(&y));
        let mut p = [&c.x, &c.w, &c.b].map(|v| vals(v.as_tensor()));
        let r = vals(&c.r);
        let silu = act == FusedAct::Silu;
        let h = 1e-5;
        for which in 0..3 {
            let mut fd = vec![0.0; p[which].len()];
            for (i, f) in fd.iter_mut().enumerate() {
                let orig = p[which][i];
                p[which][i] = orig + h;
                let up = loss_f64(&p[0], &p[1], &p[2], &r, d_in, silu);
                p[which][i] = orig - h;
                let down = loss_f64(&p[0], &p[1], &p[2], &r, d_in, silu);
                p[which][i] = orig;
                *f = (up - down) / (2.0 * h);
            }
            let err = scaled_err(&analytic[which], &fd);
            assert!(
                err < 1e-4,
                "{act:?} input {which}: error {err:e} against f64 differences"
            );
        }
    }
}

#[test]
fn gradients_skip_inputs_that_do_not_track() {
    let c = case(9, 4, 6, 3);
    let x = c.x.as_tensor().detach();
    let y = linear_act(&x, c.w.as_tensor(), c.b.as_tensor(), FusedAct::Silu).unwrap();
    let g = c.loss_grads(&y);
    assert!(g.get(&x).is_none());
    assert!(g.get(c.w.as_tensor()).is_some() && g.get(c.b.as_tensor()).is_some());
}

fn mlp(act: Activation, seed: u64) -> (VarMap, Mlp) {
    let vm = VarMap::new();
    let mut rng = Rng::new(seed);
    let m = {
        let mut p = ParamInit::new(&vm, &mut rng, &CPU);
        Mlp::new(&mut p, 13, 29, 3, 5, act).unwrap()
    };
    (vm, m)
}

#[test]
fn mlp_paths_agree_with_each_other_and_with_composed_ops() {
    for act in [Activation::Silu, Activation::Tanh, Activation::Relu] {
        let (vm, m) = mlp(act, 5);
        let x = normal(&mut Rng::new(6), &[37, 13], 1.0);
        let y = m.forward(&x).unwrap();
        let y_inf = m.forward_inference(&x).unwrap();
        assert!(!y_inf.track_op());
        assert_eq!(vals(&y), vals(&y_inf), "{act:?}");
        // Composed reference from the same weights.
        let data = vm.data().lock().unwrap();
        let get = |n: &str| data[n].as_tensor().clone();
        let mut h = x.clone();
        for i in 0..3 {
            let z = composed(
                &h,
                &get(&format!("hidden.{i}.weight")),
                &get(&format!("hidden.{i}.bias")),
                FusedAct::Identity,
            );
            h = act.apply(&z).unwrap();
        }
        let y_ref = composed(&h, &get("out.weight"), &get("out.bias"), FusedAct::Identity);
        // the fused forward pass sums in the packed GEMM's order, not candle's: agreement to
        // float rounding relative to the output's scale
        let err = scaled_err(&vals(&y), &vals(&y_ref));
        assert!(err < 2e-6, "{act:?}: value error {err:e}");
        let gy = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gr = y_ref.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in data.iter() {
            let err = scaled_err(&vals(gy.get(v).unwrap()), &vals(gr.get(v).unwrap()));
            assert!(err < 1e-4, "{act:?} {name}: gradient error {err:e}");
        }
    }
}

#[test]
fn linear_takes_rank_three_inputs() {
    let vm = VarMap::new();
    let mut rng = Rng::new(8);
    let l = {
        let mut p = ParamInit::new(&vm, &mut rng, &CPU);
        elbo::nn::Linear::new(&mut p, 13, 29, true).unwrap()
    };
    let x = normal(&mut rng, &[3, 7, 13], 1.0);
    let y = l.forward(&x).unwrap();
    assert_eq!(y.dims(), &[3, 7, 29]);
    let y_ref = x
        .broadcast_matmul(&l.weight().t().unwrap())
        .unwrap()
        .broadcast_add(l.bias().unwrap())
        .unwrap();
    assert!(max_rel(&vals(&y), &vals(&y_ref), 1e-6) < 1e-6);
    let y = l.forward_silu(&x.transpose(0, 1).unwrap()).unwrap(); // non-contiguous: composed
    let y_ref = y_ref.transpose(0, 1).unwrap().silu().unwrap();
    assert!(max_rel(&vals(&y), &vals(&y_ref), 1e-6) < 1e-5);
}

// ------------------------------------------------------------------------------------------------
// AdamW and EMA

/// The tensor-op AdamW step (the fallback path, op for op) for one parameter.
fn tensor_adamw(
    p: &Tensor,
    m: &mut Option<(Tensor, Tensor)>,
    g: &Tensor,
    t: f64,
    lr: f64,
    c: &AdamWConfig,
) -> Tensor {
    let (b1, b2) = (c.beta1, c.beta2);
    let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
    let step_size = lr / (1.0 - b1.powf(t));
    let g2 = g.sqr().unwrap();
    let (mn, vn) = match m.take() {
        Some((m, v)) => (
            (m.affine(b1, 0.0).unwrap() + g.affine(1.0 - b1, 0.0).unwrap()).unwrap(),
            (v.affine(b2, 0.0).unwrap() + g2.affine(1.0 - b2, 0.0).unwrap()).unwrap(),
        ),
        None => (
            g.affine(1.0 - b1, 0.0).unwrap(),
            g2.affine(1.0 - b2, 0.0).unwrap(),
        ),
    };
    let denom = vn.sqrt().unwrap().affine(1.0 / bc2_sqrt, c.eps).unwrap();
    let update = mn.div(&denom).unwrap().affine(step_size, 0.0).unwrap();
    let p = p.affine(1.0 - lr * c.weight_decay, 0.0).unwrap();
    *m = Some((mn, vn));
    (p - update).unwrap()
}

/// Values of exported tensors, by key.
type Snapshot = HashMap<String, Vec<f64>>;

#[test]
fn fused_adamw_matches_the_tensor_op_adamw() {
    let mut rng = Rng::new(11);
    // Odd sizes, and one large enough for the multi-threaded kernel.
    let shapes: [&[usize]; 3] = [&[29, 13], &[29], &[40_000]];
    let params: Vec<(String, Var)> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (
                format!("p{i}"),
                Var::from_tensor(&normal(&mut rng, s, 1.0)).unwrap(),
            )
        })
        .collect();
    let mut refs: Vec<Tensor> = params
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let mut ref_m: Vec<Option<(Tensor, Tensor)>> = vec![None; params.len()];
    let cfg = AdamWConfig {
        lr: 0.01,
        weight_decay: 0.1,
        eps: 1e-6,
        ..Default::default()
    };
    let mut opt = AdamW::new(cfg.clone());
    let mut exported: Option<(HashMap<String, Tensor>, Snapshot)> = None;
    for step in 1..=6 {
        // Gradient of sum(c * p^3 / 3) = c * p^2 with fresh random c each step.
        let cs: Vec<Tensor> = shapes.iter().map(|s| normal(&mut rng, s, 1.0)).collect();
        let loss = params
            .iter()
            .zip(&cs)
            .map(|((_, v), c)| {
                (v.as_tensor().powf(3.0).unwrap() * c)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            })
            .reduce(|a, b| (a + b).unwrap())
            .unwrap();
        let grads = loss.backward().unwrap();
        let lr = 0.01 * step as f64;
        for (i, (_, v)) in params.iter().enumerate() {
            let g = grads.get(v.as_tensor()).unwrap();
            refs[i] = tensor_adamw(&refs[i], &mut ref_m[i], g, step as f64, lr, &cfg);
        }
        opt.step(&params, &grads, lr).unwrap();
        for (i, (name, v)) in params.iter().enumerate() {
            let d = max_rel(&vals(v.as_tensor()), &vals(&refs[i]), 1.0);
            // Bit-identical: the same f32 operations in the same order.
            assert!(d == 0.0, "step {step} {name}: differs by {d:e}");
            let st = opt.state_tensors();
            let (m, vv) = ref_m[i].as_ref().unwrap();
            assert!(max_rel(&vals(&st[&format!("m.{name}")]), &vals(m), 1e-3) <= 1e-6);
            assert!(max_rel(&vals(&st[&format!("v.{name}")]), &vals(vv), 1e-3) <= 1e-6);
        }
        if step == 3 {
            let st = opt.state_tensors();
            let copy = st.iter().map(|(k, t)| (k.clone(), vals(t))).collect();
            exported = Some((st, copy));
        }
    }
    // Exported state is a snapshot: the in-place steps after it did not change it.
    let (st, copy) = exported.unwrap();
    for (k, t) in &st {
        assert_eq!(&vals(t), &copy[k], "exported {k} changed");
    }
}

#[test]
fn in_place_ema_matches_its_formula() {
    for dtype in [DType::F32, DType::F64] {
        let mut rng = Rng::new(21);
        let shapes: [&[usize]; 2] = [&[29, 13], &[40_000]];
        let params: Vec<(String, Var)> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = normal(&mut rng, s, 1.0).to_dtype(dtype).unwrap();
                (format!("p{i}"), Var::from_tensor(&t).unwrap())
            })
            .collect();
        let mut ema = Ema::new(&params, 0.95).unwrap();
        let mut want: Vec<Vec<f64>> = params.iter().map(|(_, v)| vals(v.as_tensor())).collect();
        let mut snapshot = None;
        for step in 0..8u64 {
            for (_, v) in &params {
                let noise = normal(&mut rng, v.dims(), 0.1).to_dtype(dtype).unwrap();
                v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
            }
            let d = ema.effective_decay();
            assert_eq!(d, 0.95f64.min((1.0 + step as f64) / (10.0 + step as f64)));
            ema.update(&params).unwrap();
            for (i, (name, v)) in params.iter().enumerate() {
                let p = vals(v.as_tensor());
                for (w, pv) in want[i].iter_mut().zip(&p) {
                    *w = d * *w + (1.0 - d) * pv;
                }
                let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
                let got = vals(&ema.tensors()[name]);
                let err = max_rel(&got, &want[i], 1.0);
                assert!(err < tol, "{dtype:?} step {step} {name}: {err:e}");
            }
            if step == 2 {
                let t = ema.tensors();
                let copy: Snapshot = t.iter().map(|(k, v)| (k.clone(), vals(v))).collect();
                snapshot = Some((t, copy));
            }
        }
        let (t, copy) = snapshot.unwrap();
        for (k, v) in &t {
            assert_eq!(&vals(v), &copy[k], "exported {k} changed");
        }
        // Swapping twice restores the live weights exactly.
        let live: Vec<Vec<f64>> = params.iter().map(|(_, v)| vals(v.as_tensor())).collect();
        ema.swap(&params).unwrap();
        let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
        for (i, (_, v)) in params.iter().enumerate() {
            assert!(max_rel(&vals(v.as_tensor()), &want[i], 1.0) < tol);
        }
        ema.swap(&params).unwrap();
        let back: Vec<Vec<f64>> = params.iter().map(|(_, v)| vals(v.as_tensor())).collect();
        assert_eq!(back, live);
    }
}

/// The one dispatch rule: fused kernels on CPU `f32` only. A CUDA (or Metal) tensor takes the
/// composed candle path of every entry point, which the other tests here check against the
/// fused one on the CPU (`f64` CPU tensors take that path too: see the tests of
/// `fused_transformer.rs` and `device_fallback.rs`, which runs it on a GPU).
#[test]
fn fused_kernels_are_picked_on_cpu_f32_only() {
    use candle_core::DeviceLocation;
    use elbo::nn::fused::{cpu_f32, fused_at};
    assert!(fused_at(DeviceLocation::Cpu, DType::F32));
    for dtype in [DType::F64, DType::F16, DType::BF16] {
        assert!(!fused_at(DeviceLocation::Cpu, dtype), "{dtype:?}");
    }
    for loc in [
        DeviceLocation::Cuda { gpu_id: 0 },
        DeviceLocation::Cuda { gpu_id: 3 },
        DeviceLocation::Metal { gpu_id: 0 },
    ] {
        assert!(!fused_at(loc, DType::F32), "{loc:?}");
    }
    let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(cpu_f32(&[&x, &x]));
    assert!(!cpu_f32(&[&x, &x64]));
}
