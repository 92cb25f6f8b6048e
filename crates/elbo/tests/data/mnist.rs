//! Tests of the embedded MNIST digits: counts, value ranges and levels, the fixed split,
//! binarization, and that the images and labels look like the digits they claim to be.

use candle_core::{DType, Device, Tensor};
use elbo::data::mnist::{self, MnistSource, CLASS_COUNTS, N_IMAGES, PIXELS};
use elbo::data::{open, DataConfig, DataKind, DataSource, KNOWN_DATASETS};
use elbo::Rng;

const CPU: Device = Device::Cpu;

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

#[test]
fn counts_labels_and_known_pixel_sums() {
    let d = mnist::load().unwrap();
    assert_eq!(d.len(), N_IMAGES);
    assert_eq!(d.images.len(), N_IMAGES * PIXELS);
    for (c, &n) in CLASS_COUNTS.iter().enumerate() {
        assert_eq!(d.labels.iter().filter(|&&l| l as usize == c).count(), n);
    }
    assert_eq!(CLASS_COUNTS.iter().sum::<usize>(), N_IMAGES);
    // figures computed from the npm package's JSON (sum of round(255 v))
    let sum = |s: &[u8]| s.iter().map(|&k| u64::from(k)).sum::<u64>();
    assert_eq!(sum(&d.images), 262_146_600);
    assert_eq!(sum(d.image(0)), 31_095);
    assert_eq!(sum(d.image(N_IMAGES - 1)), 19_255);
    assert_eq!(d.image(0).iter().filter(|&&k| k >= 128).count(), 125);
    // both ends of the 0..=255 range occur; most pixels are background
    assert!(d.images.contains(&0) && d.images.contains(&255));
    let zeros = d.images.iter().filter(|&&k| k == 0).count() as f64 / d.images.len() as f64;
    assert!((zeros - 0.808).abs() < 0.001, "{zeros}");
}

#[test]
fn class_brightness_and_shapes_look_like_digits() {
    let d = mnist::load().unwrap();
    let mut mean = [0f64; 10];
    for i in 0..d.len() {
        let s: f64 = d.image(i).iter().map(|&k| f64::from(k) / 255.0).sum();
        mean[d.labels[i] as usize] += s / PIXELS as f64 / CLASS_COUNTS[d.labels[i] as usize] as f64;
    }
    // ones use the least ink, zeros the most (mean intensities 0.078 and 0.177)
    let argmin = (0..10)
        .min_by(|&a, &b| mean[a].total_cmp(&mean[b]))
        .unwrap();
    let argmax = (0..10)
        .max_by(|&a, &b| mean[a].total_cmp(&mean[b]))
        .unwrap();
    assert_eq!((argmin, argmax), (1, 0), "{mean:?}");
    assert!(mean.iter().all(|&m| (0.07..0.19).contains(&m)), "{mean:?}");
    // the mean zero has a hole in the middle; the mean one is ink down the middle column
    let class_mean = |c: u8| -> Vec<f64> {
        let idx: Vec<usize> = (0..d.len()).filter(|&i| d.labels[i] == c).collect();
        (0..PIXELS)
            .map(|p| idx.iter().map(|&i| f64::from(d.image(i)[p])).sum::<f64>() / idx.len() as f64)
            .collect()
    };
    let (zero, one) = (class_mean(0), class_mean(1));
    let at = |m: &[f64], r: usize, c: usize| m[r * 28 + c];
    assert!(
        at(&zero, 14, 14) < 0.3 * at(&zero, 14, 8),
        "zero centre not empty"
    );
    assert!(
        at(&one, 14, 14) > 3.0 * at(&one, 14, 8),
        "one has no stroke in the middle"
    );
    // nothing in the corners (MNIST digits are centred in a 20x20 box)
    for m in [&zero, &one] {
        assert_eq!(
            at(m, 0, 0) + at(m, 0, 27) + at(m, 27, 0) + at(m, 27, 27),
            0.0
        );
    }
}

#[test]
fn sources_levels_and_fixed_split() {
    let grey = MnistSource::new().unwrap();
    let bin = MnistSource::binary().unwrap();
    assert_eq!(
        (grey.n_train(), grey.n_val(), grey.n_test()),
        (8100, 900, 1000)
    );
    assert_eq!(
        (bin.n_train(), bin.n_val(), bin.n_test()),
        (8100, 900, 1000)
    );
    assert_eq!(grey.name(), "mnist");
    assert_eq!(bin.name(), "mnist-binary");
    assert_eq!(grey.kind(), DataKind::Discrete { levels: 256 });
    assert_eq!(bin.kind(), DataKind::Discrete { levels: 2 });
    assert_eq!((grey.dim(), bin.dim()), (784, 784));
    assert_eq!(grey.image_shape(), Some((28, 28)));
    assert_eq!(bin.image_shape(), Some((28, 28)));

    // the test set is every tenth image (i % 10 == 9) of the file
    let d = mnist::load().unwrap();
    let test = rows(&grey.test_set(&CPU).unwrap());
    let expected: Vec<usize> = (0..N_IMAGES).filter(|&i| mnist::is_test(i)).collect();
    assert_eq!(test.len(), expected.len());
    for (row, &i) in test.iter().zip(&expected) {
        let want: Vec<f32> = d.image(i).iter().map(|&k| f32::from(k)).collect();
        assert_eq!(row, &want);
    }
    let total: f64 = test.iter().flatten().map(|&v| f64::from(v)).sum();
    assert_eq!(total, 26_035_719.0);
    // every class is held out in proportion (about 10 %)
    for (c, &n) in CLASS_COUNTS.iter().enumerate() {
        let k = expected
            .iter()
            .filter(|&&i| d.labels[i] as usize == c)
            .count();
        assert!(k.abs_diff(n / 10) <= 1, "class {c}: {k} of {n} held out");
    }

    // binarization: 1 exactly where the grey level is >= 128 (intensity >= 0.5)
    let btest = rows(&bin.test_set(&CPU).unwrap());
    for (g, b) in test.iter().zip(&btest) {
        for (&gv, &bv) in g.iter().zip(b) {
            assert_eq!(bv, if gv >= 128.0 { 1.0 } else { 0.0 });
        }
    }

    // training batches come from the training split and depend only on the rng
    let mut s1 = MnistSource::new().unwrap();
    let mut s2 = MnistSource::new().unwrap();
    let b1 = rows(&s1.train_batch(64, &mut Rng::new(5), &CPU).unwrap());
    let b2 = rows(&s2.train_batch(64, &mut Rng::new(5), &CPU).unwrap());
    assert_eq!(b1, b2);
    let train_rows: std::collections::HashSet<Vec<u8>> = s1
        .train_rows()
        .iter()
        .map(|&i| d.image(i).to_vec())
        .collect();
    for r in &b1 {
        assert!(r
            .iter()
            .all(|&v| (0.0..=255.0).contains(&v) && v.fract() == 0.0));
        let bytes: Vec<u8> = r.iter().map(|&v| v as u8).collect();
        assert!(
            train_rows.contains(&bytes),
            "a batch row is not a training image"
        );
    }
    let bb = rows(&bin.clone().train_batch(32, &mut Rng::new(6), &CPU).unwrap());
    assert!(bb.iter().flatten().all(|&v| v == 0.0 || v == 1.0));
}

#[test]
fn registry_opens_both() {
    for (name, levels) in [("mnist", 256), ("mnist-binary", 2)] {
        assert!(KNOWN_DATASETS.contains(&name));
        let s = open(name, &DataConfig::default()).unwrap();
        assert_eq!(s.name(), name);
        assert_eq!(s.kind(), DataKind::Discrete { levels });
        assert_eq!(s.test_set(&CPU).unwrap().dims(), [1000, 784]);
        assert_eq!(s.val_set(&CPU).unwrap().dims(), [900, 784]);
    }
}
