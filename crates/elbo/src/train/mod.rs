//! The thin training layer candle lacks: AdamW with saveable state, learning-rate schedules,
//! gradient clipping, EMA weights, atomic checkpoints, and one explicit training loop.

pub mod checkpoint;
pub mod clip;
pub mod ema;
pub mod optim;
pub mod rmsprop;
pub mod run;
pub mod run_dir;
pub mod schedule;
pub mod step;
pub mod trainer;

pub use run::{CheckpointChoice, LoadedRun};
pub use trainer::{ModelBuilder, TrainOutcome, Trainer};
