//! The eight toy generators, their entropies and the toy data sources.

use std::collections::HashSet;
use std::f64::consts::PI;

use candle_core::Device;
use elbo::data::toy2d::{Toy2d, Toy2dSource};
use elbo::data::{open, DataConfig, DataKind, DataSource, KNOWN_DATASETS};
use elbo::Rng;

use super::close;

const N: usize = 20_000;

fn pts(toy: Toy2d, n: usize, seed: u64) -> Vec<[f64; 2]> {
    let v = toy.sample(n, &mut Rng::new(seed));
    assert_eq!(v.len(), 2 * n, "{}", toy.name());
    v.chunks(2).map(|c| [c[0] as f64, c[1] as f64]).collect()
}

fn mean(p: &[[f64; 2]]) -> [f64; 2] {
    let n = p.len() as f64;
    [
        p.iter().map(|q| q[0]).sum::<f64>() / n,
        p.iter().map(|q| q[1]).sum::<f64>() / n,
    ]
}

fn var(p: &[[f64; 2]]) -> [f64; 2] {
    let m = mean(p);
    let n = p.len() as f64;
    [
        p.iter().map(|q| (q[0] - m[0]).powi(2)).sum::<f64>() / n,
        p.iter().map(|q| (q[1] - m[1]).powi(2)).sum::<f64>() / n,
    ]
}

fn mean_r2(p: &[[f64; 2]]) -> f64 {
    p.iter().map(|q| q[0] * q[0] + q[1] * q[1]).sum::<f64>() / p.len() as f64
}

fn radius(q: &[f64; 2]) -> f64 {
    q[0].hypot(q[1])
}

/// The 8gaussians mixture written out from FFJORD's definition, independently of the library.
fn eight_gaussians_logp(x: f64, y: f64) -> f64 {
    let s = 0.5 / 1.414;
    let r = 4.0 / 1.414;
    let terms: Vec<f64> = (0..8)
        .map(|k| {
            let a = k as f64 * PI / 4.0;
            let (dx, dy) = (x - r * a.cos(), y - r * a.sin());
            -(dx * dx + dy * dy) / (2.0 * s * s)
        })
        .collect();
    let m = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    m + terms.iter().map(|t| (t - m).exp()).sum::<f64>().ln() - (8.0 * 2.0 * PI * s * s).ln()
}

// ---------------------------------------------------------------- toy generators

#[test]
fn toy_names_round_trip_and_are_registered() {
    let names: HashSet<&str> = Toy2d::ALL.iter().map(|t| t.name()).collect();
    assert_eq!(names.len(), 9);
    for t in Toy2d::ALL {
        assert_eq!(Toy2d::from_name(t.name()), Some(t));
        assert!(KNOWN_DATASETS.contains(&t.name()));
    }
    assert_eq!(Toy2d::from_name("9gaussians"), None);
    assert!(KNOWN_DATASETS.contains(&"digits"));
}

#[test]
fn toy_samples_are_finite_seeded_and_sized() {
    for t in Toy2d::ALL {
        for n in [1, 7, 333] {
            let a = t.sample(n, &mut Rng::new(3));
            assert_eq!(a.len(), 2 * n, "{} n={n}", t.name());
            assert!(a.iter().all(|v| v.is_finite()), "{}", t.name());
        }
        let a = t.sample(500, &mut Rng::new(11));
        let b = t.sample(500, &mut Rng::new(11));
        let c = t.sample(500, &mut Rng::new(12));
        assert_eq!(a, b, "{}: same seed must give the same samples", t.name());
        assert_ne!(a, c, "{}: different seeds must differ", t.name());
    }
}

#[test]
fn eight_gaussians_modes_radius_and_spread() {
    let p = pts(Toy2d::EightGaussians, N, 1);
    let r = 4.0 / 1.414;
    let s = 0.5 / 1.414;
    let centres: Vec<[f64; 2]> = (0..8)
        .map(|k| {
            let a = k as f64 * PI / 4.0;
            [r * a.cos(), r * a.sin()]
        })
        .collect();
    let mut groups: Vec<Vec<[f64; 2]>> = vec![Vec::new(); 8];
    for q in &p {
        let k = (0..8)
            .min_by(|&a, &b| {
                let da = (q[0] - centres[a][0]).powi(2) + (q[1] - centres[a][1]).powi(2);
                let db = (q[0] - centres[b][0]).powi(2) + (q[1] - centres[b][1]).powi(2);
                da.total_cmp(&db)
            })
            .unwrap();
        groups[k].push(*q);
    }
    let mut pooled = 0.0;
    for (k, g) in groups.iter().enumerate() {
        close("mode mass", g.len() as f64 / N as f64, 0.125, 0.012);
        let m = mean(g);
        close("mode radius", radius(&m), r, 0.03);
        close("mode centre x", m[0], centres[k][0], 0.03);
        let v = var(g);
        pooled += (v[0] + v[1]) * g.len() as f64;
    }
    let std = (pooled / (2.0 * N as f64)).sqrt();
    close("within-mode std", std, s, 0.01);
}

#[test]
fn checkerboard_squares_mass_and_mean() {
    let p = pts(Toy2d::Checkerboard, N, 2);
    let mut counts = [[0usize; 4]; 4];
    for q in &p {
        assert!(
            (-4.0..4.0).contains(&q[0]) && (-4.0..4.0).contains(&q[1]),
            "{q:?}"
        );
        let i = ((q[0] + 4.0) / 2.0).floor() as usize;
        let j = ((q[1] + 4.0) / 2.0).floor() as usize;
        assert_eq!((i + j) % 2, 0, "point {q:?} lies in an empty square");
        counts[i][j] += 1;
        assert_eq!(
            Toy2d::Checkerboard.log_density(q[0], q[1]),
            Some(-(32f64.ln()))
        );
    }
    for (i, row) in counts.iter().enumerate() {
        for (j, &c) in row.iter().enumerate() {
            if (i + j) % 2 == 0 {
                close("square mass", c as f64 / N as f64, 0.125, 0.012);
            }
        }
    }
    let m = mean(&p);
    close("mean x", m[0], 0.0, 0.06);
    close("mean y", m[1], 0.0, 0.06);
    // A point in an empty square (i = 0, j = 1) has zero density.
    assert_eq!(
        Toy2d::Checkerboard.log_density(-3.0, -1.0),
        Some(f64::NEG_INFINITY)
    );
}

#[test]
fn circles_two_radii_half_each() {
    let p = pts(Toy2d::Circles, N, 3);
    let (inner, outer): (Vec<f64>, Vec<f64>) = p.iter().map(radius).partition(|&r| r < 2.25);
    close("inner fraction", inner.len() as f64 / N as f64, 0.5, 0.01);
    let mo = outer.iter().sum::<f64>() / outer.len() as f64;
    let mi = inner.iter().sum::<f64>() / inner.len() as f64;
    // E|R + noise| = R + sigma^2 / (2R) to first order, sigma = 0.24.
    close("outer radius", mo, 3.0 + 0.0576 / 6.0, 0.02);
    close("inner radius", mi, 1.5 + 0.0576 / 3.0, 0.02);
    let so = (outer.iter().map(|r| (r - mo).powi(2)).sum::<f64>() / outer.len() as f64).sqrt();
    close("radial std", so, 0.24, 0.015);
    let m = mean(&p);
    close("mean x", m[0], 0.0, 0.04);
    close("mean y", m[1], 0.0, 0.04);
}

#[test]
fn rings_four_radii_quarter_each() {
    let p = pts(Toy2d::Rings, N, 4);
    let radii = [3.0, 2.25, 1.5, 0.75];
    for &rr in &radii {
        let g: Vec<f64> = p
            .iter()
            .map(radius)
            .filter(|r| (r - rr).abs() < 0.375)
            .collect();
        close("ring mass", g.len() as f64 / N as f64, 0.25, 0.005);
        let m = g.iter().sum::<f64>() / g.len() as f64;
        close("ring radius", m, rr, 0.01);
        let s = (g.iter().map(|r| (r - m).powi(2)).sum::<f64>() / g.len() as f64).sqrt();
        close("ring radial std", s, 0.08, 0.008);
    }
    let m = mean(&p);
    close("mean x", m[0], 0.0, 0.02);
    close("mean y", m[1], 0.0, 0.02);
}

#[test]
fn moons_moments_follow_the_definition() {
    // Raw moons: outer (cos t, sin t), inner (1 - cos t, 0.5 - sin t), t uniform on [0, pi],
    // noise 0.1; then 2x + (-1, -0.2). Raw mean (0.5, 0.25) -> (0, 0.3). Raw var x: 1/2 within
    // + 1/4 between + 0.01 noise = 0.76 -> 3.04. Raw var y: (1/2 - 4/pi^2) within
    // + (0.5 - 2/pi)^2... between (means 2/pi and 0.5 - 2/pi) + 0.01 -> times 4.
    let p = pts(Toy2d::Moons, N, 5);
    let m = mean(&p);
    close("mean x", m[0], 0.0, 0.04);
    close("mean y", m[1], 0.3, 0.02);
    let within = 0.5 - 4.0 / (PI * PI);
    let between = ((2.0 / PI - (0.5 - 2.0 / PI)) / 2.0).powi(2);
    let v = var(&p);
    close("var x", v[0], 4.0 * 0.76, 0.06);
    close("var y", v[1], 4.0 * (within + between + 0.01), 0.03);
}

#[test]
fn swissroll_moments_follow_the_definition() {
    // t ~ U[1.5 pi, 4.5 pi]; x = (t cos t + e1) / 5, y = (t sin t + e2) / 5.
    // E[t cos t] = 6 pi / 3 pi = 2, E[t sin t] = 2 / 3 pi, E[t^2] = (a^2 + ab + b^2) / 3.
    let p = pts(Toy2d::SwissRoll, N, 6);
    let (a, b) = (1.5 * PI, 4.5 * PI);
    let m = mean(&p);
    close("mean x", m[0], 2.0 / 5.0, 0.04);
    close("mean y", m[1], 2.0 / (3.0 * PI) / 5.0, 0.04);
    let et2 = (a * a + a * b + b * b) / 3.0;
    close("E r^2", mean_r2(&p), (et2 + 2.0) / 25.0, 0.06);
    // The roll never comes closer to the origin than t = 1.5 pi, less the noise.
    let inside = p.iter().filter(|q| radius(q) < 0.5).count();
    assert!(inside < N / 200, "{inside} points near the origin");
}

#[test]
fn pinwheel_radius_and_fivefold_symmetry() {
    // |x| = 2 |f| with f0 ~ N(1, 0.3^2), f1 ~ N(0, 0.1^2): E|x|^2 = 4 (1 + 0.09 + 0.01).
    let p = pts(Toy2d::Pinwheel, N, 7);
    close("E r^2", mean_r2(&p), 4.4, 0.07);
    let m = mean(&p);
    close("mean x", m[0], 0.0, 0.04);
    close("mean y", m[1], 0.0, 0.04);
    // Five arms rotated by 72 degrees: any five equal sectors hold 1/5 each.
    for offset in [0.0, 0.3, 1.0] {
        let mut c = [0usize; 5];
        for q in &p {
            let a = (q[1].atan2(q[0]) + offset).rem_euclid(2.0 * PI);
            c[((a / (2.0 * PI / 5.0)) as usize).min(4)] += 1;
        }
        for k in c {
            close("sector mass", k as f64 / N as f64, 0.2, 0.015);
        }
    }
}

#[test]
fn two_spirals_radius_and_point_symmetry() {
    // t = 3 pi sqrt(u); E[t^2] = 9 pi^2 / 2, E[t cos t] = -4 / 3 pi, E[t sin t] = 2 - 8 / 9 pi^2;
    // |d|^2 = t^2 + 2 a (-t cos t) + 2 b t sin t + a^2 + b^2 with a, b ~ U[0, 0.5].
    let p = pts(Toy2d::TwoSpirals, N, 8);
    let et2 = 9.0 * PI * PI / 2.0;
    let cross = 2.0 * 0.25 * (4.0 / (3.0 * PI) + 2.0 - 8.0 / (9.0 * PI * PI));
    let want = (et2 + cross + 2.0 / 12.0) / 9.0 + 0.02;
    close("E r^2", mean_r2(&p), want, 0.08);
    let m = mean(&p);
    close("mean x", m[0], 0.0, 0.04);
    close("mean y", m[1], 0.0, 0.04);
    let right = p.iter().filter(|q| q[0] > 0.0).count() as f64 / N as f64;
    close("right half", right, 0.5, 0.015);
    assert!(p.iter().all(|q| radius(q) < 3.0 * PI / 3.0 + 1.0));
}

// ---------------------------------------------------------------- entropy

#[test]
fn entropies() {
    let h = Toy2d::EightGaussians.entropy().unwrap();
    close("8gaussians entropy", h, 2.833, 0.005);
    // Slightly below ln 8 + the entropy of one Gaussian, since the modes overlap a little.
    let s2 = (0.5f64 / 1.414).powi(2);
    let separated = 8f64.ln() + (2.0 * PI * std::f64::consts::E * s2).ln();
    assert!(h < separated && h > separated - 0.02, "{h} vs {separated}");
    close(
        "checkerboard entropy",
        Toy2d::Checkerboard.entropy().unwrap(),
        32f64.ln(),
        1e-12,
    );
    for t in [
        Toy2d::SwissRoll,
        Toy2d::Circles,
        Toy2d::Rings,
        Toy2d::Moons,
        Toy2d::Pinwheel,
        Toy2d::TwoSpirals,
    ] {
        assert_eq!(t.entropy(), None, "{}", t.name());
        assert_eq!(t.log_density(0.0, 0.0), None);
    }
}

#[test]
fn eight_gaussians_entropy_monte_carlo_and_density() {
    let h = Toy2d::EightGaussians.entropy().unwrap();
    let p = pts(Toy2d::EightGaussians, N, 9);
    let nll: Vec<f64> = p
        .iter()
        .map(|q| -eight_gaussians_logp(q[0], q[1]))
        .collect();
    let m = nll.iter().sum::<f64>() / N as f64;
    let se = (nll.iter().map(|v| (v - m).powi(2)).sum::<f64>() / N as f64 / N as f64).sqrt();
    assert!((m - h).abs() < 4.0 * se + 1e-3, "MC {m} +- {se} vs {h}");
    // The library's density agrees with the one written here.
    for q in p.iter().take(200) {
        let lib = Toy2d::EightGaussians.log_density(q[0], q[1]).unwrap();
        close("log density", lib, eight_gaussians_logp(q[0], q[1]), 1e-9);
    }
    // and integrates to 1 (midpoint rule on [-5, 5]^2).
    let step = 0.025;
    let mut total = 0.0;
    for i in 0..400 {
        for j in 0..400 {
            let (x, y) = (
                -5.0 + step * (i as f64 + 0.5),
                -5.0 + step * (j as f64 + 0.5),
            );
            total += Toy2d::EightGaussians.log_density(x, y).unwrap().exp();
        }
    }
    close("mass", total * step * step, 1.0, 1e-4);
}

// ---------------------------------------------------------------- toy sources

#[test]
fn toy_source_held_out_set_is_fixed_and_train_batches_follow_the_rng() {
    let dev = Device::Cpu;
    let cfg = DataConfig::default();
    assert_eq!(cfg.test_size, 5000);
    let mut a = open("8gaussians", &cfg).unwrap();
    let mut b = open("8gaussians", &cfg).unwrap();
    assert_eq!(a.name(), "8gaussians");
    assert_eq!(a.dim(), 2);
    assert_eq!(a.kind(), DataKind::Continuous);
    assert_eq!(a.image_shape(), None);
    assert!(a.entropy().is_some());
    // Different run seeds, and training draws before the held-out set is asked for.
    let (mut r1, mut r2) = (Rng::new(1), Rng::new(2));
    let ba = a.train_batch(64, &mut r1, &dev).unwrap();
    let bb = b.train_batch(64, &mut r2, &dev).unwrap();
    assert_eq!(ba.dims(), &[64, 2]);
    assert_ne!(ba.to_vec2::<f32>().unwrap(), bb.to_vec2::<f32>().unwrap());
    let ta = a.test_set(&dev).unwrap();
    let tb = b.test_set(&dev).unwrap();
    assert_eq!(ta.dims(), &[5000, 2]);
    assert_eq!(ta.to_vec2::<f32>().unwrap(), tb.to_vec2::<f32>().unwrap());
    // The same seed gives the same training batch.
    let again = a.train_batch(64, &mut Rng::new(1), &dev).unwrap();
    assert_eq!(
        ba.to_vec2::<f32>().unwrap(),
        again.to_vec2::<f32>().unwrap()
    );
    // A smaller test size draws from the same fixed stream.
    let small = DataConfig {
        test_size: 100,
        ..DataConfig::default()
    };
    let c = Toy2dSource::new(Toy2d::Checkerboard, 100).unwrap();
    assert_eq!(c.toy(), Toy2d::Checkerboard);
    let d = open("checkerboard", &small).unwrap();
    assert_eq!(
        c.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(),
        d.test_set(&dev).unwrap().to_vec2::<f32>().unwrap()
    );
    let e = open("8gaussians", &small).unwrap();
    assert_eq!(
        e.test_set(&dev).unwrap().to_vec2::<f32>().unwrap()[..],
        ta.to_vec2::<f32>().unwrap()[..100]
    );
    assert!(Toy2dSource::new(Toy2d::Moons, 0).is_err());
    assert!(a.train_batch(0, &mut r1, &dev).is_err());
}
