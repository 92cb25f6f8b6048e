//! Masked diffusion language model, MDLM (Sahoo et al. 2024), with LLaDA's estimators (Nie et
//! al. 2025).
//!
//! Forward process: each token is independently replaced by MASK (id V) with probability
//! 1 - alpha_t; log-linear schedule alpha_t = 1 - t (MDLM's `LogLinearNoise` with eps -> 0), so
//! x_1 is all MASK (zero prior KL) and x_0 = x (zero reconstruction term).
//!
//! SUBS parameterization (MDLM sec. 3.2): the denoiser puts zero probability on MASK (its head has
//! only V outputs) and unmasked tokens are carried over unchanged, so only masked positions
//! contribute. The continuous-time NELBO (MDLM eq. 10-11) is then
//! `E_{t~U(0,1]} E_{x_t} [ (alpha'_t / (1 - alpha_t)) sum_{i masked} log p(x_i | x_t) ]`
//! `= E_t [ (1/t) sum_{i masked} -log p(x_i | x_t) ]` (MDLM eq. 11): a 1/t-weighted cross-entropy on
//! masked tokens. With T discrete steps, t ~ U{1/T, ..., 1} and the same weight 1/t (MDLM eq. 8:
//! T (alpha_s - alpha_t)/(1 - alpha_t) = 1/t). The network needs no time input (the masked
//! fraction carries it, and SUBS makes the optimum time-independent), so none is given.
//!
//! Antithetic time sampling (MDLM's `_sample_t`): u_i = (r_i / n + i / n) mod 1.

use candle_core::{Device, Tensor};

use super::{gather_nll, ids_tensor};
use crate::likelihood::mean_stderr;
use crate::{Error, Result, Rng};

/// A denoiser of masked sequences: what the MDLM bound and samplers need from a network.
pub trait MaskDenoiser {
    /// Vocabulary size V; the mask token is id V.
    fn vocab(&self) -> usize;
    /// `x_t: [B, L]` (u32, MASK = V) -> `[B, L, V]` log p_theta(x_0^i = . | x_t) (SUBS: no mass
    /// on MASK).
    fn log_probs(&self, xt: &Tensor) -> Result<Tensor>;
}

/// Times `t` in (0, 1] for `n` draws: uniform, antithetic (stratified) and/or on the grid
/// {1/T, ..., 1} when `steps > 0`.
pub fn sample_times(n: usize, antithetic: bool, steps: usize, rng: &mut Rng) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let r = rng.uniform();
            let u = if antithetic {
                (r / n as f64 + i as f64 / n as f64) % 1.0
            } else {
                r
            };
            let t = 1.0 - u; // (0, 1]
            if steps > 0 {
                ((t * steps as f64).ceil().max(1.0)) / steps as f64
            } else {
                t
            }
        })
        .collect()
}

/// Mask each token of `ids` independently with probability `t[row]`; returns `x_t` and the
/// weights `1/t` at masked positions (0 elsewhere) as `[B, L]` f32.
pub fn mask_at_times(
    ids: &[Vec<u32>],
    t: &[f64],
    mask_id: u32,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let l = ids.first().map_or(0, Vec::len);
    let mut xt = ids.to_vec();
    let mut w = vec![0f32; ids.len() * l];
    for (b, (row, &tb)) in xt.iter_mut().zip(t).enumerate() {
        for (i, tok) in row.iter_mut().enumerate() {
            if rng.uniform() < tb {
                *tok = mask_id;
                w[b * l + i] = (1.0 / tb) as f32;
            }
        }
    }
    Ok((
        ids_tensor(&xt, device)?,
        Tensor::from_vec(w, (ids.len(), l), device)?,
    ))
}

/// One-sample NELBO estimate per example, `[B]` (differentiable): `(1/t) sum_{masked} CE`.
pub fn nelbo_terms(
    den: &dyn MaskDenoiser,
    ids: &Tensor,
    t: &[f64],
    rng: &mut Rng,
) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = ids.to_vec2()?;
    let (xt, w) = mask_at_times(&rows, t, den.vocab() as u32, rng, ids.device())?;
    let ce = gather_nll(&den.log_probs(&xt)?, ids)?; // [B, L]
    Ok((ce * w)?.sum(1)?)
}

/// Monte-Carlo NELBO per example: mean over `samples` antithetic times (bound on -log p(x)).
pub fn nelbo(
    den: &dyn MaskDenoiser,
    ids: &Tensor,
    samples: usize,
    steps: usize,
    rng: &mut Rng,
) -> Result<Vec<f64>> {
    let b = ids.dim(0)?;
    let k = samples.max(1);
    let mut acc = vec![0.0; b];
    // per example, the k times are stratified over (0, 1]
    let times: Vec<Vec<f64>> = (0..b).map(|_| sample_times(k, true, steps, rng)).collect();
    for j in 0..k {
        let t: Vec<f64> = times.iter().map(|ts| ts[j]).collect();
        let v: Vec<f32> = nelbo_terms(den, ids, &t, rng)?.to_vec1()?;
        acc.iter_mut().zip(v).for_each(|(a, x)| *a += f64::from(x));
    }
    Ok(acc.into_iter().map(|a| a / k as f64).collect())
}

/// The NELBO of one sequence computed exactly by enumerating all 2^L mask patterns (L <= 16):
/// pattern S with k masked tokens has weight `int_0^1 (1/t) t^k (1-t)^(L-k) dt = B(k, L-k+1)`
/// (continuous time) or `(1/T) sum_j t_j^(k-1) (1 - t_j)^(L-k)` on the grid t_j = j/T.
pub fn nelbo_by_enumeration(den: &dyn MaskDenoiser, ids: &[u32], steps: usize) -> Result<f64> {
    let l = ids.len();
    if l == 0 || l > 16 {
        return Err(Error::Config(format!(
            "pattern enumeration needs 1..=16 positions, got {l}"
        )));
    }
    let mask = den.vocab() as u32;
    let patterns: Vec<u32> = (1u32..(1 << l)).collect();
    let rows: Vec<Vec<u32>> = patterns
        .iter()
        .map(|&s| {
            (0..l)
                .map(|i| if s >> i & 1 == 1 { mask } else { ids[i] })
                .collect()
        })
        .collect();
    let dev = Device::Cpu;
    let x = Tensor::from_vec(ids.to_vec(), (1, l), &dev)?.repeat((rows.len(), 1))?;
    let ce: Vec<Vec<f32>> =
        gather_nll(&den.log_probs(&ids_tensor(&rows, &dev)?)?, &x)?.to_vec2()?;
    let weight = |k: usize| -> f64 {
        if steps == 0 {
            // B(k, L-k+1) = (k-1)! (L-k)! / L!
            let lf = |n: usize| (1..=n).map(|i| (i as f64).ln()).sum::<f64>();
            (lf(k - 1) + lf(l - k) - lf(l)).exp()
        } else {
            (1..=steps)
                .map(|j| {
                    let t = j as f64 / steps as f64;
                    t.powi(k as i32 - 1) * (1.0 - t).powi((l - k) as i32)
                })
                .sum::<f64>()
                / steps as f64
        }
    };
    Ok(patterns
        .iter()
        .zip(&ce)
        .map(|(&s, row)| {
            let c: f64 = (0..l)
                .filter(|i| s >> i & 1 == 1)
                .map(|i| f64::from(row[i]))
                .sum();
            weight(s.count_ones() as usize) * c
        })
        .sum())
}

/// LLaDA's Monte-Carlo estimate of the conditional NLL -log p(answer | prompt) (Nie et al. 2025,
/// eq. 6 / Alg. 3): draw l ~ U{1..A} (A answer positions), mask l answer positions chosen
/// uniformly, score `(A / l) sum_{masked} -log p(x_i | x_masked)`. `answer[i]` marks the scored
/// positions; the others are the prompt, always visible. Returns per example (mean, stderr) over
/// `samples` draws. With every position an answer it bounds -log p(x) with the same expectation
/// as the MDLM NELBO, at lower variance.
pub fn llada_conditional_nll(
    den: &dyn MaskDenoiser,
    ids: &Tensor,
    answer: &[bool],
    samples: usize,
    rng: &mut Rng,
) -> Result<Vec<(f64, f64)>> {
    let rows: Vec<Vec<u32>> = ids.to_vec2()?;
    let l = answer.len();
    let ans: Vec<usize> = (0..l).filter(|&i| answer[i]).collect();
    if ans.is_empty() || rows.first().is_some_and(|r| r.len() != l) {
        return Err(Error::Config(
            "the answer mask must mark at least one position and match the sequence length".into(),
        ));
    }
    let a = ans.len();
    let mut draws = vec![Vec::with_capacity(samples); rows.len()];
    for _ in 0..samples.max(1) {
        let mut xt = rows.clone();
        let mut w = vec![0f32; rows.len() * l];
        for (b, row) in xt.iter_mut().enumerate() {
            let m = 1 + rng.below(a);
            let perm = rng.permutation(a);
            for &j in &perm[..m] {
                row[ans[j]] = den.vocab() as u32;
                w[b * l + ans[j]] = (a as f64 / m as f64) as f32;
            }
        }
        let w = Tensor::from_vec(w, (rows.len(), l), ids.device())?;
        let ce = gather_nll(&den.log_probs(&ids_tensor(&xt, ids.device())?)?, ids)?;
        let v: Vec<f32> = (ce * w)?.sum(1)?.to_vec1()?;
        for (d, x) in draws.iter_mut().zip(v) {
            d.push(f64::from(x));
        }
    }
    Ok(draws.iter().map(|d| mean_stderr(d)).collect())
}
