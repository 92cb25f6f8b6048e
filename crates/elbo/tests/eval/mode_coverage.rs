//! Mode coverage on the ring of 8 and the grid of 25 Gaussians: the data's own samples capture
//! every mode with the high-quality share of a 2-D Gaussian within 3 standard deviations
//! (`1 - e^{-9/2}`), a collapsed sampler captures only its modes, scattered samples are low
//! quality, PacGAN's 20-in-2500 rule is applied exactly, the mixture is recognised from the data
//! (other data refused), and the grid's stated entropy matches a Monte-Carlo estimate.

use elbo::data::toy2d::Toy2d;
use elbo::eval::mode_coverage::{Mixture, MIN_SHARE};
use elbo::eval::sample_metric::metric_by_name;
use elbo::Rng;

const HQ_EXACT: f64 = 0.988_891_003_461_758; // 1 - exp(-4.5)

#[test]
fn the_data_itself_captures_every_mode_with_the_gaussian_share() {
    for (toy, modes) in [(Toy2d::EightGaussians, 8.0), (Toy2d::Grid25, 25.0)] {
        let data = toy.sample(5000, &mut Rng::new(1));
        let samples = toy.sample(20000, &mut Rng::new(2));
        let mut rng = Rng::new(3);
        let m = metric_by_name("modes")
            .unwrap()
            .compute(&samples, &data, 2, &mut rng)
            .unwrap();
        assert_eq!(m.value, modes, "{toy:?}");
        let hq = metric_by_name("high-quality")
            .unwrap()
            .compute(&samples, &data, 2, &mut rng)
            .unwrap();
        let se = hq.stderr.unwrap();
        assert!(
            (hq.value - HQ_EXACT).abs() < 4.0 * se,
            "{toy:?}: {} vs {HQ_EXACT} (se {se})",
            hq.value
        );
        assert!(!metric_by_name("modes").unwrap().lower_is_better());
    }
}

#[test]
fn a_collapsed_sampler_captures_only_its_modes() {
    let grid = Mixture::of_toy(Toy2d::Grid25).unwrap();
    let data = Toy2d::Grid25.sample(2500, &mut Rng::new(4));
    // keep the samples of three modes only: high quality, but 3 of 25 modes
    let keep = [0usize, 7, 24];
    let near = |p: &[f32], k: usize| {
        let c = grid.centres[k];
        (f64::from(p[0]) - c[0]).hypot(f64::from(p[1]) - c[1]) < 0.5
    };
    let collapsed: Vec<f32> = Toy2d::Grid25
        .sample(20000, &mut Rng::new(5))
        .chunks_exact(2)
        .filter(|p| keep.iter().any(|k| near(p, *k)))
        .flatten()
        .copied()
        .collect();
    let cov = grid.coverage(&collapsed);
    assert_eq!(cov.captured, 3);
    assert!(cov.high_quality > 0.97, "{}", cov.high_quality);
    let v = metric_by_name("modes")
        .unwrap()
        .compute(&collapsed, &data, 2, &mut Rng::new(0))
        .unwrap();
    assert_eq!(v.value, 3.0);
    // samples scattered uniformly over [-5, 5]^2: the 25 discs of radius 0.15 cover
    // 25 pi 0.15^2 / 100 = 1.8% of the square
    let mut rng = Rng::new(6);
    let uniform: Vec<f32> = (0..40000)
        .map(|_| (rng.uniform() * 10.0 - 5.0) as f32)
        .collect();
    let cov = grid.coverage(&uniform);
    let want = 25.0 * std::f64::consts::PI * 0.15f64.powi(2) / 100.0;
    let se = (want * (1.0 - want) / 20000.0).sqrt();
    assert!(
        (cov.high_quality - want).abs() < 4.0 * se,
        "{} vs {want}",
        cov.high_quality
    );
    // 1.8% of 20000 spread over 25 modes is about 14 each, under the 160 a mode needs
    assert_eq!(cov.captured, 0);
}

#[test]
fn a_mode_needs_pacgans_share_of_the_samples() {
    let ring = Mixture::of_toy(Toy2d::EightGaussians).unwrap();
    assert_eq!(MIN_SHARE, 0.008);
    // 2500 samples: 19 at mode 0 do not capture it, 20 at mode 1 do; the rest far away
    let (c0, c1) = (ring.centres[0], ring.centres[1]);
    let mut s = Vec::new();
    for _ in 0..19 {
        s.extend([c0[0] as f32, c0[1] as f32]);
    }
    for _ in 0..20 {
        s.extend([c1[0] as f32, c1[1] as f32]);
    }
    while s.len() < 5000 {
        s.extend([40.0f32, 40.0]);
    }
    let cov = ring.coverage(&s);
    assert_eq!(cov.counts[0], 19);
    assert_eq!(cov.counts[1], 20);
    assert_eq!(cov.captured, 1);
    assert!((cov.high_quality - 39.0 / 2500.0).abs() < 1e-12);
}

#[test]
fn the_mixture_is_recognised_from_the_data_and_other_data_refused() {
    let ring = Toy2d::EightGaussians.sample(1000, &mut Rng::new(7));
    let grid = Toy2d::Grid25.sample(1000, &mut Rng::new(8));
    assert_eq!(
        Mixture::recognise(&ring, 2).unwrap(),
        Mixture::of_toy(Toy2d::EightGaussians).unwrap()
    );
    assert_eq!(
        Mixture::recognise(&grid, 2).unwrap(),
        Mixture::of_toy(Toy2d::Grid25).unwrap()
    );
    let moons = Toy2d::Moons.sample(1000, &mut Rng::new(9));
    let e = metric_by_name("modes")
        .unwrap()
        .compute(&moons, &moons, 2, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("8gaussians") && e.contains("energy-distance"),
        "{e}"
    );
    let e = metric_by_name("high-quality")
        .unwrap()
        .compute(&[0.0; 6], &[0.0; 6], 3, &mut Rng::new(0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("2-D") && e.contains("3-D"), "{e}");
}

/// The stated entropy `ln 25 + ln(2 pi e 0.05^2)` against `-mean log p(x)` over draws.
#[test]
fn the_grid_entropy_matches_a_monte_carlo_estimate() {
    let h = Toy2d::Grid25.entropy().unwrap();
    let x = Toy2d::Grid25.sample(40000, &mut Rng::new(10));
    let lp: Vec<f64> = x
        .chunks_exact(2)
        .map(|p| {
            -Toy2d::Grid25
                .log_density(f64::from(p[0]), f64::from(p[1]))
                .unwrap()
        })
        .collect();
    let n = lp.len() as f64;
    let mean = lp.iter().sum::<f64>() / n;
    let var = lp.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let se = (var / n).sqrt();
    assert!((mean - h).abs() < 4.0 * se, "{mean} vs {h} (se {se})");
    assert!((h - 0.0653).abs() < 1e-3, "{h}");
}
