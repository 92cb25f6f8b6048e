//! Atomic file writes: every file elbo writes (configs, metrics, reports, samples, plots) goes
//! through a temporary sibling, is flushed to disk, and replaces the destination by one
//! `rename(2)`, which POSIX makes atomic within a file system. A reader (or a crash) therefore
//! sees either the old file or the new one, never a truncated or half-written one.
//!
//! The temporary sibling of `DIR/STEM.EXT` is `DIR/STEM.tmp-PID.EXT` (the extension stays last,
//! so writers that pick an encoder by extension, such as PNG plots, still work). A crash can
//! leave one behind; [`is_temporary`] recognises them so a run directory can be cleaned at start.

use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The marker every temporary name carries (`checkpoint.tmp-PID`, `samples.tmp-PID.npy`).
pub const TMP_MARKER: &str = ".tmp-";

/// Whether a file or directory name is a temporary left by an atomic write of some process.
pub fn is_temporary(name: &str) -> bool {
    name.contains(TMP_MARKER)
}

/// The temporary sibling of `path` for this process: `STEM.tmp-PID.EXT` (or `NAME.tmp-PID`).
pub fn tmp_path(path: &Path) -> Result<PathBuf> {
    let Some(stem) = path.file_stem() else {
        return Err(Error::Config(format!(
            "cannot write {}: the path has no file name",
            path.display()
        )));
    };
    let mut name = OsString::from(stem);
    name.push(format!("{TMP_MARKER}{}", std::process::id()));
    if let Some(ext) = path.extension() {
        name.push(".");
        name.push(ext);
    }
    Ok(path.with_file_name(name))
}

/// fsync a directory so that renames and creations inside it are durable (no-op off Unix).
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let d = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(d, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Create `path`'s parent directory if it is missing.
fn ensure_parent(path: &Path) -> Result<()> {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => fs::create_dir_all(p).map_err(|e| Error::io(p, e)),
        _ => Ok(()),
    }
}

/// Make the file `write` produced at `tmp` durable and move it to `path`; on any failure the
/// temporary is removed and `path` is left as it was.
fn commit(tmp: &Path, path: &Path) -> Result<()> {
    let done = fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(tmp, e))
        .and_then(|_| fs::rename(tmp, path).map_err(|e| Error::io(path, e)));
    if let Err(e) = done {
        let _ = fs::remove_file(tmp);
        return Err(e);
    }
    sync_dir(path.parent().unwrap_or(Path::new("")))
}

/// Write `bytes` to `path` atomically (see the module documentation), creating its directory.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        let mut f = fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))
    })
}

/// Let `produce` write the file at the temporary path it is given (a plotting or encoding
/// library that only writes to paths), then move it to `path` atomically. If `produce` fails,
/// the temporary is removed and `path` keeps its old contents.
pub fn write_with<F>(path: &Path, produce: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    ensure_parent(path)?;
    let tmp = tmp_path(path)?;
    if let Err(e) = produce(&tmp) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    commit(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_names_keep_the_extension_and_are_recognised() {
        let t = tmp_path(Path::new("run/samples.npy")).unwrap();
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(name, format!("samples.tmp-{}.npy", std::process::id()));
        assert!(is_temporary(name));
        assert!(!is_temporary("samples.npy"));
        let t = tmp_path(Path::new("run/checkpoint")).unwrap();
        assert!(is_temporary(t.file_name().unwrap().to_str().unwrap()));
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("report.json");
        write(&p, b"old").unwrap();
        let err = write_with(&p, |tmp| {
            fs::write(tmp, b"half").unwrap();
            Err(Error::Config("encoder failed".into()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("encoder failed"));
        assert_eq!(fs::read(&p).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "a temporary was left behind");
        write(&p, b"new").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }
}
