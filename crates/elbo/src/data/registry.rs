//! Data set names -> [`DataSource`]s, and [`ArraySource`] for the user's own arrays.
//!
//! [`open`] accepts the eight toy names (`8gaussians`, `checkerboard`, ...), `digits`, `mnist`,
//! `mnist-binary`, and a path to a 2-D array: `PATH.npy` / `PATH.csv`, or `npy:PATH` /
//! `csv:PATH` for other file names.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::digits::DigitsSource;
use super::mnist::MnistSource;
use super::text::TextSource;
use super::toy2d::{Toy2d, Toy2dSource};
use super::{csv, npy, DataKind, DataSource};
use crate::{Error, Result, Rng};

/// Names [`open`] accepts; the last two stand for any path with that extension.
pub const KNOWN_DATASETS: &[&str] = &[
    "swissroll",
    "circles",
    "rings",
    "moons",
    "8gaussians",
    "pinwheel",
    "2spirals",
    "checkerboard",
    "digits",
    "shakespeare",
    "mnist",
    "mnist-binary",
    "PATH.npy",
    "PATH.csv",
    "PATH.txt (or text:PATH)",
];

/// Seed of the fixed permutation that splits a user array into train and held-out rows.
const SPLIT_SEED: u64 = 0x5B17_DA7A;

/// Data options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// Held-out points of the toy 2-D sets (drawn once from a fixed generator).
    pub test_size: usize,
    /// Fraction of the rows of a user array (`.npy` / `.csv`), or of the end of a user text
    /// file, held out for evaluation.
    pub test_fraction: f64,
    /// Text data: tokens per example (window length).
    pub seq_len: usize,
    /// Text data: cap on the held-out windows (0: all).
    pub test_windows: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            test_size: 5000,
            test_fraction: 0.1,
            seq_len: 128,
            test_windows: 0,
        }
    }
}

impl DataConfig {
    /// Check the values are in range.
    pub fn validate(&self) -> Result<()> {
        if self.test_size == 0 {
            return Err(Error::Config("data.test_size must be at least 1".into()));
        }
        if !(self.test_fraction > 0.0 && self.test_fraction < 1.0) {
            return Err(Error::Config(format!(
                "data.test_fraction must be in (0, 1), got {}",
                self.test_fraction
            )));
        }
        Ok(())
    }
}

/// Open a data set by name (see the module docs for the accepted forms).
pub fn open(name: &str, cfg: &DataConfig) -> Result<Box<dyn DataSource>> {
    cfg.validate()?;
    if let Some(toy) = Toy2d::from_name(name) {
        return Ok(Box::new(Toy2dSource::new(toy, cfg.test_size)?));
    }
    if name == "digits" {
        return Ok(Box::new(DigitsSource::new()?));
    }
    if name == "shakespeare" {
        return Ok(Box::new(TextSource::shakespeare(
            cfg.seq_len,
            cfg.test_windows,
        )?));
    }
    if name == "mnist" {
        return Ok(Box::new(MnistSource::new()?));
    }
    if name == "mnist-binary" {
        return Ok(Box::new(MnistSource::binary()?));
    }
    let lower = name.to_ascii_lowercase();
    let text_path = name
        .strip_prefix("text:")
        .or_else(|| lower.ends_with(".txt").then_some(name));
    if let Some(p) = text_path {
        return Ok(Box::new(TextSource::from_file(
            Path::new(p),
            cfg.seq_len,
            cfg.test_windows,
            cfg.test_fraction,
        )?));
    }
    let (data, shape) = if let Some(p) = name.strip_prefix("npy:") {
        npy::read_npy(Path::new(p))?
    } else if let Some(p) = name.strip_prefix("csv:") {
        csv::read_csv(Path::new(p))?
    } else if lower.ends_with(".npy") {
        npy::read_npy(Path::new(name))?
    } else if lower.ends_with(".csv") {
        csv::read_csv(Path::new(name))?
    } else {
        return Err(Error::UnknownDataset {
            name: name.to_string(),
            known: KNOWN_DATASETS.join(", "),
        });
    };
    Ok(Box::new(ArraySource::new(
        name,
        data,
        &shape,
        cfg.test_fraction,
    )?))
}

/// A user-supplied 2-D array `[N, D]` of real vectors: a fixed permutation (independent of the
/// run seed) holds out `round(test_fraction * N)` rows (at least 1, leaving at least 1 for
/// training); training batches draw the other rows uniformly with replacement.
#[derive(Clone, Debug)]
pub struct ArraySource {
    name: String,
    dim: usize,
    train: Vec<f32>,
    test: Vec<f32>,
}

impl ArraySource {
    /// Split `data` (row-major with `shape` `[N, D]`). Errors when the array is not 2-D, has
    /// fewer than 2 rows or no columns, holds NaN or infinity, or `test_fraction` is not in (0, 1).
    pub fn new(name: &str, data: Vec<f32>, shape: &[usize], test_fraction: f64) -> Result<Self> {
        let &[n, dim] = shape else {
            return Err(Error::data(
                name,
                format!("expected a 2-D array [N, D], got shape {shape:?}"),
            ));
        };
        if n < 2 || dim == 0 {
            return Err(Error::data(
                name,
                format!("need at least 2 rows and 1 column, got shape {shape:?}"),
            ));
        }
        if data.len() != n * dim {
            return Err(Error::Shape(format!(
                "{name}: shape {shape:?} needs {} values, got {}",
                n * dim,
                data.len()
            )));
        }
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(Error::Config(format!(
                "data.test_fraction must be in (0, 1), got {test_fraction}"
            )));
        }
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(Error::data(
                name,
                format!(
                    "row {}, column {} is {} (values must be finite)",
                    i / dim,
                    i % dim,
                    data[i]
                ),
            ));
        }
        let n_test = ((test_fraction * n as f64).round() as usize).clamp(1, n - 1);
        let perm = Rng::new(SPLIT_SEED).permutation(n);
        let gather = |rows: &[usize]| -> Vec<f32> {
            rows.iter()
                .flat_map(|&r| data[r * dim..(r + 1) * dim].iter().copied())
                .collect()
        };
        Ok(Self {
            name: name.to_string(),
            dim,
            test: gather(&perm[..n_test]),
            train: gather(&perm[n_test..]),
        })
    }

    /// Number of training rows.
    pub fn n_train(&self) -> usize {
        self.train.len() / self.dim
    }

    /// Number of held-out rows.
    pub fn n_test(&self) -> usize {
        self.test.len() / self.dim
    }
}

impl DataSource for ArraySource {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn kind(&self) -> DataKind {
        DataKind::Continuous
    }

    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        let v = sample_rows(&self.train, self.dim, batch_size, rng)?;
        Ok(Tensor::from_vec(v, (batch_size, self.dim), device)?)
    }

    fn test_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.test.clone(),
            (self.n_test(), self.dim),
            device,
        )?)
    }
}

/// `batch_size` rows of `rows` (row-major, `dim` columns) drawn uniformly with replacement.
pub(crate) fn sample_rows(
    rows: &[f32],
    dim: usize,
    batch_size: usize,
    rng: &mut Rng,
) -> Result<Vec<f32>> {
    if batch_size == 0 {
        return Err(Error::Config("batch size must be at least 1".into()));
    }
    let n = rows.len().checked_div(dim).unwrap_or(0);
    if n == 0 {
        return Err(Error::Shape("cannot draw a batch from no rows".into()));
    }
    let mut out = Vec::with_capacity(batch_size * dim);
    for _ in 0..batch_size {
        let r = rng.below(n);
        out.extend_from_slice(&rows[r * dim..(r + 1) * dim]);
    }
    Ok(out)
}
