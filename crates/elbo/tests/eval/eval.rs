//! Likelihood reports (Markdown, JSON, terminal, files) and PNG plots.

use std::path::Path;

use elbo::eval::plot::{density_compare, image_grid, loss_curve, scatter_compare};
use elbo::eval::report::{LikelihoodReport, ReportRow};
use elbo::{Error, Nll, NllKind};

fn row(model: &str, kind: NllKind, nats: &[f64], entropy: Option<f64>) -> ReportRow {
    let nll = if kind == NllKind::None {
        Nll::none(2)
    } else {
        Nll {
            nats: nats.to_vec(),
            dims: 2,
            kind,
        }
    };
    ReportRow {
        model: model.into(),
        dataset: "moons".into(),
        split: "test".into(),
        checkpoint: "ema, step 3000".into(),
        summary: nll.summary(),
        entropy,
        method: format!("{model} | method text"),
        metrics: Vec::new(),
    }
}

fn report() -> LikelihoodReport {
    LikelihoodReport {
        title: "Toy likelihoods".into(),
        rows: vec![
            // mean 2.5, true entropy 2.25 -> gap 0.25
            row("cnf", NllKind::Exact, &[2.0, 3.0], Some(2.25)),
            row("vae", NllKind::Bound, &[3.0, 3.5], None),
            row(
                "ffjord",
                NllKind::Estimate { samples: 16 },
                &[2.4, 2.6],
                Some(2.25),
            ),
            row("gan", NllKind::None, &[], Some(2.25)),
        ],
    }
}

/// The table lines of a Markdown document (those starting with '|').
fn table_lines(md: &str) -> Vec<&str> {
    md.lines().filter(|l| l.starts_with('|')).collect()
}

fn cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    inner.split(" | ").map(|c| c.trim().to_string()).collect()
}

#[test]
fn gap_is_nll_minus_entropy_and_absent_without_entropy_or_likelihood() {
    let r = report();
    assert!((r.rows[0].gap().unwrap() - 0.25).abs() < 1e-12);
    assert_eq!(r.rows[1].gap(), None);
    assert!((r.rows[2].gap().unwrap() - 0.25).abs() < 1e-12);
    assert_eq!(r.rows[3].gap(), None, "no likelihood, no gap");
}

#[test]
fn markdown_has_header_one_row_per_entry_and_labels() {
    let md = report().to_markdown();
    assert!(md.starts_with("# Toy likelihoods\n"), "{md}");
    let lines = table_lines(&md);
    assert_eq!(lines.len(), 2 + 4, "header + rule + 4 rows:\n{md}");
    let header = cells(lines[0]);
    assert_eq!(
        header,
        [
            "model",
            "data",
            "split",
            "likelihood",
            "NLL nats ± s.e.",
            "bits/dim ± s.e.",
            "true entropy",
            "gap",
            "n",
            "checkpoint"
        ]
    );
    let rows: Vec<Vec<String>> = lines[2..].iter().map(|l| cells(l)).collect();
    for r in &rows {
        assert_eq!(r.len(), 10, "{r:?}");
    }
    // exact row: mean 2.5 ± 0.5, gap 0.25 nats
    assert_eq!(rows[0][3], "exact");
    assert_eq!(rows[0][4], "2.5000 ± 0.5000");
    assert_eq!(rows[0][6], "2.2500");
    assert_eq!(rows[0][7], "0.2500");
    assert_eq!(rows[0][8], "2");
    assert_eq!(rows[0][9], "ema, step 3000");
    // bits/dim = 2.5 / (2 ln 2)
    let bpd = 2.5 / (2.0 * std::f64::consts::LN_2);
    assert!(
        rows[0][5].starts_with(&format!("{bpd:.4} ± ")),
        "{}",
        rows[0][5]
    );
    assert_eq!(rows[1][3], "bound (upper bound on NLL)");
    assert_eq!(rows[1][7], "—", "no entropy, no gap");
    assert_eq!(rows[2][3], "estimate (16 samples)");
    assert_eq!(rows[2][7], "0.2500");
    // no likelihood: numbers are dashes
    assert_eq!(rows[3][3], "none");
    assert_eq!(&rows[3][4..8], ["—", "—", "2.2500", "—"]);
    // method footnotes, one per row, with the pipe escaped
    for (i, m) in ["cnf", "vae", "ffjord", "gan"].iter().enumerate() {
        assert!(rows[i][0].starts_with(m) && rows[i][0].contains(&format!("[^{}]", i + 1)));
        let note = format!("[^{}]: method: {m} \\| method text", i + 1);
        assert!(md.contains(&note), "missing {note}:\n{md}");
    }
}

#[test]
fn json_round_trips_and_carries_gap_and_kind_label() {
    let r = report();
    let json = r.to_json().unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 4);
    assert!((rows[0]["gap"].as_f64().unwrap() - 0.25).abs() < 1e-12);
    assert_eq!(rows[0]["kind_label"], "exact");
    assert_eq!(rows[2]["likelihood"], "estimate (16 samples)");
    assert!(rows[1]["gap"].is_null());
    assert!(
        rows[3]["summary"]["nats"].is_null(),
        "NaN is written as null"
    );
    assert!(json.contains("\n  "), "pretty-printed");

    let back = LikelihoodReport::from_json(&json).unwrap();
    assert_eq!(back.title, r.title);
    assert_eq!(back.rows.len(), r.rows.len());
    for (a, b) in back.rows.iter().zip(&r.rows) {
        assert_eq!(
            (&a.model, &a.dataset, &a.split),
            (&b.model, &b.dataset, &b.split)
        );
        assert_eq!((&a.checkpoint, &a.method), (&b.checkpoint, &b.method));
        assert_eq!(a.summary.kind, b.summary.kind);
        assert_eq!((a.summary.n, a.summary.dims), (b.summary.n, b.summary.dims));
        assert_eq!(a.entropy, b.entropy);
        // serde_json without `float_roundtrip` may parse the last bit differently
        let same = |x: f64, y: f64| (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-14 * y.abs();
        assert!(same(a.summary.nats, b.summary.nats));
        assert!(same(
            a.summary.stderr_bits_per_dim,
            b.summary.stderr_bits_per_dim
        ));
    }
    assert_eq!(back.to_markdown(), r.to_markdown());
    assert!(matches!(
        LikelihoodReport::from_json("{\"rows\": 3}"),
        Err(Error::Data { .. })
    ));
}

#[test]
fn terminal_table_is_aligned() {
    let t = report().to_terminal();
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines[0], "Toy likelihoods");
    assert!(lines[1].starts_with("model") && lines[1].contains("checkpoint"));
    assert!(lines[2].chars().all(|c| c == '-'));
    // every data row ends with the checkpoint column at the same character offset
    let col = |l: &str| l.chars().count() - "ema, step 3000".chars().count();
    let header_col = lines[1].chars().count() - "checkpoint".len();
    for l in &lines[3..7] {
        assert!(l.ends_with("ema, step 3000"), "{l}");
        assert_eq!(col(l), header_col, "misaligned: {l}");
    }
    assert!(t.contains("[3] ffjord: ffjord | method text"));
}

#[test]
fn write_creates_json_and_markdown() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/reports");
    let r = report();
    r.write(&out, "toy").unwrap();
    let md = std::fs::read_to_string(out.join("toy.md")).unwrap();
    assert_eq!(md, r.to_markdown());
    let json = std::fs::read_to_string(out.join("toy.json")).unwrap();
    assert_eq!(LikelihoodReport::from_json(&json).unwrap().rows.len(), 4);
    assert!(r.write(&out, "").is_err());
    assert!(r.write(&out, "a/b").is_err());
}

/// PNG signature and the IHDR width and height.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap();
    assert!(b.len() > 33, "{} is too short for a PNG", path.display());
    assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&b[12..16], b"IHDR");
    let be = |s: &[u8]| u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
    (be(&b[16..20]), be(&b[20..24]))
}

/// Two noisy rings of radius 1 and 2, row-major [n, 2].
fn rings(n: usize) -> Vec<f32> {
    (0..n)
        .flat_map(|i| {
            let t = i as f32 * 0.37;
            let r = if i % 2 == 0 { 1.0 } else { 2.0 } + 0.05 * (i as f32 * 1.3).sin();
            [r * t.cos(), r * t.sin()]
        })
        .collect()
}

#[test]
fn scatter_compare_writes_png_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sub/scatter.png");
    let mut samples = rings(500);
    samples.extend([f32::NAN, 1.0, 50.0, 50.0]); // a non-finite and an outlying sample
    scatter_compare(&p, &rings(30_000), &samples, "rings").unwrap();
    assert_eq!(png_size(&p), (1000, 520));

    let bad = dir.path().join("bad.png");
    assert!(matches!(
        scatter_compare(&bad, &[], &samples, "t"),
        Err(Error::Data { .. })
    ));
    assert!(matches!(
        scatter_compare(&bad, &[1.0, 2.0, 3.0], &samples, "t"),
        Err(Error::Shape(_))
    ));
    assert!(scatter_compare(&bad, &rings(10), &[f32::NAN, 0.0], "t").is_err());
    assert!(scatter_compare(&dir.path().join("x.jpg"), &rings(10), &rings(10), "t").is_err());
    assert!(!bad.exists(), "failed plots write nothing");
}

#[test]
fn density_compare_writes_png_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("density.png");
    let (rows, cols) = (40, 60);
    let density: Vec<f64> = (0..rows * cols)
        .map(|k| {
            let y = -3.0 + 6.0 * ((k / cols) as f64 + 0.5) / rows as f64;
            let x = -3.0 + 6.0 * ((k % cols) as f64 + 0.5) / cols as f64;
            (-(x * x + y * y) / 2.0).exp()
        })
        .collect();
    let ext = (-3.0, 3.0, -3.0, 3.0);
    density_compare(&p, &rings(2000), &density, (rows, cols), ext, "density").unwrap();
    assert_eq!(png_size(&p), (1000, 520));

    let q = dir.path().join("q.png");
    let d = &density;
    assert!(matches!(
        density_compare(&q, &rings(10), d, (rows, cols + 1), ext, "t"),
        Err(Error::Shape(_))
    ));
    assert!(density_compare(&q, &rings(10), d, (rows, cols), (1.0, -1.0, 0.0, 1.0), "t").is_err());
    assert!(density_compare(&q, &rings(10), &[-1.0; 4], (2, 2), ext, "t").is_err());
    assert!(density_compare(&q, &rings(10), &[f64::NAN; 4], (2, 2), ext, "t").is_err());
    assert!(density_compare(&q, &[], d, (rows, cols), ext, "t").is_err());
    assert!(!q.exists());
}

#[test]
fn loss_curve_writes_png_with_and_without_eval() {
    let dir = tempfile::tempdir().unwrap();
    let train: Vec<(f64, f64)> = (0..500)
        .map(|s| {
            (
                s as f64,
                3.0 * (-(s as f64) / 100.0).exp() + 0.1 * (s as f64).sin(),
            )
        })
        .chain([(500.0, f64::NAN), (f64::INFINITY, 1.0)])
        .collect();
    let eval: Vec<(f64, f64)> = (0..5)
        .map(|i| (i as f64 * 100.0, 2.5 - 0.4 * i as f64))
        .collect();
    let p = dir.path().join("loss.png");
    loss_curve(&p, &train, &eval, "training", "NLL (nats)").unwrap();
    assert_eq!(png_size(&p), (900, 540));
    let p2 = dir.path().join("loss_no_eval.png");
    loss_curve(&p2, &train[..3], &[], "short", "loss").unwrap();
    assert_eq!(png_size(&p2), (900, 540));

    let q = dir.path().join("q.png");
    assert!(matches!(
        loss_curve(&q, &[], &eval, "t", "y"),
        Err(Error::Data { .. })
    ));
    assert!(loss_curve(&q, &[(0.0, f64::NAN)], &eval, "t", "y").is_err());
    assert!(!q.exists());
}

#[test]
fn image_grid_has_the_documented_size_and_rejects_bad_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let (h, w, n) = (8, 6, 10);
    let images: Vec<f32> = (0..n * h * w).map(|i| (i % 17) as f32 / 16.0).collect();
    let p = dir.path().join("grid.png");
    image_grid(&p, &images, h, w, 4, 0.0, 1.0, 3).unwrap();
    // 4 columns, 3 rows of 8x6 images at scale 3 with 1-px separators
    assert_eq!(png_size(&p), (4 * 6 * 3 + 5, 3 * 8 * 3 + 4));
    // fewer images than columns: the grid shrinks to one row of n
    let p1 = dir.path().join("one.png");
    image_grid(&p1, &images[..2 * h * w], h, w, 8, 0.0, 1.0, 1).unwrap();
    assert_eq!(png_size(&p1), (2 * 6 + 3, 8 + 2));

    let q = dir.path().join("q.png");
    let err = image_grid(&q, &images[..h * w + 1], h, w, 4, 0.0, 1.0, 1).unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    assert!(err.to_string().contains("8x6"), "{err}");
    assert!(image_grid(&q, &[], h, w, 4, 0.0, 1.0, 1).is_err());
    assert!(image_grid(&q, &images, h, w, 0, 0.0, 1.0, 1).is_err());
    assert!(image_grid(&q, &images, h, w, 4, 1.0, 1.0, 1).is_err());
    assert!(image_grid(&q, &images, h, w, 4, 0.0, 1.0, 0).is_err());
    assert!(image_grid(&q, &images, h, w, 4, 0.0, 1.0, 100_000).is_err());
    assert!(!q.exists());
}
