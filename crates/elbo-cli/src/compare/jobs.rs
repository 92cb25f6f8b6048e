//! `elbo compare --jobs N`: entries side by side, each in a child process of its own.
//!
//! The parent holds the output directory's lock and starts at most N children, each running
//! `elbo compare --entry NAME` (hidden flag) with `RAYON_NUM_THREADS` set to its share of the
//! threads. A child trains (or reuses, or resumes) and scores one entry, writes its
//! [`EntryReport`] to `runs/NAME/entry.json` and its terminal output to `runs/NAME/compare.log`.
//! Processes rather than threads, because the thread count of the tensor kernels is read from
//! the environment once per process. The parent rewrites the report, in suite order, after every
//! entry that finishes, so an interrupt loses no finished entry; a child that dies without a
//! report becomes a failed entry naming its log.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use elbo::compare::{CompareReport, EntryReport, EntryStatus, Suite};

use super::{outcome, run_entry, Wanted};
use crate::CompareArgs;

/// File in each entry's run directory holding the child's report of it.
const ENTRY_JSON: &str = "entry.json";
/// File in each entry's run directory holding the child's stdout and stderr.
const ENTRY_LOG: &str = "compare.log";

/// The child's side: run the entry named `name` of `suite` and write its report.
pub fn run_child(
    suite: &Suite,
    name: &str,
    out: &Path,
    examples: Option<usize>,
    dev: &Device,
) -> Result<()> {
    let Some(e) = suite.entries.iter().find(|e| e.name == name) else {
        bail!("suite {} has no entry named {name}", suite.header.name);
    };
    let dir = out.join("runs").join(&e.name);
    let rep = match &e.config {
        Err(msg) => EntryReport::failed(&e.name, &dir, msg.clone()),
        Ok(cfg) => {
            let wanted = Wanted {
                likelihoods: &e.likelihoods,
                metrics: &e.metrics,
                examples,
            };
            run_entry(&e.name, cfg, &dir, &wanted, dev, true)
        }
    };
    std::fs::create_dir_all(&dir)?;
    let json = serde_json::to_string_pretty(&rep)?;
    elbo::atomic_file::write(&dir.join(ENTRY_JSON), json.as_bytes())?;
    Ok(())
}

/// One child at work.
struct Running {
    index: usize,
    child: Child,
    started: Instant,
    dir: PathBuf,
}

/// The parent's side: every entry of `suite`, at most `a.jobs` at a time. Returns the entries'
/// reports in suite order.
pub fn run_parallel(a: &CompareArgs, suite: &Suite, out: &Path) -> Result<Vec<EntryReport>> {
    let n = suite.entries.len();
    let total = candle_core::utils::get_num_threads();
    let per_job = (total / a.jobs).max(1);
    if a.jobs > total {
        eprintln!(
            "note: --jobs {} on {total} threads: the entries will share cores",
            a.jobs
        );
    }
    eprintln!(
        "running {} entries at a time, {per_job} thread(s) each; per-entry output in \
         {}/runs/NAME/{ENTRY_LOG}",
        a.jobs.min(n),
        out.display()
    );
    let exe = std::env::current_exe().context("cannot find the elbo executable")?;
    let started = Instant::now();
    let mut results: Vec<Option<EntryReport>> = vec![None; n];
    let mut queue: VecDeque<usize> = (0..n).collect();
    let mut running: Vec<Running> = Vec::new();
    let mut done = 0;
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < a.jobs {
            // the first queued entry whose codes:ENTRY run (if any) has finished
            let Some(pos) = queue
                .iter()
                .position(|&i| suite.dependency(i).is_none_or(|d| results[d].is_some()))
                // a cycle of codes: entries (nothing running could unblock it): run in order
                .or_else(|| running.is_empty().then_some(0))
            else {
                break;
            };
            let Some(i) = queue.remove(pos) else { break };
            let e = &suite.entries[i];
            let dir = out.join("runs").join(&e.name);
            let dep_failed = suite.dependency(i).and_then(|d| {
                let r = results[d].as_ref()?;
                (r.status != EntryStatus::Ok).then(|| {
                    format!(
                        "entry '{}', whose codes it trains on, failed",
                        suite.entries[d].name
                    )
                })
            });
            if let Some(msg) = dep_failed.or_else(|| e.config.as_ref().err().cloned()) {
                results[i] = Some(EntryReport::failed(&e.name, &dir, msg.clone()));
                done += 1;
                eprintln!("[{done}/{n}] {}: FAILED: {msg}", e.name);
                continue;
            }
            eprintln!("[{}/{n}] {}: starting", done + running.len() + 1, e.name);
            running.push(spawn(&exe, a, i, &e.name, &dir, per_job)?);
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut k = 0;
        while k < running.len() {
            let Some(status) = running[k].child.try_wait()? else {
                k += 1;
                continue;
            };
            let r = running.swap_remove(k);
            let name = &suite.entries[r.index].name;
            let rep = read_entry(&r.dir, name, status);
            done += 1;
            let elapsed = started.elapsed().as_secs_f64();
            // finished entries per second already counts the entries running side by side
            let eta = elapsed / done as f64 * (n - done) as f64;
            eprintln!(
                "[{done}/{n}] {name}: {}; entry {:.1} s, elapsed {elapsed:.0} s, ETA {eta:.0} s",
                outcome(&rep),
                r.started.elapsed().as_secs_f64()
            );
            results[r.index] = Some(rep);
            let finished: Vec<EntryReport> = results.iter().flatten().cloned().collect();
            CompareReport::new(&suite.header.name, a.quick, finished).write(out)?;
        }
    }
    Ok(results.into_iter().flatten().collect())
}

/// Start the child for one entry, its output going to the entry's log.
fn spawn(
    exe: &Path,
    a: &CompareArgs,
    index: usize,
    name: &str,
    dir: &Path,
    threads: usize,
) -> Result<Running> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    // a report left by an earlier child must not stand in for this one's
    match std::fs::remove_file(dir.join(ENTRY_JSON)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => {}
    }
    let log = std::fs::File::create(dir.join(ENTRY_LOG))
        .with_context(|| format!("cannot create {}", dir.join(ENTRY_LOG).display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(["compare", "--suite", &a.suite, "--entry", name, "--quiet"])
        .arg("--out")
        .arg(&a.out);
    if a.quick {
        cmd.arg("--quick");
    }
    let child = cmd
        .env("RAYON_NUM_THREADS", threads.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {} for entry {name}", exe.display()))?;
    Ok(Running {
        index,
        child,
        started: Instant::now(),
        dir: dir.to_path_buf(),
    })
}

/// The child's report of its entry, or a failed entry naming its exit status and log.
fn read_entry(dir: &Path, name: &str, status: std::process::ExitStatus) -> EntryReport {
    let json = dir.join(ENTRY_JSON);
    if let Ok(text) = std::fs::read_to_string(&json) {
        if let Ok(rep) = serde_json::from_str::<EntryReport>(&text) {
            return rep;
        }
    }
    let log = dir.join(ENTRY_LOG);
    let tail: String = std::fs::read_to_string(&log)
        .map(|t| {
            let lines: Vec<&str> = t.lines().rev().take(5).collect();
            lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
        })
        .unwrap_or_default();
    EntryReport::failed(
        name,
        dir,
        format!(
            "the entry's process ended ({status}) without a report; its output is in {}: {tail}",
            log.display()
        ),
    )
}
