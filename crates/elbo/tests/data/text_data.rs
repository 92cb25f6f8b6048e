//! The vendored Shakespeare corpus, its split and vocabulary, and user text files.

use candle_core::{Device, Tensor};
use elbo::data::text::{
    shakespeare_splits, shakespeare_works, TextSource, Tokenizer, SHAKESPEARE_VOCAB,
};
use elbo::data::{open, DataConfig, DataKind, DataSource, Split};
use elbo::{Error, Rng};

/// The rows of a `[n, seq_len]` window tensor as token ids.
fn windows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|r| r.iter().map(|&v| v as u32).collect())
        .collect()
}

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
    let splits = shakespeare_splits(&works, 0.1).unwrap();
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
        assert!(found.iter().any(|&i| splits[i] == Split::Train), "{s:?}");
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
fn shakespeare_validation_is_the_last_training_works() {
    let works = shakespeare_works().unwrap();
    let len = |i: usize| works[i].1.chars().count();
    let splits = shakespeare_splits(&works, 0.1).unwrap();
    let of = |want: Split| -> Vec<usize> { (0..42).filter(|&i| splits[i] == want).collect() };
    // the test works are as before; the validation works are the last three non-test works
    assert_eq!(of(Split::Test), [9, 19, 29, 39]);
    assert_eq!(of(Split::Val), [38, 40, 41]);
    let names: Vec<&str> = of(Split::Val)
        .iter()
        .map(|&i| works[i].0.as_str())
        .collect();
    assert_eq!(
        names,
        [
            "troilus_and_cressida_gut",
            "two_gentlemen_of_verona_gut",
            "winters_tale_gut"
        ]
    );
    let val_chars: usize = of(Split::Val).iter().map(|&i| len(i)).sum();
    let non_test: usize = (0..42).filter(|i| i % 10 != 9).map(len).sum();
    assert_eq!((val_chars, non_test), (401_298, 4_581_447));
    assert_eq!(of(Split::Train).len(), 35);
    // the count of works is the nearest to val_fraction of the non-test characters
    for f in [0.01, 0.05, 0.1, 0.2, 0.5] {
        let sp = shakespeare_splits(&works, f).unwrap();
        let val: Vec<usize> = (0..42).filter(|&i| sp[i] == Split::Val).collect();
        let rest: Vec<usize> = (0..42).filter(|i| i % 10 != 9).collect();
        let k = val.len();
        assert!(k >= 1 && val[..] == rest[rest.len() - k..], "{f}: {val:?}");
        let total =
            |k: usize| -> f64 { rest[rest.len() - k..].iter().map(|&i| len(i) as f64).sum() };
        let target = f * non_test as f64;
        for other in 1..rest.len() {
            assert!(
                (total(k) - target).abs() <= (total(other) - target).abs(),
                "{f}: {k} works, but {other} is nearer"
            );
        }
        assert_eq!(
            (0..42).filter(|&i| sp[i] == Split::Test).count(),
            4,
            "test works do not move"
        );
    }
    for f in [0.0, 1.0, -1.0] {
        match shakespeare_splits(&works, f) {
            Err(Error::Config(m)) => assert!(m.contains("data.val_fraction"), "{m}"),
            other => panic!("{f}: expected a config error, got {other:?}"),
        }
    }

    let cfg = DataConfig {
        seq_len: 64,
        test_windows: 100,
        ..DataConfig::default()
    };
    let dev = Device::Cpu;
    let mut d = open("shakespeare", &cfg).unwrap();
    let t = d.tokenizer().unwrap().clone();
    // validation windows: consecutive text from the start of the first validation work, capped
    // by test_windows like the test windows
    let val = d.val_set(&dev).unwrap();
    assert_eq!(val.dims(), [100, 64]);
    let vw = windows(&val);
    let text: String = vw.iter().map(|w| t.decode(w)).collect();
    assert!(works[38].1.starts_with(&text));
    // fixed: the same for another source and after training draws with any seed
    d.train_batch(16, &mut Rng::new(123), &dev).unwrap();
    assert_eq!(windows(&d.val_set(&dev).unwrap()), vw);
    let all = DataConfig {
        seq_len: 64,
        ..DataConfig::default()
    };
    let full = TextSource::shakespeare_with_val(64, 0, 0.1).unwrap();
    assert_eq!(
        full.n_val(),
        of(Split::Val).iter().map(|&i| len(i) / 64).sum::<usize>()
    );
    assert_eq!(
        open("shakespeare", &all)
            .unwrap()
            .val_set(&dev)
            .unwrap()
            .dims()[0],
        full.n_val()
    );
    // training windows never come from a validation or test work: each occurs in a training
    // work (validation windows, 64 characters of a play, are not found in training works)
    let train_text: Vec<&str> = of(Split::Train)
        .iter()
        .map(|&i| works[i].1.as_str())
        .collect();
    let b = d.train_batch(200, &mut Rng::new(5), &dev).unwrap();
    for w in windows(&b) {
        let s = t.decode(&w);
        assert!(train_text.iter().any(|x| x.contains(&s)), "{s:?}");
    }
    for w in vw.iter().take(20) {
        let s = t.decode(w);
        assert!(!train_text.iter().any(|x| x.contains(&s)), "{s:?}");
    }
}

#[test]
fn user_text_splits_are_contiguous_disjoint_spans() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("lines.txt");
    // 3000 distinct 7-byte lines: any 16-byte window holds a whole line, so it occurs once
    let text: String = (0..3000).map(|i| format!("{i:06}\n")).collect();
    std::fs::write(&p, &text).unwrap();
    let n = text.len();
    let cut_t = (0.9 * n as f64).round() as usize;
    let cut_v = (0.9 * cut_t as f64).round() as usize;
    let cfg = DataConfig {
        seq_len: 16,
        ..DataConfig::default()
    };
    let dev = Device::Cpu;
    let mut d = open(p.to_str().unwrap(), &cfg).unwrap();
    let offset = |w: &[u32]| -> usize {
        let s = Tokenizer::Bytes.decode(w);
        let at = text.find(&s).unwrap();
        assert_eq!(text.rfind(&s), Some(at), "window {s:?} is not unique");
        at
    };
    // the validation windows tile [cut_v, cut_t), the test windows [cut_t, n)
    let val = windows(&d.val_set(&dev).unwrap());
    assert_eq!(val.len(), (cut_t - cut_v) / 16);
    for (k, w) in val.iter().enumerate() {
        assert_eq!(offset(w), cut_v + 16 * k);
    }
    let test = windows(&d.test_set(&dev).unwrap());
    assert_eq!(test.len(), (n - cut_t) / 16);
    for (k, w) in test.iter().enumerate() {
        assert_eq!(offset(w), cut_t + 16 * k);
    }
    // training windows lie inside [0, cut_v) and reach its end
    let b = windows(&d.train_batch(20_000, &mut Rng::new(1), &dev).unwrap());
    let starts: Vec<usize> = b.iter().map(|w| offset(w)).collect();
    assert!(starts.iter().all(|&s| s + 16 <= cut_v));
    assert!(starts.iter().any(|&s| s + 16 > cut_v - 40));
    assert!(starts.contains(&0));
    // validation windows are capped by test_windows too
    let capped = DataConfig {
        seq_len: 16,
        test_windows: 7,
        ..DataConfig::default()
    };
    let c = open(p.to_str().unwrap(), &capped).unwrap();
    assert_eq!(windows(&c.val_set(&dev).unwrap()), val[..7]);
    // a fraction too small to hold one window is a config error naming the field
    let tiny = DataConfig {
        seq_len: 16,
        val_fraction: 0.0005,
        ..DataConfig::default()
    };
    match open(p.to_str().unwrap(), &tiny) {
        Err(Error::Config(m)) => assert!(m.contains("data.val_fraction"), "{m}"),
        other => panic!("expected a config error, got {:?}", other.err()),
    }
    let most = DataConfig {
        seq_len: 16,
        val_fraction: 0.9995,
        ..DataConfig::default()
    };
    match open(p.to_str().unwrap(), &most) {
        Err(Error::Config(m)) => assert!(m.contains("data.val_fraction"), "{m}"),
        other => panic!("expected a config error, got {:?}", other.err()),
    }
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
    let n = text.len(); // every byte is a token, CRLF kept
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
    let src = TextSource::with_splits(
        "x",
        Tokenizer::Bytes,
        vec![vec![1; 20]],
        &[vec![3; 9], vec![3; 5]],
        &[vec![2; 20]],
        4,
        0,
    )
    .unwrap();
    // windows never straddle documents: 2 + 1 validation windows, 5 test windows
    assert_eq!((src.n_val(), src.n_test()), (3, 5));
    let capped = TextSource::with_splits(
        "x",
        Tokenizer::Bytes,
        vec![vec![1; 20]],
        &[vec![3; 20]],
        &[vec![2; 20]],
        4,
        2,
    )
    .unwrap();
    assert_eq!((capped.n_val(), capped.n_test()), (2, 2));
    assert!(TextSource::with_splits(
        "x",
        Tokenizer::Bytes,
        vec![vec![1; 20]],
        &[vec![3; 3]],
        &[vec![2; 20]],
        4,
        0
    )
    .is_err());
    // with_val_fraction (and new, at 0.1) holds out the tail of the training tokens, cutting
    // inside a document: 30 tokens, the last 30 - round(0.75 * 30) = 7 are validation
    let ids: Vec<u32> = (0..30).collect();
    let docs = vec![ids[..10].to_vec(), ids[10..].to_vec()];
    let mut tail = TextSource::with_val_fraction(
        "t",
        Tokenizer::Bytes,
        docs.clone(),
        &[vec![2; 8]],
        3,
        0,
        0.25,
    )
    .unwrap();
    let dev = Device::Cpu;
    assert_eq!(
        windows(&tail.val_set(&dev).unwrap()),
        [vec![23, 24, 25], vec![26, 27, 28]]
    );
    let b = windows(&tail.train_batch(500, &mut Rng::new(2), &dev).unwrap());
    // training windows are ascending runs inside 0..10 or 10..23, never across a cut
    for w in &b {
        assert!(
            w[2] == w[0] + 2 && (w[2] < 10 || (w[0] >= 10 && w[2] < 23)),
            "{w:?}"
        );
    }
    assert!(b.iter().any(|w| w[2] == 22) && b.iter().any(|w| w[0] == 0));
    let dflt = TextSource::new("d", Tokenizer::Bytes, docs, &[vec![2; 8]], 3, 0).unwrap();
    assert_eq!(windows(&dflt.val_set(&dev).unwrap()), [vec![27, 28, 29]]);
    assert_eq!(dflt.n_train_tokens(), 27);
    let _ = SHAKESPEARE_VOCAB;
}
