//! Mode coverage of samples from a 2-D Gaussian mixture with known modes, as reported for the
//! ring of 8 and the grid of 25 Gaussians by Unrolled GAN (Metz et al. 2017, sec. 3.1), VEEGAN
//! (Srivastava et al. 2017, sec. 5.1, table 1) and PacGAN (Lin et al. 2018, sec. 5, table 2):
//!
//! - a sample is **high quality** when it lies within 3 standard deviations (Euclidean
//!   distance) of some mode's centre;
//! - a mode is **captured** when at least [`MIN_SHARE`] of the samples (PacGAN's 20 of 2500)
//!   are high-quality samples of that mode.
//!
//! For a perfect sampler the high-quality share is `1 - e^{-9/2}`, about 0.989 (the mass of a
//! 2-D isotropic Gaussian within 3 standard deviations), and every mode is captured once the
//! sample is large enough. The mixture is recognised from the held-out data (the toy mixtures
//! of [`crate::data::toy2d`] whose modes explain at least 95% of it), so the metrics fit the
//! [`SampleMetric`] interface, which sees only the two sample sets.

use crate::data::toy2d::{mixture_modes, Toy2d};
use crate::eval::sample_metric::{check_set, MetricValue, SampleMetric};
use crate::{Error, Result, Rng};

/// The smallest share of the samples near a mode for it to count as captured (PacGAN, sec. 5:
/// "a mode is lost if there are less than 20 generated samples within 3 standard deviations"
/// of 2500).
pub const MIN_SHARE: f64 = 20.0 / 2500.0;

/// An equally weighted isotropic Gaussian mixture in 2-D: its centres and common standard
/// deviation.
#[derive(Clone, Debug, PartialEq)]
pub struct Mixture {
    /// The modes' centres.
    pub centres: Vec<[f64; 2]>,
    /// The components' standard deviation.
    pub std: f64,
}

/// What the samples of a mixture cover.
#[derive(Clone, Debug, PartialEq)]
pub struct Coverage {
    /// High-quality samples per mode.
    pub counts: Vec<usize>,
    /// Modes with at least `ceil(MIN_SHARE n)` (and at least 1) high-quality samples.
    pub captured: usize,
    /// The share of samples within 3 standard deviations of some mode.
    pub high_quality: f64,
    /// Samples scored.
    pub n: usize,
}

impl Mixture {
    /// The mixture of a toy data set, where it is one (8gaussians, 25gaussians).
    pub fn of_toy(toy: Toy2d) -> Option<Self> {
        mixture_modes(toy).map(|(centres, std)| Self { centres, std })
    }

    /// The known toy mixture whose modes hold at least 95% of `data` (`[m, 2]`, row-major)
    /// within 3 standard deviations; an error naming the data sets the metric knows otherwise.
    pub fn recognise(data: &[f32], dim: usize) -> Result<Self> {
        if dim != 2 || data.is_empty() || !data.len().is_multiple_of(2) {
            return Err(Error::Config(format!(
                "the mode-coverage metrics need 2-D samples of a known Gaussian mixture \
                 (8gaussians, 25gaussians), got {dim}-D data"
            )));
        }
        Toy2d::ALL
            .iter()
            .filter_map(|t| Self::of_toy(*t))
            .find(|m| m.coverage(data).high_quality >= 0.95)
            .ok_or_else(|| {
                Error::Config(
                    "the mode-coverage metrics need data from a known Gaussian mixture \
                     (8gaussians, 25gaussians); these data are neither: use energy-distance, \
                     mmd or sliced-wasserstein"
                        .into(),
                )
            })
    }

    /// The coverage of `samples` (`[n, 2]`, row-major).
    pub fn coverage(&self, samples: &[f32]) -> Coverage {
        let r2 = (3.0 * self.std).powi(2);
        let mut counts = vec![0usize; self.centres.len()];
        let n = samples.len() / 2;
        for p in samples.chunks_exact(2) {
            let (x, y) = (f64::from(p[0]), f64::from(p[1]));
            let near = self
                .centres
                .iter()
                .map(|c| (x - c[0]).powi(2) + (y - c[1]).powi(2))
                .enumerate()
                .min_by(|a, b| a.1.total_cmp(&b.1));
            if let Some((k, d2)) = near {
                if d2 <= r2 {
                    counts[k] += 1;
                }
            }
        }
        let need = ((MIN_SHARE * n as f64).ceil() as usize).max(1);
        let hq: usize = counts.iter().sum();
        Coverage {
            captured: counts.iter().filter(|c| **c >= need).count(),
            high_quality: if n == 0 { 0.0 } else { hq as f64 / n as f64 },
            counts,
            n,
        }
    }
}

/// The shared checks of both sets (shape, emptiness, finite values), then the mixture.
fn checked_coverage(samples: &[f32], data: &[f32], dim: usize) -> Result<Coverage> {
    check_set("samples", samples, dim, 1)?;
    check_set("held-out data", data, dim, 1)?;
    Ok(Mixture::recognise(data, dim)?.coverage(samples))
}

/// `modes`: the number of modes captured (higher is better).
#[derive(Clone, Copy, Debug, Default)]
pub struct ModesCaptured;

impl SampleMetric for ModesCaptured {
    fn name(&self) -> &'static str {
        "modes"
    }

    fn lower_is_better(&self) -> bool {
        false
    }

    fn compute(
        &self,
        samples: &[f32],
        data: &[f32],
        dim: usize,
        _rng: &mut Rng,
    ) -> Result<MetricValue> {
        let cov = checked_coverage(samples, data, dim)?;
        Ok(MetricValue {
            value: cov.captured as f64,
            stderr: None,
            n_samples: cov.n,
            n_data: data.len() / 2,
        })
    }
}

/// `high-quality`: the share of samples within 3 standard deviations of a mode (higher is
/// better), with its binomial standard error.
#[derive(Clone, Copy, Debug, Default)]
pub struct HighQualityShare;

impl SampleMetric for HighQualityShare {
    fn name(&self) -> &'static str {
        "high-quality"
    }

    fn lower_is_better(&self) -> bool {
        false
    }

    fn compute(
        &self,
        samples: &[f32],
        data: &[f32],
        dim: usize,
        _rng: &mut Rng,
    ) -> Result<MetricValue> {
        let cov = checked_coverage(samples, data, dim)?;
        let p = cov.high_quality;
        Ok(MetricValue {
            value: p,
            stderr: Some((p * (1.0 - p) / cov.n as f64).sqrt()),
            n_samples: cov.n,
            n_data: data.len() / 2,
        })
    }
}
