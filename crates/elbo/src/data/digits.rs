//! scikit-learn's 8x8 handwritten digits (UCI optdigits test set), embedded in the binary.
//!
//! The vendored file `data/digits.csv.gz` (see `data/README.md` for source and licence) has 1797
//! rows of 65 comma-separated integers: 64 pixels (row-major 8x8, grey levels 0..16) and the
//! label 0..9.
//!
//! Splits (fixed, independent of the run seed): rows `1500..1797` are the test split (297
//! images); of rows `0..1500`, `round(val_fraction * 1500)` picked by
//! [`split_train_val`](super::split_train_val) are the validation split (150 with the default
//! `val_fraction` 0.1) and the rest (1350) the training split.

use std::io::Read;

use candle_core::{Device, Tensor};
use flate2::read::GzDecoder;

use super::registry::DEFAULT_VAL_FRACTION;
use super::{split_train_val, DataKind, DataSource, Layout};
use crate::{Error, Result, Rng};

/// The gzipped CSV, embedded at compile time.
const DIGITS_CSV_GZ: &[u8] = include_bytes!("../../../../data/digits.csv.gz");
/// Name used in error messages about the embedded file.
const SOURCE_NAME: &str = "embedded data/digits.csv.gz";

/// Number of images in the data set.
pub const N_IMAGES: usize = 1797;
/// Number of images before the test split (rows `0..N_TRAIN`), from which the training and
/// validation splits are drawn.
pub const N_TRAIN: usize = 1500;
/// Pixels per image (8x8).
pub const PIXELS: usize = 64;
/// Grey levels per pixel (0..=16).
pub const LEVELS: usize = 17;

/// The whole digits data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digits {
    /// Pixels, `[1797 * 64]`, row-major 8x8 per image, values 0..=16.
    pub images: Vec<u8>,
    /// Labels 0..=9, one per image.
    pub labels: Vec<u8>,
}

impl Digits {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 64 pixels of image `i` (panics if `i >= len()`).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// Pixels of images `rows` as f32, row-major `[rows.len(), 64]`.
    fn pixels_f32(&self, rows: &[usize]) -> Vec<f32> {
        rows.iter()
            .flat_map(|&i| self.image(i).iter().map(|&p| f32::from(p)))
            .collect()
    }
}

/// Decompress and parse the embedded digits.
pub fn load() -> Result<Digits> {
    let mut text = String::new();
    GzDecoder::new(DIGITS_CSV_GZ)
        .read_to_string(&mut text)
        .map_err(|e| Error::data(SOURCE_NAME, format!("cannot decompress: {e}")))?;
    let mut images = Vec::with_capacity(N_IMAGES * PIXELS);
    let mut labels = Vec::with_capacity(N_IMAGES);
    for (lineno, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = |m: String| Error::data(SOURCE_NAME, format!("line {}: {m}", lineno + 1));
        let fields: Vec<&str> = line.split(',').collect();
        if fields.len() != PIXELS + 1 {
            return Err(bad(format!(
                "expected {} fields, found {}",
                PIXELS + 1,
                fields.len()
            )));
        }
        for (k, f) in fields.iter().enumerate() {
            let v: u8 = f
                .trim()
                .parse()
                .map_err(|_| bad(format!("field {} '{f}' is not an integer", k + 1)))?;
            if k < PIXELS {
                if usize::from(v) >= LEVELS {
                    return Err(bad(format!("pixel value {v} is outside 0..=16")));
                }
                images.push(v);
            } else {
                if v > 9 {
                    return Err(bad(format!("label {v} is outside 0..=9")));
                }
                labels.push(v);
            }
        }
    }
    if labels.len() != N_IMAGES {
        return Err(Error::data(
            SOURCE_NAME,
            format!("expected {N_IMAGES} images, found {}", labels.len()),
        ));
    }
    Ok(Digits { images, labels })
}

/// The digits as a [`DataSource`]: 64 discrete dimensions with 17 levels, images 1x8x8.
#[derive(Clone, Debug)]
pub struct DigitsSource {
    train_rows: Vec<usize>,
    val_rows: Vec<usize>,
    train: Vec<f32>,
    val: Vec<f32>,
    test: Vec<f32>,
}

impl DigitsSource {
    /// [`DigitsSource::with_val_fraction`] with the default `val_fraction` (0.1): 1350 training,
    /// 150 validation and 297 test images.
    pub fn new() -> Result<Self> {
        Self::with_val_fraction(DEFAULT_VAL_FRACTION)
    }

    /// Load the embedded digits and split them (see the module docs); `Error::Config` when
    /// `val_fraction` is not in (0, 1).
    pub fn with_val_fraction(val_fraction: f64) -> Result<Self> {
        let d = load()?;
        let (train_rows, val_rows) = split_train_val(N_TRAIN, val_fraction, "digits")?;
        let test_rows: Vec<usize> = (N_TRAIN..d.len()).collect();
        Ok(Self {
            train: d.pixels_f32(&train_rows),
            val: d.pixels_f32(&val_rows),
            test: d.pixels_f32(&test_rows),
            train_rows,
            val_rows,
        })
    }

    /// Number of training images (1350 with the default `val_fraction`).
    pub fn n_train(&self) -> usize {
        self.train_rows.len()
    }

    /// Number of validation images (150 with the default `val_fraction`).
    pub fn n_val(&self) -> usize {
        self.val_rows.len()
    }

    /// Number of test images (297).
    pub fn n_test(&self) -> usize {
        self.test.len() / PIXELS
    }

    /// Rows of [`load`] in the training split, ascending.
    pub fn train_rows(&self) -> &[usize] {
        &self.train_rows
    }

    /// Rows of [`load`] in the validation split, ascending ([`DataSource::val_set`] order).
    pub fn val_rows(&self) -> &[usize] {
        &self.val_rows
    }

    /// Rows of [`load`] in the test split (`1500..1797`, [`DataSource::test_set`] order).
    pub fn test_rows(&self) -> std::ops::Range<usize> {
        N_TRAIN..N_IMAGES
    }
}

impl DataSource for DigitsSource {
    fn name(&self) -> &str {
        "digits"
    }

    fn dim(&self) -> usize {
        PIXELS
    }

    fn kind(&self) -> DataKind {
        DataKind::Discrete { levels: LEVELS }
    }

    fn layout(&self) -> Layout {
        Layout::Image {
            channels: 1,
            height: 8,
            width: 8,
        }
    }

    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        let v = super::registry::sample_rows(&self.train, PIXELS, batch_size, rng)?;
        Ok(Tensor::from_vec(v, (batch_size, PIXELS), device)?)
    }

    fn train_set(&self, device: &Device) -> Result<Option<Tensor>> {
        let n = self.train.len() / PIXELS;
        Ok(Some(Tensor::from_vec(
            self.train.clone(),
            (n, PIXELS),
            device,
        )?))
    }

    fn val_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.val.clone(),
            (self.n_val(), PIXELS),
            device,
        )?)
    }

    fn test_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.test.clone(),
            (self.n_test(), PIXELS),
            device,
        )?)
    }
}
