//! MDLM ancestral sampling, with or without the cache (see the parent module).

use std::ops::Range;

use super::{predict, SampleStats};
use crate::discrete::filter::TokenFilter;
use crate::discrete::masked_diffusion::MaskDenoiser;
use crate::{Result, Rng};

/// Run `steps` reverse steps t_j = j / steps -> t_{j-1} on the masked positions of `range`.
/// At step j every still-masked position unmasks with probability (t_j - t_{j-1}) / t_j = 1/j,
/// so all are unmasked after the last step. The unmasking decisions are drawn before any token,
/// so the cached and uncached variants consume the generator identically and return the same
/// samples.
#[allow(clippy::too_many_arguments)]
pub fn run_block(
    den: &dyn MaskDenoiser,
    x: &mut [Vec<u32>],
    range: Range<usize>,
    steps: usize,
    cached: bool,
    filter: &TokenFilter,
    rng: &mut Rng,
    stats: &mut SampleStats,
) -> Result<()> {
    let mask = den.vocab() as u32;
    let mut logp: Option<Vec<Vec<Vec<f32>>>> = None; // valid for the current x
    for j in (1..=steps).rev() {
        let p = 1.0 / j as f64;
        let mut chosen: Vec<(usize, usize)> = Vec::new();
        for (b, row) in x.iter().enumerate() {
            for i in range.clone() {
                if row[i] == mask && rng.uniform() < p {
                    chosen.push((b, i));
                }
            }
        }
        if !cached || (!chosen.is_empty() && logp.is_none()) {
            logp = Some(predict(den, x, stats)?);
        }
        if chosen.is_empty() {
            continue;
        }
        if let Some(lp) = logp.as_ref() {
            for &(b, i) in &chosen {
                x[b][i] = filter.sample(&lp[b][i], rng);
            }
        }
        logp = None; // x changed
    }
    Ok(())
}
