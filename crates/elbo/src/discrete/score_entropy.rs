//! Denoising score entropy and the score-entropy ELBO (Lou, Meng and Ermon 2024, "Discrete
//! Diffusion Modeling by Estimating the Ratios of the Data Distribution").
//!
//! A ratio model gives the concrete score `s_theta(x_t, t)_{i,y} ~ p_t(x_t^{i<-y}) / p_t(x_t)`
//! for every position i and token y. The denoising score entropy of one position (eq. 9, with
//! the reverse-rate weights of eq. 10) is
//! `sum_{y != x_t^i} Q(y, x_t^i) [ s_y - r_y log s_y + K(r_y) ]`,
//! `r_y = p_{t|0}(y | x_0^i) / p_{t|0}(x_t^i | x_0^i)`, `K(a) = a (log a - 1)`, and the ELBO
//! (Theorem 3.6 / eq. 10) is
//! `-log p_0^theta(x_0) <= int_0^1 sigma(t) E_{x_t ~ p_{t|0}} [sum_i DSE_i] dt
//!  + KL(p_{1|0}(. | x_0) || p_base)`.
//!
//! The integral is invariant under a change of time variable, so the bound is evaluated on
//! the log-linear schedule with `eps = e^{-sigma_bar_max}` whatever the training schedule:
//! `sigma_bar` runs over the whole of `(0, sigma_bar_max]`. For the absorbing graph
//! `sigma_bar_max = inf` (eps = 0): every token is masked at t = 1 and the prior term is 0 (the
//! training schedule's eps > 0 would leave mass eps unmasked and an infinite prior KL). For the
//! uniform graph `sigma_bar_max` is the training schedule's `sigma_bar(1)` and the prior KL to
//! the uniform distribution is added in closed form.

use candle_core::{Device, Tensor};

use super::graph::{Graph, NoiseSchedule};
use super::ids_tensor;
use crate::{Error, Result, Rng};

/// A model of the concrete score: what the score-entropy loss, bound and samplers need.
pub trait RatioModel {
    /// The graph the ratios are for.
    fn graph(&self) -> Graph;
    /// `x_t: [B, L]` (u32 states of the graph) at total noise `sigma_bar[b]` ->
    /// `[B, L, V]` `log s_theta(x_t, sigma_bar)_{i,y}` for the data tokens y (the entry of the
    /// current token is never used).
    fn log_ratios(&self, xt: &Tensor, sigma_bar: &[f64]) -> Result<Tensor>;
}

/// `K(a) = a (log a - 1)`, with `K(0) = 0`.
fn k(a: f64) -> f64 {
    if a > 0.0 {
        a * (a.ln() - 1.0)
    } else {
        0.0
    }
}

/// The score entropy `sum_i DSE_i` of rows `xt` given their clean rows `x0` at total noise
/// `sigma_bar[b]`, times `weight[b]` -> `[B]` (differentiable through the model):
/// `sum_{i,y} W (e^{log s} - r log s) + sum W K(r)` with `W_{i,y} = weight Q(y, x_t^i)`
/// (Lou et al. 2024, eq. 9).
pub fn dse_terms(
    model: &dyn RatioModel,
    x0: &[Vec<u32>],
    xt: &[Vec<u32>],
    sigma_bar: &[f64],
    weight: &[f64],
    device: &Device,
) -> Result<Tensor> {
    let g = model.graph();
    let v = g.vocab;
    let (b, l) = (xt.len(), xt.first().map_or(0, Vec::len));
    if x0.len() != b || sigma_bar.len() != b || weight.len() != b {
        return Err(Error::Shape("score entropy: batch sizes differ".into()));
    }
    let mut w = vec![0f32; b * l * v];
    let mut wr = vec![0f32; b * l * v];
    let mut constant = vec![0f32; b];
    for r in 0..b {
        let mut c = 0.0;
        for i in 0..l {
            let (x, a) = (xt[r][i], x0[r][i]);
            let p = g.transition(a, sigma_bar[r]);
            for y in 0..v as u32 {
                let q = g.rate(y, x);
                if q == 0.0 {
                    continue;
                }
                let ratio = p[y as usize] / p[x as usize];
                let at = (r * l + i) * v + y as usize;
                w[at] = (weight[r] * q) as f32;
                wr[at] = (weight[r] * q * ratio) as f32;
                c += weight[r] * q * k(ratio);
            }
        }
        constant[r] = c as f32;
    }
    let ls = model.log_ratios(&ids_tensor(xt, device)?, sigma_bar)?; // [B, L, V]
    let w = Tensor::from_vec(w, (b, l, v), device)?;
    let wr = Tensor::from_vec(wr, (b, l, v), device)?;
    let terms = ((w * ls.exp()?)? - (wr * ls)?)?; // [B, L, V]
    Ok((terms.sum(2)?.sum(1)? + Tensor::from_vec(constant, b, device)?)?)
}

/// Noise every token of `x0` with `p_{t|0}(. | x0, sigma_bar[b])`.
pub fn noise_rows(g: &Graph, x0: &[Vec<u32>], sigma_bar: &[f64], rng: &mut Rng) -> Vec<Vec<u32>> {
    x0.iter()
        .zip(sigma_bar)
        .map(|(row, &s)| {
            row.iter()
                .map(|&a| g.sample_transition(a, s, rng))
                .collect()
        })
        .collect()
}

/// `n` stratified times in (0, 1): `(j + u) / n` for one uniform u, kept off 0 and 1 (the
/// antithetic time sampling of Kingma et al. 2021).
pub fn stratified_times(n: usize, rng: &mut Rng) -> Vec<f64> {
    let r = rng.uniform();
    (0..n)
        .map(|j| ((j as f64 + r) / n as f64).clamp(1e-12, 1.0 - 1e-12))
        .collect()
}

/// One-sample score-entropy loss per example `[B]` (differentiable): t at `times[b]` of the
/// training `schedule`, `x_t ~ p_{t|0}`, weight `sigma(t)` (Lou et al. 2024, Alg. 1).
pub fn dse_loss(
    model: &dyn RatioModel,
    ids: &Tensor,
    schedule: &NoiseSchedule,
    times: &[f64],
    rng: &mut Rng,
) -> Result<Tensor> {
    let x0: Vec<Vec<u32>> = ids.to_vec2()?;
    let sigma_bar: Vec<f64> = times.iter().map(|&t| schedule.total(t)).collect();
    let weight: Vec<f64> = times.iter().map(|&t| schedule.rate(t)).collect();
    let xt = noise_rows(&model.graph(), &x0, &sigma_bar, rng);
    dse_terms(model, &x0, &xt, &sigma_bar, &weight, ids.device())
}

/// The schedule the bound is evaluated on: log-linear up to the training schedule's
/// `sigma_bar(1)` (absorbing: up to infinity), see the module docs.
pub fn bound_schedule(g: &Graph, training: &NoiseSchedule) -> NoiseSchedule {
    match g.mask() {
        Some(_) => NoiseSchedule::log_linear(0.0),
        None => NoiseSchedule::log_linear((-training.total_max()).exp()),
    }
}

/// The prior term `sum_i KL(p_{1|0}(. | x0_i) || p_base)` of one row on `schedule`.
pub fn prior_term(g: &Graph, x0: &[u32], schedule: &NoiseSchedule) -> f64 {
    let s = schedule.total_max();
    x0.iter().map(|&a| g.prior_kl(a, s)).sum()
}

/// Monte-Carlo score-entropy bound on `-log p(x0)` per example (nats): `samples` stratified
/// times of the bound schedule, one `x_t` each, plus the prior term (Lou et al. 2024, eq. 10).
pub fn elbo(
    model: &dyn RatioModel,
    ids: &Tensor,
    training: &NoiseSchedule,
    samples: usize,
    rng: &mut Rng,
) -> Result<Vec<f64>> {
    let g = model.graph();
    let sched = bound_schedule(&g, training);
    let x0: Vec<Vec<u32>> = ids.to_vec2()?;
    let k = samples.max(1);
    let times: Vec<Vec<f64>> = x0.iter().map(|_| stratified_times(k, rng)).collect();
    let mut acc: Vec<f64> = x0.iter().map(|r| prior_term(&g, r, &sched)).collect();
    for j in 0..k {
        let t: Vec<f64> = times.iter().map(|ts| ts[j]).collect();
        let v: Vec<f32> = dse_loss(model, ids, &sched, &t, rng)?.to_vec1()?;
        acc.iter_mut()
            .zip(v)
            .for_each(|(a, x)| *a += f64::from(x) / k as f64);
    }
    Ok(acc)
}
