//! AdamW with saveable state (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization").
//!
//! The update is exactly PyTorch's `torch.optim.AdamW` (non-amsgrad, non-maximize): for a
//! parameter `p` with gradient `g` at step `t` (counted from 1),
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)                       (decoupled weight decay)
//! m <- beta1 * m + (1 - beta1) * g
//! v <- beta2 * v + (1 - beta2) * g^2
//! p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//! ```
//!
//! candle-nn has an AdamW too, but its moments cannot be saved or restored, so a resumed run
//! would restart the moment estimates. Here the moments are plain tensors keyed by parameter name
//! ([`AdamW::state_tensors`] / [`AdamW::load_state`]) and go into checkpoints.
//!
//! On the CPU with `f32` parameters the update runs in place, in one pass over each
//! parameter's slice that reads the gradient and rewrites `p`, `m` and `v` together
//! ([`crate::nn::fused`]); the arithmetic is the same, operation for operation, as the tensor-op
//! path used for other devices and dtypes, so both give the same results.
//!
//! One difference from PyTorch: the step count `t` used for bias correction is global (one per
//! optimiser), while PyTorch keeps one per parameter. They differ only for a parameter that had
//! no gradient on some steps.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::nn::fused::{self, AdamWScalars};

/// Hyper-parameters of [`AdamW`]; the defaults are PyTorch's `torch.optim.AdamW` defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    /// Base learning rate (the schedule's peak); [`AdamW::step`] takes the current one.
    pub lr: f64,
    /// Decay of the first-moment (mean) estimate.
    pub beta1: f64,
    /// Decay of the second-moment (uncentred variance) estimate.
    pub beta2: f64,
    /// Added to the denominator for numerical stability.
    pub eps: f64,
    /// Decoupled weight decay coefficient (multiplied by the learning rate).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamWConfig {
    /// Check the values are in range: `lr >= 0`, `0 <= beta < 1`, `eps > 0`, `weight_decay >= 0`,
    /// all finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("AdamW: {m}")));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("lr must be finite and >= 0, got {}", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps must be finite and > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            ));
        }
        Ok(())
    }
}

/// The parameters of a [`VarMap`] as `(name, var)` pairs sorted by name, the form every function
/// in [`crate::train`] takes.
pub fn named_vars(varmap: &VarMap) -> Result<Vec<(String, Var)>> {
    let data = varmap
        .data()
        .lock()
        .map_err(|_| Error::Config("the parameter store's lock is poisoned".into()))?;
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// The AdamW optimiser (Loshchilov & Hutter 2019) with PyTorch `torch.optim.AdamW` semantics and
/// checkpointable moments. See the module documentation for the update.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    steps: u64,
    /// Per parameter name: (first moment m, second moment v), created lazily at the first
    /// gradient. Each owns its storage (the in-place update relies on it).
    moments: HashMap<String, (Tensor, Tensor)>,
    /// Set by [`AdamW::state_tensors`], whose tensors share storage with `moments`: the next
    /// step copies the moments before updating them in place, so exported state never changes.
    exported: AtomicBool,
}

/// A copy of `t` with storage of its own, contiguous.
fn owned(t: &Tensor) -> Result<Tensor> {
    Ok(t.contiguous()?.copy()?)
}

/// True when the in-place kernel can update this parameter: CPU, `f32`, contiguous parameter,
/// gradient and moments.
fn fusable(var: &Var, g: &Tensor, moments: Option<&(Tensor, Tensor)>) -> bool {
    let contiguous = |t: &Tensor| fused::cpu_f32(&[t]) && t.is_contiguous();
    contiguous(var.as_tensor())
        && contiguous(g)
        && moments.is_none_or(|(m, v)| contiguous(m) && contiguous(v))
}

impl AdamW {
    /// A fresh optimiser (no steps taken, no moments).
    pub fn new(cfg: AdamWConfig) -> Self {
        Self {
            cfg,
            steps: 0,
            moments: HashMap::new(),
            exported: AtomicBool::new(false),
        }
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// How many calls to [`AdamW::step`] have been made (including restored ones).
    pub fn steps_taken(&self) -> u64 {
        self.steps
    }

    /// One AdamW update of every parameter that has a gradient in `grads`, with learning rate
    /// `lr` (usually from an [`crate::train::schedule::LrSchedule`]). Parameters without a
    /// gradient are left alone, weight decay included, and their moments are untouched.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as f64;
        let AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
            weight_decay: wd,
            ..
        } = self.cfg;
        let bc1 = 1.0 - b1.powf(t);
        let bc2_sqrt = (1.0 - b2.powf(t)).sqrt();
        let step_size = lr / bc1;
        // The constants exactly as the tensor path rounds them (candle's `affine` casts its
        // f64 factors to the tensor dtype).
        let scalars = AdamWScalars {
            b1: b1 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            b2: b2 as f32,
            one_minus_b2: (1.0 - b2) as f32,
            inv_bc2_sqrt: (1.0 / bc2_sqrt) as f32,
            eps: eps as f32,
            step_size: step_size as f32,
            decay: (1.0 - lr * wd) as f32,
        };
        if self.exported.swap(false, Ordering::Relaxed) {
            for (m, v) in self.moments.values_mut() {
                (*m, *v) = (owned(m)?, owned(v)?);
            }
        }
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            if g.shape() != var.shape() {
                return Err(Error::Shape(format!(
                    "AdamW: gradient of '{name}' has shape {:?} but the parameter has {:?}",
                    g.dims(),
                    var.dims()
                )));
            }
            let g = if g.is_contiguous() {
                g
            } else {
                g.contiguous()?
            };
            if fusable(var, &g, self.moments.get(name)) {
                if !self.moments.contains_key(name) {
                    // Two separate allocations: the kernel locks each storage in turn.
                    let zeros = || Tensor::zeros(var.shape(), DType::F32, var.device());
                    self.moments.insert(name.clone(), (zeros()?, zeros()?));
                }
                if let Some((m, v)) = self.moments.get(name) {
                    fused::adamw_inplace(var.as_tensor(), m, v, &g, scalars)?;
                }
                continue;
            }
            let g2 = g.sqr()?;
            let (m, v) = match self.moments.get(name) {
                // m = b1 m + (1 - b1) g ; v = b2 v + (1 - b2) g^2
                Some((m, v)) => (
                    (m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?,
                    (v.affine(b2, 0.0)? + g2.affine(1.0 - b2, 0.0)?)?,
                ),
                // Moments start at zero, so the first update is just the scaled gradient.
                None => (g.affine(1.0 - b1, 0.0)?, g2.affine(1.0 - b2, 0.0)?),
            };
            let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, eps)?;
            let update = (m.div(&denom)?).affine(step_size, 0.0)?;
            let p = var.as_detached_tensor().affine(1.0 - lr * wd, 0.0)?;
            var.set(&(p - update)?)?;
            self.moments.insert(name.clone(), (m, v));
        }
        Ok(())
    }

    /// The moments as tensors keyed `"m.NAME"` and `"v.NAME"`, for checkpoints. Parameters that
    /// never had a gradient have no entry. The tensors are a snapshot: later steps do not change
    /// them.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.exported.store(true, Ordering::Relaxed);
        let mut out = HashMap::with_capacity(2 * self.moments.len());
        for (name, (m, v)) in &self.moments {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
        }
        out
    }

    /// Restore the state saved by [`AdamW::state_tensors`] and [`AdamW::steps_taken`]. Every
    /// key must be `m.NAME` or `v.NAME` for a parameter in `params`, with that parameter's shape
    /// and dtype, and `m` and `v` must come in pairs; otherwise nothing is changed and the error
    /// names the offending entry.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps_taken: u64,
        params: &[(String, Var)],
    ) -> Result<()> {
        let err = |m: String| Error::checkpoint("optimizer state", m);
        let by_name: HashMap<&str, &Var> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let (mut ms, mut vs) = (HashMap::new(), HashMap::new());
        for key in keys {
            let (map, name) = match (key.strip_prefix("m."), key.strip_prefix("v.")) {
                (Some(n), _) => (&mut ms, n),
                (_, Some(n)) => (&mut vs, n),
                _ => {
                    return Err(err(format!(
                        "unexpected entry '{key}' (not m.NAME or v.NAME)"
                    )))
                }
            };
            let Some(var) = by_name.get(name) else {
                return Err(err(format!(
                    "entry '{key}' is for unknown parameter '{name}'"
                )));
            };
            let t = &tensors[key];
            if t.shape() != var.shape() || t.dtype() != var.dtype() {
                return Err(err(format!(
                    "entry '{key}' has shape {:?} ({:?}) but parameter '{name}' has {:?} ({:?})",
                    t.dims(),
                    t.dtype(),
                    var.dims(),
                    var.dtype()
                )));
            }
            map.insert(
                name.to_string(),
                owned(&t.to_device(var.device())?.detach())?,
            );
        }
        let mut state = HashMap::with_capacity(ms.len());
        for (name, m) in ms {
            let Some(v) = vs.remove(&name) else {
                return Err(err(format!("entry 'm.{name}' has no matching 'v.{name}'")));
            };
            state.insert(name, (m, v));
        }
        if let Some(name) = vs.keys().min() {
            return Err(err(format!("entry 'v.{name}' has no matching 'm.{name}'")));
        }
        self.moments = state;
        self.exported.store(false, Ordering::Relaxed);
        self.steps = steps_taken;
        Ok(())
    }
}
