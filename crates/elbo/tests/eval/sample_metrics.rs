//! Sample-quality metrics (energy distance, MMD, sliced Wasserstein) against closed forms, hand
//! computations, invariances and bad input.

use elbo::eval::sample_metric::{
    compute_all, metric_by_name, EnergyDistance, MetricValue, Mmd, SampleMetric, SlicedWasserstein,
    METRIC_NAMES,
};
use elbo::{Error, Rng};

/// `n` rows of N(mean, I) in `mean.len()` dimensions, row-major.
fn gaussian(rng: &mut Rng, n: usize, mean: &[f64]) -> Vec<f32> {
    let dim = mean.len();
    let mut v = rng.normal_vec(n * dim);
    for (i, x) in v.iter_mut().enumerate() {
        *x += mean[i % dim] as f32;
    }
    v
}

/// The rows of `x` [n, dim] in the order `perm`.
fn permute_rows(x: &[f32], dim: usize, perm: &[usize]) -> Vec<f32> {
    perm.iter()
        .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

/// erfc, Numerical Recipes' `erfcc` (fractional error < 1.2e-7 everywhere).
fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let ans = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 {
        ans
    } else {
        2.0 - ans
    }
}

/// Standard normal CDF.
fn phi(x: f64) -> f64 {
    0.5 * erfc(-x / std::f64::consts::SQRT_2)
}

/// E|Z| for Z ~ N(m, s^2) (the folded normal mean).
fn mean_abs_normal(m: f64, s: f64) -> f64 {
    s * (2.0 / std::f64::consts::PI).sqrt() * (-m * m / (2.0 * s * s)).exp()
        + m * (1.0 - 2.0 * phi(-m / s))
}

#[test]
fn folded_normal_helper_is_right() {
    // sanity of the closed-form helper the next test relies on
    assert!((phi(0.0) - 0.5).abs() < 1e-7);
    assert!((phi(1.959_964) - 0.975).abs() < 1e-6);
    assert!((mean_abs_normal(0.0, 1.0) - (2.0 / std::f64::consts::PI).sqrt()).abs() < 1e-7);
    // far from zero |Z| = Z almost surely
    assert!((mean_abs_normal(10.0, 1.0) - 10.0).abs() < 1e-6);
}

#[test]
fn energy_distance_matches_closed_form_for_shifted_1d_gaussians() {
    let ed = EnergyDistance::default();
    for (seed, mu) in [(1u64, 1.0f64), (2, 0.5)] {
        let mut rng = Rng::new(seed);
        let x = gaussian(&mut rng, 2000, &[0.0]);
        let y = gaussian(&mut rng, 2000, &[mu]);
        let v = ed.compute(&x, &y, 1, &mut rng).unwrap();
        // X - Y ~ N(-mu, 2), X - X' ~ Y - Y' ~ N(0, 2)
        let s = std::f64::consts::SQRT_2;
        let want = 2.0 * mean_abs_normal(-mu, s) - 2.0 * mean_abs_normal(0.0, s);
        let se = v.stderr.unwrap();
        assert!(
            se > 0.0 && se < 0.15 * want,
            "mu {mu}: stderr {se} vs {want}"
        );
        assert!(
            (v.value - want).abs() < 4.0 * se,
            "mu {mu}: ED {} vs closed form {want} (se {se})",
            v.value
        );
        assert_eq!((v.n_samples, v.n_data), (2000, 2000));
    }
}

#[test]
fn reported_stderr_matches_the_spread_over_repetitions() {
    // For shifted distributions (the non-degenerate case) the first-order standard error of ED
    // and MMD^2_u should match the standard deviation of the estimate over independent draws.
    let reps = 30;
    let metrics: Vec<Box<dyn SampleMetric>> = vec![
        Box::new(EnergyDistance::default()),
        Box::new(Mmd::with_bandwidth(1.0)),
    ];
    for metric in &metrics {
        let mut rng = Rng::new(17);
        let mut values = Vec::new();
        let mut ses = Vec::new();
        for _ in 0..reps {
            let x = gaussian(&mut rng, 300, &[0.0, 0.0]);
            let y = gaussian(&mut rng, 300, &[1.0, 0.0]);
            let v = metric.compute(&x, &y, 2, &mut rng).unwrap();
            values.push(v.value);
            ses.push(v.stderr.unwrap());
        }
        let mean = values.iter().sum::<f64>() / reps as f64;
        let sd =
            (values.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (reps - 1) as f64).sqrt();
        let se = ses.iter().sum::<f64>() / reps as f64;
        let ratio = se / sd;
        assert!(
            (0.7..1.4).contains(&ratio),
            "{}: mean reported stderr {se} vs spread {sd}",
            metric.name()
        );
    }
}

#[test]
fn energy_distance_of_one_distribution_is_near_zero() {
    let ed = EnergyDistance::default();
    let mut rng = Rng::new(3);
    let x = gaussian(&mut rng, 1500, &[0.0, 0.0, 0.0]);
    let y = gaussian(&mut rng, 1500, &[0.0, 0.0, 0.0]);
    let same = ed.compute(&x, &y, 3, &mut rng).unwrap().value;
    let z = gaussian(&mut rng, 1500, &[1.0, 0.0, 0.0]);
    let shifted = ed.compute(&x, &z, 3, &mut rng).unwrap().value;
    assert!(same.abs() < 0.01, "same-distribution ED {same}");
    assert!(shifted > 0.2, "shifted ED {shifted}");
    assert!(same.abs() < 0.05 * shifted, "{same} vs {shifted}");
}

#[test]
fn energy_distance_and_mmd_on_a_hand_computed_example() {
    // x = (0,0), (1,1); y = (2,0), (0,3), (1,-1): squared distances
    //   within x: 2;  within y: 13, 2, 17;  cross: 4, 9, 2 | 2, 5, 4.
    let x = [0.0f32, 0.0, 1.0, 1.0];
    let y = [2.0f32, 0.0, 0.0, 3.0, 1.0, -1.0];
    let mut rng = Rng::new(0);

    let sigma: f64 = 1.5;
    let k = |d2: f64| (-d2 / (2.0 * sigma * sigma)).exp();
    let kxx = k(2.0); // both ordered pairs of x, divided by n(n-1) = 2
    let kyy = (k(13.0) + k(2.0) + k(17.0)) / 3.0; // 2 * sum / (3 * 2)
    let kxy = (k(4.0) + k(9.0) + k(2.0) + k(2.0) + k(5.0) + k(4.0)) / 6.0;
    let want = kxx + kyy - 2.0 * kxy;
    let v = Mmd::with_bandwidth(sigma)
        .compute(&x, &y, 2, &mut rng)
        .unwrap();
    assert!(
        (v.value - want).abs() < 1e-12,
        "MMD^2_u {} vs {want}",
        v.value
    );
    assert_eq!((v.n_samples, v.n_data), (2, 3));

    let r = |d2: f64| d2.sqrt();
    let exy = (r(4.0) + r(9.0) + r(2.0) + r(2.0) + r(5.0) + r(4.0)) / 6.0;
    let exx = r(2.0);
    let eyy = (r(13.0) + r(2.0) + r(17.0)) / 3.0;
    let want = 2.0 * exy - exx - eyy;
    let v = EnergyDistance::default()
        .compute(&x, &y, 2, &mut rng)
        .unwrap();
    assert!((v.value - want).abs() < 1e-12, "ED {} vs {want}", v.value);
}

#[test]
fn mmd_is_unbiased_at_zero_and_positive_for_shifted_distributions() {
    let mmd = Mmd::default();
    let mut rng = Rng::new(11);
    let reps = 20;
    let mut same = Vec::new();
    let mut shifted = Vec::new();
    for _ in 0..reps {
        let x = gaussian(&mut rng, 200, &[0.0, 0.0]);
        let y = gaussian(&mut rng, 200, &[0.0, 0.0]);
        let z = gaussian(&mut rng, 200, &[1.0, 1.0]);
        same.push(mmd.compute(&x, &y, 2, &mut rng).unwrap().value);
        shifted.push(mmd.compute(&x, &z, 2, &mut rng).unwrap().value);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let sd = |v: &[f64]| {
        let m = mean(v);
        (v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt()
    };
    let (m0, s0) = (mean(&same), sd(&same));
    // unbiased: the mean over repetitions is within 3 standard errors of 0 ...
    assert!(
        m0.abs() < 3.0 * s0 / (reps as f64).sqrt(),
        "mean {m0}, sd {s0}"
    );
    // ... so single estimates straddle 0 (a biased V-statistic would always be > 0)
    assert!(same.iter().any(|&v| v < 0.0), "{same:?}");
    // shifted by (1, 1): every repetition clearly positive, far above the null spread
    assert!(
        shifted.iter().all(|&v| v > 10.0 * s0),
        "{shifted:?} vs null sd {s0}"
    );
    assert!(mean(&shifted) > 0.05, "{}", mean(&shifted));
}

#[test]
fn sliced_wasserstein_of_shifted_gaussians_is_half_the_squared_shift_in_2d() {
    // For N(0, I) vs N(m, I), the projection on theta is N(0,1) vs N(<m,theta>,1), whose W2 is
    // |<m,theta>|; averaged over theta uniform on the circle, E <m,theta>^2 = |m|^2 / 2.
    // `value` is SW_2^2 (the p-th power), so it should be 12.5 for m = (3, -4).
    let m = [3.0, -4.0];
    let target = 12.5;
    let projections = 2000;
    let sw = SlicedWasserstein {
        projections,
        ..SlicedWasserstein::default()
    };
    // Per-direction variance of <m,theta>^2 = 25 cos^2: 625 Var(cos^2) = 625 / 8.
    let se_theory = (625.0f64 / 8.0 / projections as f64).sqrt();

    // (a) y = x + m exactly: every projection's W2^2 is exactly <m,theta>^2, so the only noise is
    // that of the directions, which `stderr` reports.
    let mut rng = Rng::new(21);
    let x = gaussian(&mut rng, 4000, &[0.0, 0.0]);
    let y: Vec<f32> = x
        .iter()
        .enumerate()
        .map(|(i, &v)| v + m[i % 2] as f32)
        .collect();
    let v = sw.compute(&x, &y, 2, &mut rng).unwrap();
    let se = v.stderr.unwrap();
    assert!(
        (se / se_theory - 1.0).abs() < 0.15,
        "stderr {se} vs theory {se_theory}"
    );
    assert!(
        (v.value - target).abs() < 4.0 * se,
        "SW2^2 {} vs {target} (se {se})",
        v.value
    );

    // (b) independent samples: add the sampling error of the mean difference, whose projection
    // contributes <m, xbar - ybar> with sd |m| sqrt(2/n).
    let n = 8000;
    let x = gaussian(&mut rng, n, &[0.0, 0.0]);
    let y = gaussian(&mut rng, n, &m);
    let v = sw.compute(&x, &y, 2, &mut rng).unwrap();
    let se = v.stderr.unwrap();
    let tol = 4.0 * (se * se + 25.0 * 2.0 / n as f64).sqrt() + 0.02;
    assert!(
        (v.value - target).abs() < tol,
        "SW2^2 {} vs {target} (tol {tol})",
        v.value
    );
    // and it is near 0 for one distribution
    let z = gaussian(&mut rng, n, &[0.0, 0.0]);
    let v0 = sw.compute(&x, &z, 2, &mut rng).unwrap();
    assert!(v0.value >= 0.0 && v0.value < 0.01, "{}", v0.value);
}

#[test]
fn sliced_wasserstein_uses_empirical_quantiles_for_unequal_sizes() {
    // 1-D: every direction is +-1, so SW_p^p = W_p^p. x = {0, 1}, y = {0, 1, 2}: the quantile
    // functions differ by 1 on (1/3, 1/2] and (2/3, 1], so W_p^p = 1/6 + 1/3 = 1/2 for every p.
    let mut rng = Rng::new(0);
    for p in [1.0, 2.0, 3.0] {
        let sw = SlicedWasserstein {
            projections: 8,
            p,
            ..SlicedWasserstein::default()
        };
        let v = sw
            .compute(&[0.0, 1.0], &[2.0, 0.0, 1.0], 1, &mut rng)
            .unwrap();
        assert!((v.value - 0.5).abs() < 1e-12, "p {p}: {}", v.value);
        assert!(v.stderr.unwrap() < 1e-12);
        assert_eq!((v.n_samples, v.n_data), (2, 3));
    }
    // a pure shift in 1-D: W_2^2 = shift^2 exactly
    let x: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
    let y: Vec<f32> = x.iter().map(|v| v + 3.0).collect();
    let v = SlicedWasserstein::default()
        .compute(&x, &y, 1, &mut rng)
        .unwrap();
    assert!((v.value - 9.0).abs() < 1e-5, "{}", v.value);
}

#[test]
fn metrics_do_not_depend_on_row_order() {
    let dim = 3;
    let mut rng = Rng::new(5);
    let x = gaussian(&mut rng, 300, &[0.0, 0.0, 0.0]);
    let y = gaussian(&mut rng, 250, &[0.5, 0.0, -0.5]);
    let xp = permute_rows(&x, dim, &rng.permutation(300));
    let yp = permute_rows(&y, dim, &rng.permutation(250));
    let metrics: Vec<Box<dyn SampleMetric>> = vec![
        Box::new(EnergyDistance::default()),
        Box::new(Mmd::default()), // median heuristic over all 550 pooled rows
        Box::new(Mmd::with_bandwidth(0.7)),
        Box::new(SlicedWasserstein::default()),
    ];
    for metric in &metrics {
        let a = metric.compute(&x, &y, dim, &mut Rng::new(9)).unwrap();
        let b = metric.compute(&xp, &yp, dim, &mut Rng::new(9)).unwrap();
        assert!(a.value > 0.0, "{}: {}", metric.name(), a.value);
        assert!(
            (a.value - b.value).abs() <= 1e-10 * a.value.abs(),
            "{}: {} vs {} after permuting rows",
            metric.name(),
            a.value,
            b.value
        );
    }
}

#[test]
fn row_cap_subsamples_with_the_rng() {
    let mut rng = Rng::new(8);
    let x = gaussian(&mut rng, 3000, &[0.0, 0.0]);
    let y = gaussian(&mut rng, 1200, &[1.0, 0.0]);
    let ed = EnergyDistance { max_rows: 500 };
    let a = ed.compute(&x, &y, 2, &mut Rng::new(1)).unwrap();
    let b = ed.compute(&x, &y, 2, &mut Rng::new(1)).unwrap();
    let c = ed.compute(&x, &y, 2, &mut Rng::new(2)).unwrap();
    assert_eq!((a.n_samples, a.n_data), (500, 500));
    assert_eq!(a, b, "same seed, same subsample");
    assert_ne!(a.value, c.value, "another seed, another subsample");
    // the subsampled estimate still agrees with the full one within its error
    let full = EnergyDistance { max_rows: 3000 }
        .compute(&x, &y, 2, &mut Rng::new(1))
        .unwrap();
    assert_eq!((full.n_samples, full.n_data), (3000, 1200));
    assert!((a.value - full.value).abs() < 4.0 * a.stderr.unwrap());
}

#[test]
fn registry_resolves_names_and_aliases() {
    for (alias, canonical) in [
        ("energy-distance", "energy-distance"),
        ("energy", "energy-distance"),
        ("ed", "energy-distance"),
        ("mmd", "mmd"),
        ("MMD", "mmd"),
        ("sliced-wasserstein", "sliced-wasserstein"),
        ("swd", "sliced-wasserstein"),
        (" sw ", "sliced-wasserstein"),
    ] {
        let m = metric_by_name(alias).unwrap();
        assert_eq!(m.name(), canonical);
        assert!(m.lower_is_better());
    }
    for name in METRIC_NAMES {
        assert_eq!(metric_by_name(name).unwrap().name(), *name);
    }
}

#[test]
fn unknown_metric_name_lists_the_valid_names() {
    let err = metric_by_name("fid").err().unwrap();
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(msg.contains("'fid'"), "{msg}");
    for name in METRIC_NAMES.iter().chain(&["energy", "ed", "swd", "sw"]) {
        assert!(msg.contains(name), "{msg} lacks {name}");
    }
    // compute_all resolves every name before computing anything
    let mut rng = Rng::new(0);
    let x = gaussian(&mut rng, 10, &[0.0]);
    let err = compute_all(&["ed".to_string(), "nope".to_string()], &x, &x, 1, &mut rng)
        .err()
        .unwrap();
    assert!(err.to_string().contains("'nope'"), "{err}");
}

#[test]
fn compute_all_returns_canonical_names_once_each() {
    let mut rng = Rng::new(4);
    let x = gaussian(&mut rng, 100, &[0.0, 0.0]);
    let y = gaussian(&mut rng, 120, &[2.0, 0.0]);
    let names: Vec<String> = ["sw", "ed", "mmd", "energy"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let out: Vec<(String, MetricValue)> = compute_all(&names, &x, &y, 2, &mut rng).unwrap();
    let got: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got, ["sliced-wasserstein", "energy-distance", "mmd"]);
    for (name, v) in &out {
        assert!(v.value > 0.0 && v.value.is_finite(), "{name}: {v:?}");
        assert_eq!((v.n_samples, v.n_data), (100, 120), "{name}");
    }
    // the same as computing energy distance alone (it uses no randomness below the cap)
    let ed = EnergyDistance::default()
        .compute(&x, &y, 2, &mut rng)
        .unwrap();
    assert_eq!(out[1].1.value, ed.value);
}

#[test]
fn bad_input_is_an_error_that_names_the_problem() {
    let good = [0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0]; // [3, 2]
    let mut rng = Rng::new(0);
    let metrics: Vec<Box<dyn SampleMetric>> = METRIC_NAMES
        .iter()
        .map(|n| metric_by_name(n).unwrap())
        .collect();
    for m in &metrics {
        let name = m.name();
        // length not a multiple of dim
        let err = m.compute(&good[..5], &good, 2, &mut rng).err().unwrap();
        assert!(matches!(err, Error::Shape(_)), "{name}: {err:?}");
        assert!(
            err.to_string().contains("multiple of dim 2"),
            "{name}: {err}"
        );
        assert!(err.to_string().contains("samples"), "{name}: {err}");
        // dim 0
        let err = m.compute(&good, &good, 0, &mut rng).err().unwrap();
        assert!(err.to_string().contains("dim"), "{name}: {err}");
        // empty sets
        let err = m.compute(&[], &good, 2, &mut rng).err().unwrap();
        assert!(err.to_string().contains("empty"), "{name}: {err}");
        let err = m.compute(&good, &[], 2, &mut rng).err().unwrap();
        assert!(err.to_string().contains("empty"), "{name}: {err}");
        assert!(err.to_string().contains("held-out data"), "{name}: {err}");
        // non-finite values, with their position
        let mut bad = good;
        bad[3] = f32::NAN;
        let err = m.compute(&bad, &good, 2, &mut rng).err().unwrap();
        let msg = err.to_string();
        assert!(matches!(err, Error::Data { .. }), "{name}: {err:?}");
        assert!(
            msg.contains("NaN") && msg.contains("row 1, column 1"),
            "{name}: {msg}"
        );
        let mut bad = good;
        bad[4] = f32::INFINITY;
        let err = m.compute(&good, &bad, 2, &mut rng).err().unwrap();
        assert!(err.to_string().contains("inf"), "{name}: {err}");
    }
    // the U-statistics need two rows per set
    for m in [
        metric_by_name("ed").unwrap(),
        metric_by_name("mmd").unwrap(),
    ] {
        let err = m.compute(&good[..2], &good, 2, &mut rng).err().unwrap();
        assert!(
            err.to_string().contains("at least 2"),
            "{}: {err}",
            m.name()
        );
    }
    // bad settings
    let err = Mmd::with_bandwidth(-1.0)
        .compute(&good, &good, 2, &mut rng)
        .err()
        .unwrap();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    let sw = SlicedWasserstein {
        projections: 0,
        ..SlicedWasserstein::default()
    };
    assert!(matches!(
        sw.compute(&good, &good, 2, &mut rng),
        Err(Error::Config(_))
    ));
    // a median-heuristic bandwidth of 0 (all points equal) is an error, not a NaN
    let same = [1.0f32; 6];
    let err = Mmd::default()
        .compute(&same, &same, 2, &mut rng)
        .err()
        .unwrap();
    assert!(err.to_string().contains("bandwidth"), "{err}");
}
