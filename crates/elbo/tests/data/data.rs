//! Tests of the data module: toy generators against statistics derived from their definitions
//! (`data/toy2d.rs`), the embedded digits, `.npy` and CSV readers (`data/files.rs`), the
//! train / validation / test splits and layouts of every source (`data/splits.rs`), and the
//! registry (here).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::Device;
use elbo::data::npy::write_npy;
use elbo::data::registry::ArraySource;
use elbo::data::toy2d::Toy2d;
use elbo::data::{open, split_train_val, DataConfig, DataKind, KNOWN_DATASETS};
use elbo::{Error, Rng};

#[path = "files.rs"]
mod files;
#[path = "splits.rs"]
mod splits;
#[path = "toy2d.rs"]
mod toy2d;

/// Assert `got` is within `tol` of `want`.
fn close(name: &str, got: f64, want: f64, tol: f64) {
    assert!(
        (got - want).abs() <= tol,
        "{name}: got {got}, want {want} +- {tol}"
    );
}

/// A file under `tests/fixtures`.
fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Assert `r` is an `Error::Data` whose source names `name` and whose message mentions `needle`.
fn data_err(r: elbo::Result<(Vec<f32>, Vec<usize>)>, needle: &str, name: &str) {
    match r {
        Err(Error::Data {
            source_name,
            message,
        }) => {
            assert!(
                source_name.contains(name),
                "{source_name} should name {name}"
            );
            assert!(
                message.to_lowercase().contains(needle),
                "'{message}' should mention '{needle}'"
            );
        }
        other => panic!("expected a data error mentioning {needle}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- registry

#[test]
fn unknown_names_list_the_known_ones() {
    let err = open("mnist-but-misspelled", &DataConfig::default())
        .err()
        .unwrap();
    match err {
        Error::UnknownDataset { name, known } => {
            assert_eq!(name, "mnist-but-misspelled");
            assert_eq!(known, KNOWN_DATASETS.join(", "));
            for n in [
                "8gaussians",
                "checkerboard",
                "digits",
                "PATH.npy",
                "PATH.csv",
            ] {
                assert!(known.contains(n), "{known}");
            }
        }
        other => panic!("expected UnknownDataset, got {other:?}"),
    }
    for t in Toy2d::ALL {
        assert_eq!(
            open(t.name(), &DataConfig::default()).unwrap().name(),
            t.name()
        );
    }
}

#[test]
fn data_config_defaults_and_validation() {
    let c: DataConfig = toml::from_str("").unwrap();
    assert_eq!((c.test_size, c.test_fraction), (5000, 0.1));
    assert_eq!((c.val_size, c.val_fraction), (5000, 0.1));
    assert_eq!(c, DataConfig::default());
    let c: DataConfig = toml::from_str("test_fraction = 0.25").unwrap();
    assert_eq!((c.test_size, c.test_fraction), (5000, 0.25));
    let c: DataConfig = toml::from_str("val_fraction = 0.2\nval_size = 300").unwrap();
    assert_eq!((c.val_size, c.val_fraction, c.test_size), (300, 0.2, 5000));
    // Out-of-range split options are configuration errors that name the field, for every kind
    // of source (the check runs before any data is read).
    for (bad, field) in [
        (
            DataConfig {
                val_fraction: 0.0,
                ..Default::default()
            },
            "data.val_fraction",
        ),
        (
            DataConfig {
                val_fraction: 1.0,
                ..Default::default()
            },
            "data.val_fraction",
        ),
        (
            DataConfig {
                val_fraction: -0.2,
                ..Default::default()
            },
            "data.val_fraction",
        ),
        (
            DataConfig {
                val_fraction: f64::NAN,
                ..Default::default()
            },
            "data.val_fraction",
        ),
        (
            DataConfig {
                val_size: 0,
                ..Default::default()
            },
            "data.val_size",
        ),
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
        for name in ["moons", "digits", "mnist", "shakespeare", "x.npy", "y.txt"] {
            match open(name, &bad) {
                Err(Error::Config(m)) => assert!(m.contains(field), "{name}: '{m}' names {field}"),
                other => panic!(
                    "{name} with {bad:?}: expected a config error, got {:?}",
                    other.err()
                ),
            }
        }
    }
    for bad in [
        DataConfig {
            test_size: 0,
            ..Default::default()
        },
        DataConfig {
            test_fraction: 1.5,
            ..Default::default()
        },
        DataConfig {
            test_fraction: 0.0,
            ..Default::default()
        },
    ] {
        assert!(
            matches!(open("moons", &bad), Err(Error::Config(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn array_files_are_split_once_and_sampled_from_train() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    // Row i is (i, -2i): every row is identifiable.
    let data: Vec<f32> = (0..50).flat_map(|i| [i as f32, -2.0 * i as f32]).collect();
    let npy = dir.path().join("arr.npy");
    write_npy(&npy, &data, &[50, 2]).unwrap();
    let cfg = DataConfig::default();
    let mut s = open(npy.to_str().unwrap(), &cfg).unwrap();
    assert_eq!((s.dim(), s.kind()), (2, DataKind::Continuous));
    let test = s.test_set(&dev).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(test.len(), 5);
    let test_ids: HashSet<i64> = test.iter().map(|r| r[0] as i64).collect();
    assert_eq!(test_ids.len(), 5);
    for r in &test {
        assert_eq!(r[1], -2.0 * r[0]);
    }
    // The test rows are those the two-way split held out before validation existed.
    assert_eq!(
        test.iter().map(|r| r[0] as i64).collect::<Vec<_>>(),
        [34, 3, 27, 9, 1]
    );
    // Validation: round(0.1 * 45) of the other 45 rows, disjoint from the test rows.
    let val = s.val_set(&dev).unwrap().to_vec2::<f32>().unwrap();
    let val_ids: HashSet<i64> = val.iter().map(|r| r[0] as i64).collect();
    assert_eq!((val.len(), val_ids.len()), (5, 5));
    assert!(val_ids.is_disjoint(&test_ids));
    for r in &val {
        assert_eq!(r[1], -2.0 * r[0]);
    }
    // The split is fixed: the same file opened again holds out the same rows.
    let again = open(npy.to_str().unwrap(), &cfg).unwrap();
    assert_eq!(
        again.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(),
        test
    );
    // Training batches use the other 40 rows, with replacement.
    let b = s
        .train_batch(1000, &mut Rng::new(3), &dev)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let seen: HashSet<i64> = b.iter().map(|r| r[0] as i64).collect();
    assert!(seen.is_disjoint(&test_ids));
    assert!(seen.is_disjoint(&val_ids));
    assert_eq!(
        seen.len(),
        40,
        "1000 draws from 40 rows should see them all"
    );
    // Drawing batches with another seed leaves the validation set as it was.
    s.train_batch(100, &mut Rng::new(99), &dev).unwrap();
    assert_eq!(s.val_set(&dev).unwrap().to_vec2::<f32>().unwrap(), val);
    assert_eq!(again.val_set(&dev).unwrap().to_vec2::<f32>().unwrap(), val);

    // The same array as CSV (with a header), and through the "csv:" / "npy:" prefixes.
    let mut text = String::from("x,y\n");
    for c in data.chunks(2) {
        text.push_str(&format!("{},{}\n", c[0], c[1]));
    }
    let csv = dir.path().join("arr.csv");
    std::fs::write(&csv, &text).unwrap();
    let c = open(csv.to_str().unwrap(), &cfg).unwrap();
    assert_eq!(c.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(), test);
    assert_eq!(c.val_set(&dev).unwrap().to_vec2::<f32>().unwrap(), val);
    let other = dir.path().join("arr.data");
    std::fs::write(&other, &text).unwrap();
    let c2 = open(&format!("csv:{}", other.display()), &cfg).unwrap();
    assert_eq!(c2.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(), test);
    let bin = dir.path().join("arr.bin");
    std::fs::copy(&npy, &bin).unwrap();
    assert!(open(&format!("npy:{}", bin.display()), &cfg).is_ok());

    // test_fraction and val_fraction round, with at least one row in each split.
    let tiny = ArraySource::new("tiny", vec![1.0, 2.0, 3.0], &[3, 1], 0.01).unwrap();
    assert_eq!((tiny.n_train(), tiny.n_val(), tiny.n_test()), (1, 1, 1));
    let half = ArraySource::new("half", data.clone(), &[50, 2], 0.5).unwrap();
    assert_eq!((half.n_train(), half.n_val(), half.n_test()), (22, 3, 25));
    let most = ArraySource::with_val_fraction("most", data.clone(), &[50, 2], 0.1, 0.99).unwrap();
    assert_eq!((most.n_train(), most.n_val(), most.n_test()), (1, 44, 5));
    // Two rows cannot make three splits: a config error naming the field.
    match ArraySource::new("two", vec![1.0, 2.0], &[2, 1], 0.5) {
        Err(Error::Config(m)) => assert!(m.contains("data.val_fraction") && m.contains("two")),
        other => panic!("expected a config error, got {other:?}"),
    }
    for f in [0.0, 1.0, 1.5, f64::NAN] {
        match ArraySource::with_val_fraction("f", data.clone(), &[50, 2], 0.1, f) {
            Err(Error::Config(m)) => assert!(m.contains("data.val_fraction"), "{m}"),
            other => panic!("val_fraction {f}: expected a config error, got {other:?}"),
        }
    }
    // The three index lists partition the rows; the test rows do not depend on val_fraction.
    for f in [0.05, 0.1, 0.3, 0.9] {
        let a = ArraySource::with_val_fraction("a", data.clone(), &[50, 2], 0.1, f).unwrap();
        assert_eq!(a.test_rows(), half_test_prefix(&data));
        assert_eq!(a.n_val(), ((f * 45.0).round() as usize).clamp(1, 44));
        let mut all: Vec<usize> = [a.train_rows(), a.val_rows(), a.test_rows()].concat();
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<_>>());
    }
}

/// The test rows of the 50-row array with the default test_fraction.
fn half_test_prefix(data: &[f32]) -> Vec<usize> {
    let a = ArraySource::new("p", data.to_vec(), &[50, 2], 0.1).unwrap();
    a.test_rows().to_vec()
}

#[test]
fn the_validation_permutation_is_fixed_sized_and_nested() {
    let (train, val) = split_train_val(1000, 0.1, "x").unwrap();
    assert_eq!((train.len(), val.len()), (900, 100));
    assert!(train.windows(2).all(|w| w[0] < w[1]) && val.windows(2).all(|w| w[0] < w[1]));
    let t: HashSet<usize> = train.iter().copied().collect();
    assert!(val.iter().all(|v| !t.contains(v) && *v < 1000));
    // the same every call (no run seed enters), spread over the whole range, not a block
    assert_eq!(split_train_val(1000, 0.1, "x").unwrap().1, val);
    assert!(val[0] < 100 && val[99] > 900, "{val:?}");
    // a larger fraction holds out a superset
    let (_, val3) = split_train_val(1000, 0.3, "x").unwrap();
    assert_eq!(val3.len(), 300);
    let v3: HashSet<usize> = val3.iter().copied().collect();
    assert!(val.iter().all(|v| v3.contains(v)));
    // at least one row each way
    assert_eq!(split_train_val(5, 0.01, "x").unwrap().1.len(), 1);
    assert_eq!(split_train_val(5, 0.99, "x").unwrap().0.len(), 1);
    for (n, f) in [(1, 0.5), (0, 0.5), (10, 0.0), (10, 1.0)] {
        match split_train_val(n, f, "src") {
            Err(Error::Config(m)) => assert!(m.contains("data.val_fraction"), "{m}"),
            other => panic!("({n}, {f}): expected a config error, got {other:?}"),
        }
    }
}

#[test]
fn array_sources_reject_bad_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = DataConfig::default();
    let one_d = dir.path().join("v.npy");
    write_npy(&one_d, &[1.0, 2.0, 3.0], &[3]).unwrap();
    let e = open(one_d.to_str().unwrap(), &cfg)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("2-D") && e.contains("v.npy"), "{e}");
    let one_row = dir.path().join("r.npy");
    write_npy(&one_row, &[1.0, 2.0], &[1, 2]).unwrap();
    assert!(matches!(
        open(one_row.to_str().unwrap(), &cfg),
        Err(Error::Data { .. })
    ));
    let nan = dir.path().join("nan.csv");
    std::fs::write(&nan, "1,2\n3,NaN\n5,6\n").unwrap();
    let e = open(nan.to_str().unwrap(), &cfg).err().unwrap().to_string();
    assert!(e.contains("finite") && e.contains("row 1"), "{e}");
    assert!(ArraySource::new("inf", vec![1.0, f32::INFINITY], &[2, 1], 0.1).is_err());
    let missing = dir.path().join("missing.npy");
    match open(missing.to_str().unwrap(), &cfg) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected an i/o error, got {:?}", other.err()),
    }
}
