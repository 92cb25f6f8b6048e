//! Learning-rate schedule: linear warm-up followed by cosine decay (Loshchilov & Hutter 2017,
//! "SGDR: Stochastic Gradient Descent with Warm Restarts", without restarts; the warm-up is that of
//! Goyal et al. 2017). This is the schedule of most diffusion and flow-matching codebases.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Linear warm-up to `base_lr`, then half a cosine down to `base_lr * min_lr_ratio`.
///
/// Steps are counted from 0 (the step about to be taken). With `w = warmup_steps` and
/// `T = total_steps`:
/// - `step < w`: `base_lr * (step + 1) / w`, so `lr_at(0) = base_lr / w` and `lr_at(w - 1) = base_lr`;
/// - `w <= step < T`: `min + (base_lr - min) * (1 + cos(pi * (step - w) / (T - w))) / 2` with
///   `min = base_lr * min_lr_ratio`, so `lr_at(w) = base_lr`;
/// - `step >= T`: `min`.
///
/// `warmup_steps = 0` means no warm-up; `min_lr_ratio = 1` gives a constant rate after warm-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The peak learning rate, reached at the end of warm-up.
    pub base_lr: f64,
    /// Number of warm-up steps (0 for none).
    pub warmup_steps: usize,
    /// The step at which the decay reaches its minimum.
    pub total_steps: usize,
    /// Final learning rate as a fraction of `base_lr`, in [0, 1].
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// A constant learning rate (no warm-up, no decay).
    pub fn constant(lr: f64) -> Self {
        Self {
            base_lr: lr,
            warmup_steps: 0,
            total_steps: 0,
            min_lr_ratio: 1.0,
        }
    }

    /// Check the values: `base_lr` finite and >= 0, `min_lr_ratio` in [0, 1],
    /// `total_steps >= warmup_steps`.
    pub fn validate(&self) -> Result<()> {
        if !(self.base_lr.is_finite() && self.base_lr >= 0.0) {
            return Err(Error::Config(format!(
                "learning-rate schedule: base_lr must be finite and >= 0, got {}",
                self.base_lr
            )));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::Config(format!(
                "learning-rate schedule: min_lr_ratio must be in [0, 1], got {}",
                self.min_lr_ratio
            )));
        }
        if self.total_steps < self.warmup_steps {
            return Err(Error::Config(format!(
                "learning-rate schedule: total_steps ({}) is shorter than warmup_steps ({})",
                self.total_steps, self.warmup_steps
            )));
        }
        Ok(())
    }

    /// The learning rate for step `step` (counted from 0).
    pub fn lr_at(&self, step: usize) -> f64 {
        let (w, total) = (self.warmup_steps, self.total_steps);
        let min_lr = self.base_lr * self.min_lr_ratio;
        if step < w {
            return self.base_lr * (step + 1) as f64 / w as f64;
        }
        if step >= total {
            return min_lr;
        }
        // Here w <= step < total, so total - w >= 1.
        let progress = (step - w) as f64 / (total - w) as f64;
        min_lr + (self.base_lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}
