//! The families, one file each, and the registry that names them.
//!
//! Each `models/<family>.rs` holds the family's typed `Config` (its `[model]` table, with
//! `deny_unknown_fields`) beside the model that implements [`GenerativeModel`], in the style of
//! candle-transformers' `models/<name>.rs`. The shared mathematics the families are built from
//! lives elsewhere: [`crate::continuous`] (schedules, samplers, ODE solvers and the CNF
//! likelihood, the Gaussian chain), [`crate::discrete`] (masking, orders, token filters) and
//! [`crate::nn`] (backbones that know nothing about generative modelling).
//!
//! Adding a family: write `models/<family>.rs` with a `Config` implementing [`FamilyConfig`]
//! and a model implementing [`GenerativeModel`], then add one line to the [`families!`] list
//! below. The line declares the module, the `[model] name` (first) and its aliases; the CLI's
//! help, the config parser, `--set` and the contract test all read this list.

use candle_core::Device;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::EvalOptions;
use crate::model::{DataInfo, GenerativeModel};
use crate::resources::MemoryEstimate;
use crate::{Error, Result, Rng};

/// What a family's `[model]` table must provide.
pub trait FamilyConfig:
    Clone + std::fmt::Debug + Default + PartialEq + Serialize + DeserializeOwned
{
    /// One line for `--help` and reports.
    const ABOUT: &'static str;
    /// The likelihoods `elbo eval --likelihood` accepts for this family; the first is the
    /// default (`auto`). Empty for a family without one.
    const LIKELIHOODS: &'static [&'static str];
    /// Likelihoods the family also computes when named, never by default (`auto`, compare
    /// suites without `likelihoods`, selection during training): estimates of a stated model
    /// around the family's own, such as AIS through a GAN generator with a Gaussian
    /// observation model. Empty unless a family overrides it.
    const OPT_IN_LIKELIHOODS: &'static [&'static str] = &[];
    /// Ranges serde cannot check.
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    /// Rough memory of training on batches of `batch` examples shaped like `data`: the exact
    /// parameter count and an upper-ish estimate of the activations (see [`crate::resources`]),
    /// from the settings alone, before anything is allocated.
    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate;
    /// Bytes of one held-out likelihood batch under `eval` (default: the activations of a
    /// training batch of `eval.batch_size` examples).
    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        self.memory_estimate(data, eval.batch_size).activations
    }
    /// The model for data of the given shape, initial weights drawn from `rng`.
    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>>;
}

/// A registered family, as `--help` and reports list it.
#[derive(Clone, Copy, Debug)]
pub struct FamilyInfo {
    /// Canonical `[model] name`.
    pub name: &'static str,
    /// Other accepted names.
    pub aliases: &'static [&'static str],
    /// One line.
    pub about: &'static str,
    /// Likelihood names, default first.
    pub likelihoods: &'static [&'static str],
    /// Likelihoods computed only when named ([`FamilyConfig::OPT_IN_LIKELIHOODS`]).
    pub opt_in_likelihoods: &'static [&'static str],
}

/// Declares the family modules and generates [`ModelConfig`] (a serde enum tagged by `name`),
/// [`FAMILIES`] and the dispatch from the list of `module => Variant = "name" | "alias" ...;`.
macro_rules! families {
    ($($(#[$doc:meta])* $module:ident => $variant:ident = $name:literal $(| $alias:literal)*;)*) => {
        $($(#[$doc])* pub mod $module;)*

        /// The `[model]` table: one variant per family, chosen by `name` (or an alias; no
        /// name means `flow-matching`), each with its own typed settings.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "name", try_from = "serde_json::Value")]
        pub enum ModelConfig {
            $($(#[$doc])* #[serde(rename = $name $(, alias = $alias)*)] $variant($module::Config),)*
        }

        /// What serde derives for the tagged table; [`ModelConfig`] parses through it after
        /// supplying the default name.
        #[derive(Deserialize)]
        #[serde(tag = "name")]
        enum Tagged {
            $(#[serde(rename = $name $(, alias = $alias)*)] $variant($module::Config),)*
        }

        impl From<Tagged> for ModelConfig {
            fn from(t: Tagged) -> Self {
                match t { $(Tagged::$variant(c) => Self::$variant(c),)* }
            }
        }

        /// Every registered family, in registry order.
        pub const FAMILIES: &[FamilyInfo] = &[$(FamilyInfo {
            name: $name,
            aliases: &[$($alias),*],
            about: <$module::Config as FamilyConfig>::ABOUT,
            likelihoods: <$module::Config as FamilyConfig>::LIKELIHOODS,
            opt_in_likelihoods: <$module::Config as FamilyConfig>::OPT_IN_LIKELIHOODS,
        },)*];

        impl ModelConfig {
            /// The canonical family name.
            pub fn name(&self) -> &'static str {
                match self { $(Self::$variant(_) => $name,)* }
            }
            /// Ranges serde cannot check.
            pub fn validate(&self) -> Result<()> {
                match self { $(Self::$variant(c) => c.validate(),)* }
            }
            /// The family's memory estimate for training batches of `batch` examples
            /// ([`FamilyConfig::memory_estimate`]).
            pub fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
                match self { $(Self::$variant(c) => c.memory_estimate(data, batch),)* }
            }
            /// Bytes of one held-out likelihood batch ([`FamilyConfig::eval_memory`]).
            pub fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
                match self { $(Self::$variant(c) => c.eval_memory(data, eval),)* }
            }
            /// Build the family's model for the data, drawing its initial weights from `rng`.
            pub fn build(
                &self,
                data: &DataInfo,
                device: &Device,
                rng: &mut Rng,
            ) -> Result<Box<dyn GenerativeModel>> {
                match self { $(Self::$variant(c) => c.build(data, device, rng),)* }
            }
            /// The default settings of the family named `name` (canonical or alias).
            pub fn default_for(name: &str) -> Result<Self> {
                let canonical = family(name)?.name;
                $(if canonical == $name {
                    return Ok(Self::$variant(<$module::Config>::default()));
                })*
                Err(unknown(name))
            }
        }
    };
}

families! {
    /// Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023).
    flow_matching => FlowMatching = "flow-matching" | "fm" | "rectified-flow" | "flow" | "flow_matching";
    /// DDPM (Ho et al. 2020); DDIM is its `ddim` sampler.
    ddpm => Ddpm = "ddpm";
    /// Score SDEs (Song et al. 2021).
    score_sde => ScoreSde = "sde" | "score-sde" | "score_sde";
    /// EDM (Karras et al. 2022).
    edm => Edm = "edm";
    /// Autoregressive transformer LM.
    autoregressive => Autoregressive = "ar" | "autoregressive";
    /// Any-order autoregressive transformer.
    any_order => AnyOrder = "ao-ar" | "any-order" | "aoar";
    /// Masked diffusion LM (MDLM, LLaDA).
    mdlm => Mdlm = "mdlm" | "masked-diffusion";
    /// Discrete diffusion with transition matrices (D3PM).
    d3pm => D3pm = "d3pm";
    /// Block diffusion LM (BD3-LM).
    bd3lm => Bd3lm = "bd3lm" | "block-diffusion";
    /// Score-entropy discrete diffusion (SEDD).
    sedd => Sedd = "sedd" | "score-entropy";
    /// Normalizing flows: NICE, RealNVP, Glow.
    normalizing_flow => NormalizingFlow = "normalizing-flow" | "nf" | "normalizing_flow";
    /// Variational autoencoder with the ELBO and IWAE bounds.
    vae => Vae = "vae";
    /// VQ-VAE: a codebook autoencoder, the first stage of a two-stage model.
    vq_vae => VqVae = "vq-vae" | "vqvae" | "vq_vae";
    /// GAN, WGAN and WGAN-GP (Goodfellow et al. 2014; Arjovsky et al. 2017; Gulrajani et al. 2017).
    gan => Gan = "gan";
    /// Energy-based model: denoising score matching or PCD, Langevin sampling, AIS log Z.
    ebm => Ebm = "ebm" | "energy";
    /// Noise-contrastive estimation and InfoNCE (Gutmann & Hyvärinen 2010; van den Oord et al. 2018).
    nce => Nce = "nce" | "noise-contrastive";
    gaussian => Gaussian = "gaussian";
}

impl TryFrom<serde_json::Value> for ModelConfig {
    type Error = String;

    fn try_from(mut v: serde_json::Value) -> std::result::Result<Self, String> {
        if let serde_json::Value::Object(map) = &mut v {
            map.entry("name")
                .or_insert_with(|| serde_json::Value::String(FAMILIES[0].name.into()));
        }
        let mut nulls = Vec::new();
        null_keys(&v, "model", &mut nulls);
        serde_json::from_value::<Tagged>(v)
            .map(Self::from)
            .map_err(|e| {
                if nulls.is_empty() {
                    e.to_string()
                } else {
                    // a NaN or infinity reaches the tagged table as a JSON null
                    format!("{e}: {} must be finite numbers", nulls.join(", "))
                }
            })
    }
}

/// The dotted keys under `prefix` whose value is null.
fn null_keys(v: &serde_json::Value, prefix: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Null => out.push(prefix.to_string()),
        serde_json::Value::Object(map) => {
            for (k, x) in map {
                null_keys(x, &format!("{prefix}.{k}"), out);
            }
        }
        _ => {}
    }
}

impl ModelConfig {
    /// The family `name`, keeping the settings of `self` that it shares (the same key with a
    /// value of the right type, such as `net` between the continuous families); the rest are
    /// the new family's defaults.
    pub fn switch_to(&self, name: &str) -> Result<Self> {
        let target = Self::default_for(name)?;
        if target.name() == self.name() {
            return Ok(self.clone());
        }
        let to_json = |m: &Self| {
            serde_json::to_value(m)
                .map_err(|e| Error::Config(format!("cannot serialise the model config: {e}")))
        };
        let (serde_json::Value::Object(old), serde_json::Value::Object(mut new)) =
            (to_json(self)?, to_json(&target)?)
        else {
            return Ok(target);
        };
        let keys: Vec<String> = new.keys().filter(|k| *k != "name").cloned().collect();
        for k in keys {
            let Some(v) = old.get(&k) else { continue };
            let mut trial = new.clone();
            trial.insert(k.clone(), v.clone());
            if Self::try_from(serde_json::Value::Object(trial.clone())).is_ok() {
                new = trial;
            }
        }
        Self::try_from(serde_json::Value::Object(new)).map_err(Error::Config)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self::FlowMatching(flow_matching::Config::default())
    }
}

/// The registered family called `name` (canonical name or alias, any case).
pub fn family(name: &str) -> Result<&'static FamilyInfo> {
    let want = name.trim().to_ascii_lowercase();
    FAMILIES
        .iter()
        .find(|f| f.name == want || f.aliases.contains(&want.as_str()))
        .ok_or_else(|| unknown(name))
}

fn unknown(name: &str) -> Error {
    let hint = if name.trim().eq_ignore_ascii_case("ddim") {
        " (DDIM is a sampler: use ddpm with sampler \"ddim\", e.g. --model ddpm --sampler ddim)"
    } else {
        ""
    };
    Error::UnknownModel {
        name: format!("{name}{hint}"),
        known: known_names(),
    }
}

/// "flow-matching (fm, rectified-flow, flow), ddpm, ..." for error messages and help.
pub fn known_names() -> String {
    FAMILIES
        .iter()
        .map(|f| match f.aliases.first() {
            None => f.name.to_string(),
            Some(_) => format!("{} ({})", f.name, f.aliases.join(", ")),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per family for `--help`: name, what it is, its likelihoods.
pub fn help_table() -> String {
    FAMILIES
        .iter()
        .map(|f| {
            let mut lik = if f.likelihoods.is_empty() {
                "none".to_string()
            } else {
                f.likelihoods.join(", ")
            };
            if !f.opt_in_likelihoods.is_empty() {
                lik.push_str(&format!(
                    "; when named: {}",
                    f.opt_in_likelihoods.join(", ")
                ));
            }
            format!("  {:<14} {} [likelihoods: {lik}]", f.name, f.about)
        })
        .collect::<Vec<_>>()
        .join("\n")
}
