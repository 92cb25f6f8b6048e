//! Samplers of score-entropy models (Lou, Meng and Ermon 2024, sec. 4.1 and Alg. 2), as free
//! functions over any [`RatioModel`]: from the base distribution at t = 1 (all MASK, or uniform
//! tokens) down a grid of `steps` times to `t = eps`, then one analytic step to
//! `sigma_bar = 0` (the final denoise; for the absorbing graph it unmasks every position).
//!
//! - `euler` (tau-leaping, eq. 16): each position jumps `x -> y` with probability
//!   `sigma(t) dt Q(y, x) s_theta(x_t, t)_y`, and stays otherwise.
//! - `analytic` (the Tweedie tau-leaping step, Theorem 4.2 / eq. 19): with
//!   `Delta = sigma_bar(t) - sigma_bar(s)`, position i moves to y with probability proportional
//!   to `(exp(-Delta Q)^T s_theta)_y exp(Delta Q)(y, x_t^i)`; with exact ratios this is the
//!   exact one-position reverse transition.
//!
//! Given positions of a template (a prompt or any pattern of blanks) are never changed; the
//! network sees them at every step.

use super::filter::{sample_categorical, TokenFilter};
use super::graph::{GraphKind, NoiseSchedule};
use super::ids_tensor;
use super::sampler::SampleStats;
use super::score_entropy::RatioModel;
use crate::{Error, Result, Rng};

/// Which score-entropy sampler (`model.sampling.sampler`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RatioSampler {
    /// Euler / tau-leaping on the reverse rates.
    #[serde(alias = "tau-leaping", alias = "tau_leaping")]
    Euler,
    /// The analytic (Tweedie) denoiser step.
    #[default]
    #[serde(alias = "tweedie")]
    Analytic,
}

impl RatioSampler {
    /// The name as configs spell it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::Analytic => "analytic",
        }
    }
}

/// Sampler settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RatioSampleConfig {
    /// Which sampler.
    pub sampler: RatioSampler,
    /// Reverse steps from t = 1 to t = eps (then one final denoising step).
    pub steps: usize,
    /// The noise schedule the steps are spaced on.
    pub schedule: NoiseSchedule,
    /// The last time of the grid, in (0, 1).
    pub eps: f64,
    /// Temperature / top-k / top-p of where a moving position goes (its chance to move is
    /// kept).
    pub filter: TokenFilter,
}

/// `n` rows sampled with the positions given in `template` fixed (`None`: generate).
pub fn sample(
    model: &dyn RatioModel,
    n: usize,
    template: &[Option<u32>],
    cfg: &RatioSampleConfig,
    rng: &mut Rng,
) -> Result<(Vec<Vec<u32>>, SampleStats)> {
    cfg.filter.validate()?;
    if !(cfg.eps > 0.0 && cfg.eps < 1.0) || cfg.steps == 0 {
        return Err(Error::Config(format!(
            "score-entropy sampling needs steps >= 1 and eps in (0, 1), got {} and {}",
            cfg.steps, cfg.eps
        )));
    }
    let g = model.graph();
    if let Some(bad) = template.iter().flatten().find(|&&t| t as usize >= g.vocab) {
        return Err(Error::Config(format!(
            "template token {bad} is not below the vocabulary size {}",
            g.vocab
        )));
    }
    let mut x: Vec<Vec<u32>> = (0..n)
        .map(|_| {
            template
                .iter()
                .map(|t| t.unwrap_or_else(|| g.sample_base(rng)))
                .collect()
        })
        .collect();
    let free: Vec<usize> = (0..template.len())
        .filter(|&i| template[i].is_none())
        .collect();
    let mut stats = SampleStats::default();
    let sched = &cfg.schedule;
    let time = |j: usize| 1.0 - j as f64 * (1.0 - cfg.eps) / cfg.steps as f64;
    for j in 0..=cfg.steps {
        let last = j == cfg.steps;
        let t = time(j);
        let sbar = sched.total(t);
        let (sampler, delta) = if last {
            (RatioSampler::Analytic, sbar) // to sigma_bar = 0
        } else {
            let s = time(j + 1);
            match cfg.sampler {
                RatioSampler::Euler => (RatioSampler::Euler, sched.rate(t) * (t - s)),
                RatioSampler::Analytic => (RatioSampler::Analytic, sbar - sched.total(s)),
            }
        };
        stats.nfe += 1;
        let ls: Vec<Vec<Vec<f32>>> = model
            .log_ratios(&ids_tensor(&x, &candle_core::Device::Cpu)?, &vec![sbar; n])?
            .to_vec3()?; // [n, L, V]
        for (row, lr) in x.iter_mut().zip(&ls) {
            for &i in &free {
                let cur = row[i];
                let mut ratios: Vec<f64> = (0..g.states())
                    .map(|y| match y {
                        y if y == cur as usize => 1.0,
                        y if y < g.vocab => f64::from(lr[i][y]).exp(),
                        _ => 0.0, // MASK seen from a token: unreachable backwards
                    })
                    .collect();
                let mut p = match sampler {
                    RatioSampler::Euler => {
                        for (y, r) in ratios.iter_mut().enumerate() {
                            *r *= delta * g.rate(y as u32, cur);
                        }
                        let moved: f64 = ratios.iter().filter(|r| r.is_finite()).sum::<f64>()
                            - ratios[cur as usize];
                        ratios[cur as usize] = (1.0 - moved).max(0.0);
                        ratios
                    }
                    RatioSampler::Analytic => {
                        let into = g.transition_into(cur, delta);
                        g.staggered(&ratios, delta)
                            .iter()
                            .zip(&into)
                            .map(|(a, b)| a * b)
                            .collect()
                    }
                };
                if last && g.kind == GraphKind::Absorbing {
                    p[g.vocab] = 0.0;
                }
                row[i] = draw(&mut p, cur, &cfg.filter, rng);
            }
        }
    }
    Ok((x, stats))
}

/// A draw from the unnormalised `p` over states (negative or non-finite entries count as 0):
/// stay at `cur` with its share, else move where the filter sends the rest.
fn draw(p: &mut [f64], cur: u32, filter: &TokenFilter, rng: &mut Rng) -> u32 {
    p.iter_mut()
        .filter(|q| !(q.is_finite() && **q > 0.0))
        .for_each(|q| *q = 0.0);
    let total: f64 = p.iter().sum();
    if total <= 0.0 {
        return cur;
    }
    let stay = p[cur as usize] / total;
    if *filter == TokenFilter::default() || stay >= 1.0 {
        p.iter_mut().for_each(|q| *q /= total);
        return sample_categorical(p, rng);
    }
    if rng.uniform() < stay {
        return cur;
    }
    let logits: Vec<f32> = p
        .iter()
        .enumerate()
        .map(|(y, &q)| {
            if y == cur as usize || q == 0.0 {
                f32::NEG_INFINITY
            } else {
                q.ln() as f32
            }
        })
        .collect();
    filter.sample(&logits, rng)
}
