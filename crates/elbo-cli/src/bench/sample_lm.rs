//! S3: language-model sampling throughput on W3/W4's transformer shape (vocabulary 96, L = 256,
//! d = 256, 4 layers, 4 heads, learned positions), randomly initialised from a fixed seed, a
//! batch of 16 sequences of 256 tokens per run, all at one network call per token:
//!
//! - `s3_ar`: autoregressive decoding with the KV cache (`models::autoregressive`), 256 calls of
//!   one token each;
//! - `s3_mdlm`: MDLM ancestral sampling (`models::mdlm`, `discrete::sampler`, uncached) with 256
//!   steps over the whole sequence, 256 calls of all 256 positions;
//! - `s3_bd3lm`: block diffusion, BD3-LM with blocks of 4 (`models::bd3lm`): 64 blocks, each
//!   denoised in 4 ancestral steps against the KV cache of the finished blocks, then committed
//!   to the cache (one more call on the clean block).
//!
//! Tokens are drawn from the full softmax (temperature 1). bench/torch_bench.py's `s3_ar`,
//! `s3_mdlm`, `s3_bd3lm` are the PyTorch loops timed beside these.

use anyhow::{bail, Result};
use candle_core::Device;
use elbo::data::DataKind;
use elbo::discrete::filter::TokenFilter;
use elbo::discrete::sampler::{self, MaskedSampleConfig, MaskedSampler};
use elbo::discrete::TransformerSettings;
use elbo::model::DataInfo;
use elbo::models::mdlm::MaskedSampling;
use elbo::models::{autoregressive, bd3lm, mdlm};
use elbo::nn::transformer::Positions;
use elbo::Rng;
use serde_json::json;

use super::flops::{self, TransformerShape};
use super::{add_efficiency, emit, extend, median_ms, summarize, time_steps};

/// Vocabulary, sequence length, batch and BD3-LM block.
const V: usize = 96;
const L: usize = 256;
const B: usize = 16;
const BLOCK: usize = 4;

/// Which sampler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampler {
    Ar,
    Mdlm,
    Bd3lm,
}

impl Sampler {
    fn name(self) -> &'static str {
        match self {
            Self::Ar => "s3_ar_sample",
            Self::Mdlm => "s3_mdlm_sample",
            Self::Bd3lm => "s3_bd3lm_sample",
        }
    }

    /// Network calls of one run and their FLOPs (see [`flops`]).
    fn cost(self) -> (usize, f64) {
        let s = TransformerShape {
            d: 256,
            layers: 4,
            heads: 4,
            vocab_out: V,
        };
        match self {
            // one new token per call, attending to the pos + 1 cached ones
            Self::Ar => (L, (0..L).map(|p| flops::transformer(s, B, 1, p + 1)).sum()),
            Self::Mdlm => (L, L as f64 * flops::transformer(s, B, L, L)),
            // per block: BLOCK denoising calls and the commit, against the blocks before it
            Self::Bd3lm => {
                let blocks = L / BLOCK;
                let per = |k: usize| flops::transformer(s, B, BLOCK, (k + 1) * BLOCK);
                let f = (0..blocks).map(|k| (BLOCK + 1) as f64 * per(k)).sum();
                (blocks * (BLOCK + 1), f)
            }
        }
    }
}

/// The transformer settings of W3/W4.
fn settings() -> TransformerSettings {
    TransformerSettings {
        d_model: 256,
        n_heads: 4,
        n_layers: 4,
        positions: Positions::Learned,
    }
}

/// Times `which`: `steps` = (warm-up, timed) runs, each drawing B sequences of L tokens.
pub fn run(which: Sampler, steps: (usize, usize)) -> Result<()> {
    let dev = Device::Cpu;
    let data = DataInfo::flat(L, DataKind::Discrete { levels: V });
    let filter = TokenFilter::default();
    let ancestral = |steps: usize| MaskedSampleConfig {
        sampler: MaskedSampler::Ancestral,
        steps,
        block_len: 0,
        filter,
    };
    let mut init_rng = Rng::new(0);
    let mut rng = Rng::new(5);
    let mut nfe = 0;
    let ts = match which {
        Sampler::Ar => {
            let cfg = autoregressive::Config {
                transformer: settings(),
                ..Default::default()
            };
            let m = autoregressive::Autoregressive::new(&cfg, data, &dev, &mut init_rng)?;
            time_steps(steps, || {
                let rows = m.generate(B, &[], &filter, &mut rng)?;
                nfe = L;
                std::hint::black_box(rows);
                Ok(())
            })?
        }
        Sampler::Mdlm => {
            let cfg = mdlm::Config {
                transformer: settings(),
                ..Default::default()
            };
            let m = mdlm::Mdlm::new(&cfg, data, &dev, &mut init_rng)?;
            let sc = ancestral(L);
            time_steps(steps, || {
                let init = vec![vec![V as u32; L]; B];
                let (rows, stats) = sampler::sample(&m, init, &sc, &mut rng)?;
                nfe = stats.nfe;
                std::hint::black_box(rows);
                Ok(())
            })?
        }
        Sampler::Bd3lm => {
            let cfg = bd3lm::Config {
                transformer: settings(),
                block_size: BLOCK,
                sampling: MaskedSampling {
                    sampler: MaskedSampler::Ancestral,
                    ..Default::default()
                },
                ..Default::default()
            };
            let m = bd3lm::Bd3lm::new(&cfg, data, &dev, &mut init_rng)?;
            time_steps(steps, || {
                let (rows, denoise) = m.generate(B, &[None; L], L / BLOCK, BLOCK, &mut rng)?;
                nfe = denoise + L / BLOCK; // and one commit per block
                std::hint::black_box(rows);
                Ok(())
            })?
        }
    };
    let (calls, flop) = which.cost();
    if nfe != calls {
        bail!("{}: {nfe} network calls, expected {calls}", which.name());
    }
    let mut s = summarize(ts)?;
    let med = median_ms(&s);
    extend(
        &mut s,
        vec![
            ("bench", json!(which.name())),
            ("batch", json!(B)),
            ("seq", json!(L)),
            ("network_calls", json!(calls)),
            ("tokens_per_s", json!((B * L) as f64 / (med / 1e3))),
            ("ms_per_model_call", json!(med / calls as f64)),
        ],
    );
    add_efficiency(&mut s, which.name(), flop)?;
    emit(s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn costs_count_one_call_per_token() {
        assert_eq!(Sampler::Ar.cost().0, L);
        assert_eq!(Sampler::Mdlm.cost().0, L);
        assert_eq!(Sampler::Bd3lm.cost().0, L + L / BLOCK);
        // MDLM's full passes cost most; the cached AR decode least
        let (a, m, b) = (
            Sampler::Ar.cost().1,
            Sampler::Mdlm.cost().1,
            Sampler::Bd3lm.cost().1,
        );
        assert!(a < b && b < m, "{a} {b} {m}");
    }
}
