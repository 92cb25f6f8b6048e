//! Tests of the data module: toy generators against statistics derived from their definitions
//! (`data/toy2d.rs`), the embedded digits, `.npy` and CSV readers (`data/files.rs`), and the
//! registry (here).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::Device;
use elbo::data::npy::write_npy;
use elbo::data::registry::ArraySource;
use elbo::data::toy2d::Toy2d;
use elbo::data::{open, DataConfig, DataKind, KNOWN_DATASETS};
use elbo::{Error, Rng};

#[path = "data/files.rs"]
mod files;
#[path = "data/toy2d.rs"]
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
    let c: DataConfig = toml::from_str("test_fraction = 0.25").unwrap();
    assert_eq!((c.test_size, c.test_fraction), (5000, 0.25));
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
    // The split is fixed: the same file opened again holds out the same rows.
    let again = open(npy.to_str().unwrap(), &cfg).unwrap();
    assert_eq!(
        again.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(),
        test
    );
    // Training batches use the other 45 rows, with replacement.
    let b = s
        .train_batch(1000, &mut Rng::new(3), &dev)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let seen: HashSet<i64> = b.iter().map(|r| r[0] as i64).collect();
    assert!(seen.is_disjoint(&test_ids));
    assert_eq!(
        seen.len(),
        45,
        "1000 draws from 45 rows should see them all"
    );

    // The same array as CSV (with a header), and through the "csv:" / "npy:" prefixes.
    let mut text = String::from("x,y\n");
    for c in data.chunks(2) {
        text.push_str(&format!("{},{}\n", c[0], c[1]));
    }
    let csv = dir.path().join("arr.csv");
    std::fs::write(&csv, &text).unwrap();
    let c = open(csv.to_str().unwrap(), &cfg).unwrap();
    assert_eq!(c.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(), test);
    let other = dir.path().join("arr.data");
    std::fs::write(&other, &text).unwrap();
    let c2 = open(&format!("csv:{}", other.display()), &cfg).unwrap();
    assert_eq!(c2.test_set(&dev).unwrap().to_vec2::<f32>().unwrap(), test);
    let bin = dir.path().join("arr.bin");
    std::fs::copy(&npy, &bin).unwrap();
    assert!(open(&format!("npy:{}", bin.display()), &cfg).is_ok());

    // test_fraction rounds, with at least one held-out row.
    let tiny = ArraySource::new("tiny", vec![1.0, 2.0, 3.0], &[3, 1], 0.01).unwrap();
    assert_eq!((tiny.n_train(), tiny.n_test()), (2, 1));
    let half = ArraySource::new("half", data.clone(), &[50, 2], 0.5).unwrap();
    assert_eq!((half.n_train(), half.n_test()), (25, 25));
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
