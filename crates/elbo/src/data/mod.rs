//! Datasets turned into batches.
//!
//! Every data set is a [`DataSource`]: it draws training batches from the caller's [`Rng`] (so a
//! resumed run draws the same batches) and owns a fixed held-out set that does not depend on the
//! run's seed, so runs with different seeds are compared on the same examples.

use candle_core::{Device, Tensor};

use crate::{Result, Rng};

pub mod csv;
pub mod digits;
pub mod mnist;
pub mod npy;
pub mod registry;
pub mod text;
pub mod toy2d;

pub use registry::{open, DataConfig, KNOWN_DATASETS};

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

/// A data set: training batches on demand and a fixed held-out set.
pub trait DataSource: Send {
    /// The data set's name as the user typed it (e.g. "8gaussians").
    fn name(&self) -> &str;
    /// Dimensions of one example.
    fn dim(&self) -> usize;
    /// Continuous or discrete.
    fn kind(&self) -> DataKind;
    /// A training batch, `[batch_size, dim]` f32, drawn with `rng`.
    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor>;
    /// The fixed held-out set, `[n_test, dim]` f32.
    fn test_set(&self, device: &Device) -> Result<Tensor>;
    /// The true differential entropy of the data distribution in nats per example, where known
    /// (e.g. 8gaussians, checkerboard); a model's NLL cannot go below it on fresh samples.
    fn entropy(&self) -> Option<f64> {
        None
    }
    /// Image shape `(height, width)` when examples are images.
    fn image_shape(&self) -> Option<(usize, usize)> {
        None
    }
    /// The tokenizer of text data (token ids <-> text), for prompts and decoded samples.
    fn tokenizer(&self) -> Option<&text::Tokenizer> {
        None
    }
}
