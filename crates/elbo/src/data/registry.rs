//! Data set names -> [`DataSource`]s, and [`ArraySource`] for the user's own arrays.
//!
//! [`open`] accepts the eight toy names (`8gaussians`, `checkerboard`, ...), `digits`, `mnist`,
//! `mnist-binary`, and a path to a 2-D array: `PATH.npy` / `PATH.csv`, or `npy:PATH` /
//! `csv:PATH` for other file names.
//!
//! Every source has a train, a validation and a test split (see the [`super`] module docs);
//! [`DataConfig`] sets their sizes.

use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::digits::DigitsSource;
use super::mnist::MnistSource;
use super::text::TextSource;
use super::toy2d::{Toy2d, Toy2dSource};
use super::{csv, gather_rows, npy, split_train_val, DataKind, DataSource, Layout};
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
    "25gaussians",
    "digits",
    "shakespeare",
    "mnist",
    "mnist-binary",
    "PATH.npy",
    "PATH.csv",
    "PATH.txt (or text:PATH)",
    "codes:RUN (the codes of a vq-vae run)",
];

/// Seed of the fixed permutation that splits a user array into training and test rows.
const SPLIT_SEED: u64 = 0x5B17_DA7A;

/// Default [`DataConfig::val_size`].
pub const DEFAULT_VAL_SIZE: usize = 5000;
/// Default [`DataConfig::val_fraction`].
pub const DEFAULT_VAL_FRACTION: f64 = 0.1;

/// Data options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DataConfig {
    /// Test points of the toy 2-D sets (drawn once from a fixed generator). Default 5000.
    pub test_size: usize,
    /// Fraction of the rows of a user array (`.npy` / `.csv`), or of the end of a user text
    /// file, held out as the test split. Default 0.1.
    pub test_fraction: f64,
    /// Validation points of the toy 2-D sets, drawn once from a fixed generator stream of their
    /// own (neither the test stream nor the training draws). Default 5000, the default
    /// `test_size`, so validation and test estimates have the same Monte Carlo error.
    pub val_size: usize,
    /// Fraction of the training part of a finite data set held out as the validation split:
    /// of the training rows of digits, MNIST and user arrays (at least 1 row, leaving at least 1
    /// to train on), of the training tokens of a user text file, and (in whole works, the
    /// nearest count) of the training characters of Shakespeare. Must be in (0, 1); default 0.1.
    pub val_fraction: f64,
    /// Text data: tokens per example (window length).
    pub seq_len: usize,
    /// Text data: cap on the test windows and, separately, on the validation windows (0: all).
    pub test_windows: usize,
    /// CSV data: whether the first row is a header ("auto", "yes" or "no"; see
    /// [`csv::CsvHeader`]). Default "auto".
    pub csv_header: csv::CsvHeader,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            test_size: 5000,
            test_fraction: 0.1,
            val_size: DEFAULT_VAL_SIZE,
            val_fraction: DEFAULT_VAL_FRACTION,
            seq_len: 128,
            test_windows: 0,
            csv_header: csv::CsvHeader::Auto,
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
        if self.val_size == 0 {
            return Err(Error::Config("data.val_size must be at least 1".into()));
        }
        super::check_val_fraction(self.val_fraction)?;
        Ok(())
    }
}

/// Open a data set by name (see the module docs for the accepted forms).
pub fn open(name: &str, cfg: &DataConfig) -> Result<Box<dyn DataSource>> {
    cfg.validate()?;
    if let Some(toy) = Toy2d::from_name(name) {
        return Ok(Box::new(Toy2dSource::with_sizes(
            toy,
            cfg.test_size,
            cfg.val_size,
        )?));
    }
    if let Some(dir) = super::codes::run_dir(name) {
        return Ok(Box::new(super::codes::CodesSource::open(name, &dir)?));
    }
    if name == "digits" {
        return Ok(Box::new(DigitsSource::with_val_fraction(cfg.val_fraction)?));
    }
    if name == "shakespeare" {
        return Ok(Box::new(TextSource::shakespeare_with_val(
            cfg.seq_len,
            cfg.test_windows,
            cfg.val_fraction,
        )?));
    }
    if name == "mnist" || name == "mnist-binary" {
        return Ok(Box::new(MnistSource::with_val_fraction(
            name == "mnist-binary",
            cfg.val_fraction,
        )?));
    }
    let lower = name.to_ascii_lowercase();
    let text_path = name
        .strip_prefix("text:")
        .or_else(|| lower.ends_with(".txt").then_some(name));
    if let Some(p) = text_path {
        return Ok(Box::new(TextSource::from_file_split(
            Path::new(p),
            cfg.seq_len,
            cfg.test_windows,
            cfg.test_fraction,
            cfg.val_fraction,
        )?));
    }
    let (data, shape) = if let Some(p) = name.strip_prefix("npy:") {
        npy::read_npy(Path::new(p))?
    } else if let Some(p) = name.strip_prefix("csv:") {
        csv::read_csv_with(Path::new(p), cfg.csv_header)?
    } else if lower.ends_with(".npy") {
        npy::read_npy(Path::new(name))?
    } else if lower.ends_with(".csv") {
        csv::read_csv_with(Path::new(name), cfg.csv_header)?
    } else {
        return Err(Error::UnknownDataset {
            name: name.to_string(),
            known: KNOWN_DATASETS.join(", "),
        });
    };
    Ok(Box::new(ArraySource::with_val_fraction(
        name,
        data,
        &shape,
        cfg.test_fraction,
        cfg.val_fraction,
    )?))
}

/// A user-supplied 2-D array `[N, D]` of real vectors, split by fixed permutations (independent
/// of the run seed):
///
/// - test: the first `round(test_fraction * N)` rows of a permutation of all rows (at least 1,
///   leaving at least 1);
/// - validation: `round(val_fraction * M)` of the `M` remaining rows (at least 1, leaving at
///   least 1), picked by [`split_train_val`];
/// - train: the rest; training batches draw them uniformly with replacement.
///
/// So `N >= 3` rows are needed.
#[derive(Clone, Debug)]
pub struct ArraySource {
    name: String,
    dim: usize,
    train_rows: Vec<usize>,
    val_rows: Vec<usize>,
    test_rows: Vec<usize>,
    train: Vec<f32>,
    val: Vec<f32>,
    test: Vec<f32>,
}

impl ArraySource {
    /// [`ArraySource::with_val_fraction`] with the default `val_fraction` (0.1).
    pub fn new(name: &str, data: Vec<f32>, shape: &[usize], test_fraction: f64) -> Result<Self> {
        Self::with_val_fraction(name, data, shape, test_fraction, DEFAULT_VAL_FRACTION)
    }

    /// Split `data` (row-major with `shape` `[N, D]`) into train, validation and test rows.
    /// Errors when the array is not 2-D, has fewer than 2 rows or no columns, holds NaN or
    /// infinity, `test_fraction` or `val_fraction` is not in (0, 1) (`Error::Config`), or too
    /// few rows are left after the test split to hold out validation rows (`Error::Config`).
    pub fn with_val_fraction(
        name: &str,
        data: Vec<f32>,
        shape: &[usize],
        test_fraction: f64,
        val_fraction: f64,
    ) -> Result<Self> {
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
        // The test rows, in permutation order, are exactly those of the two-way split this
        // source had before it had a validation split.
        let test_rows = perm[..n_test].to_vec();
        let rest = &perm[n_test..];
        let (train_pos, val_pos) = split_train_val(rest.len(), val_fraction, name)?;
        let train_rows: Vec<usize> = train_pos.iter().map(|&i| rest[i]).collect();
        let val_rows: Vec<usize> = val_pos.iter().map(|&i| rest[i]).collect();
        Ok(Self {
            name: name.to_string(),
            dim,
            test: gather_rows(&data, dim, &test_rows),
            val: gather_rows(&data, dim, &val_rows),
            train: gather_rows(&data, dim, &train_rows),
            train_rows,
            val_rows,
            test_rows,
        })
    }

    /// Number of training rows.
    pub fn n_train(&self) -> usize {
        self.train_rows.len()
    }

    /// Number of validation rows.
    pub fn n_val(&self) -> usize {
        self.val_rows.len()
    }

    /// Number of test rows.
    pub fn n_test(&self) -> usize {
        self.test_rows.len()
    }

    /// Indices (rows of the input array) of the training rows, in the order batches index them.
    pub fn train_rows(&self) -> &[usize] {
        &self.train_rows
    }

    /// Indices of the validation rows, in [`DataSource::val_set`] order.
    pub fn val_rows(&self) -> &[usize] {
        &self.val_rows
    }

    /// Indices of the test rows, in [`DataSource::test_set`] order.
    pub fn test_rows(&self) -> &[usize] {
        &self.test_rows
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

    fn layout(&self) -> Layout {
        Layout::Flat
    }

    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        let v = sample_rows(&self.train, self.dim, batch_size, rng)?;
        Ok(Tensor::from_vec(v, (batch_size, self.dim), device)?)
    }

    fn train_set(&self, device: &Device) -> Result<Option<Tensor>> {
        let n = self.train.len() / self.dim;
        Ok(Some(Tensor::from_vec(
            self.train.clone(),
            (n, self.dim),
            device,
        )?))
    }

    fn val_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.val.clone(),
            (self.n_val(), self.dim),
            device,
        )?)
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

/// The user file a data-set name reads (`text:PATH`, `npy:PATH`, `csv:PATH`, or a path ending
/// in `.txt`, `.npy` or `.csv`), `None` for the built-in and generated sets. A run records this
/// file's fingerprint, so that a later resume or evaluation can tell when it changed.
pub fn user_file(name: &str) -> Option<std::path::PathBuf> {
    if Toy2d::from_name(name).is_some()
        || matches!(name, "digits" | "shakespeare" | "mnist" | "mnist-binary")
        || name.starts_with(super::codes::PREFIX)
    {
        return None;
    }
    for prefix in ["text:", "npy:", "csv:"] {
        if let Some(p) = name.strip_prefix(prefix) {
            return Some(p.into());
        }
    }
    let lower = name.to_ascii_lowercase();
    [".txt", ".npy", ".csv"]
        .iter()
        .any(|ext| lower.ends_with(ext))
        .then(|| name.into())
}
