//! The D3PM variational bound (Austin et al. 2021, eq. 1) with the x_0-parameterised reverse
//! process (D3PM eq. 4) and the hybrid loss (D3PM eq. 5):
//!
//! `L_vlb = KL(q(x_T|x_0) || p(x_T)) + sum_{t=2}^T E_q KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))
//!          - E_q log p(x_0|x_1)`,
//! with the posterior `q(x_s | x_t, x_0) ∝ (x_t Qbar_{t|s}^T) ⊙ (x_0 Qbar_s)` (D3PM eq. 3, with
//! `s = t - 1` in training and any `s < t` when sampling with skipped steps) and the reverse step
//! `p(x_s | x_t) ∝ sum_{x0} q(x_s, x_t | x0) p~(x0 | x_t) = (x_t Qbar_{t|s}^T) ⊙ (p~ Qbar_s)`.
//! At t = 1 the posterior is a point mass on x_0, so its KL is the reconstruction term
//! `-log p(x_0 | x_1)`: one formula covers every t. Everything factorises over tokens given x_t;
//! the expectation over x_t is joint (a Monte-Carlo draw, or enumeration on tiny cases).
//!
//! Eq. 4 weighs each `x0` by `q(x_t | x0)`, so its reverse step is the true per-token
//! `q(x_s^i | x_t)` when `p~(x0^i) ∝ q(x0^i | x_t) / q(x_t^i | x0^i)`, not at the posterior
//! itself; with the absorbing matrix `q(x_t^i | x0^i)` is the same for every `x0^i` consistent
//! with `x_t^i`, and the two coincide (MDLM's SUBS).
//!
//! The unbiased estimate draws t ~ U{1..T} and x_t ~ q(x_t|x_0) and scores `T L_t + L_T`, with
//! the prior term in closed form.

use candle_core::{DType, Device, Tensor};

use super::transition::Transition;
use crate::discrete::filter::sample_categorical;
use crate::discrete::masked_diffusion::sample_times;
use crate::discrete::{gather_nll, ids_tensor};
use crate::{Error, Result, Rng};

/// Probabilities below this are treated as zero inside logarithms.
const TINY: f64 = 1e-30;

/// What the bound and the sampler need from a network: `p~(x_0 | x_t, t)`.
pub trait X0Denoiser {
    /// Number of data tokens V.
    fn vocab(&self) -> usize;
    /// `x_t: [B, L]` (u32 states, `0..K`) and per-row times `t/T` in (0, 1] -> `[B, L, V]`
    /// log p~(x_0^i = . | x_t).
    fn log_probs(&self, xt: &Tensor, time: &[f64]) -> Result<Tensor>;
}

/// A point mass on token `x` over the V data tokens.
fn one_hot(x: u32, v: usize) -> Vec<f64> {
    let mut p = vec![0.0; v];
    p[x as usize] = 1.0;
    p
}

/// `(x_t Qbar_{t|s}^T) ⊙ (p Qbar_s)`, normalised: with `p` a point mass on x_0 the posterior
/// `q(x_s | x_t, x_0)` (D3PM eq. 3), with `p = p~(. | x_t)` the reverse step `p(x_s | x_t)`
/// (D3PM eq. 4).
pub fn reverse_step(tr: &dyn Transition, p: &[f64], xt: u32, s: usize, t: usize) -> Vec<f64> {
    let col = tr.column(s, t, xt as usize);
    let mut out: Vec<f64> = tr
        .propagate(p, s)
        .iter()
        .zip(&col)
        .map(|(a, b)| a * b)
        .collect();
    let z: f64 = out.iter().sum();
    if z > 0.0 {
        out.iter_mut().for_each(|x| *x /= z);
    }
    out
}

/// The posterior `q(x_s | x_t, x_0)` over the K states (D3PM eq. 3).
pub fn posterior(tr: &dyn Transition, x0: u32, xt: u32, s: usize, t: usize) -> Vec<f64> {
    reverse_step(tr, &one_hot(x0, tr.data_states()), xt, s, t)
}

/// Draws x_t ~ q(x_t | x_0) = x_0 Qbar_t token by token, row `b` at step `t[b]`.
pub fn sample_forward(
    tr: &dyn Transition,
    x0: &[Vec<u32>],
    t: &[usize],
    rng: &mut Rng,
) -> Vec<Vec<u32>> {
    let v = tr.data_states();
    x0.iter()
        .zip(t)
        .map(|(row, &tb)| {
            row.iter()
                .map(|&x| sample_categorical(&tr.propagate(&one_hot(x, v), tb), rng))
                .collect()
        })
        .collect()
}

/// The prior term `sum_i KL(q(x_T^i | x_0^i) || p(x_T))` of one sequence, in nats.
pub fn prior_kl(tr: &dyn Transition, x0: &[u32]) -> f64 {
    let prior = tr.prior();
    x0.iter()
        .map(|&x| {
            let q = tr.propagate(&one_hot(x, tr.data_states()), tr.steps());
            q.iter()
                .zip(&prior)
                .filter(|(qi, _)| **qi > 0.0)
                .map(|(qi, pi)| qi * (qi.ln() - pi.max(TINY).ln()))
                .sum::<f64>()
        })
        .sum()
}

/// `log p(x_s | x_t)` `[B, L, K]` from `log p~(x_0 | x_t)` `[B, L, V]` (differentiable), row `b`
/// stepping from `t[b]` to `s[b]`.
pub fn reverse_log_probs(
    tr: &dyn Transition,
    log_p0: &Tensor,
    xt: &[Vec<u32>],
    s: &[usize],
    t: &[usize],
) -> Result<Tensor> {
    let (b, l, v) = log_p0.dims3()?;
    let (k, dev) = (tr.states(), log_p0.device());
    let p0 = log_p0.exp()?; // [B, L, V]
                            // p~ Qbar_s, per row
    let prop = match tr.mixture(0) {
        Some(_) => {
            let (mut a, mut m) = (Vec::with_capacity(b), Vec::with_capacity(b * k));
            for &sb in s {
                let (ab, mb) = tr.mixture(sb).ok_or_else(|| {
                    Error::Config("a transition must be structured at every step or none".into())
                })?;
                a.push(ab as f32);
                m.extend(mb.iter().map(|x| ((1.0 - ab) * x) as f32));
            }
            let padded = match k - v {
                0 => p0,
                extra => Tensor::cat(&[&p0, &Tensor::zeros((b, l, extra), DType::F32, dev)?], 2)?,
            }; // [B, L, K]
            let a = Tensor::from_vec(a, (b, 1, 1), dev)?;
            let m = Tensor::from_vec(m, (b, 1, k), dev)?;
            padded.broadcast_mul(&a)?.broadcast_add(&m)? // [B, L, K]
        }
        None => {
            let mats: Vec<f32> = s
                .iter()
                .flat_map(|&sb| {
                    let q = tr.cumulative(sb);
                    q[..v]
                        .iter()
                        .flatten()
                        .map(|&x| x as f32)
                        .collect::<Vec<_>>()
                })
                .collect();
            p0.matmul(&Tensor::from_vec(mats, (b, v, k), dev)?)? // [B, L, K]
        }
    };
    let cols: Vec<f32> = xt
        .iter()
        .zip(s.iter().zip(t))
        .flat_map(|(row, (&sb, &tb))| {
            row.iter()
                .flat_map(|&x| tr.column(sb, tb, x as usize))
                .map(|c| c as f32)
                .collect::<Vec<_>>()
        })
        .collect();
    let un = (prop * Tensor::from_vec(cols, (b, l, k), dev)?)?; // [B, L, K]
    let z = un.sum_keepdim(2)?; // [B, L, 1]
    Ok((un + TINY)?.log()?.broadcast_sub(&z.log()?)?)
}

/// Per example the term `L_{t-1}` at the given `x_t` (summed over tokens, `[B]`,
/// differentiable): `KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))`, which at t = 1 is
/// `-log p(x_0 | x_1)`; and the auxiliary `-log p~(x_0 | x_t)` `[B]` of the hybrid loss.
pub fn vlb_terms_at(
    tr: &dyn Transition,
    den: &dyn X0Denoiser,
    x0: &[Vec<u32>],
    xt: &[Vec<u32>],
    t: &[usize],
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (b, l, k) = (x0.len(), x0.first().map_or(0, Vec::len), tr.states());
    if t.iter().any(|&tb| tb == 0 || tb > tr.steps()) || t.len() != b || xt.len() != b {
        return Err(Error::Config(format!(
            "D3PM terms need one step in 1..={} per row",
            tr.steps()
        )));
    }
    let time: Vec<f64> = t.iter().map(|&tb| tb as f64 / tr.steps() as f64).collect();
    let log_p0 = den.log_probs(&ids_tensor(xt, device)?, &time)?; // [B, L, V]
    let s: Vec<usize> = t.iter().map(|tb| tb - 1).collect();
    let logp = reverse_log_probs(tr, &log_p0, xt, &s, t)?; // [B, L, K]
    let mut q = Vec::with_capacity(b * l * k);
    for ((r0, rt), &tb) in x0.iter().zip(xt).zip(t) {
        for (&a, &c) in r0.iter().zip(rt) {
            q.extend(posterior(tr, a, c, tb - 1, tb));
        }
    }
    let logq: Vec<f32> = q.iter().map(|x| x.max(TINY).ln() as f32).collect();
    let q: Vec<f32> = q.iter().map(|&x| x as f32).collect();
    let q = Tensor::from_vec(q, (b, l, k), device)?;
    let logq = Tensor::from_vec(logq, (b, l, k), device)?;
    let kl = (q * (logq - logp)?)?.sum(2)?.sum(1)?; // [B]
    let ce = gather_nll(&log_p0, &ids_tensor(x0, device)?)?.sum(1)?; // [B]
    Ok((kl, ce))
}

/// Stratified steps in 1..=T for `n` draws (MDLM's antithetic times on the grid).
pub fn sample_steps(n: usize, steps: usize, rng: &mut Rng) -> Vec<usize> {
    sample_times(n, true, steps, rng)
        .into_iter()
        .map(|u| ((u * steps as f64).round() as usize).clamp(1, steps))
        .collect()
}

/// One-draw unbiased estimates per example (`[B]`, differentiable): the bound
/// `T L_{t-1} + L_T` at t ~ U{1..T}, x_t ~ q(x_t | x_0), and the auxiliary cross-entropy.
pub fn vlb_estimate_terms(
    tr: &dyn Transition,
    den: &dyn X0Denoiser,
    ids: &Tensor,
    t: &[usize],
    rng: &mut Rng,
) -> Result<(Tensor, Tensor)> {
    let x0: Vec<Vec<u32>> = ids.to_vec2()?;
    let xt = sample_forward(tr, &x0, t, rng);
    let (kl, ce) = vlb_terms_at(tr, den, &x0, &xt, t, ids.device())?;
    let prior: Vec<f32> = x0.iter().map(|r| prior_kl(tr, r) as f32).collect();
    let prior = Tensor::from_vec(prior, x0.len(), ids.device())?;
    Ok((((kl * tr.steps() as f64)? + prior)?, ce))
}

/// Monte-Carlo bound per example: the mean of `samples` stratified draws of the estimate.
pub fn vlb(
    tr: &dyn Transition,
    den: &dyn X0Denoiser,
    ids: &Tensor,
    samples: usize,
    rng: &mut Rng,
) -> Result<Vec<f64>> {
    let (b, k) = (ids.dim(0)?, samples.max(1));
    let steps: Vec<Vec<usize>> = (0..b).map(|_| sample_steps(k, tr.steps(), rng)).collect();
    let mut acc = vec![0.0; b];
    for j in 0..k {
        let t: Vec<usize> = steps.iter().map(|ts| ts[j]).collect();
        let v: Vec<f32> = vlb_estimate_terms(tr, den, ids, &t, rng)?.0.to_vec1()?;
        acc.iter_mut().zip(v).for_each(|(a, x)| *a += f64::from(x));
    }
    Ok(acc.into_iter().map(|a| a / k as f64).collect())
}

/// The bound of one sequence exactly: every t in 1..=T and every x_t in K^L with
/// `q(x_t | x_0) > 0` (at most 2^16 states per step).
pub fn vlb_by_enumeration(tr: &dyn Transition, den: &dyn X0Denoiser, x0: &[u32]) -> Result<f64> {
    let (l, k) = (x0.len(), tr.states());
    if l == 0 || (k as f64).powi(l as i32) > 65536.0 {
        return Err(Error::Config(format!(
            "enumerating x_t needs K^L <= 65536 states, got K = {k}, L = {l}"
        )));
    }
    let v = tr.data_states();
    let mut total = prior_kl(tr, x0);
    for t in 1..=tr.steps() {
        let marg: Vec<Vec<f64>> = x0
            .iter()
            .map(|&x| tr.propagate(&one_hot(x, v), t))
            .collect();
        let (mut rows, mut w) = (Vec::new(), Vec::new());
        for code in 0..k.pow(l as u32) {
            let row: Vec<u32> = (0..l)
                .map(|i| (code / k.pow(i as u32) % k) as u32)
                .collect();
            let p: f64 = row.iter().zip(&marg).map(|(&x, m)| m[x as usize]).product();
            if p > 0.0 {
                rows.push(row);
                w.push(p);
            }
        }
        let x0s = vec![x0.to_vec(); rows.len()];
        let (kl, _) = vlb_terms_at(tr, den, &x0s, &rows, &vec![t; rows.len()], &Device::Cpu)?;
        let kl: Vec<f32> = kl.to_vec1()?;
        total += kl
            .iter()
            .zip(&w)
            .map(|(a, b)| f64::from(*a) * b)
            .sum::<f64>();
    }
    Ok(total)
}
