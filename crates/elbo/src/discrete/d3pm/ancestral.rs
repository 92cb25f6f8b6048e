//! Ancestral sampling of a D3PM (Austin et al. 2021, sec. 3): x_T ~ p(x_T), then
//! x_s ~ p(x_s | x_t) ∝ (x_t Qbar_{t|s}^T) ⊙ (p~(x_0 | x_t) Qbar_s) (D3PM eq. 4) down a grid of
//! `n <= T` times, so skipping steps uses the closed-form `Qbar_{t|s}` rather than `Q_t`. The last
//! step (s = 0) lands on the data tokens. Given positions of a template stay fixed at every step.

use candle_core::Device;

use super::transition::Transition;
use super::vlb::{reverse_step, X0Denoiser};
use crate::discrete::filter::{sample_categorical, TokenFilter};
use crate::discrete::ids_tensor;
use crate::{Error, Result, Rng};

/// How to sample.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AncestralConfig {
    /// Network calls (at most T; more are capped at T).
    pub steps: usize,
    /// Temperature / top-k / top-p applied to p~(x_0 | x_t) before each step.
    pub filter: TokenFilter,
}

/// The time grid `0 = t_0 < t_1 < ... < t_n = T` of `n` (capped at T) evenly spaced steps.
pub fn time_grid(steps: usize, total: usize) -> Vec<usize> {
    let n = steps.clamp(1, total.max(1));
    (0..=n).map(|j| (j * total).div_ceil(n)).collect()
}

/// `template.len()` tokens per row for `n` rows: `Some(token)` positions are kept, the rest drawn
/// from the reverse process. Returns rows of data tokens.
pub fn sample(
    tr: &dyn Transition,
    den: &dyn X0Denoiser,
    template: &[Option<u32>],
    n: usize,
    cfg: &AncestralConfig,
    rng: &mut Rng,
    device: &Device,
) -> Result<Vec<Vec<u32>>> {
    let v = tr.data_states();
    if template.iter().flatten().any(|&x| x as usize >= v) {
        return Err(Error::Config(format!("template tokens must be in 0..{v}")));
    }
    let prior = tr.prior();
    let mut x: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            template
                .iter()
                .map(|g| g.unwrap_or_else(|| sample_categorical(&prior, rng)))
                .collect()
        })
        .collect();
    if n == 0 || template.iter().all(Option::is_some) {
        return Ok(x);
    }
    let grid = time_grid(cfg.steps, tr.steps());
    for w in grid.windows(2).rev() {
        let (s, t) = (w[0], w[1]);
        let time = vec![t as f64 / tr.steps() as f64; n];
        let logp: Vec<Vec<Vec<f32>>> = den.log_probs(&ids_tensor(&x, device)?, &time)?.to_vec3()?;
        for (row, lp) in x.iter_mut().zip(&logp) {
            for ((tok, given), l) in row.iter_mut().zip(template).zip(lp) {
                if given.is_none() {
                    let p0 = cfg.filter.probs(l);
                    *tok = sample_categorical(&reverse_step(tr, &p0, *tok, s, t), rng);
                }
            }
        }
    }
    Ok(x)
}
