//! Block diffusion, BD3-LM (Arriola et al. 2025, "Block Diffusion: Interpolating Between
//! Autoregressive and Diffusion Language Models"): autoregressive over blocks of `L'` tokens,
//! masked diffusion (MDLM, Sahoo et al. 2024) inside each block.
//!
//! The likelihood factorises over the `B = L / L'` blocks,
//! `log p(x) = sum_b log p(x^b | x^{<b})` (Arriola et al. 2025, eq. 1), and each factor is bounded
//! by the MDLM NELBO of the block given the clean earlier blocks (eq. 8-10): with the linear
//! schedule `alpha_t = 1 - t`, SUBS parameterisation and one time `t_b ~ U(0, 1]` per block,
//! `-log p(x) <= sum_b E_{t_b} E_{x_t^b} [ (1/t_b) sum_{i in b masked} -log p(x^i | x_t^b, x^{<b}) ]`.
//! `L' = 1` is the autoregressive NLL (one mask pattern, weight 1), `L' = L` the MDLM NELBO.
//!
//! Training may draw `t_b` from a clipped interval `U[beta, omega]` (the clipped schedules of
//! sec. 5, for lower gradient variance); that is not a bound, so every reported likelihood
//! draws `t_b` from all of `(0, 1]`.
//!
//! Sampling (Alg. 2) generates one block after another: each block starts fully masked and is
//! denoised by any masked-diffusion sampler of [`super::sampler`] given the finished blocks,
//! which a network keeps as a KV cache ([`BlockDecoder`]).

use candle_core::{Device, Tensor};

use super::masked_diffusion::{sample_times, MaskDenoiser};
use super::sampler::{self, MaskedSampleConfig, SampleStats};
use super::{gather_nll, ids_tensor};
use crate::{Error, Result, Rng};

/// A denoiser of noisy blocks given the clean earlier blocks: what the block-diffusion bound
/// needs from a network.
pub trait BlockDenoiser {
    /// Vocabulary size V; the mask token is id V.
    fn vocab(&self) -> usize;
    /// Block length `L'`.
    fn block(&self) -> usize;
    /// `x_t, x_0: [B, L]` (u32; `x_t` with MASK = V) -> `[B, L, V]`: row `i` in block `b` is
    /// log p_theta(x_0^i = . | x_t^b, x_0^{<b}); it must not depend on other blocks of `x_t`
    /// nor on blocks `>= b` of `x_0`.
    fn log_probs(&self, xt: &Tensor, x0: &Tensor) -> Result<Tensor>;
}

/// Times `t[row][block]` for `n` rows of `blocks` blocks in `[lo, hi]` (a sub-interval of
/// (0, 1]): uniform, antithetic over all `n blocks` draws when `antithetic`.
pub fn sample_block_times(
    n: usize,
    blocks: usize,
    antithetic: bool,
    (lo, hi): (f64, f64),
    rng: &mut Rng,
) -> Vec<Vec<f64>> {
    let t = sample_times(n * blocks, antithetic, 0, rng);
    t.chunks(blocks.max(1))
        .map(|c| c.iter().map(|&t| lo + (hi - lo) * t).collect())
        .collect()
}

/// Masks each token of block `b` of row `r` with probability `t[r][b]`; returns `x_t` and the
/// weights `1/t` at the masked positions (0 elsewhere), `[B, L]` f32.
pub fn mask_blocks(
    ids: &[Vec<u32>],
    t: &[Vec<f64>],
    block: usize,
    mask_id: u32,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let l = ids.first().map_or(0, Vec::len);
    let mut xt = ids.to_vec();
    let mut w = vec![0f32; ids.len() * l];
    for (r, (row, tr)) in xt.iter_mut().zip(t).enumerate() {
        for (i, tok) in row.iter_mut().enumerate() {
            let tb = tr[i / block];
            if rng.uniform() < tb {
                *tok = mask_id;
                w[r * l + i] = (1.0 / tb) as f32;
            }
        }
    }
    Ok((
        ids_tensor(&xt, device)?,
        Tensor::from_vec(w, (ids.len(), l), device)?,
    ))
}

/// One-sample NELBO estimate per example, `[B]` (differentiable; Arriola et al. 2025, eq. 10):
/// `sum_b (1/t_b) sum_{i in b masked} -log p(x^i | x_t^b, x^{<b})` at block times `t[row][b]`.
pub fn nelbo_terms(
    den: &dyn BlockDenoiser,
    ids: &Tensor,
    t: &[Vec<f64>],
    rng: &mut Rng,
) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = ids.to_vec2()?;
    let (xt, w) = mask_blocks(&rows, t, den.block(), den.vocab() as u32, rng, ids.device())?;
    let ce = gather_nll(&den.log_probs(&xt, ids)?, ids)?; // [B, L]
    Ok((ce * w)?.sum(1)?)
}

/// Monte-Carlo NELBO per example on the full interval `t in (0, 1]` (a bound on -log p(x)):
/// the mean over `samples` draws, each block's times stratified over the draws.
pub fn nelbo(
    den: &dyn BlockDenoiser,
    ids: &Tensor,
    samples: usize,
    rng: &mut Rng,
) -> Result<Vec<f64>> {
    let (b, l) = ids.dims2()?;
    let blocks = l.div_ceil(den.block().max(1));
    let k = samples.max(1);
    // per example and block, k stratified times: times[row][block][draw]
    let times: Vec<Vec<Vec<f64>>> = (0..b)
        .map(|_| (0..blocks).map(|_| sample_times(k, true, 0, rng)).collect())
        .collect();
    let mut acc = vec![0.0; b];
    for j in 0..k {
        let t: Vec<Vec<f64>> = times
            .iter()
            .map(|row| row.iter().map(|ts| ts[j]).collect())
            .collect();
        let v: Vec<f32> = nelbo_terms(den, ids, &t, rng)?.to_vec1()?;
        acc.iter_mut().zip(v).for_each(|(a, x)| *a += f64::from(x));
    }
    Ok(acc.into_iter().map(|a| a / k as f64).collect())
}

/// The continuous-time NELBO of one sequence computed exactly: per block, all `2^{L'} - 1`
/// non-empty mask patterns of the block (`L' <= 16`) with weights
/// `int_0^1 (1/t) t^k (1-t)^{L'-k} dt = B(k, L'-k+1)` for `k` masked tokens.
pub fn nelbo_by_enumeration(den: &dyn BlockDenoiser, ids: &[u32]) -> Result<f64> {
    let (l, block) = (ids.len(), den.block());
    if l == 0 || block == 0 || block > 16 {
        return Err(Error::Config(format!(
            "pattern enumeration needs 1..=16 positions per block, got {block}"
        )));
    }
    let mask = den.vocab() as u32;
    let lf = |n: usize| (1..=n).map(|i| (i as f64).ln()).sum::<f64>();
    let dev = Device::Cpu;
    let mut total = 0.0;
    for start in (0..l).step_by(block) {
        let lb = block.min(l - start);
        let patterns: Vec<u32> = (1u32..(1 << lb)).collect();
        // other blocks of x_t are fully masked: the denoiser must not look at them
        let rows: Vec<Vec<u32>> = patterns
            .iter()
            .map(|&s| {
                (0..l)
                    .map(|i| match i.checked_sub(start) {
                        Some(j) if j < lb && s >> j & 1 == 0 => ids[i],
                        _ => mask,
                    })
                    .collect()
            })
            .collect();
        let x0 = Tensor::from_vec(ids.to_vec(), (1, l), &dev)?.repeat((rows.len(), 1))?;
        let ce: Vec<Vec<f32>> =
            gather_nll(&den.log_probs(&ids_tensor(&rows, &dev)?, &x0)?, &x0)?.to_vec2()?;
        for (&s, row) in patterns.iter().zip(&ce) {
            let k = s.count_ones() as usize;
            let c: f64 = (0..lb)
                .filter(|j| s >> j & 1 == 1)
                .map(|j| f64::from(row[start + j]))
                .sum();
            total += (lf(k - 1) + lf(lb - k) - lf(lb)).exp() * c;
        }
    }
    Ok(total)
}

/// What block-by-block sampling needs from a network: the log-probabilities of the current
/// (noisy) block given the finished ones, and a way to append a finished block (a KV cache).
pub trait BlockDecoder {
    /// Vocabulary size V; the mask token is id V.
    fn vocab(&self) -> usize;
    /// `x_t: [n, T]` the current block (MASK = V), placed after the finished blocks ->
    /// `[n, T, V]` log p_theta(x_0 = . | x_t, finished blocks).
    fn block_log_probs(&self, xt: &Tensor) -> Result<Tensor>;
    /// Appends the finished block `x_0: [n, T]`.
    fn commit(&mut self, x0: &Tensor) -> Result<()>;
}

/// The current block of a [`BlockDecoder`] as a [`MaskDenoiser`] for the inner sampler.
struct CurrentBlock<'a>(&'a dyn BlockDecoder);

impl MaskDenoiser for CurrentBlock<'_> {
    fn vocab(&self) -> usize {
        self.0.vocab()
    }

    fn log_probs(&self, xt: &Tensor) -> Result<Tensor> {
        self.0.block_log_probs(xt)
    }
}

/// Completes the masked positions (id V) of `x` (rows of any common length, any number of
/// blocks of `block` tokens; a prompt is its unmasked tokens) block by block (Arriola et al.
/// 2025, Alg. 2): each block is denoised by the masked-diffusion sampler of `cfg` with
/// `cfg.steps` steps (per block) given the finished blocks, then committed to `dec`. A block
/// with nothing masked costs no denoising call. `max_blocks` stops after that many blocks
/// (variable-length generation); the rows are truncated there.
pub fn sample_blocks(
    dec: &mut dyn BlockDecoder,
    mut x: Vec<Vec<u32>>,
    block: usize,
    max_blocks: Option<usize>,
    cfg: &MaskedSampleConfig,
    rng: &mut Rng,
) -> Result<(Vec<Vec<u32>>, SampleStats)> {
    if block == 0 {
        return Err(Error::Config(
            "block diffusion: block size must be >= 1".into(),
        ));
    }
    let l = x.first().map_or(0, Vec::len);
    if x.iter().any(|r| r.len() != l) {
        return Err(Error::Shape("ragged rows to sample".into()));
    }
    let mask = dec.vocab() as u32;
    let blocks = l.div_ceil(block).min(max_blocks.unwrap_or(usize::MAX));
    let inner = MaskedSampleConfig {
        block_len: 0,
        ..*cfg
    };
    let mut stats = SampleStats::default();
    for bi in 0..blocks {
        let range = bi * block..((bi + 1) * block).min(l);
        let mut cur: Vec<Vec<u32>> = x.iter().map(|r| r[range.clone()].to_vec()).collect();
        if cur.iter().flatten().any(|&t| t == mask) {
            let (done, s) = sampler::sample(&CurrentBlock(&*dec), cur, &inner, rng)?;
            stats.nfe += s.nfe;
            cur = done;
        }
        dec.commit(&ids_tensor(&cur, &Device::Cpu)?)?;
        for (row, c) in x.iter_mut().zip(&cur) {
            row[range.clone()].copy_from_slice(c);
        }
    }
    let end = (blocks * block).min(l);
    x.iter_mut().for_each(|r| r.truncate(end));
    Ok((x, stats))
}
