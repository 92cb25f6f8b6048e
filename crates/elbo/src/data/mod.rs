//! Datasets turned into batches.
//!
//! Every data set is a [`DataSource`] with three disjoint splits:
//!
//! - **train**: [`DataSource::train_batch`] draws training batches from the caller's [`Rng`] (so
//!   a resumed run draws the same batches);
//! - **validation**: [`DataSource::val_set`], a fixed set that does not depend on the run's seed,
//!   for everything a training run decides from held-out data: periodic evaluation, choosing the
//!   best checkpoint, early stopping;
//! - **test**: [`DataSource::test_set`], a fixed set that does not depend on the run's seed and
//!   that training never reads; only `elbo eval` reports on it, so a best-checkpoint figure is not
//!   biased by having been selected on the examples it is measured on.
//!
//! How each source splits:
//!
//! - the generated 2-D toys ([`toy2d`]) draw the test set and the validation set once each, from
//!   two different fixed generator streams (sizes [`DataConfig::test_size`] and
//!   [`DataConfig::val_size`]); training batches are fresh samples from the run's generator;
//! - the finite sets (`digits`, `mnist`, `mnist-binary`, user `.npy` / `.csv` arrays) keep their
//!   fixed test rows, and hold out [`DataConfig::val_fraction`] of the remaining training rows as
//!   validation, chosen by a fixed permutation ([`split_train_val`]); batches are drawn only from
//!   the rows left;
//! - text ([`text`]) holds out the last training works (Shakespeare) or the last
//!   [`DataConfig::val_fraction`] of the training text (user files) as validation, cut into
//!   windows like the test windows.
//!
//! Validation and test sets are the same for every run seed, so runs with different seeds are
//! compared on the same examples.

use candle_core::{Device, Tensor};

use crate::{Error, Result, Rng};

pub mod codes;
pub mod csv;
pub mod digits;
pub mod mnist;
pub mod npy;
pub mod registry;
pub mod text;
pub mod toy2d;

pub use registry::{open, DataConfig, KNOWN_DATASETS};

/// Seed of the fixed permutation that picks the validation rows of a finite data set.
const VAL_SPLIT_SEED: u64 = 0x7A11_DA7E;

/// Whether the examples are real vectors or discrete levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DataKind {
    /// Real-valued vectors in R^D.
    Continuous,
    /// Integer levels 0..levels-1 stored as f32 (e.g. 8x8 digits: 17 grey levels).
    Discrete {
        /// Number of levels per dimension.
        levels: usize,
    },
}

/// How the `dim` values of one example are arranged. Examples are always stored flat
/// (`[n, dim]`); the layout says how to reshape one row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Layout {
    /// A plain vector (the 2-D toys, user arrays).
    Flat,
    /// An image stored channel-major then row-major: `[channels, height, width]`.
    Image {
        /// Channels (1 for grey levels).
        channels: usize,
        /// Rows.
        height: usize,
        /// Columns.
        width: usize,
    },
    /// A sequence of `len` token ids.
    Sequence {
        /// Tokens per example.
        len: usize,
    },
}

impl Layout {
    /// Values per example under this layout; `None` for [`Layout::Flat`], whose length is the
    /// source's `dim`.
    pub fn dim(&self) -> Option<usize> {
        match *self {
            Layout::Flat => None,
            Layout::Image {
                channels,
                height,
                width,
            } => Some(channels * height * width),
            Layout::Sequence { len } => Some(len),
        }
    }
}

/// One of the three splits of a data set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    /// What training batches are drawn from.
    Train,
    /// Held out for periodic evaluation, best-checkpoint selection and early stopping.
    Val,
    /// Held out for the final report (`elbo eval`).
    Test,
}

/// A data set: training batches on demand and fixed validation and test sets.
pub trait DataSource: Send {
    /// The data set's name as the user typed it (e.g. "8gaussians").
    fn name(&self) -> &str;
    /// Dimensions of one example.
    fn dim(&self) -> usize;
    /// Continuous or discrete.
    fn kind(&self) -> DataKind;
    /// How one example's `dim` values are arranged.
    fn layout(&self) -> Layout;
    /// A training batch, `[batch_size, dim]` f32, drawn with `rng`.
    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor>;
    /// The fixed validation set, `[n_val, dim]` f32: disjoint from the test set and from what
    /// [`DataSource::train_batch`] draws, and the same for every run seed. Training reads it for
    /// periodic evaluation, best-checkpoint selection and early stopping.
    fn val_set(&self, device: &Device) -> Result<Tensor>;
    /// The fixed test set, `[n_test, dim]` f32, the same for every run seed; only the final
    /// evaluation (`elbo eval`) reads it.
    fn test_set(&self, device: &Device) -> Result<Tensor>;
    /// Every training row, `[n_train, dim]` f32, for a finite data set (`None` for generated
    /// data and text windows): what a derived data set such as `codes:RUN` transforms.
    fn train_set(&self, device: &Device) -> Result<Option<Tensor>> {
        let _ = device;
        Ok(None)
    }
    /// Levels per dimension of discrete data (`None` when continuous), from [`DataSource::kind`].
    fn levels(&self) -> Option<usize> {
        match self.kind() {
            DataKind::Continuous => None,
            DataKind::Discrete { levels } => Some(levels),
        }
    }
    /// The true differential entropy of the data distribution in nats per example, where known
    /// (e.g. 8gaussians, checkerboard); a model's NLL cannot go below it on fresh samples.
    fn entropy(&self) -> Option<f64> {
        None
    }
    /// Image shape `(height, width)` when examples are images, from [`DataSource::layout`].
    fn image_shape(&self) -> Option<(usize, usize)> {
        match self.layout() {
            Layout::Image { height, width, .. } => Some((height, width)),
            _ => None,
        }
    }
    /// The tokenizer of text data (token ids <-> text), for prompts and decoded samples.
    fn tokenizer(&self) -> Option<&text::Tokenizer> {
        None
    }
}

/// Number of validation rows out of `n_train` training rows: `round(val_fraction * n_train)`,
/// at least 1 and leaving at least 1 to train on. Errors (`Error::Config`, naming
/// `data.val_fraction`) when `val_fraction` is not in (0, 1) or `n_train < 2`.
pub fn n_val_rows(n_train: usize, val_fraction: f64, source: &str) -> Result<usize> {
    check_val_fraction(val_fraction)?;
    if n_train < 2 {
        return Err(Error::Config(format!(
            "data.val_fraction: {source} has {n_train} training row(s) after the test split; \
             a validation split needs at least 2 (1 to validate, 1 to train)"
        )));
    }
    Ok(((val_fraction * n_train as f64).round() as usize).clamp(1, n_train - 1))
}

/// Split training positions `0..n_train` into `(train, val)`, both sorted: the validation
/// positions are the first [`n_val_rows`] of a fixed permutation (its seed is a constant, so
/// the split is the same for every run seed, and a larger `val_fraction` holds out a superset).
pub fn split_train_val(
    n_train: usize,
    val_fraction: f64,
    source: &str,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let n_val = n_val_rows(n_train, val_fraction, source)?;
    let perm = Rng::new(VAL_SPLIT_SEED).permutation(n_train);
    let mut val = perm[..n_val].to_vec();
    let mut train = perm[n_val..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    Ok((train, val))
}

/// `Error::Config` naming `data.val_fraction` unless it is in (0, 1).
pub(crate) fn check_val_fraction(val_fraction: f64) -> Result<()> {
    if val_fraction > 0.0 && val_fraction < 1.0 {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "data.val_fraction must be in (0, 1), got {val_fraction}"
        )))
    }
}

/// Rows `rows` of the row-major `data` (`dim` columns), concatenated.
pub(crate) fn gather_rows(data: &[f32], dim: usize, rows: &[usize]) -> Vec<f32> {
    rows.iter()
        .flat_map(|&r| data[r * dim..(r + 1) * dim].iter().copied())
        .collect()
}
