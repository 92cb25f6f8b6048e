//! Parameter groups and the context a family's training step runs in.
//!
//! A family's [`crate::model::GenerativeModel::train_step`] sees a [`StepContext`]: it draws
//! batches, and [`StepContext::minimize`] takes a loss over one named [`ParamGroup`]: backward,
//! gradient clipping, that group's optimiser step (AdamW or RMSProp) at its scheduled learning rate, and its EMA.
//! Each group keeps its own optimiser state, saved in every checkpoint, so a GAN's generator and
//! critic (two optimisers with their own settings, the critic stepped several times a step)
//! train through the same loop as a one-network family.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};

use super::clip::{clip_grad_norm, clip_grad_norm_tensor, grad_norm, grad_norm_tensor};
use super::ema::Ema;
use super::optim::AdamWConfig;
use super::rmsprop::{Optimizer, OptimizerKind};
use super::schedule::LrSchedule;
use crate::config::TrainConfig;
use crate::data::DataSource;
use crate::{Error, Result, Rng};

/// The name of the single group of a one-network family.
pub const DEFAULT_GROUP: &str = "model";

/// Per-group optimiser settings; `None` takes the `[train]` value.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupSettings {
    /// Peak learning rate.
    pub lr: Option<f64>,
    /// AdamW beta1.
    pub beta1: Option<f64>,
    /// AdamW beta2.
    pub beta2: Option<f64>,
    /// Decoupled weight decay.
    pub weight_decay: Option<f64>,
    /// Global-norm gradient clipping (0 disables).
    pub grad_clip: Option<f64>,
    /// Linear warm-up steps of the learning rate.
    pub warmup_steps: Option<usize>,
    /// Final learning rate as a fraction of the peak (cosine decay).
    pub min_lr_ratio: Option<f64>,
    /// Keep an EMA of this group's weights (`Some(false)` turns it off even when
    /// `train.ema_decay > 0`).
    pub ema: Option<bool>,
    /// The update rule (default AdamW).
    pub optimizer: Option<OptimizerKind>,
}

/// A named set of parameters: those whose names start with one of `prefixes`, or every
/// parameter no other group claims when `prefixes` is empty.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamGroup {
    /// Group name (checkpoint files and logs use it).
    pub name: String,
    /// Parameter-name prefixes (e.g. `"gen."`); empty: the rest.
    pub prefixes: Vec<String>,
    /// Optimiser settings.
    pub settings: GroupSettings,
}

impl ParamGroup {
    /// A group taking every parameter no other group claims.
    pub fn all(name: &str) -> Self {
        Self {
            name: name.to_string(),
            prefixes: Vec::new(),
            settings: GroupSettings::default(),
        }
    }

    /// A group of the parameters whose names start with one of `prefixes`.
    pub fn with_prefixes(name: &str, prefixes: &[&str]) -> Self {
        Self {
            name: name.to_string(),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
            settings: GroupSettings::default(),
        }
    }

    /// The same group with `settings`.
    pub fn settings(mut self, settings: GroupSettings) -> Self {
        self.settings = settings;
        self
    }
}

/// What one training step reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepOutput {
    /// The loss logged for the step (NaN while [`StepOutput::on_device`] holds it).
    pub loss: f64,
    /// Gradient norm before clipping of the last minimisation (NaN while
    /// [`StepOutput::on_device`] holds it).
    pub grad_norm: f64,
    /// Learning rate of the last minimisation.
    pub lr: f64,
    /// Further named figures to log (e.g. a critic's loss).
    pub extra: Vec<(String, f64)>,
    /// The loss and gradient norm still on the device, not read yet: set by
    /// [`StepContext::minimize`] when the trainer defers host reads (GPU devices, see
    /// [`crate::train::Trainer::set_deferred_reads`]); the trainer reads a batch of them at once
    /// and fills `loss` and `grad_norm`. Only the returned output is read: a family that logs
    /// the loss of an earlier minimisation of its step (e.g. a critic's) reads it itself.
    pub on_device: Option<DeviceScalars>,
}

/// A step's loss and gradient norm as scalar `f64` tensors on the training device.
#[derive(Clone, Debug)]
pub struct DeviceScalars {
    /// The loss (detached).
    pub loss: Tensor,
    /// The gradient norm before clipping.
    pub grad_norm: Tensor,
}

impl PartialEq for DeviceScalars {
    /// The same tensors (values are not read: that would synchronise).
    fn eq(&self, other: &Self) -> bool {
        self.loss.id() == other.loss.id() && self.grad_norm.id() == other.grad_norm.id()
    }
}

/// One group's parameters and optimiser state.
pub(crate) struct GroupState {
    pub name: String,
    pub params: Vec<(String, Var)>,
    pub optim: Optimizer,
    pub sched: LrSchedule,
    pub clip: f64,
    pub ema: Option<Ema>,
}

impl GroupState {
    /// The checkpoint file of this group's optimiser state ("optim" for the default group, as
    /// before groups existed).
    pub fn optim_file(&self) -> String {
        if self.name == DEFAULT_GROUP {
            "optim".to_string()
        } else {
            format!("optim-{}", self.name)
        }
    }
}

/// Split `params` (sorted by name) into the groups `specs` declares, with settings from
/// `train` where a group sets none.
pub(crate) fn build_groups(
    specs: &[ParamGroup],
    params: Vec<(String, Var)>,
    train: &TrainConfig,
) -> Result<Vec<GroupState>> {
    if specs.is_empty() {
        return Err(Error::Config(
            "a model must declare at least one parameter group".into(),
        ));
    }
    if specs.iter().filter(|g| g.prefixes.is_empty()).count() > 1 {
        return Err(Error::Config(
            "at most one parameter group may take the remaining parameters".into(),
        ));
    }
    let mut members: Vec<Vec<(String, Var)>> = vec![Vec::new(); specs.len()];
    for (name, var) in params {
        let by_prefix = specs
            .iter()
            .position(|g| g.prefixes.iter().any(|p| name.starts_with(p.as_str())));
        let idx = by_prefix
            .or_else(|| specs.iter().position(|g| g.prefixes.is_empty()))
            .ok_or_else(|| {
                Error::Config(format!("parameter '{name}' belongs to no parameter group"))
            })?;
        members[idx].push((name, var));
    }
    specs
        .iter()
        .zip(members)
        .map(|(spec, params)| {
            if params.is_empty() && !spec.prefixes.is_empty() {
                return Err(Error::Config(format!(
                    "parameter group '{}' matches no parameter (prefixes {:?})",
                    spec.name, spec.prefixes
                )));
            }
            let s = &spec.settings;
            let optim = Optimizer::new(
                s.optimizer.unwrap_or_default(),
                AdamWConfig {
                    lr: s.lr.unwrap_or(train.lr),
                    beta1: s.beta1.unwrap_or(train.beta1),
                    beta2: s.beta2.unwrap_or(train.beta2),
                    eps: 1e-8,
                    weight_decay: s.weight_decay.unwrap_or(train.weight_decay),
                },
            )?;
            let sched = LrSchedule {
                base_lr: s.lr.unwrap_or(train.lr),
                warmup_steps: s.warmup_steps.unwrap_or(train.warmup_steps),
                total_steps: train.steps,
                min_lr_ratio: s.min_lr_ratio.unwrap_or(train.min_lr_ratio),
            };
            let ema = match s.ema.unwrap_or(true) && train.ema_decay > 0.0 {
                true => Some(Ema::new(&params, train.ema_decay)?),
                false => None,
            };
            Ok(GroupState {
                name: spec.name.clone(),
                params,
                optim,
                sched,
                clip: s.grad_clip.unwrap_or(train.grad_clip),
                ema,
            })
        })
        .collect()
}

/// What a family's training step can do: draw batches and random numbers, and minimise a loss
/// over a parameter group.
pub struct StepContext<'a> {
    pub(crate) data: &'a mut dyn DataSource,
    pub(crate) batch_size: usize,
    pub(crate) rng: &'a mut Rng,
    pub(crate) device: Device,
    pub(crate) groups: &'a mut [GroupState],
    pub(crate) step: usize,
    /// Leave the loss and gradient norm on the device ([`StepOutput::on_device`]).
    pub(crate) defer_reads: bool,
}

impl StepContext<'_> {
    /// A training batch of `[train] batch_size` examples.
    pub fn batch(&mut self) -> Result<Tensor> {
        let n = self.batch_size;
        self.batch_of(n)
    }

    /// A training batch of `n` examples.
    pub fn batch_of(&mut self, n: usize) -> Result<Tensor> {
        self.data.train_batch(n, self.rng, &self.device)
    }

    /// The run's training generator (its state is checkpointed, so a resumed run draws the
    /// same numbers).
    pub fn rng(&mut self) -> &mut Rng {
        self.rng
    }

    /// Steps completed before this one.
    pub fn step(&self) -> usize {
        self.step
    }

    /// The names of the parameter groups.
    pub fn group_names(&self) -> Vec<&str> {
        self.groups.iter().map(|g| g.name.as_str()).collect()
    }

    /// Minimise the scalar `loss` over the parameters of `group`: backward, clip the group's
    /// gradient norm, one AdamW step at the scheduled learning rate, EMA update. A NaN or
    /// infinite loss is an error and changes nothing.
    ///
    /// When the trainer defers host reads (by default on GPU devices), nothing is read back:
    /// the loss and the norm stay on the device ([`StepOutput::on_device`]; `loss` and
    /// `grad_norm` are NaN until the trainer reads them), clipping scales the gradients by a
    /// device scalar ([`clip_grad_norm_tensor`]), and a non-finite loss is found by the trainer
    /// at its next read (a log, checkpoint or evaluation step), after the parameters were
    /// updated with it; the error names the step it happened at, and no checkpoint is written
    /// from such weights.
    pub fn minimize(&mut self, group: &str, loss: &Tensor) -> Result<StepOutput> {
        let step = self.step;
        let Some(idx) = self.groups.iter().position(|g| g.name == group) else {
            let names = self.group_names().join(", ");
            return Err(Error::Config(format!(
                "no parameter group '{group}' (groups: {names})"
            )));
        };
        let g = &mut self.groups[idx];
        if self.defer_reads {
            let loss_t = loss.detach().to_dtype(DType::F64)?;
            let mut grads = loss.backward()?;
            let gnorm = if g.clip > 0.0 {
                clip_grad_norm_tensor(&g.params, &mut grads, g.clip, loss.device())?
            } else {
                grad_norm_tensor(&g.params, &grads, loss.device())?
            };
            let lr = g.sched.lr_at(step);
            g.optim.step(&g.params, &grads, lr)?;
            if let Some(ema) = g.ema.as_mut() {
                ema.update(&g.params)?;
            }
            return Ok(StepOutput {
                loss: f64::NAN,
                grad_norm: f64::NAN,
                lr,
                extra: Vec::new(),
                on_device: Some(DeviceScalars {
                    loss: loss_t,
                    grad_norm: gnorm,
                }),
            });
        }
        let loss_val = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_val.is_finite() {
            return Err(Error::NonFiniteLoss {
                step: step + 1,
                loss: loss_val,
                kept: String::new(),
            });
        }
        let mut grads = loss.backward()?;
        let gnorm = if g.clip > 0.0 {
            clip_grad_norm(&g.params, &mut grads, g.clip)?
        } else {
            grad_norm(&g.params, &grads)?
        };
        let lr = g.sched.lr_at(step);
        g.optim.step(&g.params, &grads, lr)?;
        if let Some(ema) = g.ema.as_mut() {
            ema.update(&g.params)?;
        }
        Ok(StepOutput {
            loss: loss_val,
            grad_norm: gnorm,
            lr,
            extra: Vec::new(),
            on_device: None,
        })
    }
}

/// The entries of `all` that belong to `params` (a group's share of a checkpoint file holding
/// several groups).
pub(crate) fn subset(
    all: &HashMap<String, Tensor>,
    params: &[(String, Var)],
) -> HashMap<String, Tensor> {
    params
        .iter()
        .filter_map(|(n, _)| all.get(n).map(|t| (n.clone(), t.clone())))
        .collect()
}
