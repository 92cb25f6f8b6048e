//! The three splits of every source: the test sets are those of the two-way split the sources
//! had before the validation split (checksums recorded from that code), validation sets are
//! fixed and sized by `val_size` / `val_fraction`, and each source reports its layout.

use std::collections::HashSet;

use candle_core::{Device, Tensor};
use elbo::data::digits::{self, DigitsSource};
use elbo::data::mnist::{self, MnistSource};
use elbo::data::npy::write_npy;
use elbo::data::toy2d::{Toy2d, Toy2dSource};
use elbo::data::{open, DataConfig, DataKind, DataSource, Layout};
use elbo::{Error, Rng};

/// FNV-1a over the little-endian bits of every value.
fn fnv(t: &Tensor) -> u64 {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// The 1000x3 array and the 3000-line text file the recorded checksums were computed on.
fn user_files(dir: &std::path::Path) -> (String, String) {
    let arr: Vec<f32> = (0..1000)
        .flat_map(|i| [i as f32, (i as f32 * 0.37).sin(), -(i as f32)])
        .collect();
    let npy = dir.join("arr.npy");
    write_npy(&npy, &arr, &[1000, 3]).unwrap();
    let txt = dir.join("t.txt");
    let text: String = (0..3000).map(|i| format!("{i:06}\n")).collect();
    std::fs::write(&txt, text).unwrap();
    (npy.display().to_string(), txt.display().to_string())
}

#[test]
fn test_sets_are_bit_identical_to_the_two_way_split() {
    // (name, test-set dims, FNV-1a of the test set) computed with the code before validation
    // splits existed, default DataConfig.
    let recorded: &[(&str, [usize; 2], u64)] = &[
        ("swissroll", [5000, 2], 0x9f5c_1e13_7ecb_0a19),
        ("circles", [5000, 2], 0xae2c_d383_8715_df2b),
        ("rings", [5000, 2], 0xbeb9_5f25_830f_d884),
        ("moons", [5000, 2], 0xc9a8_d0fe_cddf_686b),
        ("8gaussians", [5000, 2], 0xa90f_9dc0_085a_b398),
        ("pinwheel", [5000, 2], 0x3000_6c3e_1202_b480),
        ("2spirals", [5000, 2], 0x8cc0_1ce4_7f0f_5495),
        ("checkerboard", [5000, 2], 0x0051_cc18_4561_5248),
        ("digits", [297, 64], 0xe3b3_7dd4_e404_c5e2),
        ("mnist", [1000, 784], 0x8265_76bf_7f4a_de0e),
        ("mnist-binary", [1000, 784], 0x2ef2_1807_4303_0e25),
        ("shakespeare", [3555, 128], 0x7c9c_a9c5_2540_d60f),
        ("arr.npy", [100, 3], 0x10a5_a60a_2ea6_4c16),
        ("t.txt", [16, 128], 0x5e08_3222_b1b1_1c01),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (npy, txt) = user_files(dir.path());
    let dev = Device::Cpu;
    for cfg in [
        DataConfig::default(),
        DataConfig {
            val_fraction: 0.3,
            val_size: 17,
            ..DataConfig::default()
        },
    ] {
        for &(name, dims, hash) in recorded {
            let path = match name {
                "arr.npy" => npy.clone(),
                "t.txt" => txt.clone(),
                n => n.to_string(),
            };
            let t = open(&path, &cfg).unwrap().test_set(&dev).unwrap();
            assert_eq!(t.dims(), dims, "{name}");
            assert_eq!(fnv(&t), hash, "{name}: test set changed ({cfg:?})");
        }
    }
    let small = DataConfig {
        seq_len: 64,
        test_windows: 100,
        ..DataConfig::default()
    };
    let t = open("shakespeare", &small).unwrap().test_set(&dev).unwrap();
    assert_eq!((t.dims(), fnv(&t)), (&[100, 64][..], 0xbca7_bcfb_5823_885d));
}

#[test]
fn every_source_reports_its_layout_and_levels() {
    let dir = tempfile::tempdir().unwrap();
    let (npy, txt) = user_files(dir.path());
    let cfg = DataConfig {
        seq_len: 32,
        ..DataConfig::default()
    };
    let image = |c, h, w| Layout::Image {
        channels: c,
        height: h,
        width: w,
    };
    let cases: Vec<(String, Layout, Option<usize>, usize)> = vec![
        ("8gaussians".into(), Layout::Flat, None, 2),
        ("checkerboard".into(), Layout::Flat, None, 2),
        (npy, Layout::Flat, None, 3),
        ("digits".into(), image(1, 8, 8), Some(17), 64),
        ("mnist".into(), image(1, 28, 28), Some(256), 784),
        ("mnist-binary".into(), image(1, 28, 28), Some(2), 784),
        (
            "shakespeare".into(),
            Layout::Sequence { len: 32 },
            Some(78),
            32,
        ),
        (txt, Layout::Sequence { len: 32 }, Some(256), 32),
    ];
    for (name, layout, levels, dim) in cases {
        let s = open(&name, &cfg).unwrap();
        assert_eq!(s.layout(), layout, "{name}");
        assert_eq!(s.levels(), levels, "{name}");
        assert_eq!(s.dim(), dim, "{name}");
        assert_eq!(
            s.levels().is_none(),
            s.kind() == DataKind::Continuous,
            "{name}"
        );
        if let Some(n) = layout.dim() {
            assert_eq!(n, s.dim(), "{name}: layout size");
        }
        let shape = match layout {
            Layout::Image { height, width, .. } => Some((height, width)),
            _ => None,
        };
        assert_eq!(s.image_shape(), shape, "{name}");
        // the validation set has the same row shape as the test set
        let dev = Device::Cpu;
        assert_eq!(s.val_set(&dev).unwrap().dim(1).unwrap(), dim, "{name}");
    }
    for t in Toy2d::ALL {
        assert_eq!(open(t.name(), &cfg).unwrap().layout(), Layout::Flat);
    }
    // the layout serialises with a type tag, like DataKind
    let j = serde_json::to_string(&image(1, 8, 8)).unwrap();
    assert_eq!(j, r#"{"type":"image","channels":1,"height":8,"width":8}"#);
    for l in [Layout::Flat, image(3, 4, 5), Layout::Sequence { len: 7 }] {
        let back: Layout = serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(back, l);
    }
}

#[test]
fn toy_validation_sets_are_fixed_their_own_stream_and_sized_by_val_size() {
    let dev = Device::Cpu;
    for t in Toy2d::ALL {
        let mut a = Toy2dSource::new(t, 5000).unwrap();
        let b = Toy2dSource::with_sizes(t, 300, 5000).unwrap();
        assert_eq!((a.n_val(), a.n_test(), b.n_test()), (5000, 5000, 300));
        let val = a.val_set(&dev).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(val.len(), 5000);
        // training draws with any seed leave it unchanged; another source has the same one
        a.train_batch(256, &mut Rng::new(7), &dev).unwrap();
        assert_eq!(a.val_set(&dev).unwrap().to_vec2::<f32>().unwrap(), val);
        assert_eq!(b.val_set(&dev).unwrap().to_vec2::<f32>().unwrap(), val);
        // not the test stream: no validation point is a test point, nor a training draw
        let key = |r: &Vec<f32>| (r[0].to_bits(), r[1].to_bits());
        let test: HashSet<(u32, u32)> = a
            .test_set(&dev)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
            .iter()
            .map(key)
            .collect();
        let v: HashSet<(u32, u32)> = val.iter().map(key).collect();
        assert!(v.len() > 4900, "{}: {} distinct", t.name(), v.len());
        assert!(v.is_disjoint(&test), "{}", t.name());
        for seed in [0, 1, 42] {
            let batch = a.train_batch(5000, &mut Rng::new(seed), &dev).unwrap();
            let tr: HashSet<(u32, u32)> = batch.to_vec2::<f32>().unwrap().iter().map(key).collect();
            assert!(tr.is_disjoint(&v), "{} seed {seed}", t.name());
        }
        // the same distribution: means of validation and test agree to Monte Carlo error
        let mean = |rows: &[Vec<f32>], c: usize| {
            rows.iter().map(|r| f64::from(r[c])).sum::<f64>() / rows.len() as f64
        };
        let trows = a.test_set(&dev).unwrap().to_vec2::<f32>().unwrap();
        for c in 0..2 {
            assert!(
                (mean(&val, c) - mean(&trows, c)).abs() < 0.15,
                "{} column {c}",
                t.name()
            );
        }
    }
    // val_size comes from DataConfig; an i.i.d. generator gives a prefix for a smaller size
    let cfg = DataConfig {
        val_size: 123,
        ..DataConfig::default()
    };
    let small = open("8gaussians", &cfg).unwrap().val_set(&dev).unwrap();
    let full = open("8gaussians", &DataConfig::default())
        .unwrap()
        .val_set(&dev)
        .unwrap();
    assert_eq!(small.dims(), [123, 2]);
    assert_eq!(
        small.to_vec2::<f32>().unwrap()[..],
        full.to_vec2::<f32>().unwrap()[..123]
    );
    match Toy2dSource::with_sizes(Toy2d::Moons, 10, 0) {
        Err(Error::Config(m)) => assert!(m.contains("data.val_size"), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn digits_splits_are_disjoint_fixed_and_sized_by_val_fraction() {
    let dev = Device::Cpu;
    let d = digits::load().unwrap();
    let mut s = DigitsSource::new().unwrap();
    assert_eq!((s.n_train(), s.n_val(), s.n_test()), (1350, 150, 297));
    assert_eq!(s.test_rows(), 1500..1797);
    // row indices: train and val partition 0..1500, the test rows are the rest
    let mut all: Vec<usize> = [s.train_rows(), s.val_rows()].concat();
    all.sort_unstable();
    assert_eq!(all, (0..1500).collect::<Vec<_>>());
    // the validation set holds exactly the images at val_rows
    let val = s.val_set(&dev).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(val.len(), 150);
    for (row, &i) in val.iter().zip(s.val_rows()) {
        let want: Vec<f32> = d.image(i).iter().map(|&p| f32::from(p)).collect();
        assert_eq!(row, &want);
    }
    // training batches draw only training images (the 1797 images are all distinct)
    let img = |r: &Vec<f32>| -> Vec<u8> { r.iter().map(|&v| v as u8).collect() };
    let train: HashSet<Vec<u8>> = s
        .train_rows()
        .iter()
        .map(|&i| d.image(i).to_vec())
        .collect();
    let b = s.train_batch(4000, &mut Rng::new(11), &dev).unwrap();
    let seen: HashSet<Vec<u8>> = b.to_vec2::<f32>().unwrap().iter().map(img).collect();
    assert!(seen.is_subset(&train));
    assert!(seen.len() > 1250, "4000 draws cover most of the 1350 rows");
    // fixed: another source, after other draws, has the same validation set
    let other = open("digits", &DataConfig::default()).unwrap();
    assert_eq!(other.val_set(&dev).unwrap().to_vec2::<f32>().unwrap(), val);
    // val_fraction sizes it; a larger fraction holds out a superset, the test rows stay put
    let cfg = DataConfig {
        val_fraction: 0.25,
        ..DataConfig::default()
    };
    let big = open("digits", &cfg).unwrap();
    let bv: HashSet<Vec<u8>> = big
        .val_set(&dev)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(img)
        .collect();
    assert_eq!(bv.len(), 375);
    assert!(val.iter().all(|r| bv.contains(&img(r))));
    assert_eq!(
        big.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(),
        s.test_set(&dev).unwrap().to_vec2::<f32>().unwrap()
    );
    for f in [0.0, 1.0, 2.0] {
        match DigitsSource::with_val_fraction(f) {
            Err(Error::Config(m)) => assert!(m.contains("data.val_fraction"), "{m}"),
            other => panic!("val_fraction {f}: expected a config error, got {other:?}"),
        }
    }
}

#[test]
fn mnist_splits_are_disjoint_fixed_and_sized_by_val_fraction() {
    let dev = Device::Cpu;
    let d = mnist::load().unwrap();
    let grey = MnistSource::new().unwrap();
    let bin = MnistSource::binary().unwrap();
    for s in [&grey, &bin] {
        assert_eq!((s.n_train(), s.n_val(), s.n_test()), (8100, 900, 1000));
        let expected_test: Vec<usize> = (0..10_000).filter(|&i| mnist::is_test(i)).collect();
        assert_eq!(s.test_rows(), expected_test);
        let mut all: Vec<usize> = [s.train_rows(), s.val_rows(), s.test_rows()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
        assert!(s.val_rows().iter().all(|&i| !mnist::is_test(i)));
    }
    // the same rows for both encodings
    assert_eq!(grey.val_rows(), bin.val_rows());
    // the validation set holds exactly the images at val_rows, binarized for mnist-binary
    let gv = grey.val_set(&dev).unwrap().to_vec2::<f32>().unwrap();
    let bv = bin.val_set(&dev).unwrap().to_vec2::<f32>().unwrap();
    for ((g, b), &i) in gv.iter().zip(&bv).zip(grey.val_rows()) {
        let want: Vec<f32> = d.image(i).iter().map(|&k| f32::from(k)).collect();
        assert_eq!(g, &want);
        let want_b: Vec<f32> = d
            .image(i)
            .iter()
            .map(|&k| if k >= 128 { 1.0 } else { 0.0 })
            .collect();
        assert_eq!(b, &want_b);
    }
    // every class is represented in validation
    for c in 0..10u8 {
        let k = grey
            .val_rows()
            .iter()
            .filter(|&&i| d.labels[i] == c)
            .count();
        assert!((50..=130).contains(&k), "class {c}: {k} validation images");
    }
    // training batches draw only training images (the 10000 grey images are all distinct)
    let train: HashSet<Vec<u8>> = grey
        .train_rows()
        .iter()
        .map(|&i| d.image(i).to_vec())
        .collect();
    let mut s = grey.clone();
    let b = s.train_batch(2000, &mut Rng::new(3), &dev).unwrap();
    for r in b.to_vec2::<f32>().unwrap() {
        let bytes: Vec<u8> = r.iter().map(|&v| v as u8).collect();
        assert!(
            train.contains(&bytes),
            "a batch row is not a training image"
        );
    }
    // fixed across constructions; val_fraction sizes it
    let again = open("mnist", &DataConfig::default()).unwrap();
    assert_eq!(
        fnv(&again.val_set(&dev).unwrap()),
        fnv(&grey.val_set(&dev).unwrap())
    );
    let cfg = DataConfig {
        val_fraction: 0.05,
        ..DataConfig::default()
    };
    let small = MnistSource::with_val_fraction(false, 0.05).unwrap();
    assert_eq!((small.n_train(), small.n_val()), (8550, 450));
    assert!(small.val_rows().iter().all(|i| grey.val_rows().contains(i)));
    assert_eq!(
        open("mnist-binary", &cfg)
            .unwrap()
            .val_set(&dev)
            .unwrap()
            .dims(),
        [450, 784]
    );
    match MnistSource::with_val_fraction(true, 1.0) {
        Err(Error::Config(m)) => assert!(m.contains("data.val_fraction"), "{m}"),
        other => panic!("expected a config error, got {other:?}"),
    }
}
