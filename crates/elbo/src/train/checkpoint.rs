//! Atomic, verified checkpoints: several named safetensors files plus a JSON state.
//!
//! A checkpoint is a directory `DIR` holding `NAME.safetensors` for each tensor file (model
//! weights, EMA weights, optimiser moments, ...) and `state.json` (step, RNG state, config, ...).
//! `state.json` also records `"format_version": 1`, a `"manifest"` giving every tensor file's
//! byte length and 64-bit FNV-1a hash, so truncation and corruption are detected on load, and
//! `"state_fnv1a64"`, the hash of the rest of the state, so a hand edit (a step that no longer
//! matches the optimiser's counts) is detected too.
//!
//! [`save`] never leaves a half-written `DIR`: it writes everything into the sibling
//! `DIR.tmp-<pid>`, fsyncs the files and the directory, then renames the old `DIR` to `DIR.old`,
//! the new directory to `DIR`, and removes `DIR.old`. A crash at any point leaves either the old
//! or the new checkpoint complete: if it happens between the two renames, [`load`] finds `DIR`
//! missing and uses `DIR.old`. A stale `DIR.tmp-*` from a crashed save is never read.
//!
//! Two saves to the same `DIR` must not run concurrently.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor, Var};
use serde_json::{json, Map, Value};

use crate::atomic_file::sync_dir;
use crate::error::{Error, Result};

/// The version written to `state.json` and required on load.
pub const FORMAT_VERSION: u64 = 1;
const STATE_FILE: &str = "state.json";

/// A checkpoint read back by [`load`].
#[derive(Debug)]
pub struct Loaded {
    /// Tensor files by name (`NAME` of `NAME.safetensors`), each a map of tensor name to tensor.
    pub files: HashMap<String, HashMap<String, Tensor>>,
    /// The state given to [`save`] (without the `manifest` and `format_version` keys it added).
    pub state: Value,
}

/// The 64-bit FNV-1a hash (Fowler, Noll & Vo) of `bytes`, used for the manifest.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The FNV-1a hash of the state's compact JSON (keys in serde_json's map order), recorded as
/// `state_fnv1a64` so that a `state.json` edited by hand is detected on load.
fn state_hash(state: &Map<String, Value>) -> Result<String> {
    let bytes = serde_json::to_vec(state)
        .map_err(|e| Error::Config(format!("cannot serialise checkpoint state: {e}")))?;
    Ok(format!("{:016x}", fnv1a64(&bytes)))
}

/// `DIR` with `suffix` appended to its last component (`run/ckpt` -> `run/ckpt.old`).
fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf> {
    let Some(name) = dir.file_name() else {
        return Err(Error::checkpoint(
            dir,
            "checkpoint path has no final component",
        ));
    };
    let mut s = OsString::from(name);
    s.push(suffix);
    Ok(dir.with_file_name(s))
}

fn check_name(dir: &Path, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "state"
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::checkpoint(
            dir,
            format!(
                "bad tensor file name '{name}' (use letters, digits, '_', '-', '.'; not 'state')"
            ),
        ))
    }
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(dir, e)),
        _ => Ok(()),
    }
}

/// Write a checkpoint atomically into `dir` (see the module documentation): one
/// `NAME.safetensors` per entry of `files`, and `state.json` holding `state` (which must be a
/// JSON object) plus `"format_version"` and `"manifest"` (those two keys are overwritten).
pub fn save(dir: &Path, files: &[(&str, &HashMap<String, Tensor>)], state: &Value) -> Result<()> {
    let Value::Object(user_state) = state else {
        return Err(Error::checkpoint(
            dir,
            "the checkpoint state must be a JSON object",
        ));
    };
    for (i, (name, _)) in files.iter().enumerate() {
        check_name(dir, name)?;
        if files[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::checkpoint(
                dir,
                format!("tensor file '{name}' given twice"),
            ));
        }
    }
    let tmp = sibling(dir, &format!(".tmp-{}", std::process::id()))?;
    let old = sibling(dir, ".old")?;
    let parent = dir.parent().unwrap_or(Path::new(""));
    if !parent.as_os_str().is_empty() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    remove_dir_if_exists(&tmp)?;
    fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;

    let mut manifest = Map::new();
    for (name, tensors) in files {
        let path = tmp.join(format!("{name}.safetensors"));
        candle_core::safetensors::save(tensors, &path)
            .map_err(|e| Error::checkpoint(&path, format!("cannot write tensors: {e}")))?;
        let bytes = fs::read(&path).map_err(|e| Error::io(&path, e))?;
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io(&path, e))?;
        manifest.insert(
            name.to_string(),
            json!({ "bytes": bytes.len(), "fnv1a64": format!("{:016x}", fnv1a64(&bytes)) }),
        );
    }
    let mut full = user_state.clone();
    full.insert("state_fnv1a64".into(), json!(state_hash(user_state)?));
    full.insert("format_version".into(), json!(FORMAT_VERSION));
    full.insert("manifest".into(), Value::Object(manifest));
    let state_path = tmp.join(STATE_FILE);
    let text = serde_json::to_vec_pretty(&Value::Object(full))
        .map_err(|e| Error::checkpoint(&state_path, format!("cannot serialise state: {e}")))?;
    let mut f = fs::File::create(&state_path).map_err(|e| Error::io(&state_path, e))?;
    f.write_all(&text)
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(&state_path, e))?;
    drop(f);
    sync_dir(&tmp)?;

    // Swap in: DIR -> DIR.old, tmp -> DIR, drop DIR.old. If DIR is missing but DIR.old exists,
    // DIR.old is the last good checkpoint until the rename below lands, so keep it until then.
    if dir.exists() {
        remove_dir_if_exists(&old)?;
        fs::rename(dir, &old).map_err(|e| Error::io(dir, e))?;
    }
    fs::rename(&tmp, dir).map_err(|e| Error::io(&tmp, e))?;
    sync_dir(parent)?;
    remove_dir_if_exists(&old)?;
    Ok(())
}

/// Read and verify a checkpoint written by [`save`], loading tensors onto `device`. If `dir` is
/// missing but `DIR.old` exists (a crash between the two renames of [`save`]), `DIR.old` is read.
///
/// Every problem is an [`Error::Checkpoint`] naming the file: no checkpoint, missing or
/// malformed `state.json`, unknown format version, a missing tensor file, a length or hash that
/// does not match the manifest (truncated or corrupted), or an unparsable safetensors file.
pub fn load(dir: &Path, device: &Device) -> Result<Loaded> {
    let old = sibling(dir, ".old")?;
    let root = if dir.is_dir() {
        dir.to_path_buf()
    } else if old.is_dir() {
        old
    } else {
        return Err(Error::checkpoint(dir, "no checkpoint directory here"));
    };
    let state_path = root.join(STATE_FILE);
    let text = fs::read(&state_path)
        .map_err(|e| Error::checkpoint(&state_path, format!("cannot read {STATE_FILE}: {e}")))?;
    load_from(&root, &text, |file| fs::read(root.join(file)), device)
}

/// The parsing and verification of [`load`], in memory: `state_json` is the content of
/// `state.json` and `read(file)` returns the bytes of the tensor file `file` (`NAME.safetensors`)
/// of the checkpoint directory `root`, which only labels errors. Nothing is read that the
/// manifest does not name, and a file is parsed only when its length and hash match.
pub fn load_from<F>(root: &Path, state_json: &[u8], read: F, device: &Device) -> Result<Loaded>
where
    F: Fn(&str) -> std::io::Result<Vec<u8>>,
{
    let state_path = root.join(STATE_FILE);
    let bad_state = |m: String| Error::checkpoint(&state_path, format!("{STATE_FILE}: {m}"));
    let state: Value = serde_json::from_slice(state_json).map_err(|e| {
        bad_state(format!(
            "invalid JSON at line {}, column {}: {e}",
            e.line(),
            e.column()
        ))
    })?;
    let Value::Object(mut state) = state else {
        return Err(bad_state("expected a JSON object at the top level".into()));
    };
    match state.remove("format_version") {
        Some(v) if v.as_u64() == Some(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(bad_state(format!(
                "unsupported format_version {v} (expected {FORMAT_VERSION})"
            )))
        }
        None => return Err(bad_state("missing key \"format_version\"".into())),
    }
    let manifest = match state.remove("manifest") {
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(bad_state(
                "\"manifest\" must be an object of file name to {\"bytes\", \"fnv1a64\"}".into(),
            ))
        }
        None => return Err(bad_state("missing key \"manifest\"".into())),
    };
    // checkpoints written before the state hash have none; any other must match it
    if let Some(recorded) = state.remove("state_fnv1a64") {
        if recorded.as_str() != Some(state_hash(&state)?.as_str()) {
            return Err(bad_state(
                "its contents do not match the hash recorded when it was written (edited by \
                 hand?); elbo cannot trust a step, RNG or optimiser count that disagrees with the \
                 tensors: restore the file, or start again from best/"
                    .into(),
            ));
        }
    }

    let mut files = HashMap::with_capacity(manifest.len());
    for (name, entry) in &manifest {
        check_name(root, name)?;
        let file = format!("{name}.safetensors");
        let path = root.join(&file);
        let bytes_expected = entry.get("bytes").and_then(Value::as_u64);
        let hash_expected = entry.get("fnv1a64").and_then(Value::as_str);
        let (Some(bytes_expected), Some(hash_expected)) = (bytes_expected, hash_expected) else {
            return Err(bad_state(format!(
                "manifest entry \"{name}\" must be {{\"bytes\": integer, \"fnv1a64\": \
                 16 hex digits}}, found {entry}"
            )));
        };
        let fail = |m: String| Error::checkpoint(&path, format!("{file}: {m}"));
        let data = read(&file).map_err(|e| fail(format!("cannot read: {e}")))?;
        if data.len() as u64 != bytes_expected {
            return Err(fail(format!(
                "truncated or overwritten: {} bytes on disk, {bytes_expected} in the manifest",
                data.len()
            )));
        }
        let hash = format!("{:016x}", fnv1a64(&data));
        if hash != hash_expected {
            return Err(fail(format!(
                "corrupted: FNV-1a hash {hash} does not match {hash_expected} in the manifest"
            )));
        }
        let tensors = candle_core::safetensors::load_buffer(&data, device).map_err(|e| {
            fail(format!(
                "not a valid safetensors file: {}",
                where_bad(&data, e)
            ))
        })?;
        files.insert(name.clone(), tensors);
    }
    Ok(Loaded {
        files,
        state: Value::Object(state),
    })
}

/// Locate a safetensors parse error: the format (huggingface/safetensors) is an 8-byte
/// little-endian header length `n`, `n` bytes of JSON header, then the tensor data.
fn where_bad(data: &[u8], e: impl std::fmt::Display) -> String {
    let Some(len) = data
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
    else {
        return format!(
            "byte offset 0: expected an 8-byte header length, the file has {} bytes",
            data.len()
        );
    };
    let end = 8u64.saturating_add(len);
    if end > data.len() as u64 {
        return format!(
            "byte offset 0: the header length {len} runs past the end of the file ({} bytes)",
            data.len()
        );
    }
    format!("{e} (the JSON header is bytes 8..{end}, the tensor data follows)")
}

/// Set `params` from `tensors` (e.g. a file of [`Loaded::files`]). Every parameter must be present
/// with the same shape and dtype, and there must be no other entries; otherwise no parameter is
/// changed and the [`Error::Checkpoint`] (with `what` as its path, e.g. the file it came from)
/// names the first offending parameter and its shapes.
pub fn load_into_vars(
    tensors: &HashMap<String, Tensor>,
    params: &[(String, Var)],
    what: &str,
) -> Result<()> {
    let err = |m: String| Error::checkpoint(what, m);
    let mut ready = Vec::with_capacity(params.len());
    for (name, var) in params {
        let Some(t) = tensors.get(name) else {
            return Err(err(format!(
                "parameter '{name}' (shape {:?}) is missing",
                var.dims()
            )));
        };
        if t.shape() != var.shape() || t.dtype() != var.dtype() {
            return Err(err(format!(
                "parameter '{name}' has shape {:?} ({:?}) in the checkpoint but {:?} ({:?}) in the model",
                t.dims(),
                t.dtype(),
                var.dims(),
                var.dtype()
            )));
        }
        ready.push((var, t.to_device(var.device())?));
    }
    let known: std::collections::HashSet<&str> = params.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = tensors.keys().filter(|k| !known.contains(k.as_str())).min() {
        return Err(err(format!(
            "entry '{extra}' does not match any parameter of the model"
        )));
    }
    for (var, t) in ready {
        var.set(&t)?;
    }
    Ok(())
}

/// Detached copies of the current values of `params`, keyed by name (for [`save`]). Each copy has
/// storage of its own, so later updates of the parameters do not show through. (Should the copy
/// fail, which a CPU copy cannot, the entry shares the parameter's storage instead.)
pub fn vars_to_map(params: &[(String, Var)]) -> HashMap<String, Tensor> {
    params
        .iter()
        .map(|(name, var)| {
            let t = var.as_detached_tensor();
            let copied = t.copy();
            (name.clone(), copied.unwrap_or(t))
        })
        .collect()
}
