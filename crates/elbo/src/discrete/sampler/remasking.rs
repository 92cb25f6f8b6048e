//! LLaDA's low-confidence and random remasking (Nie et al. 2025, Alg. 5 and `generate.py`).

use std::ops::Range;

use super::{predict, SampleStats};
use crate::discrete::filter::TokenFilter;
use crate::discrete::masked_diffusion::MaskDenoiser;
use crate::{Result, Rng};

/// Tokens to unmask at each of `steps` steps when `m` are masked: `m / steps` each, the
/// remainder one more in the first steps (LLaDA's `get_num_transfer_tokens`).
pub fn transfer_counts(m: usize, steps: usize) -> Vec<usize> {
    let (base, rem) = (m / steps, m % steps);
    (0..steps).map(|j| base + usize::from(j < rem)).collect()
}

/// `steps` steps over the masked positions of `range`: each step draws a candidate for every
/// masked position, then keeps the `k_j` with the highest model probability of their candidate
/// (`low_confidence`) or `k_j` chosen at random; the others stay masked.
#[allow(clippy::too_many_arguments)]
pub fn run_block(
    den: &dyn MaskDenoiser,
    x: &mut [Vec<u32>],
    range: Range<usize>,
    steps: usize,
    low_confidence: bool,
    filter: &TokenFilter,
    rng: &mut Rng,
    stats: &mut SampleStats,
) -> Result<()> {
    let mask = den.vocab() as u32;
    let counts: Vec<Vec<usize>> = x
        .iter()
        .map(|row| transfer_counts(range.clone().filter(|&i| row[i] == mask).count(), steps))
        .collect();
    for j in 0..steps {
        if counts.iter().all(|c| c[j] == 0) {
            continue;
        }
        let lp = predict(den, x, stats)?;
        for (b, row) in x.iter_mut().enumerate() {
            let mut cand: Vec<(f64, usize, u32)> = range
                .clone()
                .filter(|&i| row[i] == mask)
                .map(|i| {
                    let tok = filter.sample(&lp[b][i], rng);
                    let conf = if low_confidence {
                        f64::from(lp[b][i][tok as usize]).exp()
                    } else {
                        rng.uniform()
                    };
                    (conf, i, tok)
                })
                .collect();
            cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            for &(_, i, tok) in cand.iter().take(counts[b][j]) {
                row[i] = tok;
            }
        }
    }
    Ok(())
}
