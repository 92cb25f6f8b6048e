//! A run directory belongs to one training process at a time.
//!
//! - [`RunLock`]: `DIR/lock`, held with an exclusive advisory lock (`flock(2)`) by the training
//!   process for as long as it runs, and holding its pid. The operating system releases the
//!   lock when the process ends in any way (`kill -9` included), so a lock left by a dead process
//!   is recognised as stale and taken over; a live owner makes a second `elbo train` into the
//!   same directory an error naming its pid.
//! - [`run_parts`]: what in a directory belongs to a run, so a fresh `elbo train --out` refuses
//!   a directory that holds any of it (a crash can leave only `checkpoint.old`, or only `best/`).
//! - [`clean_stale`]: temporaries of crashed writers are removed at start and a checkpoint left
//!   as `NAME.old` by a crash between the two renames of a save is put back.
//! - [`DataFingerprint`]: the size and FNV-1a hash of the user's data file, recorded at the
//!   start of a run (`DIR/data.json`) and compared on resume and evaluation.

use std::fs;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::atomic_file::{self, is_temporary};
use crate::{Error, Result};

/// The lock file of a run directory.
pub const LOCK_FILE: &str = "lock";
/// The data fingerprint of a run directory.
pub const DATA_FILE: &str = "data.json";
/// The checkpoint directories of a run.
pub const CHECKPOINT_DIRS: [&str; 2] = ["checkpoint", "best"];
/// Files a run writes beside its checkpoints (removed by `--force` with the rest of the run).
const RUN_FILES: [&str; 10] = [
    "config.json",
    "metrics.jsonl",
    DATA_FILE,
    "loss.png",
    "report.json",
    "report.md",
    "samples.npy",
    "samples.png",
    "samples.txt",
    "checkpoint.old",
];

/// The exclusive lock of a training process on its run directory, released on drop.
#[derive(Debug)]
pub struct RunLock {
    file: fs::File,
    /// The pid recorded by a previous owner that ended without releasing the lock (a crash).
    pub stale_owner: Option<u32>,
}

/// The pid written in a lock file, if any.
fn read_pid(file: &mut fs::File) -> Option<u32> {
    let mut s = String::new();
    file.seek(std::io::SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.split_whitespace().next()?.parse().ok()
}

impl RunLock {
    /// Take `dir`'s lock (creating `dir/lock`), or fail naming the process that holds it.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let owner = read_pid(&mut file)
                    .map_or("another process".to_string(), |p| format!("process {p}"));
                return Err(Error::RunDir(format!(
                    "{} is in use: {owner} is training into it (lock file {}); wait for it to \
                     finish or stop it, then `elbo train --resume {}`",
                    dir.display(),
                    path.display(),
                    dir.display()
                )));
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let me = std::process::id();
        let stale_owner = read_pid(&mut file).filter(|&p| p != me);
        file.set_len(0)
            .and_then(|_| file.seek(std::io::SeekFrom::Start(0)))
            .and_then(|_| writeln!(file, "{me}"))
            .and_then(|_| file.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self { file, stale_owner })
    }

    /// The pid of the live process training into `dir`, if one is.
    pub fn holder(dir: &Path) -> Option<u32> {
        let mut file = fs::File::open(dir.join(LOCK_FILE)).ok()?;
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                None
            }
            Err(fs::TryLockError::WouldBlock) => Some(read_pid(&mut file).unwrap_or(0)),
            Err(fs::TryLockError::Error(_)) => None,
        }
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // an empty lock file means the last owner ended cleanly; the lock itself goes with the
        // file handle
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// What in `dir` belongs to a run (checkpoints, their leftovers, config, metrics, ...), sorted.
pub fn run_parts(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(dir, e)),
    };
    let mut parts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let of_checkpoint = CHECKPOINT_DIRS
            .iter()
            .any(|c| name == *c || name.starts_with(&format!("{c}.")));
        if of_checkpoint || RUN_FILES.contains(&name.as_str()) {
            parts.push(name);
        }
    }
    parts.sort();
    Ok(parts)
}

/// Refuse to start a new run in `dir` when a process is training into it (call it without
/// holding the lock) or when it holds any part of a run.
pub fn ensure_free(dir: &Path) -> Result<()> {
    if let Some(pid) = RunLock::holder(dir) {
        return Err(Error::RunDir(format!(
            "{} is in use: process {pid} is training into it; wait for it to finish or stop \
             it, or choose another --out",
            dir.display()
        )));
    }
    ensure_no_run(dir)
}

/// Refuse to start a new run in `dir` when it holds any part of one.
pub fn ensure_no_run(dir: &Path) -> Result<()> {
    let parts = run_parts(dir)?;
    if parts.is_empty() {
        return Ok(());
    }
    Err(Error::RunDir(format!(
        "{d} already holds a run ({}); continue it with `elbo train --resume {d}`, choose \
         another --out, or add --force to delete that run and start over",
        parts.join(", "),
        d = dir.display()
    )))
}

/// Delete the run in `dir` (what [`run_parts`] lists), for `elbo train --force`. Files that are
/// not part of a run are left alone.
pub fn remove_run(dir: &Path) -> Result<()> {
    for name in run_parts(dir)? {
        let p = dir.join(&name);
        let res = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        res.map_err(|e| Error::io(&p, e))?;
    }
    Ok(())
}

/// Whether the process `pid` is alive (Linux: `/proc/PID`; elsewhere assumed alive).
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

/// The pid in a temporary's name (`NAME.tmp-PID[.EXT]`).
fn temporary_pid(name: &str) -> Option<u32> {
    let (_, rest) = name.split_once(atomic_file::TMP_MARKER)?;
    rest.split('.').next()?.parse().ok()
}

/// Remove the temporaries of writers that are gone and put back a checkpoint left as
/// `NAME.old` by a crash between the two renames of a save (see [`super::checkpoint::save`]).
/// Call it while holding the run's lock. Returns what it did, one line each.
pub fn clean_stale(dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !is_temporary(&name) {
            continue;
        }
        let owner = temporary_pid(&name);
        if owner.is_some_and(|p| p != std::process::id() && alive(p)) {
            continue;
        }
        let p = entry.path();
        let res = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        res.map_err(|e| Error::io(&p, e))?;
        done.push(format!(
            "removed the temporary {name} of an interrupted write"
        ));
    }
    for name in CHECKPOINT_DIRS {
        let (cur, old) = (dir.join(name), dir.join(format!("{name}.old")));
        if !old.exists() {
            continue;
        }
        if cur.exists() {
            fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
            done.push(format!("removed {name}.old (superseded by {name}/)"));
        } else {
            fs::rename(&old, &cur).map_err(|e| Error::io(&old, e))?;
            atomic_file::sync_dir(dir)?;
            done.push(format!(
                "restored {name}/ from {name}.old (a save was interrupted)"
            ));
        }
    }
    done.sort();
    Ok(done)
}

/// The size and 64-bit FNV-1a hash of a user data file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    /// The file as the configuration names it.
    pub path: PathBuf,
    /// Its length in bytes.
    pub bytes: u64,
    /// FNV-1a of its contents, 16 hex digits.
    pub fnv1a64: String,
}

impl DataFingerprint {
    /// The fingerprint of the user file the data set `name` reads (`None` for built-in sets).
    pub fn of_data(name: &str) -> Result<Option<Self>> {
        let Some(path) = crate::data::registry::user_file(name) else {
            return Ok(None);
        };
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        Ok(Some(Self {
            path,
            bytes: bytes.len() as u64,
            fnv1a64: format!("{:016x}", super::checkpoint::fnv1a64(&bytes)),
        }))
    }

    /// Record the fingerprint of `name`'s file in `dir` (nothing for built-in sets).
    pub fn record(dir: &Path, name: &str) -> Result<()> {
        if let Some(f) = Self::of_data(name)? {
            let text = serde_json::to_vec_pretty(&f)
                .map_err(|e| Error::Config(format!("cannot serialise {DATA_FILE}: {e}")))?;
            atomic_file::write(&dir.join(DATA_FILE), &text)?;
        }
        Ok(())
    }

    /// Compare the file of data set `name` with the fingerprint recorded in `dir`: `Ok(None)`
    /// when it is unchanged or nothing was recorded (built-in data, runs of earlier releases),
    /// `Ok(Some(message))` saying plainly what changed.
    pub fn changed(dir: &Path, name: &str) -> Result<Option<String>> {
        let path = dir.join(DATA_FILE);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path, e)),
        };
        let recorded: Self = serde_json::from_slice(&text)
            .map_err(|e| Error::data(path.display().to_string(), format!("invalid JSON: {e}")))?;
        let now = match Self::of_data(name) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(None),
            Err(e) => {
                return Ok(Some(format!(
                    "the run was trained on {} ({} bytes), which cannot be read now: {e}",
                    recorded.path.display(),
                    recorded.bytes
                )))
            }
        };
        if now == recorded {
            return Ok(None);
        }
        Ok(Some(format!(
            "the data file {} changed since this run started: it had {} bytes (FNV-1a {}) and \
             now has {} bytes (FNV-1a {}); its splits and shapes are no longer the ones the \
             model was trained and selected on. Restore the file, or train a new run on it",
            now.path.display(),
            recorded.bytes,
            recorded.fnv1a64,
            now.bytes,
            now.fnv1a64
        )))
    }
}
