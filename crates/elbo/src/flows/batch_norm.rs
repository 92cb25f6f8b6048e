//! Batch normalisation as a bijector (Dinh et al. 2017, sec. 3.7; Ioffe & Szegedy 2015):
//!
//!   y = (x - μ̃) / sqrt(σ̃² + ε) ⊙ exp(log γ) + β,
//!   log |det ∂y/∂x| = Σ_j (log γ_j - ½ log(σ̃²_j + ε))     (eq. 11, per value),
//!
//! with `(μ̃, σ̃²)` the statistics of the current batch in training (the gradient flows through
//! them, as in the paper) and running averages of them at evaluation, so that a held-out
//! density is one fixed bijection. The running averages move by
//! `m <- ρ m + (1 - ρ) m_batch` at every training forward pass, start from the first batch's
//! statistics ([`Bijector::init_from_data`]) and are kept in checkpoints
//! ([`Bijector::state`]). The inverse always uses the running averages. On channels-last
//! images `[B, H, W, C]` it acts per channel (statistics over the batch and every pixel), and
//! the log-determinant counts every pixel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use candle_core::{Tensor, Var};

use super::{positions, Bijector};
use crate::nn::ParamInit;
use crate::{Error, Result};

/// `ε` under the square root.
pub const EPS: f64 = 1e-5;
/// Decay `ρ` of the running averages.
pub const DECAY: f64 = 0.95;

/// Batch normalisation along the last axis, with a trainable log-scale and shift.
pub struct BatchNorm {
    log_gamma: Var,
    beta: Var,
    /// Running `(mean, variance)`, `[D]` each.
    running: Mutex<(Tensor, Tensor)>,
    training: AtomicBool,
}

impl BatchNorm {
    /// Identity scale and shift, running mean 0 and variance 1, in evaluation mode.
    /// Parameters: `log_gamma`, `beta`.
    pub fn new(p: &mut ParamInit, d: usize) -> Result<Self> {
        let dev = p.device().clone();
        Ok(Self {
            log_gamma: p.constant("log_gamma", &[d], 0.0)?,
            beta: p.constant("beta", &[d], 0.0)?,
            running: Mutex::new((
                Tensor::zeros(d, candle_core::DType::F32, &dev)?,
                Tensor::ones(d, candle_core::DType::F32, &dev)?,
            )),
            training: AtomicBool::new(false),
        })
    }

    /// Per-dimension `(mean, biased variance)` of `x` over every axis but the last, `[D]` each.
    pub fn batch_statistics(x: &Tensor) -> Result<(Tensor, Tensor)> {
        let f = x.dim(x.rank() - 1)?;
        let x = x.reshape(((), f))?; // [B H W, C] or [B, D]
        let mean = x.mean(0)?; // [D]
        let var = x.broadcast_sub(&mean)?.sqr()?.mean(0)?; // [D]
        Ok((mean, var))
    }

    /// The running `(mean, variance)`.
    pub fn running(&self) -> Result<(Tensor, Tensor)> {
        Ok(self.lock()?.clone())
    }

    /// Replace the running `(mean, variance)`.
    pub fn set_running(&self, mean: &Tensor, var: &Tensor) -> Result<()> {
        *self.lock()? = (mean.detach(), var.detach());
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, (Tensor, Tensor)>> {
        self.running
            .lock()
            .map_err(|_| Error::Config("batch norm: running statistics poisoned".into()))
    }

    /// `y` and the log-determinant `[B]` for statistics `(mean, var)`.
    fn apply(&self, x: &Tensor, mean: &Tensor, var: &Tensor) -> Result<(Tensor, Tensor)> {
        let inv_std = (var + EPS)?.sqrt()?.recip()?; // [D]
        let scale = inv_std.mul(&self.log_gamma.exp()?)?; // [D]
        let y = x
            .broadcast_sub(mean)?
            .broadcast_mul(&scale)?
            .broadcast_add(self.beta.as_tensor())?; // shaped as x
        let per = (self.log_gamma.as_tensor() - ((var + EPS)?.log()? * 0.5)?)?.sum_all()?;
        let ld = (per * positions(x)? as f64)?
            .broadcast_as(x.dim(0)?)?
            .contiguous()?; // [B]
        Ok((y, ld))
    }
}

impl Bijector for BatchNorm {
    /// Training: the batch's statistics (and the running averages move towards them);
    /// evaluation: the running averages.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.training.load(Ordering::Relaxed) {
            let (mean, var) = Self::batch_statistics(x)?;
            {
                let mut r = self.lock()?;
                let m = ((&r.0 * DECAY)? + (mean.detach() * (1.0 - DECAY))?)?;
                let v = ((&r.1 * DECAY)? + (var.detach() * (1.0 - DECAY))?)?;
                *r = (m, v);
            }
            self.apply(x, &mean, &var)
        } else {
            let (mean, var) = self.running()?;
            self.apply(x, &mean, &var)
        }
    }

    fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        let (mean, var) = self.running()?;
        let std = (var + EPS)?.sqrt()?; // [D]
        Ok(z.broadcast_sub(self.beta.as_tensor())?
            .broadcast_mul(&self.log_gamma.neg()?.exp()?.mul(&std)?)?
            .broadcast_add(&mean)?
            .detach())
    }

    /// The running averages start at the first batch's statistics.
    fn init_from_data(&mut self, x: &Tensor) -> Result<()> {
        let (mean, var) = Self::batch_statistics(&x.detach())?;
        self.set_running(&mean, &var)
    }

    fn set_training(&self, on: bool) {
        self.training.store(on, Ordering::Relaxed);
    }

    fn state(&self, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
        let (mean, var) = self.running()?;
        out.insert(format!("{prefix}running_mean"), mean);
        out.insert(format!("{prefix}running_var"), var);
        Ok(())
    }

    fn load_state(&mut self, prefix: &str, t: &HashMap<String, Tensor>) -> Result<()> {
        let mut r = self.lock()?;
        if let Some(m) = t.get(&format!("{prefix}running_mean")) {
            r.0 = m.clone();
        }
        if let Some(v) = t.get(&format!("{prefix}running_var")) {
            r.1 = v.clone();
        }
        Ok(())
    }
}
