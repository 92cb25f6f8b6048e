//! The Fréchet distance: the closed form between Gaussians (commuting and non-commuting
//! covariances, against the scalar formula and a direct matrix square root), the vendored
//! classifiers load with their hash checked (and a changed file is refused), classify held-out
//! images well, and the distance separates held-out digits from blurred and noisy ones.

use elbo::data::{self, DataConfig};
use elbo::eval::feature_net::{FeatureData, FeatureNet};
use elbo::eval::frechet::{frechet_gaussians, mean_and_covariance, symmetric_eigen};
use elbo::eval::sample_metric::metric_by_name;
use elbo::train::checkpoint::fnv1a64;
use elbo::Rng;

#[test]
fn jacobi_eigenvalues_and_the_gaussian_closed_form() {
    // a symmetric matrix with known eigenvalues: Q diag(1, 2, 5) Q^T
    let (c, s) = (0.6f64, 0.8f64);
    let q = [c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0];
    let l = [1.0, 2.0, 5.0];
    let mut a = vec![0.0; 9];
    for i in 0..3 {
        for j in 0..3 {
            a[i * 3 + j] = (0..3).map(|k| q[i * 3 + k] * l[k] * q[j * 3 + k]).sum();
        }
    }
    let (mut got, v) = symmetric_eigen(a.clone(), 3);
    // A v = lambda v for each column
    for k in 0..3 {
        for i in 0..3 {
            let av: f64 = (0..3).map(|j| a[i * 3 + j] * v[j * 3 + k]).sum();
            assert!((av - got[k] * v[i * 3 + k]).abs() < 1e-10);
        }
    }
    got.sort_by(f64::total_cmp);
    for (g, w) in got.iter().zip(l) {
        assert!((g - w).abs() < 1e-10, "{got:?}");
    }
    // 1-D: (m1 - m2)^2 + (s1 - s2)^2
    let d = frechet_gaussians(&[1.0], &[4.0], &[-0.5], &[9.0], 1);
    assert!((d - (2.25 + 1.0)).abs() < 1e-12, "{d}");
    // diagonal covariances: the per-axis sum
    let d = frechet_gaussians(
        &[0.0, 0.0],
        &[1.0, 0.0, 0.0, 4.0],
        &[0.0, 1.0],
        &[4.0, 0.0, 0.0, 1.0],
        2,
    );
    assert!((d - (1.0 + 1.0 + 1.0)).abs() < 1e-10, "{d}");
    // non-commuting: tr (S1 S2)^{1/2} by the 2x2 formula tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    let s1 = [2.0, 0.5, 0.5, 1.0];
    let s2 = [1.0, -0.3, -0.3, 3.0];
    let m = [
        s1[0] * s2[0] + s1[1] * s2[2],
        s1[0] * s2[1] + s1[1] * s2[3],
        s1[2] * s2[0] + s1[3] * s2[2],
        s1[2] * s2[1] + s1[3] * s2[3],
    ];
    let det: f64 = m[0] * m[3] - m[1] * m[2];
    let tr_sqrt = (m[0] + m[3] + 2.0 * det.sqrt()).sqrt();
    let want = 2.0 + 1.0 + 1.0 + 3.0 - 2.0 * tr_sqrt;
    let d = frechet_gaussians(&[0.0, 0.0], &s1, &[0.0, 0.0], &s2, 2);
    assert!((d - want).abs() < 1e-10, "{d} vs {want}");
    assert!(frechet_gaussians(&[0.0, 0.0], &s1, &[0.0, 0.0], &s1, 2).abs() < 1e-10);
    let (mu, cov) = mean_and_covariance(&[0.0, 0.0, 2.0, 2.0, 4.0, -2.0], 2);
    assert_eq!(mu, vec![2.0, 0.0]);
    assert_eq!(cov, vec![4.0, -2.0, -2.0, 4.0]);
}

#[test]
fn the_vendored_classifiers_load_with_their_hash_and_classify_held_out_images() {
    for (name, min_acc) in [("digits", 0.9), ("mnist", 0.9)] {
        let net = FeatureNet::vendored(FeatureData::from_name(name).unwrap()).unwrap();
        let src = data::open(name, &DataConfig::default()).unwrap();
        let test: Vec<f32> = src
            .test_set(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let feats = net.features(&test, net.max_level);
        assert_eq!(feats.len(), test.len() / net.dim * 64);
        // held-out accuracy, with labels from the data set itself
        let labels: Vec<u8> = match name {
            "digits" => elbo::data::digits::load().unwrap().labels[1500..].to_vec(),
            _ => {
                let m = elbo::data::mnist::load().unwrap();
                (0..m.len())
                    .filter(|&i| elbo::data::mnist::is_test(i))
                    .map(|i| m.labels[i])
                    .collect()
            }
        };
        let correct = test
            .chunks_exact(net.dim)
            .zip(&labels)
            .filter(|(x, y)| net.predict(x, net.max_level) == **y as usize)
            .count();
        let acc = correct as f64 / labels.len() as f64;
        assert!(acc > min_acc, "{name}: held-out accuracy {acc}");
    }
    // a changed file is refused, naming the fix
    let bytes = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../data/classifiers/digits.safetensors"
    ))
    .unwrap();
    let good = fnv1a64(&bytes);
    assert!(FeatureNet::from_bytes(&bytes, good, "digits").is_ok());
    let mut bad = bytes.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let e = FeatureNet::from_bytes(&bad, good, "digits")
        .unwrap_err()
        .to_string();
    assert!(e.contains("hash") && e.contains("retrain"), "{e}");
}

/// A 3x3 box blur of each 8x8 image (edges averaged over the pixels inside), rounded to levels.
fn blur(x: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for img in x.chunks_exact(64) {
        for r in 0..8i32 {
            for c in 0..8i32 {
                let (mut s, mut n) = (0.0, 0.0);
                for dr in -1..=1 {
                    for dc in -1..=1 {
                        let (rr, cc) = (r + dr, c + dc);
                        if (0..8).contains(&rr) && (0..8).contains(&cc) {
                            s += img[(rr * 8 + cc) as usize];
                            n += 1.0;
                        }
                    }
                }
                out.push((s / n as f32).round());
            }
        }
    }
    out
}

#[test]
fn the_distance_is_small_between_held_out_halves_and_large_to_blurred_or_noisy_digits() {
    let src = data::open("digits", &DataConfig::default()).unwrap();
    let dev = candle_core::Device::Cpu;
    let val: Vec<f32> = src
        .val_set(&dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let test: Vec<f32> = src
        .test_set(&dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let half = (test.len() / 64 / 2) * 64;
    let (a, b) = (&test[..half], &test[half..]);
    let fd = metric_by_name("fd").unwrap();
    assert_eq!(fd.name(), "frechet-distance");
    let mut rng = Rng::new(0);
    let same = fd.compute(a, b, 64, &mut rng).unwrap().value;
    let val_test = fd.compute(&val, &test, 64, &mut rng).unwrap().value;
    let blurred = fd.compute(&blur(a), b, 64, &mut rng).unwrap().value;
    let mut r = Rng::new(1);
    let noise: Vec<f32> = (0..a.len()).map(|_| r.below(17) as f32).collect();
    let noisy = fd.compute(&noise, b, 64, &mut rng).unwrap().value;
    assert!(same > 0.0 && val_test > 0.0);
    assert!(
        blurred > 4.0 * same.max(val_test),
        "same {same}, val/test {val_test}, blurred {blurred}"
    );
    assert!(
        noisy > blurred && noisy > 8.0 * same.max(val_test),
        "noise {noisy}, blurred {blurred}, same {same}"
    );
    // other shapes are refused with the alternatives named
    let e = fd
        .compute(&[0.0; 8], &[0.0; 8], 2, &mut rng)
        .unwrap_err()
        .to_string();
    assert!(e.contains("energy-distance"), "{e}");
    println!("digits FD: halves {same:.3}, val/test {val_test:.3}, blurred {blurred:.3}, noise {noisy:.3}");
}
