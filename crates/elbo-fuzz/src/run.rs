//! Running inputs through the loaders: one input ([`run_one`]) and a whole campaign
//! ([`fuzz`]) with panic capture, a hang watchdog and reproducer files.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use elbo::config::Config;
use elbo::data::csv::{parse_csv_bytes, CsvHeader};
use elbo::data::npy::read_npy_bytes;
use elbo::data::text::TextSource;
use elbo::data::DataSource;
use elbo::train::checkpoint;
use elbo::Rng;

use crate::{gen, mutate};

/// A fuzzed loader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loader {
    /// `.npy` bytes.
    Npy,
    /// CSV bytes.
    Csv,
    /// Byte-level text.
    Text,
    /// TOML config / saved `config.json`.
    Config,
    /// Checkpoint directory (state.json + safetensors), packed by [`gen::pack`].
    Checkpoint,
}

impl Loader {
    /// Every loader, in report order.
    pub const ALL: [Loader; 5] = [
        Loader::Npy,
        Loader::Csv,
        Loader::Text,
        Loader::Config,
        Loader::Checkpoint,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Loader::Npy => "npy",
            Loader::Csv => "csv",
            Loader::Text => "text",
            Loader::Config => "config",
            Loader::Checkpoint => "checkpoint",
        }
    }

    /// The loader of a command-line name.
    pub fn from_name(name: &str) -> Option<Loader> {
        Loader::ALL.into_iter().find(|l| l.name() == name)
    }

    /// Number of valid inputs generated up front for mutation.
    fn pool_size(self) -> usize {
        match self {
            Loader::Checkpoint => 6,
            Loader::Config => 24,
            _ => 64,
        }
    }

    /// One valid input.
    fn generate(self, rng: &mut Rng) -> Vec<u8> {
        match self {
            Loader::Npy => gen::npy(rng),
            Loader::Csv => gen::csv(rng),
            Loader::Text => gen::text(rng),
            Loader::Config => gen::config(rng),
            Loader::Checkpoint => gen::checkpoint(rng)
                .map(|f| gen::pack(&f))
                .unwrap_or_default(),
        }
    }

    /// A mutated input from `pool` (one in eight left as generated).
    fn input(self, pool: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
        let mut x = pool[rng.below(pool.len())].clone();
        if rng.below(8) == 0 {
            return x;
        }
        let other = &pool[rng.below(pool.len())];
        if self != Loader::Checkpoint {
            mutate::mutate(&mut x, other, rng);
            return x;
        }
        // Checkpoints: mutate one file (or, rarely, the packed whole), then maybe repair the
        // manifest so the mutated tensor bytes reach the safetensors parser.
        if rng.below(16) == 0 {
            mutate::mutate(&mut x, other, rng);
            return x;
        }
        let (Some(mut files), Some(others)) = (gen::unpack(&x), gen::unpack(other)) else {
            return x;
        };
        let i = rng.below(files.len());
        let o = &others[rng.below(others.len())].1;
        mutate::mutate(&mut files[i].1, o, rng);
        if rng.below(2) == 0 {
            gen::fix_manifest(&mut files);
        }
        gen::pack(&files)
    }
}

/// What one input did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The loader accepted the input.
    Accepted,
    /// The loader returned an error (an expected rejection), with its message.
    Rejected(String),
}

/// Run one input through `loader`; a panic propagates (the caller catches it).
pub fn run_one(loader: Loader, input: &[u8]) -> Outcome {
    let verdict = |r: elbo::Result<()>| match r {
        Ok(()) => Outcome::Accepted,
        Err(e) => Outcome::Rejected(e.to_string()),
    };
    match loader {
        Loader::Npy => verdict(read_npy_bytes(input, "fuzz.npy").map(|_| ())),
        Loader::Csv => {
            let header = [CsvHeader::Auto, CsvHeader::Yes, CsvHeader::No][input.len() % 3];
            verdict(parse_csv_bytes(input, "fuzz.csv", header).map(|_| ()))
        }
        Loader::Text => {
            let seq_len = 1 + input.first().map_or(0, |&b| usize::from(b % 16));
            verdict(text(input, seq_len))
        }
        Loader::Config => {
            let text = String::from_utf8_lossy(input);
            let toml = Config::from_toml_str(&text, "fuzz.toml");
            let json = Config::from_json_str(&text, "config.json");
            match (toml, json) {
                (Ok(_), _) | (_, Ok(_)) => Outcome::Accepted,
                (Err(e), Err(_)) => Outcome::Rejected(e.to_string()),
            }
        }
        Loader::Checkpoint => {
            let Some(files) = gen::unpack(input) else {
                return Outcome::Rejected("broken packing of the fuzz input".into());
            };
            let Some((_, state)) = files.first() else {
                return Outcome::Rejected("no state.json".into());
            };
            let read = |file: &str| {
                files
                    .iter()
                    .find(|(n, _)| n == file)
                    .map(|(_, d)| d.clone())
                    .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
            };
            verdict(
                checkpoint::load_from(Path::new("fuzz-ckpt"), state, read, &Device::Cpu)
                    .map(|_| ()),
            )
        }
    }
}

/// The text source over `input`, then one training batch and the held-out sets.
fn text(input: &[u8], seq_len: usize) -> elbo::Result<()> {
    let mut src = TextSource::from_bytes("fuzz.txt", input, seq_len, 0, 0.2, 0.2)?;
    let dev = Device::Cpu;
    let mut rng = Rng::new(input.len() as u64);
    src.train_batch(2, &mut rng, &dev)?;
    src.val_set(&dev)?;
    src.test_set(&dev)?;
    Ok(())
}

/// Counts for one loader.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Inputs run.
    pub inputs: u64,
    /// Expected rejections (the loader returned an error).
    pub errors: u64,
    /// Inputs the loader accepted.
    pub accepted: u64,
    /// Panics (each written to a reproducer file).
    pub failures: u64,
    /// Wall time.
    pub seconds: f64,
    /// The reproducer files written.
    pub repro_files: Vec<PathBuf>,
    /// Rejections by kind: the message without digits, cut to 100 characters.
    pub rejection_kinds: BTreeMap<String, u64>,
}

/// The kind of a rejection message: digits dropped (offsets, lengths), cut to 100 characters.
fn kind(message: &str) -> String {
    message
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(100)
        .collect()
}

/// State the watchdog reads.
struct Watch {
    started_ms: AtomicU64,
    index: AtomicU64,
    input: Mutex<Arc<Vec<u8>>>,
    done: AtomicBool,
}

/// Write `input` to `out/<loader>-seed<seed>-input<index>.bin`; returns the path.
fn write_repro(out: &Path, loader: Loader, seed: u64, index: u64, input: &[u8]) -> PathBuf {
    let path = out.join(format!("{}-seed{seed}-input{index}.bin", loader.name()));
    if let Err(e) = std::fs::create_dir_all(out).and_then(|_| std::fs::write(&path, input)) {
        eprintln!("cannot write the reproducer {}: {e}", path.display());
    }
    path
}

/// Run `inputs` inputs through `loader` from `seed`; panics are counted, reported on stderr and
/// written under `out`. A single input running over `limit` ends the process (exit code 3)
/// after writing its reproducer. `progress` prints a line to stderr every few seconds.
pub fn fuzz(
    loader: Loader,
    inputs: u64,
    seed: u64,
    limit: Duration,
    out: &Path,
    progress: bool,
) -> Report {
    let t0 = Instant::now();
    let base = Rng::new(seed);
    let mut pool_rng = base.fork(u64::MAX);
    let pool: Vec<Vec<u8>> = (0..loader.pool_size())
        .map(|_| loader.generate(&mut pool_rng))
        .collect();

    let watch = Arc::new(Watch {
        started_ms: AtomicU64::new(u64::MAX),
        index: AtomicU64::new(0),
        input: Mutex::new(Arc::new(Vec::new())),
        done: AtomicBool::new(false),
    });
    let dog = {
        let watch = Arc::clone(&watch);
        let out = out.to_path_buf();
        std::thread::spawn(move || {
            while !watch.done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                let started = watch.started_ms.load(Ordering::Relaxed);
                let now = t0.elapsed().as_millis() as u64;
                if started != u64::MAX && now.saturating_sub(started) > limit.as_millis() as u64 {
                    let index = watch.index.load(Ordering::Relaxed);
                    let input = watch
                        .input
                        .lock()
                        .map(|g| Arc::clone(&g))
                        .unwrap_or_default();
                    let path = write_repro(&out, loader, seed, index, &input);
                    eprintln!(
                        "HANG: loader {} seed {seed} input {index} ran over {:?}; reproducer {} \
                         (elbo-fuzz --loader {} --repro {})",
                        loader.name(),
                        limit,
                        path.display(),
                        loader.name(),
                        path.display()
                    );
                    std::process::exit(3);
                }
            }
        })
    };

    let mut report = Report::default();
    let mut last = Instant::now();
    for index in 0..inputs {
        let mut rng = base.fork(index);
        let input = Arc::new(loader.input(&pool, &mut rng));
        if let Ok(mut g) = watch.input.lock() {
            *g = Arc::clone(&input);
        }
        watch.index.store(index, Ordering::Relaxed);
        watch
            .started_ms
            .store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        let result = catch_unwind(AssertUnwindSafe(|| run_one(loader, &input)));
        watch.started_ms.store(u64::MAX, Ordering::Relaxed);
        report.inputs += 1;
        match result {
            Ok(Outcome::Accepted) => report.accepted += 1,
            Ok(Outcome::Rejected(m)) => {
                report.errors += 1;
                *report.rejection_kinds.entry(kind(&m)).or_default() += 1;
            }
            Err(_) => {
                report.failures += 1;
                let path = write_repro(out, loader, seed, index, &input);
                eprintln!(
                    "FAILURE: loader {} panicked on seed {seed} input {index}; reproducer {} \
                     (elbo-fuzz --loader {} --repro {})",
                    loader.name(),
                    path.display(),
                    loader.name(),
                    path.display()
                );
                report.repro_files.push(path);
            }
        }
        if progress && last.elapsed() > Duration::from_secs(5) {
            last = Instant::now();
            eprintln!(
                "  {}: {}/{inputs} inputs, {} failures, {:.0} s",
                loader.name(),
                index + 1,
                report.failures,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    watch.done.store(true, Ordering::Relaxed);
    let _ = dog.join();
    report.seconds = t0.elapsed().as_secs_f64();
    report
}
