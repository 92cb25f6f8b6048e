//! The library's error type: every failure a user can cause names the problem.

use std::path::PathBuf;

/// Errors returned by the elbo library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// Reading or writing a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A configuration value is missing, malformed or out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A dataset name that elbo does not know.
    #[error("unknown dataset '{name}'; known datasets: {known}")]
    UnknownDataset { name: String, known: String },
    /// A model family name that elbo does not know.
    #[error("unknown model '{name}'; known models: {known}")]
    UnknownModel { name: String, known: String },
    /// User data that cannot be parsed or has the wrong shape.
    #[error("bad data in {source_name}: {message}")]
    Data {
        source_name: String,
        message: String,
    },
    /// A checkpoint that is missing, truncated or inconsistent.
    #[error("checkpoint {path} is unusable: {message}")]
    Checkpoint { path: PathBuf, message: String },
    /// Shapes that do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// The training loss became NaN or infinite.
    #[error("non-finite loss {loss} at step {step}; {kept} (try a lower train.lr, train.grad_clip > 0, or a warm-up)")]
    NonFiniteLoss {
        step: usize,
        loss: f64,
        /// What is on disk, e.g. "the checkpoint of step 1000 is kept".
        kept: String,
    },
    /// Training diverged: weights or loss stopped being finite.
    #[error("training diverged at step {step}: {what}; {kept} (try a lower train.lr, train.grad_clip > 0, or a warm-up)")]
    Diverged {
        step: usize,
        what: String,
        /// What is on disk, e.g. "the last checkpoint with finite weights (step 1000) is kept".
        kept: String,
    },
    /// A run directory that cannot be used as asked: another process is training into it, or
    /// a new run would overwrite one that is there.
    #[error("{0}")]
    RunDir(String),
    /// A piece of work ran past its time budget.
    #[error("time budget exceeded: {0}")]
    Budget(String),
    /// A numerical routine failed (e.g. an ODE solver could not meet its tolerance).
    #[error("numerical failure: {0}")]
    Numerical(String),
}

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Wrap an `std::io::Error` with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A data error for the named source.
    pub fn data(source_name: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Data {
            source_name: source_name.into(),
            message: message.into(),
        }
    }

    /// A checkpoint error for the given path.
    pub fn checkpoint(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Checkpoint {
            path: path.into(),
            message: message.into(),
        }
    }
}
