//! Exponential moving average of the weights (Polyak & Juditsky 1992 averaging, in its
//! exponential form as used by e.g. DDPM, Ho et al. 2020, and most diffusion codebases).
//!
//! After each optimiser step, [`Ema::update`] sets `ema <- d * ema + (1 - d) * param` with the
//! effective decay
//!
//! ```text
//! d = min(decay, (1 + n) / (10 + n))
//! ```
//!
//! where `n` is the number of updates made before this one. The warm-up term `(1 + n) / (10 + n)`
//! (from TensorFlow's `ExponentialMovingAverage` with `num_updates`, and the diffusion codebases
//! that copied it) keeps the average from being dominated by the random initial weights early in
//! training: the first update uses `d = 0.1`, and `decay` takes over once `n > (10 decay - 1) /
//! (1 - decay)` (about 9 000 updates for `decay = 0.9999`).
//!
//! On the CPU (`f32` or `f64`) the update runs in place, one pass over each parameter
//! ([`crate::nn::fused`]); elsewhere it is composed from tensor ops with the same arithmetic.
//!
//! Sampling and evaluation use the averaged weights through [`Ema::swap`], which exchanges them
//! with the live weights in place; a second swap restores the live weights bit for bit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::nn::fused;

/// The exponential moving average of a set of named parameters (see the module documentation).
#[derive(Debug)]
pub struct Ema {
    decay: f64,
    updates: u64,
    /// The averages; each owns its storage (updated in place on the CPU).
    shadow: HashMap<String, Tensor>,
    /// Set by [`Ema::tensors`], whose tensors share storage with `shadow`: the next update
    /// copies the averages before changing them in place, so exported tensors never change.
    exported: AtomicBool,
}

/// A detached copy of a variable's current value, with storage of its own.
fn snapshot(var: &Var) -> Result<Tensor> {
    Ok(var.as_detached_tensor().copy()?)
}

/// True when the in-place kernel can average `p` into `e`: both on the CPU, contiguous, and
/// both `f32` or both `f64`.
fn fusable(e: &Tensor, p: &Tensor) -> bool {
    e.device().is_cpu()
        && p.device().is_cpu()
        && e.dtype() == p.dtype()
        && matches!(e.dtype(), DType::F32 | DType::F64)
        && e.is_contiguous()
        && p.is_contiguous()
}

fn err(message: String) -> Error {
    Error::checkpoint("EMA weights", message)
}

impl Ema {
    /// Start an average at the current values of `params`. `decay` must be in [0, 1].
    pub fn new(params: &[(String, Var)], decay: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&decay) {
            return Err(Error::Config(format!(
                "EMA decay must be in [0, 1], got {decay}"
            )));
        }
        let shadow = params
            .iter()
            .map(|(name, var)| Ok((name.clone(), snapshot(var)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Ok(Self {
            decay,
            updates: 0,
            shadow,
            exported: AtomicBool::new(false),
        })
    }

    /// The nominal decay given to [`Ema::new`].
    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// How many updates have been made (including restored ones).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The decay the next update will use: `min(decay, (1 + n) / (10 + n))`.
    pub fn effective_decay(&self) -> f64 {
        let n = self.updates as f64;
        self.decay.min((1.0 + n) / (10.0 + n))
    }

    /// The tracked value for `name` after checking it matches `var`.
    fn tracked(&self, name: &str, var: &Var) -> Result<&Tensor> {
        let Some(e) = self.shadow.get(name) else {
            return Err(Error::Config(format!(
                "EMA: parameter '{name}' is not tracked (it did not exist when the EMA was created)"
            )));
        };
        if e.shape() != var.shape() || e.dtype() != var.dtype() {
            return Err(Error::Shape(format!(
                "EMA: parameter '{name}' is {:?} ({:?}) but its average is {:?} ({:?})",
                var.dims(),
                var.dtype(),
                e.dims(),
                e.dtype()
            )));
        }
        Ok(e)
    }

    /// Move the average towards the current values of `params` (every one must be tracked;
    /// all are checked before anything changes).
    pub fn update(&mut self, params: &[(String, Var)]) -> Result<()> {
        let d = self.effective_decay();
        for (name, var) in params {
            self.tracked(name, var)?;
        }
        if self.exported.swap(false, Ordering::Relaxed) {
            for e in self.shadow.values_mut() {
                *e = e.copy()?;
            }
        }
        for (name, var) in params {
            let e = self.tracked(name, var)?;
            let p = var.as_detached_tensor();
            let new = if !var.dtype().is_float() {
                // Integer buffers cannot be averaged; track their current value.
                p.copy()?
            } else if fusable(e, &p) {
                fused::ema_inplace(e, &p, d)?;
                continue;
            } else {
                (e.affine(d, 0.0)? + p.affine(1.0 - d, 0.0)?)?
            };
            self.shadow.insert(name.clone(), new);
        }
        self.updates += 1;
        Ok(())
    }

    /// Exchange the averaged values with the live values of `params`, in place. Calling it twice
    /// restores both exactly. All parameters are checked before anything is changed.
    pub fn swap(&mut self, params: &[(String, Var)]) -> Result<()> {
        for (name, var) in params {
            self.tracked(name, var)?;
        }
        for (name, var) in params {
            let live = snapshot(var)?;
            if let Some(e) = self.shadow.get(name) {
                var.set(e)?;
            }
            self.shadow.insert(name.clone(), live);
        }
        Ok(())
    }

    /// The averaged values keyed by parameter name, for checkpoints. The tensors are a
    /// snapshot: later updates do not change them.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.exported.store(true, Ordering::Relaxed);
        self.shadow.clone()
    }

    /// Restore averages saved by [`Ema::tensors`] and the update count. The keys must be exactly
    /// the tracked parameters, each with the tracked shape and dtype; otherwise nothing changes
    /// and the error names the first offending parameter.
    pub fn load(&mut self, tensors: &HashMap<String, Tensor>, updates: u64) -> Result<()> {
        let mut names: Vec<&String> = self.shadow.keys().collect();
        names.sort();
        let mut next = HashMap::with_capacity(names.len());
        for name in names {
            let Some(t) = tensors.get(name) else {
                return Err(err(format!("parameter '{name}' is missing")));
            };
            let cur = &self.shadow[name];
            if t.shape() != cur.shape() || t.dtype() != cur.dtype() {
                return Err(err(format!(
                    "parameter '{name}' is {:?} ({:?}) in the saved state but {:?} ({:?}) in the model",
                    t.dims(),
                    t.dtype(),
                    cur.dims(),
                    cur.dtype()
                )));
            }
            next.insert(
                name.clone(),
                t.to_device(cur.device())?.detach().contiguous()?.copy()?,
            );
        }
        if let Some(extra) = tensors
            .keys()
            .filter(|k| !self.shadow.contains_key(*k))
            .min()
        {
            return Err(err(format!(
                "unexpected entry '{extra}' (no such parameter)"
            )));
        }
        self.shadow = next;
        self.exported.store(false, Ordering::Relaxed);
        self.updates = updates;
        Ok(())
    }
}
