//! A full-covariance Gaussian, the baseline row of every report: p(x) = N(x; μ, Σ), its exact
//! log-likelihood, fit by maximum likelihood in closed form (the sample mean and covariance of
//! every training batch seen; Bishop 2006, eq. 2.121-2.122) or by gradient descent on the NLL.
//!
//! The covariance is held through the inverse of its Cholesky factor, A = L⁻¹ with Σ = L Lᵀ
//! (lower triangular, positive diagonal exp(log_diag)), so that with z = A (x - μ)
//!
//!   -log p(x) = D/2 log 2π - Σ_i log A_ii + |z|²/2,
//!
//! which needs only a matrix product and is differentiable in every entry. Sampling solves
//! A (x - μ) = ε by forward substitution.
//!
//! On discrete data (levels 0..L-1) the model is a density on the dequantized grid of
//! [`DataScale`] and reports its Jacobian-corrected NLL: a bound on the discrete NLL (Theis et
//! al. 2016).
//!
//! This file is the worked example of `docs/architecture.md`: a family is a typed `Config`
//! implementing [`FamilyConfig`] and a model implementing [`GenerativeModel`]; the closed-form
//! fit shows the training-step hook and checkpointed state.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::diffusion::net::{check_batch, DataScale};
use crate::continuous::gaussian_fit::{cholesky, invert_lower};
use crate::model::{
    likelihood_choice, DataInfo, GenerativeModel, GroupSettings, ModelCore, ParamGroup,
    StepContext, StepOutput, DEFAULT_GROUP,
};
use crate::models::FamilyConfig;
use crate::nn::ParamInit;
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `gaussian`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// "closed-form" (the maximum-likelihood mean and covariance of all batches seen) or
    /// "gradient" (AdamW on the NLL, like every other family).
    pub fit: Fit,
    /// Added to the diagonal of the closed-form covariance (keeps Σ invertible on data that
    /// lies in a subspace, such as image borders that are always 0).
    pub jitter: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            fit: Fit::ClosedForm,
            jitter: 1e-4,
        }
    }
}

/// How the Gaussian is fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fit {
    /// Sufficient statistics of every training batch, then the MLE.
    ClosedForm,
    /// Gradient descent on the NLL.
    Gradient,
}

impl FamilyConfig for Config {
    const ABOUT: &'static str = "full-covariance Gaussian, the baseline (exact likelihood)";
    const LIKELIHOODS: &'static [&'static str] = &["exact"];

    fn validate(&self) -> Result<()> {
        if !(self.jitter.is_finite() && self.jitter >= 0.0) {
            return Err(Error::Config(format!(
                "model.jitter must be >= 0, got {}",
                self.jitter
            )));
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let d = data.dim;
        MemoryEstimate {
            // mean, log-diagonal and the strictly lower part of A
            params: estimate::sum(&[
                estimate::prod(&[2, d]),
                estimate::prod(&[d, d.saturating_sub(1)]) / 2,
            ]),
            // x - mu, A (x - mu) and the loss around them, with gradients
            activations: estimate::prod(&[batch, d, 8, 4]),
            // the dense A, its layout and gradient, and the closed-form statistics in f64
            fixed: estimate::prod(&[d, d, 48]),
        }
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(Gaussian::new(self, *data, device, rng)?))
    }
}

/// N(μ, Σ) with Σ⁻¹ = AᵀA.
pub struct Gaussian {
    core: ModelCore,
    cfg: Config,
    scale: DataScale,
    mean: Var,
    log_diag: Var,
    /// The strictly lower entries of A, row by row.
    lower: Var,
    /// Indices into `[0, lower...]` that lay out A's off-diagonal part, `[D·D]` (u32).
    layout: Tensor,
    /// Closed form: count, Σx and Σxxᵀ of the training batches seen (f64).
    stats: Stats,
}

#[derive(Clone, Debug, Default)]
struct Stats {
    n: f64,
    sum: Vec<f64>,
    outer: Vec<f64>,
}

impl Gaussian {
    /// N(0, I) for data of the given shape.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        let d = data.dim;
        if d == 0 {
            return Err(Error::Shape("gaussian needs at least 1 dimension".into()));
        }
        let core = ModelCore::new(d, device);
        let (mean, log_diag, lower) = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            (
                p.constant("mean", &[d], 0.0)?,
                p.constant("log_diag", &[d], 0.0)?,
                p.constant("lower", &[(d * d - d) / 2], 0.0)?,
            )
        };
        let mut idx = vec![0u32; d * d];
        let mut next = 1u32;
        for i in 0..d {
            for j in 0..i {
                idx[i * d + j] = next;
                next += 1;
            }
        }
        Ok(Self {
            layout: Tensor::from_vec(idx, d * d, device)?,
            cfg: cfg.clone(),
            scale: DataScale::new(data.kind)?,
            mean,
            log_diag,
            lower,
            stats: Stats {
                n: 0.0,
                sum: vec![0.0; d],
                outer: vec![0.0; d * d],
            },
            core,
        })
    }

    /// A = strict lower part + diag(exp(log_diag)), `[D, D]`.
    fn a_matrix(&self) -> Result<Tensor> {
        let d = self.core.dim;
        let dev = &self.core.device;
        let flat = Tensor::cat(
            &[&Tensor::zeros(1, DType::F32, dev)?, self.lower.as_tensor()],
            0,
        )?;
        let off = flat.index_select(&self.layout, 0)?.reshape((d, d))?; // [D, D]
        let diag = Tensor::eye(d, DType::F32, dev)?.broadcast_mul(&self.log_diag.exp()?)?;
        Ok((off + diag)?)
    }

    /// Per-example -log p(x) of model-space rows `x: [B, D]` (before any Jacobian).
    fn nll_rows(&self, x: &Tensor) -> Result<Tensor> {
        let d = self.core.dim as f64;
        let z = x
            .broadcast_sub(self.mean.as_tensor())?
            .matmul(&self.a_matrix()?.t()?)?; // [B, D]
        let half_sq = (z.sqr()?.sum(1)? * 0.5)?; // [B]
        let log_det = self.log_diag.sum_all()?; // Σ log A_ii
        let c = 0.5 * d * (2.0 * std::f64::consts::PI).ln();
        Ok((half_sq.broadcast_sub(&log_det)? + c)?)
    }

    /// Add a batch to the statistics and set μ and A to the maximum-likelihood fit.
    fn fit_closed_form(&mut self, x: &Tensor) -> Result<()> {
        let d = self.core.dim;
        let rows: Vec<Vec<f32>> = x.to_vec2()?;
        let st = &mut self.stats;
        for r in &rows {
            st.n += 1.0;
            for (i, &xi) in r.iter().enumerate() {
                let xi = f64::from(xi);
                st.sum[i] += xi;
                let row = &mut st.outer[i * d..i * d + i + 1];
                for (o, &xj) in row.iter_mut().zip(r) {
                    *o += xi * f64::from(xj);
                }
            }
        }
        let n = st.n;
        let mu: Vec<f64> = st.sum.iter().map(|s| s / n).collect();
        let mut cov = vec![0.0; d * d];
        for i in 0..d {
            for j in 0..=i {
                cov[i * d + j] = st.outer[i * d + j] / n - mu[i] * mu[j];
            }
            cov[i * d + i] += self.cfg.jitter;
        }
        let a = invert_lower(&cholesky(&cov, d)?, d);
        let dev = &self.core.device;
        let lower: Vec<f32> = (0..d)
            .flat_map(|i| (0..i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * d + j] as f32)
            .collect();
        let log_diag: Vec<f32> = (0..d).map(|i| a[i * d + i].ln() as f32).collect();
        let mu: Vec<f32> = mu.iter().map(|&m| m as f32).collect();
        self.mean.set(&Tensor::from_vec(mu, d, dev)?)?;
        self.log_diag.set(&Tensor::from_vec(log_diag, d, dev)?)?;
        self.lower
            .set(&Tensor::from_vec(lower, (d * d - d) / 2, dev)?)?;
        Ok(())
    }
}

impl GenerativeModel for Gaussian {
    fn family(&self) -> &'static str {
        "gaussian"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// The NLL in nats per dimension of a dequantized batch.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "gaussian")?;
        let x = self.scale.dequantize(batch, rng)?;
        Ok((self.nll_rows(&x)?.mean_all()? / self.core.dim as f64)?)
    }

    /// Closed form: fold the batch into the statistics (no optimiser step); gradient: the
    /// default step.
    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let batch = ctx.batch()?;
        if self.cfg.fit == Fit::Gradient {
            let loss = self.loss(&batch, ctx.rng())?;
            return ctx.minimize(DEFAULT_GROUP, &loss);
        }
        check_batch(&batch, self.core.dim, "gaussian")?;
        let x = self.scale.dequantize(&batch, ctx.rng())?;
        self.fit_closed_form(&x)?;
        let loss = self.nll_rows(&x)?.mean_all()?.to_scalar::<f32>()?;
        Ok(StepOutput {
            loss: f64::from(loss) / self.core.dim as f64,
            ..StepOutput::default()
        })
    }

    /// The closed-form fit takes no optimiser steps, so its weights keep no EMA.
    fn param_groups(&self) -> Vec<ParamGroup> {
        let ema = (self.cfg.fit == Fit::Gradient)
            .then_some(true)
            .or(Some(false));
        vec![ParamGroup::all(DEFAULT_GROUP).settings(GroupSettings {
            ema,
            ..GroupSettings::default()
        })]
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let d = self.core.dim;
        let dev = &self.core.device;
        let s = &self.stats;
        Ok(HashMap::from([
            ("n".to_string(), Tensor::from_vec(vec![s.n], 1, dev)?),
            ("sum".to_string(), Tensor::from_vec(s.sum.clone(), d, dev)?),
            (
                "outer".to_string(),
                Tensor::from_vec(s.outer.clone(), (d, d), dev)?,
            ),
        ]))
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        let d = self.core.dim;
        let get = |k: &str, len: usize| -> Result<Vec<f64>> {
            let v: Vec<f64> = t
                .get(k)
                .ok_or_else(|| Error::Config(format!("gaussian state '{k}' missing")))?
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1()?;
            if v.len() != len {
                return Err(Error::Config(format!(
                    "gaussian state '{k}' has {} values, expected {len}",
                    v.len()
                )));
            }
            Ok(v)
        };
        if t.is_empty() {
            return Ok(()); // a checkpoint of the gradient fit, or none taken yet
        }
        self.stats = Stats {
            n: get("n", 1)?[0],
            sum: get("sum", d)?,
            outer: get("outer", d * d)?,
        };
        Ok(())
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        "exact draws x = μ + A⁻¹ε".into()
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let d = self.core.dim;
        let a: Vec<f64> = self
            .a_matrix()?
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1()?;
        let mu: Vec<f64> = self.mean.to_dtype(DType::F64)?.to_vec1()?;
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            // forward substitution: A y = ε, x = μ + y
            let mut y = vec![0.0; d];
            for i in 0..d {
                let s: f64 = (0..i).map(|k| a[i * d + k] * y[k]).sum();
                y[i] = (rng.normal() - s) / a[i * d + i];
            }
            out.extend(y.iter().zip(&mu).map(|(y, m)| (y + m) as f32));
        }
        let x = Tensor::from_vec(out, (n, d), &self.core.device)?;
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "gaussian", Config::LIKELIHOODS)?;
        check_batch(batch, self.core.dim, "gaussian")?;
        let x = self.scale.dequantize(batch, rng)?;
        let off = self.scale.log_jacobian(self.core.dim);
        let v: Vec<f32> = self.nll_rows(&x)?.to_vec1()?;
        Ok(Nll {
            nats: v.into_iter().map(|l| f64::from(l) - off).collect(),
            dims: self.core.dim,
            kind: match self.scale.levels {
                None => NllKind::Exact,
                Some(_) => NllKind::Bound,
            },
        })
    }

    fn likelihood_method(&self, _opts: &EvalOptions) -> String {
        let fit = match self.cfg.fit {
            Fit::ClosedForm => "closed-form maximum likelihood",
            Fit::Gradient => "gradient fit",
        };
        format!(
            "exact Gaussian log-density ({fit}){}",
            self.scale.dequantization_note()
        )
    }
}
