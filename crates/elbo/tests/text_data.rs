//! The vendored Shakespeare corpus, its split and vocabulary, and user text files.

use candle_core::Device;
use elbo::data::text::{shakespeare_works, TextSource, Tokenizer, SHAKESPEARE_VOCAB};
use elbo::data::{open, DataConfig, DataKind};
use elbo::Rng;

#[test]
fn shakespeare_is_clean_split_by_work_and_windowed() {
    let works = shakespeare_works().unwrap();
    assert_eq!(works.len(), 42);
    let names: Vec<&str> = works.iter().map(|(n, _)| n.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert!(names
        .iter()
        .all(|n| n.ends_with("_gut") && !n.ends_with("_gut_f")));
    let valid: Vec<&str> = (9..42).step_by(10).map(|i| names[i]).collect();
    assert_eq!(
        valid,
        [
            "henry_v_gut",
            "macbeth_gut",
            "rape_of_lucrece_gut",
            "twelfth_night_gut"
        ]
    );
    let tok = Tokenizer::shakespeare();
    assert_eq!(tok.vocab_size(), 78);
    for (n, body) in &works {
        assert!(
            !body.contains("\r") && !body.contains("\n\n\n") && !body.contains("  "),
            "{n}"
        );
        assert!(!body.to_lowercase().contains("project gutenberg"), "{n}");
        assert!(
            tok.encode(body).is_ok(),
            "{n} has characters outside the vocabulary"
        );
    }
    let total: usize = works.iter().map(|(_, b)| b.len()).sum();
    let val_chars: usize = (9..42).step_by(10).map(|i| works[i].1.len()).sum();
    assert!(
        total > 4_900_000 && val_chars == 455_442,
        "{total} {val_chars}"
    );

    let cfg = DataConfig {
        seq_len: 64,
        test_windows: 100,
        ..DataConfig::default()
    };
    let mut d = open("shakespeare", &cfg).unwrap();
    assert_eq!(d.dim(), 64);
    assert_eq!(d.kind(), DataKind::Discrete { levels: 78 });
    let dev = Device::Cpu;
    let test = d.test_set(&dev).unwrap();
    assert_eq!(test.dims(), [100, 64]);
    // the held-out windows are consecutive text of henry_v
    let first: Vec<u32> = test
        .get(0)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let second: Vec<u32> = test
        .get(1)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as u32)
        .collect();
    let t = d.tokenizer().unwrap().clone();
    let text = format!("{}{}", t.decode(&first), t.decode(&second));
    assert!(works[9].1.starts_with(&text));
    // training windows are verbatim text of a training work
    let b = d.train_batch(8, &mut Rng::new(0), &dev).unwrap();
    for row in b.to_vec2::<f32>().unwrap() {
        let ids: Vec<u32> = row.iter().map(|&v| v as u32).collect();
        let s = t.decode(&ids);
        let found: Vec<usize> = (0..42).filter(|i| works[*i].1.contains(&s)).collect();
        assert!(
            !found.is_empty() && found.iter().any(|i| i % 10 != 9),
            "{s:?}"
        );
    }
    // same generator state, same batch
    let b2 = d.train_batch(8, &mut Rng::new(0), &dev).unwrap();
    assert_eq!(b.to_vec2::<f32>().unwrap(), b2.to_vec2::<f32>().unwrap());
    assert_eq!(
        t.decode(&t.encode("To be, or not").unwrap()),
        "To be, or not"
    );
    assert!(t.encode("café").is_err());
}

#[test]
fn user_text_files_are_bytes_with_the_end_held_out() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("poem.txt");
    let text = "abcdefghij\r\n".repeat(50);
    std::fs::write(&p, &text).unwrap();
    let cfg = DataConfig {
        seq_len: 8,
        ..DataConfig::default()
    };
    let d = open(p.to_str().unwrap(), &cfg).unwrap();
    assert_eq!(d.kind(), DataKind::Discrete { levels: 256 });
    let n = "abcdefghij\n".len() * 50; // CRLF normalised
    assert_eq!(
        d.test_set(&Device::Cpu).unwrap().dims(),
        [(n - (0.9 * n as f64).round() as usize) / 8, 8]
    );
    let again = open(&format!("text:{}", p.display()), &cfg).unwrap();
    assert_eq!(again.dim(), 8);
    let short = DataConfig {
        seq_len: 10_000,
        ..DataConfig::default()
    };
    assert!(open(p.to_str().unwrap(), &short).is_err());
    assert!(open("text:/no/such/file.txt", &cfg).is_err());
    let src = TextSource::new(
        "x",
        Tokenizer::Bytes,
        vec![vec![1; 20]],
        &[vec![2; 20]],
        4,
        2,
    )
    .unwrap();
    assert_eq!(src.n_test(), 2);
    let _ = SHAKESPEARE_VOCAB;
}
