//! Closed-form Gaussian pieces of the DDPM bound, in f64 (evaluation runs on plain slices).
//!
//! - the KL divergence between two diagonal Gaussians (Ho et al. 2020, eq. 5: every L_{t-1}
//!   term compares Gaussians, so it is computed in closed form "instead of high variance Monte
//!   Carlo estimates");
//! - the Gaussian log-density (the decoder for continuous data);
//! - the discretized Gaussian decoder L_0 (Ho et al. 2020, eq. 13), generalised from 256 to `L`
//!   levels on [-1, 1]: level k sits at c_k = -1 + 2k/(L-1), its bin is c_k ± 1/(L-1), and the
//!   outermost bins extend to ∓∞, so the L probabilities sum to one exactly.

use std::f64::consts::{PI, SQRT_2};

/// KL( N(m1, v1) || N(m2, v2) ) for scalars, in nats.
pub fn normal_kl(m1: f64, v1: f64, m2: f64, v2: f64) -> f64 {
    0.5 * ((v2 / v1).ln() + (v1 + (m1 - m2).powi(2)) / v2 - 1.0)
}

/// log N(x; m, v).
pub fn normal_log_density(x: f64, m: f64, v: f64) -> f64 {
    -0.5 * ((2.0 * PI * v).ln() + (x - m).powi(2) / v)
}

/// The complementary error function erfc(x), relative error below 1.2e-7 everywhere
/// (Chebyshev fit, Numerical Recipes 2nd ed. §6.2 `erfcc`). Relative accuracy in the tails is
/// what the log-probabilities of far-off bins need.
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let r = t * poly.exp();
    if x >= 0.0 {
        r
    } else {
        2.0 - r
    }
}

/// P(a < Z < b) for Z ~ N(0, 1) and a <= b (either may be infinite), computed on the side of
/// the smaller tail so that far-off bins keep their relative accuracy.
pub fn normal_interval(a: f64, b: f64) -> f64 {
    if a >= 0.0 {
        // both in the upper tail: Q(a) - Q(b), Q(z) = erfc(z/√2)/2
        0.5 * (erfc(a / SQRT_2) - erfc(b / SQRT_2))
    } else if b <= 0.0 {
        // both in the lower tail: Φ(b) - Φ(a) = Q(-b) - Q(-a)
        0.5 * (erfc(-b / SQRT_2) - erfc(-a / SQRT_2))
    } else {
        1.0 - 0.5 * (erfc(-a / SQRT_2) + erfc(b / SQRT_2))
    }
}

/// Grid value of level `k` of `levels` on [-1, 1]: c_k = -1 + 2k/(L-1).
pub fn level_value(k: usize, levels: usize) -> f64 {
    -1.0 + 2.0 * k as f64 / (levels - 1) as f64
}

/// Nearest level index of a value in [-1, 1] (clamped).
pub fn nearest_level(x: f64, levels: usize) -> usize {
    let k = ((x + 1.0) * 0.5 * (levels - 1) as f64).round();
    k.clamp(0.0, (levels - 1) as f64) as usize
}

/// log P(level k | mean, std) of the discretized Gaussian decoder (Ho et al. 2020, eq. 13)
/// with `levels` >= 2 levels on [-1, 1]: the mass of N(mean, std²) over bin k, whose edges are
/// c_k ± 1/(L-1), with -∞ for k = 0 and +∞ for k = L-1. Probabilities below 1e-300 are
/// clamped there (the bound stays finite and honest: it only gets larger).
pub fn discretized_gaussian_log_prob(k: usize, levels: usize, mean: f64, std: f64) -> f64 {
    let half = 1.0 / (levels - 1) as f64;
    let c = level_value(k, levels);
    let lo = if k == 0 {
        f64::NEG_INFINITY
    } else {
        (c - half - mean) / std
    };
    let hi = if k + 1 == levels {
        f64::INFINITY
    } else {
        (c + half - mean) / std
    };
    normal_interval(lo, hi).max(1e-300).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erfc_matches_known_values() {
        // erfc(0) = 1, erfc(1) = 0.157299207050285, erfc(3) = 2.20904969985854e-5,
        // erfc(6) = 2.15197367124989e-17
        for (x, want) in [
            (0.0, 1.0),
            (1.0, 0.157_299_207_050_285),
            (3.0, 2.209_049_699_858_54e-5),
            (6.0, 2.151_973_671_249_89e-17),
            (-1.0, 1.842_700_792_949_715),
        ] {
            let got = erfc(x);
            assert!(
                ((got - want) / want).abs() < 2e-7,
                "erfc({x}) = {got}, want {want}"
            );
        }
    }

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        assert!(normal_kl(0.3, 2.0, 0.3, 2.0).abs() < 1e-15);
        assert!(normal_kl(0.3, 2.0, 0.1, 1.0) > 0.0);
    }
}
