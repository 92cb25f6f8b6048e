//! The loaders read input as given and say where a problem is: byte-level text keeps every byte,
//! CSV header detection never drops a numeric row (and `data.csv_header` forces it), all three
//! line endings split lines, `.npy` refuses structured dtypes and impossible shapes before
//! allocating, and every loader error names the file and the line or byte offset.

use std::collections::HashSet;

use candle_core::Device;
use elbo::config::Config;
use elbo::data::csv::{parse_csv, parse_csv_bytes, parse_csv_with, CsvHeader};
use elbo::data::npy::read_npy_bytes;
use elbo::data::text::TextSource;
use elbo::data::{open, DataConfig, DataSource};
use elbo::train::checkpoint;
use elbo::{Error, Rng};

/// The message of a data error about `name`; panics on anything else.
fn data_msg<T: std::fmt::Debug>(r: elbo::Result<T>, name: &str) -> String {
    match r {
        Err(Error::Data {
            source_name,
            message,
        }) => {
            assert_eq!(source_name, name);
            message
        }
        other => panic!("expected a data error about {name}, got {other:?}"),
    }
}

// ---------------------------------------------------------------- text

#[test]
fn text_tokens_are_the_files_bytes_unchanged() {
    // invalid UTF-8 (0xff, a lone continuation byte 0x80, a cut 3-byte sequence), CRLF and CR
    let mut bytes = b"ab\r\ncd\rX\xffY\x80\xe2\x82".to_vec();
    bytes.extend_from_slice(b"\r\n\r\rz\x00\xfe\n caf\xc3\xa9 \r\n\xf0\x9f 1234\r\n\r");
    assert_eq!(bytes.len(), 40);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("raw.txt");
    std::fs::write(&path, &bytes).unwrap();
    // 40 bytes: test = last 20, validation = 10 before, train = first 10
    let cfg = DataConfig {
        seq_len: 1,
        test_fraction: 0.5,
        val_fraction: 0.5,
        ..DataConfig::default()
    };
    let mut src = open(path.to_str().unwrap(), &cfg).unwrap();
    let dev = Device::Cpu;
    let ids = |t: candle_core::Tensor| -> Vec<u8> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(|v| v as u8)
            .collect()
    };
    assert_eq!(ids(src.val_set(&dev).unwrap()), bytes[10..20]);
    assert_eq!(ids(src.test_set(&dev).unwrap()), bytes[20..]);
    let mut rng = Rng::new(3);
    let mut seen = HashSet::new();
    for _ in 0..100 {
        seen.extend(ids(src.train_batch(8, &mut rng, &dev).unwrap()));
    }
    let want: HashSet<u8> = bytes[..10].iter().copied().collect();
    assert_eq!(seen, want);

    // the in-memory constructor agrees
    let mem = TextSource::from_bytes("raw.txt", &bytes, 1, 0, 0.5, 0.5).unwrap();
    assert_eq!(ids(mem.test_set(&dev).unwrap()), bytes[20..]);
    assert_eq!(mem.n_train_tokens(), 10);
}

// ---------------------------------------------------------------- csv

#[test]
fn csv_first_row_in_any_number_notation_is_data() {
    for first in ["1e5,2", "+.5,2", "inf,2", "nan,2", "-2.,2", "1E-3,2"] {
        let text = format!("{first}\n3,4\n");
        let (v, s) = parse_csv(&text, "n.csv").unwrap();
        assert_eq!(s, vec![2, 2], "{first}");
        assert_eq!(v[1], 2.0, "{first}");
    }
    let (v, s) = parse_csv("1e5,2\n3,4\n", "n.csv").unwrap();
    assert_eq!((v, s), (vec![1e5, 2.0, 3.0, 4.0], vec![2, 2]));
    // number-like text Rust does not parse is an error on line 1, not a dropped header
    for (first, field) in [("0x10,2", "0x10"), ("1,2.5f", "2.5f"), ("1_000,2", "1_000")] {
        let m = data_msg(parse_csv(&format!("{first}\n3,4\n"), "n.csv"), "n.csv");
        assert!(
            m.contains("line 1") && m.contains(&format!("'{field}'")),
            "{m}"
        );
    }
}

#[test]
fn csv_header_detection_and_the_csv_header_option() {
    let (v, s) = parse_csv("x,y\n1,2\n", "h.csv").unwrap();
    assert_eq!((v, s), (vec![1.0, 2.0], vec![1, 2]));
    let m = data_msg(parse_csv("a,1\n2,3\n", "m.csv"), "m.csv");
    assert!(m.contains("line 1, field 1") && m.contains("'a'"), "{m}");

    let yes = parse_csv_with("1,2\n3,4\n", "y.csv", CsvHeader::Yes).unwrap();
    assert_eq!(yes, (vec![3.0, 4.0], vec![1, 2]));
    let m = data_msg(
        parse_csv_with("x,y\n1,2\n", "no.csv", CsvHeader::No),
        "no.csv",
    );
    assert!(m.contains("line 1, field 1") && m.contains("'x'"), "{m}");
    // "yes" skips even a mixed row, "no" keeps a numeric one
    let mixed = parse_csv_with("a,1\n2,3\n", "y.csv", CsvHeader::Yes).unwrap();
    assert_eq!(mixed, (vec![2.0, 3.0], vec![1, 2]));
    let no = parse_csv_with("1,2\n3,4\n", "no.csv", CsvHeader::No).unwrap();
    assert_eq!(no.1, vec![2, 2]);
}

#[test]
fn csv_header_is_a_config_key_and_old_configs_still_load() {
    let cfg = Config::from_toml_str("[data]\ncsv_header = \"yes\"\n", "c.toml").unwrap();
    assert_eq!(cfg.data.csv_header, CsvHeader::Yes);
    assert_eq!(cfg.data.options().csv_header, CsvHeader::Yes);
    let bad = Config::from_toml_str("[data]\ncsv_header = \"maybe\"\n", "c.toml")
        .unwrap_err()
        .to_string();
    assert!(bad.contains("c.toml") && bad.contains("maybe"), "{bad}");

    // a config.json written before the key existed
    let mut json = serde_json::to_value(Config::default()).unwrap();
    let removed = json["data"].as_object_mut().unwrap().remove("csv_header");
    assert_eq!(removed, Some(serde_json::json!("auto")));
    let old = Config::from_json_str(&json.to_string(), "config.json").unwrap();
    assert_eq!(old.data.csv_header, CsvHeader::Auto);

    // the option reaches the reader through `data::open`
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.csv");
    std::fs::write(
        &p,
        "1,2\n3,4\n5,6\n7,8\n9,10\n11,12\n13,14\n15,16\n17,18\n19,20\n",
    )
    .unwrap();
    // every first column value the source holds (all splits, training rows by sampling)
    let firsts = |h: CsvHeader| -> HashSet<i32> {
        let cfg = DataConfig {
            csv_header: h,
            ..DataConfig::default()
        };
        let mut src = open(p.to_str().unwrap(), &cfg).unwrap();
        let dev = Device::Cpu;
        let mut rng = Rng::new(5);
        let mut sets = vec![src.val_set(&dev).unwrap(), src.test_set(&dev).unwrap()];
        for _ in 0..50 {
            sets.push(src.train_batch(16, &mut rng, &dev).unwrap());
        }
        sets.iter()
            .flat_map(|t| t.to_vec2::<f32>().unwrap())
            .map(|row| row[0] as i32)
            .collect()
    };
    assert_eq!(
        firsts(CsvHeader::Auto),
        (0..10).map(|i| 2 * i + 1).collect()
    );
    assert_eq!(firsts(CsvHeader::Yes), (1..10).map(|i| 2 * i + 1).collect());
}

#[test]
fn csv_line_endings_cr_crlf_and_lf() {
    let want = (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![3, 2]);
    for text in [
        "a,b\r1,2\r3,4\r5,6\r",
        "1,2\r3,4\r\r5,6",
        "1,2\r\n3,4\n5,6\r",
    ] {
        assert_eq!(parse_csv(text, "e.csv").unwrap(), want, "{text:?}");
    }
    // line numbers count every kind of ending
    let m = data_msg(parse_csv("1,2\r3,4\r\n5,x\n", "e.csv"), "e.csv");
    assert!(m.contains("line 3, field 2"), "{m}");
    // invalid UTF-8 names its line and byte offset
    let m = data_msg(
        parse_csv_bytes(b"1,2\n3,\xff\n", "u.csv", CsvHeader::Auto),
        "u.csv",
    );
    assert!(m.contains("line 2") && m.contains("byte offset 6"), "{m}");
}

// ---------------------------------------------------------------- npy

/// A version 1.0 `.npy` file with `header` (padded) and `data`.
fn npy(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while !(10 + h.len() + 1).is_multiple_of(64) {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

#[test]
fn npy_structured_dtype_is_named_with_the_supported_ones() {
    let f = npy(
        "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (2,), }",
        &[0; 16],
    );
    let m = data_msg(read_npy_bytes(&f, "s.npy"), "s.npy");
    assert!(m.contains("structured"), "{m}");
    assert!(m.contains("f4, f8") && m.contains("byte offset 20"), "{m}");
    let f = npy(
        "{'descr': '<f2', 'fortran_order': False, 'shape': (2,), }",
        &[0; 4],
    );
    let m = data_msg(read_npy_bytes(&f, "h.npy"), "h.npy");
    assert!(m.contains("'<f2'") && m.contains("supported dtypes"), "{m}");
}

#[test]
fn npy_huge_shape_in_a_tiny_file_is_refused_before_allocating() {
    // 10^12 f4 elements would be 4 TB: an allocation would abort the test process
    let f = npy(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }",
        &[0; 36],
    );
    assert!(f.len() < 200);
    let m = data_msg(read_npy_bytes(&f, "big.npy"), "big.npy");
    assert!(
        m.contains("truncated data")
            && m.contains("4000000000000 bytes")
            && m.contains("byte offset 128"),
        "{m}"
    );
    // a shape whose element count overflows
    let f = npy(
        "{'descr': '<f8', 'fortran_order': True, 'shape': (4294967296, 4294967296, 2), }",
        &[],
    );
    let m = data_msg(read_npy_bytes(&f, "o.npy"), "o.npy");
    assert!(m.contains("more elements than memory"), "{m}");
}

#[test]
fn npy_fortran_and_big_endian_are_converted() {
    // 2x3 Fortran order: the file holds columns (1, 4), (2, 5), (3, 6), as big-endian i2
    let data: Vec<u8> = [1i16, 4, 2, 5, 3, 6]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let f = npy(
        "{'descr': '>i2', 'fortran_order': True, 'shape': (2, 3), }",
        &data,
    );
    let (v, s) = read_npy_bytes(&f, "f.npy").unwrap();
    assert_eq!((v, s), (vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 3]));
}

// ---------------------------------------------------------------- where

#[test]
fn every_loader_error_names_the_file_and_where() {
    // npy: byte offsets
    let f = npy(
        "{'descr': '<f4', 'fortran_order': Maybe, 'shape': (2,), }",
        &[0; 8],
    );
    let m = data_msg(read_npy_bytes(&f, "w.npy"), "w.npy");
    assert!(m.contains("byte offset 44"), "{m}");
    let m = data_msg(
        read_npy_bytes(b"\x93NUMPY\x01\x00\xff\xff{", "t.npy"),
        "t.npy",
    );
    assert!(m.contains("byte offset 10") && m.contains("65535"), "{m}");
    // CSV: lines and fields
    let m = data_msg(parse_csv("1,2\n\n3\n", "r.csv"), "r.csv");
    assert!(
        m.contains("line 3") && m.contains("expected 2 fields"),
        "{m}"
    );
    // text: the file name
    let e = TextSource::from_bytes("short.txt", b"abc", 8, 0, 0.1, 0.1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("short.txt"), "{e}");
    // TOML config: file, line and column
    let e = Config::from_toml_str("[train]\nlr = \"fast\"\n", "my.toml")
        .unwrap_err()
        .to_string();
    assert!(e.contains("my.toml") && e.contains("line 2"), "{e}");
    // checkpoint: state.json line and column, and the tensor file
    let root = std::path::Path::new("ck");
    let none = |_: &str| -> std::io::Result<Vec<u8>> { Err(std::io::ErrorKind::NotFound.into()) };
    let e = checkpoint::load_from(root, b"{\n \"step\": 1,\n x", none, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("state.json") && e.contains("line 3"), "{e}");
    let garbage = b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}";
    let state = format!(
        r#"{{"format_version": 1, "manifest": {{"model": {{"bytes": {}, "fnv1a64": "{:016x}"}}}}}}"#,
        garbage.len(),
        checkpoint::fnv1a64(garbage)
    );
    let read = |f: &str| -> std::io::Result<Vec<u8>> {
        assert_eq!(f, "model.safetensors");
        Ok(garbage.to_vec())
    };
    let e = checkpoint::load_from(root, state.as_bytes(), read, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors file"),
        "{e}"
    );
}
