//! The embedded digits, the `.npy` reader and writer, and the CSV reader.

use std::collections::HashSet;

use candle_core::Device;
use elbo::data::csv::{parse_csv, read_csv};
use elbo::data::digits::{self, DigitsSource};
use elbo::data::npy::{read_npy, read_npy_bytes, write_npy};
use elbo::data::{open, DataConfig, DataKind, DataSource};
use elbo::{Error, Rng};

use super::{data_err, fixture};

// ---------------------------------------------------------------- digits

#[test]
fn digits_rows_labels_and_values() {
    let d = digits::load().unwrap();
    assert_eq!(d.len(), 1797);
    assert_eq!(d.images.len(), 1797 * 64);
    let mut counts = [0usize; 10];
    for &l in &d.labels {
        counts[l as usize] += 1;
    }
    assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
    assert!(d.images.iter().all(|&p| p <= 16));
    assert_eq!(d.images.iter().max(), Some(&16));
    assert_eq!(d.images.iter().min(), Some(&0));
    // The first image of sklearn's load_digits() is a 0 that starts 0, 0, 5, 13, 9, 1, 0, 0.
    assert_eq!(d.labels[0], 0);
    assert_eq!(&d.image(0)[..8], &[0, 0, 5, 13, 9, 1, 0, 0]);
    assert_eq!(&d.labels[..10], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
}

#[test]
fn digits_source_split_and_batches() {
    let dev = Device::Cpu;
    let d = digits::load().unwrap();
    let mut s = DigitsSource::new().unwrap();
    assert_eq!((s.n_train(), s.n_val(), s.n_test()), (1350, 150, 297));
    assert_eq!(s.name(), "digits");
    assert_eq!(s.dim(), 64);
    assert_eq!(s.kind(), DataKind::Discrete { levels: 17 });
    assert_eq!(s.image_shape(), Some((8, 8)));
    let t = s.test_set(&dev).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(t.len(), 297);
    for (k, row) in t.iter().enumerate() {
        let want: Vec<f32> = d.image(1500 + k).iter().map(|&p| p as f32).collect();
        assert_eq!(row, &want);
    }
    let train: HashSet<Vec<u8>> = s
        .train_rows()
        .iter()
        .map(|&i| d.image(i).to_vec())
        .collect();
    let b = s.train_batch(256, &mut Rng::new(4), &dev).unwrap();
    assert_eq!(b.dims(), &[256, 64]);
    let rows = b.to_vec2::<f32>().unwrap();
    let distinct: HashSet<Vec<u8>> = rows
        .iter()
        .map(|r| r.iter().map(|&v| v as u8).collect())
        .collect();
    assert!(distinct.len() > 200, "batch draws many different images");
    for r in &distinct {
        assert!(train.contains(r), "batch row is not a training image");
    }
    let opened = open("digits", &DataConfig::default()).unwrap();
    assert_eq!(opened.test_set(&dev).unwrap().dims(), &[297, 64]);
    assert_eq!(opened.val_set(&dev).unwrap().dims(), &[150, 64]);
}

// ---------------------------------------------------------------- npy

#[test]
fn npy_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let shapes: [&[usize]; 5] = [&[], &[5], &[3, 4], &[2, 3, 4], &[0, 3]];
    for (k, shape) in shapes.iter().enumerate() {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.37 - 2.0).collect();
        let path = dir.path().join(format!("a{k}.npy"));
        write_npy(&path, &data, shape).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_end = bytes.len() - 4 * n;
        assert_eq!(header_end % 64, 0, "data starts on a 64-byte boundary");
        let (back, s) = read_npy(&path).unwrap();
        assert_eq!(&s, shape);
        assert_eq!(back, data);
    }
    let bad = write_npy(&dir.path().join("x.npy"), &[1.0, 2.0], &[3]);
    assert!(matches!(bad, Err(Error::Shape(_))));
}

#[test]
fn npy_writer_matches_numpy_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.npy");
    write_npy(&p, &[1.0, 2.5, -3.0, 4.0, 5.0, 1e-3], &[2, 3]).unwrap();
    assert_eq!(
        std::fs::read(&p).unwrap(),
        std::fs::read(fixture("f4_2x3_numpy.npy")).unwrap()
    );
    write_npy(&p, &[7.5], &[]).unwrap();
    assert_eq!(
        std::fs::read(&p).unwrap(),
        std::fs::read(fixture("f4_scalar_numpy.npy")).unwrap()
    );
}

#[test]
fn npy_reads_numpy_files_of_each_dtype() {
    let (v, s) = read_npy(&fixture("f8_2x3.npy")).unwrap();
    assert_eq!(s, vec![2, 3]);
    assert_eq!(v, vec![-1.25, -0.75, -0.25, 0.25, 0.75, 1.25]);
    let (v, s) = read_npy(&fixture("i8_3x2.npy")).unwrap();
    assert_eq!(s, vec![3, 2]);
    assert_eq!(v, vec![-3.0, 0.0, 7.0, (1u64 << 40) as f32, 1.0, -1.0]);
    let (v, s) = read_npy(&fixture("u1_4.npy")).unwrap();
    assert_eq!((v, s), (vec![0.0, 1.0, 200.0, 255.0], vec![4]));
    let (v, s) = read_npy(&fixture("b1_2x2.npy")).unwrap();
    assert_eq!((v, s), (vec![1.0, 0.0, 0.0, 1.0], vec![2, 2]));
    let (v, _) = read_npy(&fixture("i2_2.npy")).unwrap();
    assert_eq!(v, vec![-32768.0, 32767.0]);
    let (v, s) = read_npy(&fixture("i4_v2_2x2.npy")).unwrap();
    assert_eq!((v, s), (vec![1.0, -2.0, 3.0, -4.0], vec![2, 2]));
    let (v, s) = read_npy(&fixture("f4_v3_3.npy")).unwrap();
    assert_eq!((v, s), (vec![0.5, -1.5, 3.25], vec![3]));
}
#[test]
fn npy_errors_name_the_file_and_the_problem() {
    let f = |n: &str| read_npy(&fixture(n));
    // Fortran order is reordered to C order (the file stores 0, 3, 1, 4, 2, 5), big-endian
    // elements are byte-swapped.
    assert_eq!(
        f("fortran_f8_2x3.npy").unwrap(),
        (vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0], vec![2, 3])
    );
    assert_eq!(f("bigendian_f8_2.npy").unwrap(), (vec![1.0, 2.0], vec![2]));
    data_err(f("c8_2.npy"), "unsupported dtype", "c8_2.npy");

    let good = std::fs::read(fixture("f8_2x3.npy")).unwrap();
    data_err(
        read_npy_bytes(&good[..good.len() - 3], "cut"),
        "truncated",
        "cut",
    );
    data_err(read_npy_bytes(&good[..40], "short"), "truncated", "short");
    data_err(read_npy_bytes(b"PK\x03\x04 not npy", "zip"), "magic", "zip");
    let mut extra = good.clone();
    extra.extend_from_slice(&[0; 8]);
    data_err(read_npy_bytes(&extra, "extra"), "unexpected bytes", "extra");
    let mut v9 = good.clone();
    v9[6] = 9;
    data_err(read_npy_bytes(&v9, "v9"), "version", "v9");
    let mut garbled = good.clone();
    let pos = garbled.iter().position(|&b| b == b'(').unwrap();
    garbled[pos] = b'[';
    data_err(read_npy_bytes(&garbled, "garbled"), "header", "garbled");

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.npy");
    match read_npy(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected an i/o error, got {other:?}"),
    }
}

// ---------------------------------------------------------------- csv

#[test]
fn csv_with_and_without_header() {
    let (v, s) = parse_csv("x,y,z\n1,2,3\n\n4, 5.5 ,-6e-1\n", "h.csv").unwrap();
    assert_eq!(s, vec![2, 3]);
    assert_eq!(v, vec![1.0, 2.0, 3.0, 4.0, 5.5, -0.6]);
    let (v, s) = parse_csv("1,2\r\n3,4\r\n5,6\r\n", "n.csv").unwrap();
    assert_eq!((v, s), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![3, 2]));
    let (v, s) = parse_csv("  a  b\n 1.5   2\n\t3 4\n", "w.txt").unwrap();
    assert_eq!((v, s), (vec![1.5, 2.0, 3.0, 4.0], vec![2, 2]));
    let (v, s) = parse_csv("7\n8\n", "col.csv").unwrap();
    assert_eq!((v, s), (vec![7.0, 8.0], vec![2, 1]));

    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.csv");
    std::fs::write(&p, "a,b\n0.25,1\n2,3\n").unwrap();
    assert_eq!(
        read_csv(&p).unwrap(),
        (vec![0.25, 1.0, 2.0, 3.0], vec![2, 2])
    );
}

#[test]
fn csv_errors_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ragged.csv");
    std::fs::write(&p, "a,b\n1,2\n\n3,4,5\n").unwrap();
    let name = p.display().to_string();
    let err = read_csv(&p).unwrap_err().to_string();
    assert!(err.contains(&name) && err.contains("line 4"), "{err}");
    data_err(read_csv(&p), "expected 2 fields", "ragged.csv");

    let bad = parse_csv("1,2\n3,oops\n", "bad.csv")
        .unwrap_err()
        .to_string();
    assert!(
        bad.contains("bad.csv") && bad.contains("line 2") && bad.contains("'oops'"),
        "{bad}"
    );
    let empty_field = parse_csv("1,2\n3,\n", "e.csv").unwrap_err().to_string();
    assert!(empty_field.contains("line 2"), "{empty_field}");
    data_err(parse_csv("\n\n", "blank.csv"), "no rows", "blank.csv");
    data_err(parse_csv("a,b\n", "hdr.csv"), "no data rows", "hdr.csv");
    assert!(matches!(
        read_csv(&dir.path().join("missing.csv")),
        Err(Error::Io { .. })
    ));
}
