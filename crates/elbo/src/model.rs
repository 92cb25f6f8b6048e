//! The one trait every generative family implements, and the registry of families.
//!
//! Every model answers the same three questions (DESIGN.md, "The one idea"): its training
//! objective, how to sample, and the log-likelihood of held-out data with an honest label. The
//! trainer, the CLI, evaluation and reports only ever see this trait, so adding a family means
//! implementing it and adding one line to [`build`].

use candle_core::{Device, Tensor};
use candle_nn::VarMap;

use crate::config::{EvalOptions, ModelConfig, SampleOptions};
use crate::data::DataKind;
use crate::{Error, Nll, Result, Rng};

/// Family names [`build`] accepts (first of each group is canonical).
pub const KNOWN_MODELS: &[&str] = &[
    "flow (aliases: flow-matching, rectified-flow, fm)",
    "ddpm",
    "ddim (ddpm sampled with DDIM)",
    "sde (aliases: score-sde)",
    "edm",
    "ar (autoregressive transformer LM)",
    "ao-ar (any-order autoregressive)",
    "mdlm (masked diffusion LM)",
];

/// What a family needs to know about the data to build itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataInfo {
    /// Dimensions of one example.
    pub dim: usize,
    /// Continuous or discrete levels.
    pub kind: DataKind,
}

/// A generative model fit by maximum likelihood, exactly or through a bound.
pub trait GenerativeModel {
    /// Canonical family name, e.g. "flow".
    fn family(&self) -> &'static str;
    /// The trainable parameters.
    fn varmap(&self) -> &VarMap;
    /// Dimensions of one example.
    fn dim(&self) -> usize;
    /// The device the parameters live on.
    fn device(&self) -> &Device;
    /// The training objective on a batch `[B, D]`: a differentiable scalar.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor>;
    /// `n` samples, `[n, D]`, in the data's own units (discrete data as levels).
    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor>;
    /// Per-example negative log-likelihood of `batch: [B, D]`, labelled exact / bound /
    /// estimate / none.
    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll>;
    /// One line saying how `log_likelihood` computes its number (for reports).
    fn likelihood_method(&self, opts: &EvalOptions) -> String;
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

/// Build the family named in `cfg` for data of the given shape, drawing its initial weights
/// from `rng`.
pub fn build(
    cfg: &ModelConfig,
    data: DataInfo,
    device: &Device,
    rng: &mut Rng,
) -> Result<Box<dyn GenerativeModel>> {
    match cfg.name.to_ascii_lowercase().as_str() {
        "flow" | "flow-matching" | "flow_matching" | "rectified-flow" | "fm" => Ok(Box::new(
            crate::continuous::flow_matching::FlowMatching::new(cfg, data, device, rng)?,
        )),
        "ddpm" => Ok(Box::new(crate::continuous::ddpm::Ddpm::new(
            cfg, data, device, rng, false,
        )?)),
        "ddim" => Ok(Box::new(crate::continuous::ddpm::Ddpm::new(
            cfg, data, device, rng, true,
        )?)),
        "sde" | "score-sde" | "score_sde" => Ok(Box::new(crate::continuous::sde::ScoreSde::new(
            cfg, data, device, rng,
        )?)),
        "edm" => Ok(Box::new(crate::continuous::edm::Edm::new(
            cfg, data, device, rng,
        )?)),
        "ar" | "autoregressive" => Ok(Box::new(
            crate::discrete::autoregressive::Autoregressive::new(cfg, data, device, rng)?,
        )),
        "ao-ar" | "any-order" | "aoar" => Ok(Box::new(crate::discrete::any_order::AnyOrder::new(
            cfg, data, device, rng,
        )?)),
        "mdlm" | "masked-diffusion" => Ok(Box::new(crate::discrete::masked_diffusion::Mdlm::new(
            cfg, data, device, rng,
        )?)),
        _ => Err(Error::UnknownModel {
            name: cfg.name.clone(),
            known: KNOWN_MODELS.join(", "),
        }),
    }
}

/// Per-example NLL over a whole data set, in batches of `opts.batch_size`.
pub fn dataset_nll(
    model: &dyn GenerativeModel,
    data: &Tensor,
    opts: &EvalOptions,
    rng: &mut Rng,
) -> Result<Nll> {
    let n = data.dim(0)?;
    let mut parts = Vec::new();
    let mut start = 0;
    while start < n {
        let len = opts.batch_size.min(n - start);
        parts.push(model.log_likelihood(&data.narrow(0, start, len)?, opts, rng)?);
        start += len;
    }
    Nll::concat(parts)
}
