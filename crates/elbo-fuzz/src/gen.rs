//! Valid inputs for each loader, built from the seeded generator: `.npy` files in every
//! supported (and a few unsupported) dtype, byte order, memory order and format version; numeric
//! CSV in several notations, separators and line endings; text; TOML and JSON configs from
//! `Config::default()` with random `--set`-style changes; real checkpoints written by
//! `checkpoint::save`. The mutations of [`crate::mutate`] start from these.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use elbo::config::Config;
use elbo::models::FAMILIES;
use elbo::train::checkpoint;
use elbo::Rng;
use serde_json::json;

/// A valid `.npy` file of random dtype, shape, byte order, memory order and version.
pub fn npy(rng: &mut Rng) -> Vec<u8> {
    const KINDS: &[(&str, usize)] = &[
        ("f4", 4),
        ("f8", 8),
        ("i1", 1),
        ("i2", 2),
        ("i4", 4),
        ("i8", 8),
        ("u1", 1),
        ("u2", 2),
        ("u4", 4),
        ("u8", 8),
        ("b1", 1),
        ("f2", 2),
        ("c8", 8),
    ];
    let (kind, size) = KINDS[rng.below(KINDS.len())];
    let order = ['<', '>', '|'][rng.below(3)];
    let ndim = rng.below(4);
    let shape: Vec<usize> = (0..ndim).map(|_| rng.below(5)).collect();
    let count: usize = shape.iter().product();
    let shape_repr = match shape.as_slice() {
        [] => "()".to_string(),
        [d] => format!("({d},)"),
        _ => {
            let parts: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            format!("({})", parts.join(", "))
        }
    };
    let descr = if rng.below(16) == 0 {
        format!("[('a', '{order}{kind}'), ('b', '<f4')]")
    } else {
        format!("'{order}{kind}'")
    };
    let fortran = if rng.below(4) == 0 { "True" } else { "False" };
    let header =
        format!("{{'descr': {descr}, 'fortran_order': {fortran}, 'shape': {shape_repr}, }}");
    let major = [1u8, 1, 2, 3][rng.below(4)];
    let prefix = if major == 1 { 10 } else { 12 };
    let mut h = header.into_bytes();
    while (prefix + h.len() + 1) % 64 != 0 {
        h.push(b' ');
    }
    h.push(b'\n');
    let mut out = b"\x93NUMPY".to_vec();
    out.extend_from_slice(&[major, 0]);
    if major == 1 {
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
    } else {
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
    }
    out.extend_from_slice(&h);
    for _ in 0..count * size {
        out.push(rng.below(256) as u8);
    }
    out
}

/// A number in one of the notations a CSV may hold.
fn number(rng: &mut Rng) -> String {
    let v = rng.normal() * 10f64.powi(rng.below(7) as i32 - 3);
    match rng.below(12) {
        0 => format!("{v:e}"),
        1 => format!("{}", v as i64),
        2 => format!("{v:+}"),
        3 => ["inf", "-inf", "nan", "NaN", "+.5", "5.", "1e5"][rng.below(7)].to_string(),
        _ => format!("{v}"),
    }
}

/// A numeric CSV (or whitespace-separated) table, optionally with a header, a byte-order mark,
/// blank lines and any of the three line endings.
pub fn csv(rng: &mut Rng) -> Vec<u8> {
    let rows = 1 + rng.below(12);
    let cols = 1 + rng.below(5);
    let sep = [",", ", ", " ", "\t"][rng.below(4)];
    let eol = ["\n", "\r\n", "\r"][rng.below(3)];
    let mut out = String::new();
    if rng.below(4) == 0 {
        out.push('\u{feff}');
    }
    if rng.below(2) == 0 {
        let names: Vec<String> = (0..cols).map(|c| format!("col{c}")).collect();
        out.push_str(&names.join(sep));
        out.push_str(eol);
    }
    for _ in 0..rows {
        let fields: Vec<String> = (0..cols).map(|_| number(rng)).collect();
        out.push_str(&fields.join(sep));
        out.push_str(eol);
        if rng.below(8) == 0 {
            out.push_str(eol);
        }
    }
    out.into_bytes()
}

/// Text of random bytes: ASCII words, line endings of every kind and invalid UTF-8.
pub fn text(rng: &mut Rng) -> Vec<u8> {
    let n = rng.below(400);
    (0..n)
        .map(|_| match rng.below(10) {
            0 => b"\r\n\t"[rng.below(3)],
            1 => rng.below(256) as u8,
            _ => b'a' + rng.below(26) as u8,
        })
        .collect()
}

/// `--set` changes a valid config may carry.
fn assignment(rng: &mut Rng) -> String {
    let n = 1 + rng.below(5000);
    match rng.below(12) {
        0 => format!("model.name={}", FAMILIES[rng.below(FAMILIES.len())].name),
        1 => format!("train.steps={n}"),
        2 => format!("train.lr={}", 1e-4 * (1 + rng.below(100)) as f64),
        3 => format!("train.batch_size={n}"),
        4 => format!(
            "data.name={}",
            ["digits", "moons", "shakespeare", "x.csv"][rng.below(4)]
        ),
        5 => format!("data.csv_header={}", ["auto", "yes", "no"][rng.below(3)]),
        6 => format!("data.seq_len={n}"),
        7 => format!("train.seed={}", rng.below(1 << 30)),
        8 => format!("eval.batch_size={n}"),
        9 => format!("train.ema_decay=0.{}", rng.below(1000)),
        10 => format!("data.test_fraction=0.{}", 1 + rng.below(8)),
        _ => format!("train.patience={}", rng.below(20)),
    }
}

/// A valid config as TOML or as the JSON of a saved `config.json`.
pub fn config(rng: &mut Rng) -> Vec<u8> {
    let mut cfg = Config::default();
    for _ in 0..rng.below(6) {
        // an assignment the config rejects leaves it unchanged, which is fine here
        let _ = cfg.set(&assignment(rng));
    }
    let text = if rng.below(2) == 0 {
        toml::to_string(&cfg).unwrap_or_default()
    } else {
        serde_json::to_string_pretty(&cfg).unwrap_or_default()
    };
    text.into_bytes()
}

/// A checkpoint as its files: `state.json` first, then `NAME.safetensors` files.
pub type CheckpointFiles = Vec<(String, Vec<u8>)>;

/// A real checkpoint written by `checkpoint::save` into a temporary directory and read back.
pub fn checkpoint(rng: &mut Rng) -> std::io::Result<CheckpointFiles> {
    let dir = tempfile::tempdir()?;
    let ckpt = dir.path().join("ckpt");
    let dev = Device::Cpu;
    let names = ["model", "ema", "optimizer"];
    let mut maps = Vec::new();
    for name in &names[..1 + rng.below(names.len())] {
        let mut map = HashMap::new();
        for t in 0..1 + rng.below(4) {
            let shape: Vec<usize> = (0..1 + rng.below(3)).map(|_| 1 + rng.below(4)).collect();
            let n: usize = shape.iter().product();
            let tensor = Tensor::from_vec(rng.normal_vec(n), shape, &dev)
                .and_then(|x| match rng.below(3) {
                    0 => x.to_dtype(DType::F64),
                    1 => x.to_dtype(DType::BF16),
                    _ => Ok(x),
                })
                .map_err(std::io::Error::other)?;
            map.insert(format!("layer{t}.weight"), tensor);
        }
        maps.push((*name, map));
    }
    let files: Vec<(&str, &HashMap<String, Tensor>)> = maps.iter().map(|(n, m)| (*n, m)).collect();
    let state = json!({ "step": rng.below(100000), "config": { "lr": 0.001 } });
    checkpoint::save(&ckpt, &files, &state).map_err(std::io::Error::other)?;
    let mut out = vec![(
        "state.json".to_string(),
        std::fs::read(ckpt.join("state.json"))?,
    )];
    for (name, _) in &maps {
        let file = format!("{name}.safetensors");
        out.push((file.clone(), std::fs::read(ckpt.join(&file))?));
    }
    Ok(out)
}

/// Pack checkpoint files into one byte string (for mutation of the whole and for reproducer
/// files): per file a u32 name length, the name, a u32 data length and the data.
pub fn pack(files: &CheckpointFiles) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in files {
        out.extend_from_slice(&(name.len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    out
}

/// Inverse of [`pack`]; `None` when the framing is broken.
pub fn unpack(mut bytes: &[u8]) -> Option<CheckpointFiles> {
    let mut out = Vec::new();
    let take = |b: &mut &[u8]| -> Option<Vec<u8>> {
        let len = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let data = b.get(4..4usize.checked_add(len)?)?.to_vec();
        *b = &b[4 + len..];
        Some(data)
    };
    while !bytes.is_empty() {
        let name = String::from_utf8(take(&mut bytes)?).ok()?;
        let data = take(&mut bytes)?;
        out.push((name, data));
    }
    Some(out)
}

/// Rewrite the manifest of `state.json` (when it still parses) so that every tensor file's
/// length and hash match, letting mutated safetensors bytes reach the safetensors parser.
pub fn fix_manifest(files: &mut CheckpointFiles) {
    let Some(state) = files.first().map(|(_, d)| d.clone()) else {
        return;
    };
    let Ok(serde_json::Value::Object(mut state)) = serde_json::from_slice(&state) else {
        return;
    };
    let mut manifest = serde_json::Map::new();
    for (file, data) in &files[1..] {
        let name = file.strip_suffix(".safetensors").unwrap_or(file);
        manifest.insert(
            name.to_string(),
            json!({ "bytes": data.len(), "fnv1a64": format!("{:016x}", checkpoint::fnv1a64(data)) }),
        );
    }
    state.insert("manifest".into(), serde_json::Value::Object(manifest));
    if let Ok(text) = serde_json::to_vec(&serde_json::Value::Object(state)) {
        files[0].1 = text;
    }
}
