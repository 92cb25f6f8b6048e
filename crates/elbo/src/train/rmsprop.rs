//! RMSProp with saveable state (Tieleman & Hinton 2012, lecture 6.5), the optimiser of the
//! Wasserstein GAN's weight-clipping algorithm (Arjovsky et al. 2017, algorithm 1, which found
//! momentum-based optimisers unstable for the clipped critic), and [`Optimizer`], the choice
//! between it and [`AdamW`] that each parameter group makes.
//!
//! The update is PyTorch's `torch.optim.RMSprop` (no momentum, not centred): for a parameter `p`
//! with gradient `g`,
//!
//! ```text
//! p <- p * (1 - lr * weight_decay)            (decoupled, as AdamW; 0 in the WGAN configs)
//! s <- alpha * s + (1 - alpha) * g^2
//! p <- p - lr * g / (sqrt(s) + eps)
//! ```
//!
//! with `alpha` taken from the group's `beta2` (PyTorch's default 0.99). The squared averages
//! are tensors keyed `"s.NAME"` in checkpoints, so a resumed run continues bit-identically.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, AdamWConfig};
use crate::error::{Error, Result};

/// Which update rule a parameter group uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerKind {
    /// AdamW (Loshchilov & Hutter 2019): `beta1`, `beta2`, `weight_decay`.
    #[default]
    Adamw,
    /// RMSProp (Tieleman & Hinton 2012): `beta2` is the squared-gradient decay `alpha`.
    Rmsprop,
}

/// Hyper-parameters of [`RmsProp`].
#[derive(Clone, Debug, PartialEq)]
pub struct RmsPropConfig {
    /// Decay of the running mean of squared gradients.
    pub alpha: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay coefficient (multiplied by the learning rate).
    pub weight_decay: f64,
}

impl RmsPropConfig {
    /// `0 <= alpha < 1`, `eps > 0`, `weight_decay >= 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.alpha) {
            return Err(Error::Config(format!(
                "RMSProp: alpha (the group's beta2) must be in [0, 1), got {}",
                self.alpha
            )));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(Error::Config(format!(
                "RMSProp: eps must be finite and > 0, got {}",
                self.eps
            )));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::Config(format!(
                "RMSProp: weight_decay must be finite and >= 0, got {}",
                self.weight_decay
            )));
        }
        Ok(())
    }
}

/// RMSProp with checkpointable squared averages.
#[derive(Debug)]
pub struct RmsProp {
    cfg: RmsPropConfig,
    steps: u64,
    sq: HashMap<String, Tensor>,
}

impl RmsProp {
    /// A fresh optimiser.
    pub fn new(cfg: RmsPropConfig) -> Self {
        Self {
            cfg,
            steps: 0,
            sq: HashMap::new(),
        }
    }

    /// One update of every parameter with a gradient in `grads`, at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let RmsPropConfig {
            alpha,
            eps,
            weight_decay,
        } = self.cfg;
        for (name, var) in params {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let g = g.detach();
            if g.shape() != var.shape() {
                return Err(Error::Shape(format!(
                    "RMSProp: gradient of '{name}' has shape {:?} but the parameter has {:?}",
                    g.dims(),
                    var.dims()
                )));
            }
            let g2 = g.sqr()?;
            let s = match self.sq.get(name) {
                Some(s) => (s.affine(alpha, 0.0)? + g2.affine(1.0 - alpha, 0.0)?)?,
                None => g2.affine(1.0 - alpha, 0.0)?,
            };
            let update = g.div(&s.sqrt()?.affine(1.0, eps)?)?.affine(lr, 0.0)?;
            let p = var
                .as_detached_tensor()
                .affine(1.0 - lr * weight_decay, 0.0)?;
            var.set(&(p - update)?)?;
            self.sq.insert(name.clone(), s);
        }
        Ok(())
    }

    /// The squared averages keyed `"s.NAME"`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        self.sq
            .iter()
            .map(|(n, s)| (format!("s.{n}"), s.clone()))
            .collect()
    }

    /// Restore what [`RmsProp::state_tensors`] saved; every key must be `s.NAME` of a parameter
    /// in `params` with its shape, otherwise nothing changes and the error names the entry.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps_taken: u64,
        params: &[(String, Var)],
    ) -> Result<()> {
        let err = |m: String| Error::checkpoint("optimizer state", m);
        let by_name: HashMap<&str, &Var> = params.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let mut sq = HashMap::with_capacity(tensors.len());
        for (key, t) in tensors {
            let Some(name) = key.strip_prefix("s.") else {
                return Err(err(format!(
                    "unexpected entry '{key}' in an RMSProp state (not s.NAME; was the run \
                     trained with another optimizer?)"
                )));
            };
            let Some(var) = by_name.get(name) else {
                return Err(err(format!(
                    "entry '{key}' is for unknown parameter '{name}'"
                )));
            };
            if t.shape() != var.shape() || t.dtype() != var.dtype() {
                return Err(err(format!(
                    "entry '{key}' has shape {:?} but parameter '{name}' has {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            sq.insert(
                name.to_string(),
                t.to_device(var.device())?.detach().copy()?,
            );
        }
        self.sq = sq;
        self.steps = steps_taken;
        Ok(())
    }
}

/// A parameter group's optimiser.
#[derive(Debug)]
pub enum Optimizer {
    /// AdamW.
    AdamW(AdamW),
    /// RMSProp.
    RmsProp(RmsProp),
}

impl Optimizer {
    /// The optimiser `kind` with the group's resolved settings (RMSProp reads `beta2` as its
    /// `alpha` and ignores `beta1`), checked.
    pub fn new(kind: OptimizerKind, adam: AdamWConfig) -> Result<Self> {
        match kind {
            OptimizerKind::Adamw => {
                adam.validate()?;
                Ok(Self::AdamW(AdamW::new(adam)))
            }
            OptimizerKind::Rmsprop => {
                let cfg = RmsPropConfig {
                    alpha: adam.beta2,
                    eps: adam.eps,
                    weight_decay: adam.weight_decay,
                };
                cfg.validate()?;
                if !(adam.lr.is_finite() && adam.lr >= 0.0) {
                    return Err(Error::Config(format!(
                        "RMSProp: lr must be finite and >= 0, got {}",
                        adam.lr
                    )));
                }
                Ok(Self::RmsProp(RmsProp::new(cfg)))
            }
        }
    }

    /// One update at learning rate `lr`.
    pub fn step(&mut self, params: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<()> {
        match self {
            Self::AdamW(o) => o.step(params, grads, lr),
            Self::RmsProp(o) => o.step(params, grads, lr),
        }
    }

    /// Updates taken, restored ones included.
    pub fn steps_taken(&self) -> u64 {
        match self {
            Self::AdamW(o) => o.steps_taken(),
            Self::RmsProp(o) => o.steps,
        }
    }

    /// The state for checkpoints.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        match self {
            Self::AdamW(o) => o.state_tensors(),
            Self::RmsProp(o) => o.state_tensors(),
        }
    }

    /// Restore the checkpointed state.
    pub fn load_state(
        &mut self,
        tensors: &HashMap<String, Tensor>,
        steps_taken: u64,
        params: &[(String, Var)],
    ) -> Result<()> {
        match self {
            Self::AdamW(o) => o.load_state(tensors, steps_taken, params),
            Self::RmsProp(o) => o.load_state(tensors, steps_taken, params),
        }
    }
}
