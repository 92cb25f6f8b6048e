//! The one trait every generative family implements.
//!
//! Every model answers the same three questions: its training objective, how to sample, and
//! the log-likelihood of held-out data with an honest label (exact / bound / estimate / none).
//! The trainer, the CLI, evaluation and reports only ever see this trait; the families and
//! their registry live in [`crate::models`].
//!
//! A family with one network and one loss implements `loss` and inherits the rest. Families
//! that need more override the hooks, each with a default that changes nothing:
//! - [`GenerativeModel::train_step`]: one optimisation step through a [`StepContext`], which
//!   draws batches and minimises a loss over one named parameter group (a GAN's two players,
//!   a critic stepped `n_critic` times);
//! - [`GenerativeModel::param_groups`]: the groups, each with its own optimiser settings;
//! - [`GenerativeModel::state_tensors`]: non-parameter state saved in every checkpoint (an
//!   EMA codebook, persistent MCMC chains);
//! - [`GenerativeModel::init_from_data`]: a data-dependent initialisation run once on the first
//!   batch (ActNorm).

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::config::{EvalOptions, SampleOptions};
use crate::data::{DataKind, Layout};
use crate::{Error, Nll, Result, Rng};

pub use crate::train::step::{GroupSettings, ParamGroup, StepContext, StepOutput, DEFAULT_GROUP};

/// What a family needs to know about the data to build itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataInfo {
    /// Dimensions of one example.
    pub dim: usize,
    /// Continuous or discrete levels.
    pub kind: DataKind,
    /// How the values of one example are arranged (a flat vector, an image, a sequence), as
    /// the data source knows it.
    pub layout: Layout,
}

impl DataInfo {
    /// A flat vector of `dim` values.
    pub const fn flat(dim: usize, kind: DataKind) -> Self {
        Self {
            dim,
            kind,
            layout: Layout::Flat,
        }
    }

    /// What a data source says of its examples.
    pub fn of(data: &dyn crate::data::DataSource) -> Self {
        Self {
            dim: data.dim(),
            kind: data.kind(),
            layout: data.layout(),
        }
    }

    /// The number of levels of discrete data.
    pub fn levels(&self) -> Option<usize> {
        match self.kind {
            DataKind::Discrete { levels } => Some(levels),
            DataKind::Continuous => None,
        }
    }
}

/// What every model holds: its parameters, the size of one example and its device. A family
/// keeps one and returns it from [`GenerativeModel::core`], which gives it `varmap`, `dim` and
/// `device` for free.
pub struct ModelCore {
    /// The trainable parameters.
    pub varmap: VarMap,
    /// Dimensions of one example.
    pub dim: usize,
    /// The device the parameters live on.
    pub device: Device,
}

impl ModelCore {
    /// An empty parameter set for examples of `dim` dimensions.
    pub fn new(dim: usize, device: &Device) -> Self {
        Self {
            varmap: VarMap::new(),
            dim,
            device: device.clone(),
        }
    }
}

/// A generative model fit by maximum likelihood, exactly or through a bound.
pub trait GenerativeModel {
    /// Canonical family name, as registered in [`crate::models`].
    fn family(&self) -> &'static str;
    /// The parameters, dimension and device.
    fn core(&self) -> &ModelCore;
    /// The trainable parameters.
    fn varmap(&self) -> &VarMap {
        &self.core().varmap
    }
    /// Dimensions of one example.
    fn dim(&self) -> usize {
        self.core().dim
    }
    /// The device the parameters live on.
    fn device(&self) -> &Device {
        &self.core().device
    }
    /// The training objective on a batch `[B, D]`: a differentiable scalar.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor>;
    /// One optimisation step. The default draws one batch, takes [`GenerativeModel::loss`] and
    /// minimises it over the [`DEFAULT_GROUP`] (backward, clipping, AdamW, EMA).
    fn train_step(&mut self, ctx: &mut StepContext<'_>) -> Result<StepOutput> {
        let batch = ctx.batch()?;
        let loss = self.loss(&batch, ctx.rng())?;
        ctx.minimize(DEFAULT_GROUP, &loss)
    }
    /// The parameter groups, each with its own optimiser settings (unset fields come from
    /// `[train]`). Every parameter must fall in exactly one group. Default: one group,
    /// [`DEFAULT_GROUP`], holding everything.
    fn param_groups(&self) -> Vec<ParamGroup> {
        vec![ParamGroup::all(DEFAULT_GROUP)]
    }
    /// Non-parameter state to save in every checkpoint, by name (default: none).
    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        Ok(HashMap::new())
    }
    /// Restore what [`GenerativeModel::state_tensors`] saved.
    fn load_state_tensors(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        match tensors.keys().next() {
            None => Ok(()),
            Some(k) => Err(Error::Config(format!(
                "the {} family keeps no state, but the checkpoint holds state tensor '{k}'",
                self.family()
            ))),
        }
    }
    /// A data-dependent initialisation, called once on the first training batch of a new run
    /// (never on resume: the checkpoint holds its result). Default: nothing.
    fn init_from_data(&mut self, batch: &Tensor, rng: &mut Rng) -> Result<()> {
        let _ = (batch, rng);
        Ok(())
    }
    /// The likelihood names `log_likelihood` accepts (`EvalOptions::likelihood`); the first is
    /// the default. Empty for a family without a likelihood.
    fn likelihoods(&self) -> &'static [&'static str];
    /// Likelihood names `log_likelihood` also accepts when named but never picks for `auto`
    /// (the family's `OPT_IN_LIKELIHOODS`). Default: none.
    fn opt_in_likelihoods(&self) -> &'static [&'static str] {
        &[]
    }
    /// One line saying how `sample` draws, with the given options (for reports and the CLI).
    fn sampling(&self, opts: &SampleOptions) -> String;
    /// `n` samples, `[n, D]`, in the data's own units (discrete data as levels).
    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor>;
    /// Per-example negative log-likelihood of `batch: [B, D]`, labelled exact / bound /
    /// estimate / none.
    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll>;
    /// One line saying how `log_likelihood` computes its number (for reports).
    fn likelihood_method(&self, opts: &EvalOptions) -> String;
    /// The discrete autoencoder a two-stage model encodes and decodes images with (the
    /// VQ-VAE); `None` for every other family.
    fn code_autoencoder(&self) -> Option<&dyn crate::latent::two_stage::CodeAutoencoder> {
        None
    }
    /// `n` samples `[n, D]` with some positions fixed: `template[i]` is `Some(level)` for a
    /// given position and `None` for one to generate (a prefix prompt, or blanks to fill in).
    /// Families that cannot condition return an error.
    fn sample_conditional(
        &self,
        n: usize,
        template: &[Option<u32>],
        opts: &SampleOptions,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let _ = (n, template, opts, rng);
        Err(Error::Config(format!(
            "the {} family cannot sample conditionally on a prompt",
            self.family()
        )))
    }
}

/// The likelihood `opts.likelihood` names for a family accepting `choices` (first = default
/// for "auto"); anything else is an error naming the options.
pub fn likelihood_choice(
    opts: &EvalOptions,
    family: &str,
    choices: &[&'static str],
) -> Result<&'static str> {
    likelihood_choice_among(opts, family, choices, &[])
}

/// [`likelihood_choice`] for a family that also computes the likelihoods `opt_in` when they are
/// named: "auto" still takes the first of `choices` (none when it is empty).
pub fn likelihood_choice_among(
    opts: &EvalOptions,
    family: &str,
    choices: &[&'static str],
    opt_in: &[&'static str],
) -> Result<&'static str> {
    let want = opts
        .likelihood
        .trim()
        .to_ascii_lowercase()
        .replace('_', "-");
    if want == "auto" {
        return choices.first().copied().ok_or_else(|| {
            let named = match opt_in {
                [] => String::new(),
                o => format!(" (or name {})", o.join(", ")),
            };
            Error::Config(format!(
                "the {family} family has no default likelihood; compare it by sample \
                 metrics{named}"
            ))
        });
    }
    choices
        .iter()
        .chain(opt_in)
        .find(|c| **c == want)
        .copied()
        .ok_or_else(|| {
            let all: Vec<&str> = choices.iter().chain(opt_in).copied().collect();
            let valid = if all.is_empty() {
                "auto (it has none: compare it by sample metrics)".to_string()
            } else {
                format!("auto or {}", all.join(", "))
            };
            Error::Config(format!(
                "the {family} family reports no likelihood '{want}'; use {valid}"
            ))
        })
}

/// Per-example NLL over a whole data set, in batches of `opts.batch_size`.
pub fn dataset_nll(
    model: &dyn GenerativeModel,
    data: &Tensor,
    opts: &EvalOptions,
    rng: &mut Rng,
) -> Result<Nll> {
    dataset_nll_within(model, data, opts, rng, None)
}

/// [`dataset_nll`] that gives up with [`Error::Budget`] once `deadline` has passed: checked
/// before each batch and inside the adaptive ODE solver (see [`crate::deadline`]). The result,
/// when there is one, is the same as without a deadline.
pub fn dataset_nll_within(
    model: &dyn GenerativeModel,
    data: &Tensor,
    opts: &EvalOptions,
    rng: &mut Rng,
    deadline: Option<std::time::Instant>,
) -> Result<Nll> {
    let n = data.dim(0)?;
    let mut parts = Vec::new();
    let mut start = 0;
    crate::deadline::within(deadline, || {
        while start < n {
            crate::deadline::check(|| {
                format!(
                    "the likelihood evaluation stopped after {start} of {n} examples (raise \
                     train.eval_budget_s, or lower eval.batch_size for finer steps)"
                )
            })?;
            let len = opts.batch_size.min(n - start);
            parts.push(model.log_likelihood(&data.narrow(0, start, len)?, opts, rng)?);
            start += len;
        }
        Nll::concat(std::mem::take(&mut parts))
    })
}

/// `n` samples `[n, D]` drawn `chunk` at a time (the last chunk smaller), so the sampler's
/// memory is bounded by one chunk whatever `n`; with `progress` a bar counts the chunks when
/// there are several. For `n <= chunk` this is exactly one [`GenerativeModel::sample`] call, so
/// the result is the same as drawing all at once with the same generator.
pub fn sample_chunked(
    model: &dyn GenerativeModel,
    n: usize,
    opts: &SampleOptions,
    rng: &mut Rng,
    chunk: usize,
    progress: bool,
) -> Result<Tensor> {
    in_chunks(n, chunk, progress, |m| model.sample(m, opts, rng))
}

/// `draw(m)` for consecutive chunks of at most `chunk` of `n` rows, concatenated along the
/// first dimension (a single call when `n <= chunk`).
pub fn in_chunks(
    n: usize,
    chunk: usize,
    progress: bool,
    mut draw: impl FnMut(usize) -> Result<Tensor>,
) -> Result<Tensor> {
    if n == 0 || chunk == 0 {
        return Err(Error::Config(format!(
            "cannot draw {n} samples in chunks of {chunk}: both must be at least 1"
        )));
    }
    if n <= chunk {
        return draw(n);
    }
    let chunks = n.div_ceil(chunk);
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(chunks as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "sampling [{elapsed_precise}] {bar:30} {pos}/{len} chunks ETA {eta}",
        ) {
            bar.set_style(style);
        }
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut parts = Vec::with_capacity(chunks);
    let mut done = 0;
    while done < n {
        let m = chunk.min(n - done);
        parts.push(draw(m)?);
        done += m;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(Tensor::cat(&parts, 0)?)
}
