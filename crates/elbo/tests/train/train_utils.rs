//! Tests of the training utilities: AdamW, LR schedule, gradient clipping, EMA, checkpoints.

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Init, VarMap};
use elbo::train::checkpoint::{self, fnv1a64};
use elbo::train::clip::{clip_grad_norm, grad_norm};
use elbo::train::ema::Ema;
use elbo::train::optim::{named_vars, AdamW, AdamWConfig};
use elbo::train::schedule::LrSchedule;
use elbo::{Error, Rng};

const CPU: Device = Device::Cpu;

fn var(vals: &[f64], dtype: DType) -> Var {
    let t = Tensor::from_slice(vals, vals.len(), &CPU)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    Var::from_tensor(&t).unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Bit patterns (f32 -> f64 is exact, so this is bit-exact for both dtypes).
fn bits(t: &Tensor) -> Vec<u64> {
    vals(t).iter().map(|x| x.to_bits()).collect()
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

// ------------------------------------------------------------------------------------------------
// AdamW

/// The quadratic loss sum_i a_i (w_i - c_i)^2 for each parameter, with its gradients.
struct Quadratic {
    a: Vec<Vec<f64>>,
    c: Vec<Vec<f64>>,
}

impl Quadratic {
    fn grads(&self, params: &[(String, Var)]) -> candle_core::backprop::GradStore {
        let mut loss: Option<Tensor> = None;
        for (i, (_, v)) in params.iter().enumerate() {
            let dt = v.dtype();
            let a = Tensor::new(self.a[i].as_slice(), &CPU)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let c = Tensor::new(self.c[i].as_slice(), &CPU)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let term = (v.as_tensor() - c).unwrap().sqr().unwrap().mul(&a).unwrap();
            let term = term.sum_all().unwrap();
            loss = Some(match loss {
                Some(l) => (l + term).unwrap(),
                None => term,
            });
        }
        loss.unwrap().backward().unwrap()
    }

    fn grad_ref(&self, i: usize, w: &[f64]) -> Vec<f64> {
        w.iter()
            .enumerate()
            .map(|(j, &x)| 2.0 * self.a[i][j] * (x - self.c[i][j]))
            .collect()
    }
}

/// Hand-written f64 PyTorch AdamW (torch.optim.AdamW, single-tensor path) for one parameter.
struct RefAdamW {
    w: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdamW {
    fn step(&mut self, g: &[f64], lr: f64, cfg: &AdamWConfig) {
        self.t += 1;
        let bc1 = 1.0 - cfg.beta1.powi(self.t);
        let bc2 = 1.0 - cfg.beta2.powi(self.t);
        for (j, &gj) in g.iter().enumerate() {
            self.w[j] *= 1.0 - lr * cfg.weight_decay;
            self.m[j] = cfg.beta1 * self.m[j] + (1.0 - cfg.beta1) * gj;
            self.v[j] = cfg.beta2 * self.v[j] + (1.0 - cfg.beta2) * gj * gj;
            let denom = (self.v[j] / bc2).sqrt() + cfg.eps;
            self.w[j] -= lr * (self.m[j] / bc1) / denom;
        }
    }
}

fn adamw_reference_check(dtype: DType, tol: f64) {
    let q = Quadratic {
        a: vec![vec![1.0, 0.5, 3.0], vec![2.0, 0.1]],
        c: vec![vec![0.3, -1.0, 2.0], vec![-0.5, 4.0]],
    };
    let init = [vec![1.0, 2.0, -0.5], vec![0.25, -3.0]];
    let params = vec![
        ("a".to_string(), var(&init[0], dtype)),
        ("b".to_string(), var(&init[1], dtype)),
    ];
    let cfg = AdamWConfig {
        lr: 0.1,
        beta1: 0.8,
        beta2: 0.95,
        eps: 1e-3, // large enough to matter
        weight_decay: 0.2,
    };
    let mut opt = AdamW::new(cfg.clone());
    let mut refs: Vec<RefAdamW> = init
        .iter()
        .map(|w| RefAdamW {
            w: w.clone(),
            m: vec![0.0; w.len()],
            v: vec![0.0; w.len()],
            t: 0,
        })
        .collect();
    let lrs = [0.1, 0.05, 0.2, 0.1, 0.01];
    for (step, &lr) in lrs.iter().enumerate() {
        let grads = q.grads(&params);
        opt.step(&params, &grads, lr).unwrap();
        for (i, r) in refs.iter_mut().enumerate() {
            let g = q.grad_ref(i, &r.w);
            r.step(&g, lr, &cfg);
            let got = vals(params[i].1.as_tensor());
            let d = max_abs_diff(&got, &r.w);
            assert!(
                d < tol,
                "{dtype:?} step {step} param {i}: {got:?} vs {:?}",
                r.w
            );
        }
    }
    assert_eq!(opt.steps_taken(), 5);
    let st = opt.state_tensors();
    assert!(max_abs_diff(&vals(&st["m.a"]), &refs[0].m) < tol);
    assert!(max_abs_diff(&vals(&st["v.b"]), &refs[1].v) < tol);
    // The parameters really moved (the comparison is not vacuous).
    assert!(max_abs_diff(&vals(params[0].1.as_tensor()), &init[0]) > 0.1);
}

#[test]
fn adamw_matches_pytorch_reference_f64() {
    adamw_reference_check(DType::F64, 1e-12);
}

#[test]
fn adamw_matches_pytorch_reference_f32() {
    adamw_reference_check(DType::F32, 1e-6);
}

#[test]
fn adamw_skips_parameters_without_gradient() {
    let a = var(&[1.0, 2.0], DType::F32);
    let b = var(&[3.0, -4.0], DType::F32);
    let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let cfg = AdamWConfig {
        weight_decay: 0.5,
        ..Default::default()
    };
    let mut opt = AdamW::new(cfg);
    // Step 1: both get gradients.
    let loss = (a.as_tensor().sqr().unwrap().sum_all().unwrap()
        + b.as_tensor().sqr().unwrap().sum_all().unwrap())
    .unwrap();
    opt.step(&params, &loss.backward().unwrap(), 0.1).unwrap();
    let m_b = bits(&opt.state_tensors()["m.b"]);
    let v_b = bits(&opt.state_tensors()["v.b"]);
    let b_before = bits(b.as_tensor());
    let a_before = bits(a.as_tensor());
    // Step 2: only `a` has a gradient; `b` (value, weight decay, moments) must not change.
    let loss = a.as_tensor().sqr().unwrap().sum_all().unwrap();
    opt.step(&params, &loss.backward().unwrap(), 0.1).unwrap();
    assert_eq!(bits(b.as_tensor()), b_before);
    assert_eq!(bits(&opt.state_tensors()["m.b"]), m_b);
    assert_eq!(bits(&opt.state_tensors()["v.b"]), v_b);
    assert_ne!(bits(a.as_tensor()), a_before);

    // A parameter that never had a gradient has no moments at all.
    let c = var(&[1.0], DType::F32);
    let params = vec![("a".to_string(), a.clone()), ("c".to_string(), c.clone())];
    let mut opt = AdamW::new(AdamWConfig::default());
    let loss = a.as_tensor().sum_all().unwrap();
    opt.step(&params, &loss.backward().unwrap(), 0.1).unwrap();
    let st = opt.state_tensors();
    assert!(st.contains_key("m.a") && !st.contains_key("m.c") && !st.contains_key("v.c"));
    assert_eq!(vals(c.as_tensor()), vec![1.0]);
}

#[test]
fn adamw_state_round_trip_continues_identically() {
    let q = Quadratic {
        a: vec![vec![1.0, 2.0, 0.5]],
        c: vec![vec![0.5, -0.5, 1.5]],
    };
    let make = || vec![("w".to_string(), var(&[0.0, 1.0, 2.0], DType::F32))];
    let (p1, p2) = (make(), make());
    let mut o1 = AdamW::new(AdamWConfig::default());
    for _ in 0..3 {
        o1.step(&p1, &q.grads(&p1), 0.05).unwrap();
    }
    // Copy the parameters and the optimiser state, through a checkpoint on disk.
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("ck");
    let st = o1.state_tensors();
    let weights = checkpoint::vars_to_map(&p1);
    let state = serde_json::json!({ "steps": o1.steps_taken() });
    checkpoint::save(&ck, &[("model", &weights), ("optim", &st)], &state).unwrap();
    let loaded = checkpoint::load(&ck, &CPU).unwrap();
    checkpoint::load_into_vars(&loaded.files["model"], &p2, "model").unwrap();
    let mut o2 = AdamW::new(AdamWConfig::default());
    let steps = loaded.state["steps"].as_u64().unwrap();
    o2.load_state(&loaded.files["optim"], steps, &p2).unwrap();
    assert_eq!(o2.steps_taken(), 3);
    for _ in 0..4 {
        o1.step(&p1, &q.grads(&p1), 0.05).unwrap();
        o2.step(&p2, &q.grads(&p2), 0.05).unwrap();
        assert_eq!(bits(p1[0].1.as_tensor()), bits(p2[0].1.as_tensor()));
    }
    // A fresh optimiser (no restored moments) would have diverged from o1.
    let p3 = make();
    checkpoint::load_into_vars(&loaded.files["model"], &p3, "model").unwrap();
    let mut o3 = AdamW::new(AdamWConfig::default());
    o3.step(&p3, &q.grads(&p3), 0.05).unwrap();
    let mut o4 = AdamW::new(AdamWConfig::default());
    let p4 = make();
    checkpoint::load_into_vars(&loaded.files["model"], &p4, "model").unwrap();
    o4.load_state(&loaded.files["optim"], steps, &p4).unwrap();
    o4.step(&p4, &q.grads(&p4), 0.05).unwrap();
    assert_ne!(bits(p3[0].1.as_tensor()), bits(p4[0].1.as_tensor()));
}

#[test]
fn adamw_load_state_rejects_mismatches() {
    let params = vec![("w".to_string(), var(&[0.0, 1.0], DType::F32))];
    let mut opt = AdamW::new(AdamWConfig::default());
    let good = Tensor::zeros(2, DType::F32, &CPU).unwrap();
    let bad = Tensor::zeros(3, DType::F32, &CPU).unwrap();
    let cases: Vec<(HashMap<String, Tensor>, &str)> = vec![
        (
            [("m.w".into(), bad.clone()), ("v.w".into(), good.clone())].into(),
            "'m.w'",
        ),
        ([("m.w".into(), good.clone())].into(), "v.w"),
        (
            [("m.x".into(), good.clone()), ("v.x".into(), good.clone())].into(),
            "'x'",
        ),
        ([("w".into(), good.clone())].into(), "'w'"),
    ];
    for (tensors, needle) in cases {
        let e = opt.load_state(&tensors, 7, &params).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
        assert!(
            e.to_string().contains(needle),
            "{e} should mention {needle}"
        );
        assert_eq!(opt.steps_taken(), 0, "a failed load must change nothing");
    }
    let ok: HashMap<String, Tensor> = [("m.w".into(), good.clone()), ("v.w".into(), good)].into();
    opt.load_state(&ok, 7, &params).unwrap();
    assert_eq!(opt.steps_taken(), 7);
}

#[test]
fn adamw_with_clipping_and_schedule_converges() {
    let mut rng = Rng::new(42);
    let target = rng.normal_tensor(&[16], &CPU).unwrap();
    let w = Var::from_tensor(
        &rng.normal_tensor(&[16], &CPU)
            .unwrap()
            .affine(3.0, 0.0)
            .unwrap(),
    )
    .unwrap();
    let params = vec![("w".to_string(), w.clone())];
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..Default::default()
    };
    let sched = LrSchedule {
        base_lr: 0.1,
        warmup_steps: 20,
        total_steps: 600,
        min_lr_ratio: 0.0,
    };
    sched.validate().unwrap();
    let mut opt = AdamW::new(cfg);
    let loss_of = || {
        (w.as_tensor() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let initial = loss_of().to_scalar::<f32>().unwrap();
    for step in 0..600 {
        let mut grads = loss_of().backward().unwrap();
        clip_grad_norm(&params, &mut grads, 1.0).unwrap();
        opt.step(&params, &grads, sched.lr_at(step)).unwrap();
    }
    let fin = loss_of().to_scalar::<f32>().unwrap();
    assert!(initial > 1.0, "initial loss {initial}");
    assert!(fin < 1e-5, "final loss {fin} (initial {initial})");
}

#[test]
fn named_vars_are_sorted_by_name() {
    let vm = VarMap::new();
    for name in ["z.w", "a.b", "m"] {
        vm.get(2, name, Init::Const(1.0), DType::F32, &CPU).unwrap();
    }
    let names: Vec<String> = named_vars(&vm)
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, vec!["a.b", "m", "z.w"]);
}

#[test]
fn adamw_config_defaults_and_validation() {
    let d = AdamWConfig::default();
    assert_eq!(
        (d.lr, d.beta1, d.beta2, d.eps, d.weight_decay),
        (1e-3, 0.9, 0.999, 1e-8, 0.01)
    );
    let parsed: AdamWConfig = serde_json::from_str(r#"{"lr": 0.5}"#).unwrap();
    assert_eq!(
        parsed,
        AdamWConfig {
            lr: 0.5,
            ..d.clone()
        }
    );
    d.validate().unwrap();
    assert!(AdamWConfig {
        beta2: 1.0,
        ..d.clone()
    }
    .validate()
    .is_err());
    assert!(AdamWConfig { lr: f64::NAN, ..d }.validate().is_err());
}

// ------------------------------------------------------------------------------------------------
// Learning-rate schedule

#[test]
fn schedule_warmup_cosine_values() {
    let s = LrSchedule {
        base_lr: 2.0,
        warmup_steps: 10,
        total_steps: 110,
        min_lr_ratio: 0.1,
    };
    s.validate().unwrap();
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    assert!(close(s.lr_at(0), 0.2));
    assert!(close(s.lr_at(4), 1.0));
    assert!(close(s.lr_at(9), 2.0), "end of warm-up");
    assert!(close(s.lr_at(10), 2.0), "start of decay");
    assert!(
        close(s.lr_at(60), (2.0 + 0.2) / 2.0),
        "half-way through the cosine"
    );
    // A quarter of the way: min + (base - min) (1 + cos(pi/4)) / 2.
    let quarter = 0.2 + 1.8 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
    assert!(close(s.lr_at(35), quarter));
    assert!(close(s.lr_at(110), 0.2));
    assert!(close(s.lr_at(10_000), 0.2));
    for t in 0..9 {
        assert!(s.lr_at(t + 1) > s.lr_at(t), "warm-up increases at {t}");
    }
    for t in 10..200 {
        assert!(
            s.lr_at(t + 1) <= s.lr_at(t),
            "decay is non-increasing at {t}"
        );
    }
    for t in 10..109 {
        assert!(
            s.lr_at(t + 1) < s.lr_at(t),
            "decay strictly decreases at {t}"
        );
    }
}

#[test]
fn schedule_without_warmup_and_validation() {
    let s = LrSchedule {
        base_lr: 1.0,
        warmup_steps: 0,
        total_steps: 4,
        min_lr_ratio: 0.0,
    };
    let got: Vec<f64> = (0..6).map(|t| s.lr_at(t)).collect();
    let want = [
        1.0,
        0.853_553_390_593_273_8,
        0.5,
        0.146_446_609_406_726_24,
        0.0,
        0.0,
    ];
    assert!(max_abs_diff(&got, &want) < 1e-12, "{got:?}");
    assert_eq!(LrSchedule::constant(0.3).lr_at(12345), 0.3);
    assert!(LrSchedule {
        min_lr_ratio: 1.5,
        ..s.clone()
    }
    .validate()
    .is_err());
    assert!(LrSchedule {
        warmup_steps: 5,
        ..s.clone()
    }
    .validate()
    .is_err());
    assert!(LrSchedule { base_lr: -1.0, ..s }.validate().is_err());
}

// ------------------------------------------------------------------------------------------------
// Gradient clipping

/// Parameters whose gradients are the given constants (loss = sum g . w).
fn linear_grads(gs: &[&[f64]]) -> (Vec<(String, Var)>, candle_core::backprop::GradStore) {
    let params: Vec<(String, Var)> = gs
        .iter()
        .enumerate()
        .map(|(i, g)| (format!("p{i}"), var(&vec![0.5; g.len()], DType::F32)))
        .collect();
    let mut loss = Tensor::zeros((), DType::F32, &CPU).unwrap();
    for ((_, v), g) in params.iter().zip(gs) {
        let g = Tensor::from_slice(g, g.len(), &CPU)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        loss = (loss + v.as_tensor().mul(&g).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    (params, grads)
}

#[test]
fn clipping_scales_to_max_norm() {
    // Norm sqrt(1 + 4 + 4 + 16) = 5.
    let (params, mut grads) = linear_grads(&[&[1.0, -2.0, 2.0], &[4.0]]);
    assert!((grad_norm(&params, &grads).unwrap() - 5.0).abs() < 1e-6);
    let pre = clip_grad_norm(&params, &mut grads, 2.0).unwrap();
    assert!((pre - 5.0).abs() < 1e-6);
    let post = grad_norm(&params, &grads).unwrap();
    assert!((post - 2.0).abs() < 1e-5, "post-clip norm {post}");
    // Direction is kept: every component scaled by 2 / 5.
    let g0 = vals(grads.get(params[0].1.as_tensor()).unwrap());
    assert!(max_abs_diff(&g0, &[0.4, -0.8, 0.8]) < 1e-5, "{g0:?}");
}

#[test]
fn clipping_below_threshold_changes_nothing() {
    let (params, mut grads) = linear_grads(&[&[0.3, 0.4], &[1.2]]);
    let before: Vec<Vec<u64>> = params
        .iter()
        .map(|(_, v)| bits(grads.get(v.as_tensor()).unwrap()))
        .collect();
    let pre = clip_grad_norm(&params, &mut grads, 10.0).unwrap();
    assert!((pre - 1.3).abs() < 1e-6, "norm {pre}");
    let after: Vec<Vec<u64>> = params
        .iter()
        .map(|(_, v)| bits(grads.get(v.as_tensor()).unwrap()))
        .collect();
    assert_eq!(before, after);
}

#[test]
fn clipping_non_finite_and_bad_max_norm() {
    let (params, mut grads) = linear_grads(&[&[f64::NAN, 1.0], &[1.0]]);
    let b1 = bits(grads.get(params[1].1.as_tensor()).unwrap());
    let pre = clip_grad_norm(&params, &mut grads, 1.0).unwrap();
    assert!(pre.is_nan());
    assert_eq!(
        bits(grads.get(params[1].1.as_tensor()).unwrap()),
        b1,
        "no scaling on NaN"
    );
    assert!(clip_grad_norm(&params, &mut grads, 0.0).is_err());
    assert!(clip_grad_norm(&params, &mut grads, f64::NAN).is_err());
    // No gradients at all: norm 0.
    let lone = vec![("x".to_string(), var(&[1.0], DType::F32))];
    assert_eq!(grad_norm(&lone, &grads).unwrap(), 0.0);
}

// ------------------------------------------------------------------------------------------------
// EMA

#[test]
fn ema_matches_closed_form_with_warmup() {
    let p0 = [1.0, 2.0, -3.0];
    let p1 = [5.0, -1.0, 0.5];
    let w = var(&p0, DType::F64);
    let params = vec![("w".to_string(), w.clone())];
    let mut ema = Ema::new(&params, 0.5).unwrap();
    assert_eq!(ema.decay(), 0.5);
    w.set(&Tensor::new(&p1, &CPU).unwrap()).unwrap();
    let mut prod = 1.0;
    for n in 0..12u64 {
        let d = f64::min(0.5, (1.0 + n as f64) / (10.0 + n as f64));
        assert!((ema.effective_decay() - d).abs() < 1e-15);
        ema.update(&params).unwrap();
        prod *= d;
        // Constant params: e_k = p1 + (p0 - p1) * prod_{n<k} d_n.
        let want: Vec<f64> = p0
            .iter()
            .zip(&p1)
            .map(|(a, b)| b + (a - b) * prod)
            .collect();
        let got = vals(&ema.tensors()["w"]);
        assert!(
            max_abs_diff(&got, &want) < 1e-12,
            "after {} updates: {got:?} vs {want:?}",
            n + 1
        );
    }
    assert_eq!(ema.updates(), 12);
    // The first update used d = 0.1 and the cap 0.5 was reached (n >= 8).
    assert!((ema.effective_decay() - 0.5).abs() < 1e-15);
    assert_eq!(
        vals(w.as_tensor()),
        p1.to_vec(),
        "update does not touch the live weights"
    );
}

#[test]
fn ema_swap_twice_restores_exactly() {
    let mut rng = Rng::new(3);
    let a = Var::from_tensor(&rng.normal_tensor(&[4, 3], &CPU).unwrap()).unwrap();
    let b = Var::from_tensor(&rng.normal_tensor(&[5], &CPU).unwrap()).unwrap();
    let params = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    let mut ema = Ema::new(&params, 0.9).unwrap();
    a.set(&rng.normal_tensor(&[4, 3], &CPU).unwrap()).unwrap();
    b.set(&rng.normal_tensor(&[5], &CPU).unwrap()).unwrap();
    ema.update(&params).unwrap();
    let live = [bits(a.as_tensor()), bits(b.as_tensor())];
    let avg = [bits(&ema.tensors()["a"]), bits(&ema.tensors()["b"])];
    assert_ne!(live, avg);
    ema.swap(&params).unwrap();
    assert_eq!([bits(a.as_tensor()), bits(b.as_tensor())], avg);
    assert_eq!([bits(&ema.tensors()["a"]), bits(&ema.tensors()["b"])], live);
    ema.swap(&params).unwrap();
    assert_eq!([bits(a.as_tensor()), bits(b.as_tensor())], live);
    assert_eq!([bits(&ema.tensors()["a"]), bits(&ema.tensors()["b"])], avg);
}

#[test]
fn ema_load_round_trip_and_shape_check() {
    let w = var(&[1.0, 2.0], DType::F32);
    let params = vec![("w".to_string(), w.clone())];
    let mut e1 = Ema::new(&params, 0.99).unwrap();
    w.set(&Tensor::new(&[3f32, 4.0], &CPU).unwrap()).unwrap();
    e1.update(&params).unwrap();
    let mut e2 = Ema::new(&params, 0.99).unwrap();
    e2.load(&e1.tensors(), e1.updates()).unwrap();
    assert_eq!(e2.updates(), 1);
    assert_eq!(bits(&e2.tensors()["w"]), bits(&e1.tensors()["w"]));
    let bad: HashMap<String, Tensor> =
        [("w".to_string(), Tensor::zeros(3, DType::F32, &CPU).unwrap())].into();
    let e = e2.load(&bad, 5).unwrap_err();
    assert!(e.to_string().contains("'w'"), "{e}");
    assert_eq!(e2.updates(), 1, "a failed load changes nothing");
    assert!(Ema::new(&params, 1.5).is_err());
}

// ------------------------------------------------------------------------------------------------
// Checkpoints

fn sample_files() -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let mut rng = Rng::new(11);
    let model: HashMap<String, Tensor> = [
        (
            "layer.0.weight".to_string(),
            rng.normal_tensor(&[7, 5], &CPU).unwrap(),
        ),
        (
            "layer.0.bias".to_string(),
            rng.normal_tensor(&[5], &CPU).unwrap(),
        ),
        ("scale".to_string(), Tensor::new(3.5f32, &CPU).unwrap()),
    ]
    .into();
    let optim: HashMap<String, Tensor> = [(
        "m.scale".to_string(),
        rng.normal_tensor(&[2, 2], &CPU)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap(),
    )]
    .into();
    (model, optim)
}

fn state() -> serde_json::Value {
    serde_json::json!({ "step": 1234, "rng": { "seed": "ab", "stream": 3 }, "loss": 0.125 })
}

fn assert_same(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (k, t) in a {
        let u = &b[k];
        assert_eq!(t.dims(), u.dims(), "{k}");
        assert_eq!(t.dtype(), u.dtype(), "{k}");
        assert_eq!(bits(t), bits(u), "{k}");
    }
}

fn save_sample(dir: &Path) {
    let (model, optim) = sample_files();
    checkpoint::save(dir, &[("model", &model), ("optim", &optim)], &state()).unwrap();
}

fn expect_ckpt_err(dir: &Path, needles: &[&str]) {
    let e = checkpoint::load(dir, &CPU).unwrap_err();
    assert!(
        matches!(e, Error::Checkpoint { .. }),
        "wrong variant: {e:?}"
    );
    for n in needles {
        assert!(e.to_string().contains(n), "'{e}' should mention '{n}'");
    }
}

#[test]
fn checkpoint_round_trip_is_bit_exact_and_overwrites_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run").join("ckpt");
    save_sample(&dir);
    let (model, optim) = sample_files();
    let l = checkpoint::load(&dir, &CPU).unwrap();
    assert_same(&l.files["model"], &model);
    assert_same(&l.files["optim"], &optim);
    assert_eq!(l.state, state());
    let raw: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(raw["format_version"], 1);
    let model_bytes = fs::read(dir.join("model.safetensors")).unwrap();
    assert_eq!(raw["manifest"]["model"]["bytes"], model_bytes.len());
    assert_eq!(
        raw["manifest"]["model"]["fnv1a64"],
        format!("{:016x}", fnv1a64(&model_bytes))
    );

    // Overwrite with different content: the new one is read, nothing is left behind.
    let small: HashMap<String, Tensor> =
        [("x".to_string(), Tensor::new(&[1f32], &CPU).unwrap())].into();
    checkpoint::save(
        &dir,
        &[("model", &small)],
        &serde_json::json!({ "step": 2 }),
    )
    .unwrap();
    let l = checkpoint::load(&dir, &CPU).unwrap();
    assert_same(&l.files["model"], &small);
    assert_eq!(l.files.len(), 1);
    assert_eq!(l.state, serde_json::json!({ "step": 2 }));
    let mut names: Vec<String> = fs::read_dir(tmp.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["ckpt"]);
}

#[test]
fn fnv1a64_known_values() {
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn checkpoint_detects_truncation_and_corruption() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    save_sample(&dir);
    let path = dir.join("model.safetensors");
    let good = fs::read(&path).unwrap();

    fs::write(&path, &good[..good.len() - 9]).unwrap();
    expect_ckpt_err(&dir, &["model.safetensors", "truncated"]);

    let mut flipped = good.clone();
    let i = good.len() - 13; // inside the tensor data
    flipped[i] ^= 0x10;
    fs::write(&path, &flipped).unwrap();
    expect_ckpt_err(&dir, &["model.safetensors", "hash"]);

    // Garbage whose length and hash match the manifest: the safetensors parser must reject it.
    let garbage = vec![0xffu8; 64];
    fs::write(&path, &garbage).unwrap();
    let sp = dir.join("state.json");
    let mut st: serde_json::Value = serde_json::from_slice(&fs::read(&sp).unwrap()).unwrap();
    st["manifest"]["model"] =
        serde_json::json!({ "bytes": 64, "fnv1a64": format!("{:016x}", fnv1a64(&garbage)) });
    fs::write(&sp, serde_json::to_vec(&st).unwrap()).unwrap();
    expect_ckpt_err(&dir, &["model.safetensors", "safetensors"]);

    fs::remove_file(&path).unwrap();
    expect_ckpt_err(&dir, &["model.safetensors"]);
}

#[test]
fn checkpoint_missing_or_bad_state_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    expect_ckpt_err(&dir, &["ck"]);
    save_sample(&dir);
    let sp = dir.join("state.json");
    fs::write(&sp, b"{\"step\": 12, ").unwrap();
    expect_ckpt_err(&dir, &["state.json", "JSON"]);
    fs::write(&sp, b"{\"step\": 12}").unwrap();
    expect_ckpt_err(&dir, &["state.json", "format_version"]);
    fs::remove_file(&sp).unwrap();
    expect_ckpt_err(&dir, &["state.json"]);
    assert!(checkpoint::save(&dir, &[], &serde_json::json!([1, 2])).is_err());
}

#[test]
fn checkpoint_ignores_stale_tmp_and_recovers_old() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ck");
    save_sample(&dir);
    // A crashed save left a half-written temp dir behind.
    let stale = tmp.path().join("ck.tmp-999999");
    fs::create_dir(&stale).unwrap();
    fs::write(stale.join("state.json"), b"{ broken").unwrap();
    fs::write(stale.join("model.safetensors"), b"junk").unwrap();
    let (model, _) = sample_files();
    let l = checkpoint::load(&dir, &CPU).unwrap();
    assert_same(&l.files["model"], &model);
    assert_eq!(l.state, state());

    // A crash between "DIR -> DIR.old" and "tmp -> DIR": only DIR.old exists.
    fs::rename(&dir, tmp.path().join("ck.old")).unwrap();
    let l = checkpoint::load(&dir, &CPU).unwrap();
    assert_same(&l.files["model"], &model);
    // The next save completes the swap and cleans up DIR.old.
    checkpoint::save(&dir, &[("model", &model)], &state()).unwrap();
    assert!(dir.is_dir() && !tmp.path().join("ck.old").exists());
    assert_same(
        &checkpoint::load(&dir, &CPU).unwrap().files["model"],
        &model,
    );
}

#[test]
fn load_into_vars_checks_names_and_shapes() {
    let a = var(&[0.0; 6], DType::F32);
    let b = var(&[0.0; 2], DType::F32);
    let params = vec![
        ("enc.w".to_string(), a.clone()),
        ("enc.b".to_string(), b.clone()),
    ];
    let good: HashMap<String, Tensor> = [
        (
            "enc.w".to_string(),
            Tensor::arange(0f32, 6.0, &CPU).unwrap(),
        ),
        (
            "enc.b".to_string(),
            Tensor::new(&[7f32, 8.0], &CPU).unwrap(),
        ),
    ]
    .into();

    let mut wrong = good.clone();
    wrong.insert(
        "enc.w".into(),
        Tensor::zeros((2, 3), DType::F32, &CPU).unwrap(),
    );
    let e = checkpoint::load_into_vars(&wrong, &params, "model.safetensors").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("enc.w") && msg.contains("[2, 3]") && msg.contains("[6]"),
        "{msg}"
    );
    assert_eq!(
        vals(b.as_tensor()),
        vec![0.0, 0.0],
        "nothing is set on failure"
    );

    let mut missing = good.clone();
    missing.remove("enc.b");
    let e = checkpoint::load_into_vars(&missing, &params, "m").unwrap_err();
    assert!(e.to_string().contains("enc.b"), "{e}");

    let mut extra = good.clone();
    extra.insert("dec.w".into(), Tensor::zeros(1, DType::F32, &CPU).unwrap());
    let e = checkpoint::load_into_vars(&extra, &params, "m").unwrap_err();
    assert!(e.to_string().contains("dec.w"), "{e}");

    let mut dtype = good.clone();
    dtype.insert("enc.b".into(), Tensor::new(&[7f64, 8.0], &CPU).unwrap());
    assert!(checkpoint::load_into_vars(&dtype, &params, "m").is_err());

    checkpoint::load_into_vars(&good, &params, "m").unwrap();
    assert_eq!(vals(a.as_tensor()), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    assert_eq!(vals(b.as_tensor()), vec![7.0, 8.0]);

    // vars_to_map takes copies: later updates of the variables do not show through.
    let snap = checkpoint::vars_to_map(&params);
    b.set(&Tensor::new(&[0f32, 0.0], &CPU).unwrap()).unwrap();
    assert_eq!(vals(&snap["enc.b"]), vec![7.0, 8.0]);
}
