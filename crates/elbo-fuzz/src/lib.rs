//! A seeded mutation fuzzer for elbo's input loaders, on stable Rust.
//!
//! For each loader it builds a pool of valid inputs ([`gen`]) and runs `N` inputs, each a pool
//! entry mutated by [`mutate`] (one in eight left valid), drawn from `elbo::Rng::new(seed)`
//! forked by the input index, so `(loader, seed, index)` regenerates any input. Every input runs
//! under `std::panic::catch_unwind`: an `Err` from the loader is an expected rejection, `Ok` an
//! acceptance, and a panic a failure, reported with the loader, seed and input index and written
//! to a reproducer file. A watchdog thread ends the process with exit code 3 (after writing the
//! reproducer) when one input runs longer than the time limit. An abort (an allocation failure)
//! ends the process with a non-zero status by itself.
//!
//! Loaders: `npy` (`read_npy_bytes`), `csv` (`parse_csv_bytes` with the header rule picked by
//! the input length), `text` (`TextSource::from_bytes`, then one training batch and the held-out
//! sets), `config` (`Config::from_toml_str` and `Config::from_json_str`), `checkpoint`
//! (`checkpoint::load_from`, which reaches `candle_core::safetensors::load_buffer`; half of
//! the mutated checkpoints get a manifest recomputed to match, so the mutated tensor bytes are
//! parsed rather than stopped by the hash).
//!
//! The full run, 10^6 inputs per loader:
//!
//! ```text
//! cargo run --release -p elbo-fuzz -- --loader all --inputs 1000000 --seed 1
//! ```

pub mod gen;
pub mod mutate;
pub mod run;

pub use run::{fuzz, run_one, Loader, Outcome, Report};
