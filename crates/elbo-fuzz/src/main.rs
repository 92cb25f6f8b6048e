//! `elbo-fuzz`: run the seeded loader fuzzer (see the library documentation).
//!
//! ```text
//! elbo-fuzz --loader npy|csv|text|config|checkpoint|all --inputs N --seed S [--repro FILE]
//! cargo run --release -p elbo-fuzz -- --loader all --inputs 1000000 --seed 1
//! ```
//!
//! Exit status: 0 when no input panicked, 1 on any failure, 2 on bad arguments, 3 on a hang.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use elbo_fuzz::{fuzz, run_one, Loader};

/// Seeded mutation fuzzing of elbo's loaders.
#[derive(Parser, Debug)]
#[command(name = "elbo-fuzz")]
struct Args {
    /// npy, csv, text, config, checkpoint or all.
    #[arg(long, default_value = "all")]
    loader: String,
    /// Inputs per loader.
    #[arg(long, default_value_t = 10_000)]
    inputs: u64,
    /// Seed of the input generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run one reproducer file (written by an earlier failure) through --loader.
    #[arg(long)]
    repro: Option<PathBuf>,
    /// Time limit of one input in seconds (a longer input is a hang).
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Folder for reproducer files.
    #[arg(long, default_value = "fuzz-failures")]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let loaders: Vec<Loader> = if args.loader == "all" {
        Loader::ALL.to_vec()
    } else if let Some(l) = Loader::from_name(&args.loader) {
        vec![l]
    } else {
        eprintln!(
            "unknown --loader '{}': use npy, csv, text, config, checkpoint or all",
            args.loader
        );
        return ExitCode::from(2);
    };
    if let Some(path) = &args.repro {
        let input = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("cannot read {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
        for l in loaders {
            // a panic here prints its message and ends with a non-zero status
            println!("{}: {:?}", l.name(), run_one(l, &input));
        }
        return ExitCode::SUCCESS;
    }
    if !(args.timeout > 0.0 && args.timeout.is_finite()) {
        eprintln!("--timeout must be a positive number of seconds");
        return ExitCode::from(2);
    }
    let limit = Duration::from_secs_f64(args.timeout);
    println!(
        "{:<11} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "loader", "inputs", "errors", "accepted", "failures", "seconds"
    );
    let mut failed = false;
    for l in loaders {
        let r = fuzz(l, args.inputs, args.seed, limit, &args.out, true);
        println!(
            "{:<11} {:>10} {:>10} {:>10} {:>9} {:>9.1}",
            l.name(),
            r.inputs,
            r.errors,
            r.accepted,
            r.failures,
            r.seconds
        );
        failed |= r.failures > 0;
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
