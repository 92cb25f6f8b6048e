//! Samplers of masked diffusion LMs. Each drives any [`MaskDenoiser`] from a partially masked
//! start (MASK = V at the positions to generate; given positions are carried over, so a prompt
//! is a prefix or any pattern of blanks), one block of positions after another
//! (semi-autoregressive blocks, LLaDA sec. 2.4 / Arriola et al. 2025) or all at once.
//!
//! - `ancestral`: MDLM's reverse process (Sahoo et al. 2024, eq. 7 / `_ddpm_update`): from t to
//!   s = t - 1/T each masked token unmasks with probability (alpha_s - alpha_t)/(1 - alpha_t)
//!   = (t - s)/t, drawing its value from p_theta(x_0 | x_t); one network call per step.
//! - `cached`: the same draws (identical samples for a seed), but the network is called only
//!   when some token unmasks and x_t changed since the last call (MDLM's `_ddpm_caching_update`).
//! - `low-confidence` / `random`: LLaDA's remasking (Nie et al. 2025, Alg. 5): each step predicts
//!   every masked token and keeps the most confident (or random) ones, a fixed number per step.

use super::filter::TokenFilter;
use super::masked_diffusion::MaskDenoiser;
use crate::{Error, Result, Rng};

pub mod ancestral;
pub mod remasking;

/// Which masked-diffusion sampler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MaskedSampler {
    /// MDLM ancestral sampling, one network call per step.
    #[serde(alias = "ddpm")]
    Ancestral,
    /// Ancestral sampling that skips the network when nothing would change.
    #[default]
    #[serde(alias = "ddpm_cache")]
    Cached,
    /// LLaDA low-confidence remasking.
    #[serde(alias = "low_confidence", alias = "confidence")]
    LowConfidence,
    /// LLaDA random remasking.
    Random,
}

impl MaskedSampler {
    /// The name as configs spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ancestral => "ancestral",
            Self::Cached => "cached",
            Self::LowConfidence => "low-confidence",
            Self::Random => "random",
        }
    }

    /// Parse "ancestral", "cached", "low-confidence" or "random".
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ancestral" | "ddpm" => Ok(Self::Ancestral),
            "cached" | "ddpm_cache" => Ok(Self::Cached),
            "low-confidence" | "low_confidence" | "confidence" => Ok(Self::LowConfidence),
            "random" => Ok(Self::Random),
            _ => Err(Error::Config(format!(
                "unknown masked-diffusion sampler '{s}'; use ancestral, cached, low-confidence or random"
            ))),
        }
    }
}

/// Sampler settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MaskedSampleConfig {
    /// Which sampler.
    pub sampler: MaskedSampler,
    /// Denoising steps in total (split evenly over the blocks).
    pub steps: usize,
    /// Block length of semi-autoregressive sampling (0: one block).
    pub block_len: usize,
    /// Temperature / top-k / top-p of each token draw.
    pub filter: TokenFilter,
}

/// What a sampling run cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampleStats {
    /// Network calls (function evaluations).
    pub nfe: usize,
}

/// Complete the masked positions (id V) of `init` (rows of token ids).
pub fn sample(
    den: &dyn MaskDenoiser,
    mut x: Vec<Vec<u32>>,
    cfg: &MaskedSampleConfig,
    rng: &mut Rng,
) -> Result<(Vec<Vec<u32>>, SampleStats)> {
    cfg.filter.validate()?;
    let l = x.first().map_or(0, Vec::len);
    if x.iter().any(|r| r.len() != l) {
        return Err(Error::Shape("ragged rows to sample".into()));
    }
    let mask = den.vocab() as u32;
    if let Some(bad) = x.iter().flatten().find(|&&t| t > mask) {
        return Err(Error::Config(format!("token {bad} > mask id {mask}")));
    }
    let block = if cfg.block_len == 0 {
        l.max(1)
    } else {
        cfg.block_len
    };
    let n_blocks = l.div_ceil(block).max(1);
    let steps = cfg.steps.div_ceil(n_blocks).max(1);
    let mut stats = SampleStats::default();
    for bi in 0..n_blocks {
        let range = bi * block..((bi + 1) * block).min(l);
        match cfg.sampler {
            MaskedSampler::Ancestral | MaskedSampler::Cached => ancestral::run_block(
                den,
                &mut x,
                range,
                steps,
                cfg.sampler == MaskedSampler::Cached,
                &cfg.filter,
                rng,
                &mut stats,
            )?,
            MaskedSampler::LowConfidence | MaskedSampler::Random => remasking::run_block(
                den,
                &mut x,
                range,
                steps,
                cfg.sampler == MaskedSampler::LowConfidence,
                &cfg.filter,
                rng,
                &mut stats,
            )?,
        }
    }
    Ok((x, stats))
}

/// Network log-probabilities `[n][L][V]` of the current rows.
pub(crate) fn predict(
    den: &dyn MaskDenoiser,
    x: &[Vec<u32>],
    stats: &mut SampleStats,
) -> Result<Vec<Vec<Vec<f32>>>> {
    stats.nfe += 1;
    let t = super::ids_tensor(x, &candle_core::Device::Cpu)?;
    Ok(den.log_probs(&t)?.to_vec3()?)
}
