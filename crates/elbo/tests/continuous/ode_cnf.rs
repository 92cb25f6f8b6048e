//! ODE solvers (order of accuracy, tolerance, direction, failures) and CNF likelihoods (exact
//! against a closed-form Gaussian flow, Hutchinson against exact, finite differences, round trip).

use candle_core::{DType, Device, Tensor};
use elbo::continuous::cnf::{divergence, log_likelihood, sample, CnfOptions, Divergence};
use elbo::continuous::ode::{integrate, OdeStats, Solver};
use elbo::{Error, Result, Rng};

const DEV: Device = Device::Cpu;
const LN_2PI: f64 = 1.837_877_066_409_345_3;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A [2, 3] f64 initial state: the solvers must handle any shape.
fn y0() -> Tensor {
    Tensor::new(&[[1.0f64, -0.5, 2.0], [0.25, 3.0, -1.5]], &DEV).unwrap()
}

/// dy/dt = 3 t^2: y(t1) = y(t0) + t1^3 - t0^3.
fn poly(y: &Tensor, t: f64) -> Result<Tensor> {
    Ok(y.affine(0.0, 3.0 * t * t)?)
}

/// dy/dt = y cos t: y(t) = y(0) exp(sin t).
fn cosine(y: &Tensor, t: f64) -> Result<Tensor> {
    Ok(y.affine(t.cos(), 0.0)?)
}

fn exact_cosine(t: f64) -> Tensor {
    y0().affine(t.sin().exp(), 0.0).unwrap()
}

fn exact_poly(t: f64) -> Tensor {
    y0().affine(1.0, t.powi(3)).unwrap()
}

fn solve(
    f: fn(&Tensor, f64) -> Result<Tensor>,
    y: &Tensor,
    t0: f64,
    t1: f64,
    s: &Solver,
) -> (Tensor, OdeStats) {
    let mut f = f;
    integrate(&mut f, y, t0, t1, s).unwrap()
}

#[test]
fn fixed_step_solvers_have_their_order() {
    type Field = fn(&Tensor, f64) -> Result<Tensor>;
    let cases: [(&str, Field, Tensor); 2] = [
        ("3t^2", poly, exact_poly(1.0)),
        ("y cos t", cosine, exact_cosine(1.0)),
    ];
    for (name, f, exact) in cases {
        for (order, make) in [
            (1, (|n| Solver::Euler { steps: n }) as fn(usize) -> Solver),
            (2, |n| Solver::Heun { steps: n }),
        ] {
            let mut errs = Vec::new();
            for n in [64, 128] {
                let (y, st) = solve(f, &y0(), 0.0, 1.0, &make(n));
                assert_eq!(st.steps, n);
                assert_eq!(st.nfe, n * order);
                errs.push(max_abs_diff(&y, &exact));
            }
            let ratio = errs[0] / errs[1];
            let want = (1u32 << order) as f64;
            println!("{name} order {order}: errors {errs:?}, ratio {ratio:.4}");
            assert!(
                (ratio / want - 1.0).abs() < 0.1,
                "{name}: ratio {ratio} should be {want}"
            );
        }
    }
}

#[test]
fn dopri5_meets_its_tolerance_cheaply_in_both_directions() {
    let rtol = 1e-6;
    let s = Solver::Dopri5 { rtol, atol: rtol };
    // y cos t, forward and backward.
    let (y1, st) = solve(cosine, &y0(), 0.0, 1.0, &s);
    let err = max_abs_diff(&y1, &exact_cosine(1.0));
    println!("dopri5 y cos t: err {err:e}, {st:?}");
    assert!(err < 10.0 * rtol, "error {err}");
    assert!(st.nfe < 150 && st.steps >= 2, "{st:?}");
    assert_eq!(st.nfe, 2 + 6 * (st.steps + st.rejected));
    let (back, st) = solve(cosine, &exact_cosine(1.0), 1.0, 0.0, &s);
    let err = max_abs_diff(&back, &y0());
    println!("dopri5 y cos t backward: err {err:e}, {st:?}");
    assert!(err < 10.0 * rtol, "backward error {err}");
    // 3 t^2 over [0.3, 1.7] and back: a quadratic is integrated exactly by a 5th-order method.
    let exact = y0().affine(1.0, 1.7f64.powi(3) - 0.3f64.powi(3)).unwrap();
    let (y, st) = solve(poly, &y0(), 0.3, 1.7, &s);
    assert!(max_abs_diff(&y, &exact) < 1e-12, "{st:?}");
    let (back, _) = solve(poly, &exact, 1.7, 0.3, &s);
    assert!(max_abs_diff(&back, &y0()) < 1e-12);
    // Heun backward recovers the start to its O(h^2) accuracy.
    let (back, _) = solve(
        cosine,
        &exact_cosine(1.0),
        1.0,
        0.0,
        &Solver::Heun { steps: 200 },
    );
    let err = max_abs_diff(&back, &y0());
    assert!(err < 1e-4 && err > 1e-9, "heun backward error {err}");
    // f32 state: the tolerance is still met (within f32 rounding).
    let s32 = Solver::Dopri5 {
        rtol: 1e-5,
        atol: 1e-5,
    };
    let (y32, _) = solve(cosine, &y0().to_dtype(DType::F32).unwrap(), 0.0, 1.0, &s32);
    assert_eq!(y32.dtype(), DType::F32);
    let err = max_abs_diff(&y32.to_dtype(DType::F64).unwrap(), &exact_cosine(1.0));
    assert!(err < 1e-4, "f32 error {err}");
}

#[test]
fn solvers_fail_cleanly() {
    let dopri = Solver::Dopri5 {
        rtol: 1e-6,
        atol: 1e-6,
    };
    // A field that is NaN everywhere.
    let mut nan = |y: &Tensor, _t: f64| -> Result<Tensor> { Ok(y.affine(f64::NAN, 0.0)?) };
    let r = integrate(&mut nan, &y0(), 0.0, 1.0, &dopri);
    assert!(matches!(r, Err(Error::Numerical(_))), "{r:?}");
    let r = integrate(&mut nan, &y0(), 0.0, 1.0, &Solver::Euler { steps: 4 });
    assert!(matches!(r, Err(Error::Numerical(_))), "{r:?}");
    // A field that turns NaN past t = 0.5: the solver must stop, not hang.
    let mut half = |y: &Tensor, t: f64| -> Result<Tensor> {
        Ok(y.affine(if t > 0.5 { f64::NAN } else { 1.0 }, 0.0)?)
    };
    let r = integrate(&mut half, &y0(), 0.0, 1.0, &dopri);
    assert!(matches!(r, Err(Error::Numerical(_))), "{r:?}");
    // dy/dt = y^2 from y = 1 blows up at t = 1: the step size underflows.
    let mut blow = |y: &Tensor, _t: f64| -> Result<Tensor> { Ok(y.sqr()?) };
    let one = Tensor::new(&[1.0f64], &DEV).unwrap();
    match integrate(&mut blow, &one, 0.0, 2.0, &dopri) {
        Err(Error::Numerical(m)) => println!("blow-up: {m}"),
        other => panic!("expected a numerical error, got {other:?}"),
    }
    // A right-hand side of the wrong shape.
    let mut wrong = |y: &Tensor, _t: f64| -> Result<Tensor> { Ok(y.sum_keepdim(1)?) };
    let r = integrate(&mut wrong, &y0(), 0.0, 1.0, &dopri);
    assert!(matches!(r, Err(Error::Shape(_))), "{r:?}");
}

#[test]
fn solver_and_divergence_parsing() {
    assert_eq!(
        Solver::parse("Dopri5", 0, 1e-5, 1e-6).unwrap(),
        Solver::Dopri5 {
            rtol: 1e-5,
            atol: 1e-6
        }
    );
    assert_eq!(
        Solver::parse("heun", 8, 0.0, 0.0).unwrap(),
        Solver::Heun { steps: 8 }
    );
    match Solver::parse("rk4", 8, 1e-5, 1e-5) {
        Err(Error::Config(m)) => assert!(m.contains("euler, heun, dopri5"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        Solver::parse("euler", 0, 0.0, 0.0),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Solver::parse("dopri5", 0, -1.0, 1e-5),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        Solver::parse("dopri5", 0, 0.0, 0.0),
        Err(Error::Config(_))
    ));
    assert_eq!(
        Divergence::parse("hutchinson", 4).unwrap(),
        Divergence::Hutchinson { probes: 4 }
    );
    assert_eq!(Divergence::parse("EXACT", 0).unwrap(), Divergence::Exact);
    assert!(matches!(
        Divergence::parse("hutchinson", 0),
        Err(Error::Config(_))
    ));
    match Divergence::parse("skilling", 1) {
        Err(Error::Config(m)) => assert!(m.contains("exact, hutchinson"), "{m}"),
        other => panic!("{other:?}"),
    }
    let opts = CnfOptions::default();
    let json = serde_json::to_string(&opts).unwrap();
    assert_eq!(serde_json::from_str::<CnfOptions>(&json).unwrap(), opts);
    assert_eq!(
        opts.solver,
        Solver::Dopri5 {
            rtol: 1e-5,
            atol: 1e-5
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Small dense linear algebra on the host, for the closed-form Gaussian flow.

type Mat = Vec<Vec<f64>>;

/// Inverse and determinant by Gauss-Jordan elimination with partial pivoting.
fn inv_det(m: &Mat) -> (Mat, f64) {
    let n = m.len();
    let mut a: Mat = m.clone();
    let mut inv: Mat = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    let mut det = 1.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .unwrap();
        if p != c {
            a.swap(p, c);
            inv.swap(p, c);
            det = -det;
        }
        let piv = a[c][c];
        det *= piv;
        for j in 0..n {
            a[c][j] /= piv;
            inv[c][j] /= piv;
        }
        for r in 0..n {
            if r != c {
                let f = a[r][c];
                for j in 0..n {
                    a[r][j] -= f * a[c][j];
                    inv[r][j] -= f * inv[c][j];
                }
            }
        }
    }
    (inv, det)
}

fn matmul(a: &Mat, b: &Mat) -> Mat {
    let n = a.len();
    (0..n)
        .map(|i| {
            (0..n)
                .map(|j| (0..n).map(|k| a[i][k] * b[k][j]).sum())
                .collect()
        })
        .collect()
}

/// The affine flow x_t = M_t x0 + t mu with M_t = (1 - t) I + t A, pushing N(0, I) to
/// N(mu, A A^T): v(x, t) = (A - I) M_t^{-1} (x - t mu) + mu, built from candle ops.
fn affine_field(a: Mat, mu: Vec<f64>) -> impl Fn(&Tensor, f64) -> Result<Tensor> {
    move |x: &Tensor, t: f64| {
        let d = mu.len();
        let m: Mat = (0..d)
            .map(|i| {
                (0..d)
                    .map(|j| t * a[i][j] + (1.0 - t) * f64::from(u8::from(i == j)))
                    .collect()
            })
            .collect();
        let a_minus_i: Mat = (0..d)
            .map(|i| {
                (0..d)
                    .map(|j| a[i][j] - f64::from(u8::from(i == j)))
                    .collect()
            })
            .collect();
        let bt = matmul(&a_minus_i, &inv_det(&m).0);
        let bt_t: Vec<f64> = (0..d)
            .flat_map(|j| (0..d).map(move |i| (i, j)))
            .map(|(i, j)| bt[j][i])
            .collect();
        let bt_t = Tensor::from_vec(bt_t, (d, d), x.device())?.to_dtype(x.dtype())?;
        let mu_t = Tensor::from_vec(mu.clone(), (1, d), x.device())?.to_dtype(x.dtype())?;
        let centred = x.broadcast_sub(&mu_t.affine(t, 0.0)?)?;
        Ok(centred.matmul(&bt_t)?.broadcast_add(&mu_t)?) // [B, D]
    }
}

/// Data x1 = A z + mu for z ~ N(0, I), with its exact log-density log N(x1; mu, A A^T).
fn gaussian_data(a: &Mat, mu: &[f64], n: usize, rng: &mut Rng) -> (Tensor, Tensor, Vec<f64>) {
    let d = mu.len();
    let ln_det = inv_det(a).1.abs().ln();
    let mut z = Vec::new();
    let mut x = Vec::new();
    let mut logp = Vec::new();
    for _ in 0..n {
        let zi: Vec<f64> = (0..d).map(|_| rng.normal()).collect();
        for i in 0..d {
            x.push(mu[i] + (0..d).map(|k| a[i][k] * zi[k]).sum::<f64>());
        }
        let sq: f64 = zi.iter().map(|v| v * v).sum();
        logp.push(-0.5 * sq - 0.5 * d as f64 * LN_2PI - ln_det);
        z.extend(zi);
    }
    let x = Tensor::from_vec(x, (n, d), &DEV).unwrap();
    let z = Tensor::from_vec(z, (n, d), &DEV).unwrap();
    (x, z, logp)
}

fn cases() -> Vec<(Mat, Vec<f64>)> {
    vec![
        (vec![vec![1.5, 0.4], vec![0.4, 0.8]], vec![0.5, -1.0]),
        (
            vec![
                vec![2.0, 0.3, -0.2],
                vec![0.3, 1.2, 0.5],
                vec![-0.2, 0.5, 0.7],
            ],
            vec![1.0, 0.0, -2.0],
        ),
    ]
}

#[test]
fn exact_cnf_likelihood_matches_the_gaussian_density() {
    let mut rng = Rng::new(11);
    let opts = CnfOptions {
        solver: Solver::Dopri5 {
            rtol: 1e-8,
            atol: 1e-8,
        },
        divergence: Divergence::Exact,
    };
    for (a, mu) in cases() {
        let field = affine_field(a.clone(), mu.clone());
        let (x1, z, want) = gaussian_data(&a, &mu, 50, &mut rng);
        let got = log_likelihood(&field, &x1, &opts, &mut rng).unwrap();
        assert!(got.probe_stderr.is_none());
        let worst = got
            .logp
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        let zerr = max_abs_diff(&got.z0, &z);
        println!(
            "D = {}: max |logp - exact| {worst:e}, max |z0 - z| {zerr:e}, {:?}",
            mu.len(),
            got.stats
        );
        assert!(worst < 1e-4, "logp error {worst}");
        assert!(zerr < 1e-5, "latent error {zerr}");
        // The f32 path works too, to f32 accuracy.
        let opts32 = CnfOptions {
            solver: Solver::Dopri5 {
                rtol: 1e-5,
                atol: 1e-5,
            },
            divergence: Divergence::Exact,
        };
        let got32 =
            log_likelihood(&field, &x1.to_dtype(DType::F32).unwrap(), &opts32, &mut rng).unwrap();
        assert_eq!(got32.z0.dtype(), DType::F32);
        let worst32 = got32
            .logp
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).abs())
            .fold(0.0, f64::max);
        println!("D = {} f32: max |logp - exact| {worst32:e}", mu.len());
        assert!(worst32 < 1e-3, "f32 logp error {worst32}");
    }
}

/// A nonlinear, well-behaved field on R^3: v = tanh(x W1^T + t c) W2^T - 0.3 x.
fn smooth_field(x: &Tensor, t: f64) -> Result<Tensor> {
    let w1 = Tensor::new(
        &[[0.9f64, -0.4, 0.3], [0.2, 0.7, -0.8], [-0.5, 0.6, 0.4]],
        &DEV,
    )?;
    let w2 = Tensor::new(
        &[[0.8f64, 0.5, -0.3], [-0.6, 0.4, 0.9], [0.3, -0.7, 0.5]],
        &DEV,
    )?;
    let c = Tensor::new(&[[0.5f64, -1.0, 0.25]], &DEV)?;
    let h = x
        .matmul(&w1.t()?)?
        .broadcast_add(&c.affine(t, 0.0)?)?
        .tanh()?; // [B, 3]
    Ok((h.matmul(&w2.t()?)? - x.affine(0.3, 0.0)?)?) // [B, 3]
}

#[test]
fn hutchinson_agrees_with_exact_within_its_standard_error() {
    let mut rng = Rng::new(5);
    let b = 24;
    let x1 = rng
        .normal_tensor(&[b, 3], &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let solver = Solver::Dopri5 {
        rtol: 1e-6,
        atol: 1e-6,
    };
    let exact_opts = CnfOptions {
        solver: solver.clone(),
        divergence: Divergence::Exact,
    };
    let exact = log_likelihood(&smooth_field, &x1, &exact_opts, &mut rng).unwrap();
    let hopts = CnfOptions {
        solver,
        divergence: Divergence::Hutchinson { probes: 16 },
    };
    let hutch = log_likelihood(&smooth_field, &x1, &hopts, &mut rng).unwrap();
    let se = hutch.probe_stderr.clone().unwrap();
    assert_eq!(se.len(), b);
    assert!(se.iter().all(|&s| s > 1e-3), "stderr {se:?}");
    let z: Vec<f64> = (0..b)
        .map(|i| (hutch.logp[i] - exact.logp[i]) / se[i])
        .collect();
    let within3 = z.iter().filter(|v| v.abs() < 3.0).count();
    println!(
        "hutchinson z-scores {z:.2?}\nstderr {se:.3?}\n{:?}",
        hutch.stats
    );
    assert!(
        z.iter().all(|v| v.abs() < 4.0),
        "an example is off by more than 4 stderr"
    );
    assert!(
        within3 as f64 >= 0.9 * b as f64,
        "only {within3}/{b} within 3 stderr"
    );
    let mean_h = hutch.logp.iter().sum::<f64>() / b as f64;
    let mean_e = exact.logp.iter().sum::<f64>() / b as f64;
    let se_mean = se.iter().map(|s| s * s).sum::<f64>().sqrt() / b as f64;
    println!("mean: hutchinson {mean_h:.4}, exact {mean_e:.4}, stderr {se_mean:.4}");
    assert!((mean_h - mean_e).abs() < 3.0 * se_mean);
    // The flow itself does not depend on the divergence estimator.
    assert!(max_abs_diff(&hutch.z0, &exact.z0) < 1e-4);
    // A single probe has no spread to report.
    let one = CnfOptions {
        divergence: Divergence::Hutchinson { probes: 1 },
        ..exact_opts
    };
    assert!(log_likelihood(&smooth_field, &x1, &one, &mut rng)
        .unwrap()
        .probe_stderr
        .is_none());
}

#[test]
fn exact_divergence_matches_finite_differences() {
    // v = tanh(x W^T) t + x^2.
    let field = |x: &Tensor, t: f64| -> Result<Tensor> {
        let w = Tensor::new(
            &[[0.9f64, -1.4, 0.3], [0.2, 0.7, -0.8], [1.5, 0.6, 0.4]],
            &DEV,
        )?;
        Ok((x.matmul(&w.t()?)?.tanh()?.affine(t, 0.0)? + x.sqr()?)?)
    };
    let mut rng = Rng::new(3);
    let (b, d, t) = (5, 3, 0.7);
    let x = rng
        .normal_tensor(&[b, d], &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let (v, div) = divergence(&field, &x, t, None).unwrap();
    assert_eq!(div.dims(), &[b, 1]);
    assert!(max_abs_diff(&v, &field(&x, t).unwrap()) == 0.0);
    let h = 1e-5;
    let mut fd = Tensor::zeros((b, 1), DType::F64, &DEV).unwrap();
    for i in 0..d {
        let e: Vec<f64> = (0..b * d)
            .map(|k| if k % d == i { h } else { 0.0 })
            .collect();
        let e = Tensor::from_vec(e, (b, d), &DEV).unwrap();
        let vp = field(&(&x + &e).unwrap(), t).unwrap();
        let vm = field(&(&x - &e).unwrap(), t).unwrap();
        let col = ((vp - vm).unwrap().narrow(1, i, 1).unwrap() / (2.0 * h)).unwrap();
        fd = (fd + col).unwrap();
    }
    let err = max_abs_diff(&div, &fd);
    println!("exact vs finite-difference divergence: {err:e}");
    assert!(err < 1e-6, "{err}");
    // Hutchinson over all 2^D sign patterns averages to the exact trace.
    let mut probes = Vec::new();
    for p in 0..(1usize << d) {
        for _ in 0..b {
            probes.extend((0..d).map(|i| if p >> i & 1 == 1 { 1.0f64 } else { -1.0 }));
        }
    }
    let eps = Tensor::from_vec(probes, (1 << d, b, d), &DEV).unwrap();
    let (_, est) = divergence(&field, &x, t, Some(&eps)).unwrap();
    assert_eq!(est.dims(), &[b, 1 << d]); // [B, K]
    let mean = est.mean_keepdim(1).unwrap();
    assert!(max_abs_diff(&mean, &div) < 1e-12);
    // ... while single patterns differ from it (the Jacobian is not diagonal).
    assert!(max_abs_diff(&est.narrow(1, 0, 1).unwrap(), &div) > 1e-3);
    // Probes that do not fit x are an error.
    let bad = Tensor::ones((2, b, d + 1), DType::F64, &DEV).unwrap();
    assert!(matches!(
        divergence(&field, &x, t, Some(&bad)),
        Err(Error::Shape(_))
    ));
}

#[test]
fn sample_then_log_likelihood_round_trips_and_bad_inputs_fail() {
    let mut rng = Rng::new(9);
    let z0 = rng
        .normal_tensor(&[16, 3], &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let solver = Solver::Dopri5 {
        rtol: 1e-9,
        atol: 1e-9,
    };
    let (x1, st) = sample(&smooth_field, &z0, &solver).unwrap();
    assert!(
        max_abs_diff(&x1, &z0) > 0.1,
        "the flow should move the points"
    );
    let opts = CnfOptions {
        solver,
        divergence: Divergence::Exact,
    };
    let ll = log_likelihood(&smooth_field, &x1, &opts, &mut rng).unwrap();
    let err = max_abs_diff(&ll.z0, &z0);
    println!(
        "round trip: max |z0' - z0| {err:e}; sample {st:?}; loglik {:?}",
        ll.stats
    );
    assert!(err < 1e-5, "{err}");
    assert_eq!(ll.logp.len(), 16);
    // Non-2-D data.
    let flat = Tensor::zeros(6, DType::F64, &DEV).unwrap();
    let cube = Tensor::zeros((2, 3, 1), DType::F64, &DEV).unwrap();
    for bad in [&flat, &cube] {
        let r = log_likelihood(&smooth_field, bad, &CnfOptions::default(), &mut rng);
        assert!(matches!(r, Err(Error::Shape(_))), "{:?}", r.map(|l| l.logp));
    }
    assert!(matches!(
        sample(&smooth_field, &flat, &Solver::Euler { steps: 2 }),
        Err(Error::Shape(_))
    ));
    // A field returning NaN makes the likelihood a numerical error, not a panic or a hang.
    let nan = |x: &Tensor, _t: f64| -> Result<Tensor> { Ok(x.affine(f64::NAN, 0.0)?) };
    let r = log_likelihood(&nan, &x1, &CnfOptions::default(), &mut rng);
    assert!(
        matches!(r, Err(Error::Numerical(_))),
        "{:?}",
        r.map(|l| l.logp)
    );
}

#[test]
fn dopri5_gives_up_after_max_steps() {
    // dy/dt = cos t over a long span at a tight tolerance needs millions of steps.
    let mut f = |y: &Tensor, t: f64| -> Result<Tensor> { Ok(y.affine(0.0, t.cos())?) };
    let y = Tensor::new(&[0.0f64], &DEV).unwrap();
    let s = Solver::Dopri5 {
        rtol: 1e-13,
        atol: 1e-13,
    };
    let start = std::time::Instant::now();
    match integrate(&mut f, &y, 0.0, 1e6, &s) {
        Err(Error::Numerical(m)) => assert!(m.contains("100000 steps"), "{m}"),
        other => panic!("expected a numerical error, got {other:?}"),
    }
    println!("max-steps failure after {:?}", start.elapsed());
}

#[test]
fn dopri5_stops_at_the_deadline_of_its_caller() {
    // the same endless integration under a 50 ms budget stops with a budget error well before
    // its 100000 steps
    let mut f = |y: &Tensor, t: f64| -> Result<Tensor> { Ok(y.affine(0.0, t.cos())?) };
    let y = Tensor::new(&[0.0f64], &DEV).unwrap();
    let s = Solver::Dopri5 {
        rtol: 1e-13,
        atol: 1e-13,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(50);
    let r = elbo::deadline::within(Some(deadline), || integrate(&mut f, &y, 0.0, 1e6, &s));
    match r {
        Err(Error::Budget(m)) => assert!(m.contains("dopri5 stopped"), "{m}"),
        other => panic!("expected a budget error, got {:?}", other.map(|_| ())),
    }
    assert!(std::time::Instant::now() < deadline + std::time::Duration::from_secs(5));
}
