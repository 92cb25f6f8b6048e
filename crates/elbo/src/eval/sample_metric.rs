//! Sample-quality metrics: two-sample distances between model samples and held-out data.
//!
//! These need nothing from a model but its samples, so they apply to every generative family,
//! including those with no likelihood at all, and are reported beside the NLL. All three here are
//! "lower is better" and are zero (in expectation, or exactly) when the two distributions agree:
//!
//! - [`EnergyDistance`]: the energy distance of Székely & Rizzo (2013), estimated as
//!   `2 E|X-Y| - E|X-X'| - E|Y-Y'|`, unbiased U-statistic for the within-set terms.
//! - [`Mmd`]: the squared maximum mean discrepancy with an RBF kernel, unbiased estimator
//!   `MMD^2_u` of Gretton et al. (2012), eq. (3).
//! - [`SlicedWasserstein`]: the sliced Wasserstein distance of Bonneel et al. (2015), reported as
//!   its p-th power `SW_p^p` (the mean over random directions of the 1-D `W_p^p`).
//!
//! Inputs are row-major `f32` slices, `samples` of shape `[n, dim]` and `data` of shape
//! `[m, dim]`; arithmetic is in `f64`. Pairwise sums run on rayon's pool in blocks fixed by the
//! sizes and are added in a fixed order, so results do not depend on the number of threads.
//!
//! Pick metrics by name with [`metric_by_name`] or compute several with [`compute_all`].
//!
//! References:
//! - G. J. Székely, M. L. Rizzo, "Energy statistics: A class of statistics based on distances",
//!   Journal of Statistical Planning and Inference 143(8), 2013.
//! - A. Gretton, K. M. Borgwardt, M. J. Rasch, B. Schölkopf, A. Smola, "A Kernel Two-Sample
//!   Test", JMLR 13, 2012.
//! - N. Bonneel, J. Rabin, G. Peyré, H. Pfister, "Sliced and Radon Wasserstein Barycenters of
//!   Measures", Journal of Mathematical Imaging and Vision 51, 2015.
//! - W. Hoeffding, "A Class of Statistics with Asymptotically Normal Distribution", Annals of
//!   Mathematical Statistics 19(3), 1948 (the first-order variance used for the standard errors).

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Rng};

/// A two-sample metric comparing model samples with held-out data.
pub trait SampleMetric: Send + Sync {
    /// Canonical name, e.g. "energy-distance".
    fn name(&self) -> &'static str;
    /// Lower is better (true for the three distances here, false for the mode-coverage counts of
    /// [`super::mode_coverage`]); checkpoint selection follows it.
    fn lower_is_better(&self) -> bool {
        true
    }
    /// Compare `samples` [n, dim] with held-out `data` [m, dim] (row-major f32 slices); rng for
    /// any subsampling / projections.
    fn compute(
        &self,
        samples: &[f32],
        data: &[f32],
        dim: usize,
        rng: &mut Rng,
    ) -> Result<MetricValue>;
}

/// The value of a [`SampleMetric`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricValue {
    /// The estimate (see each metric for its exact definition and power).
    pub value: f64,
    /// Its estimated standard error, where the metric provides one.
    pub stderr: Option<f64>,
    /// Rows of `samples` actually used (after any subsampling).
    pub n_samples: usize,
    /// Rows of `data` actually used (after any subsampling).
    pub n_data: usize,
}

/// Canonical names of the metrics [`metric_by_name`] knows.
pub const METRIC_NAMES: &[&str] = &[
    "energy-distance",
    "mmd",
    "sliced-wasserstein",
    "modes",
    "high-quality",
    "frechet-distance",
];

/// Canonical names with their aliases, as error messages list them.
const NAME_HELP: &str = "energy-distance (aliases: energy, ed), mmd, sliced-wasserstein \
     (aliases: swd, sw), modes, high-quality (on 8gaussians / 25gaussians samples), frechet-distance (alias: fd; \
     digits and MNIST)";

/// The metric called `name` (a canonical name from [`METRIC_NAMES`] or an alias: "energy", "ed",
/// "swd", "sw"; case and surrounding spaces are ignored), with its default settings.
pub fn metric_by_name(name: &str) -> Result<Box<dyn SampleMetric>> {
    match name.trim().to_ascii_lowercase().as_str() {
        "energy-distance" | "energy" | "ed" => Ok(Box::new(EnergyDistance::default())),
        "mmd" => Ok(Box::new(Mmd::default())),
        "sliced-wasserstein" | "swd" | "sw" => Ok(Box::new(SlicedWasserstein::default())),
        "modes" => Ok(Box::new(super::mode_coverage::ModesCaptured)),
        "high-quality" => Ok(Box::new(super::mode_coverage::HighQualityShare)),
        "frechet-distance" | "fd" => Ok(Box::new(super::frechet::FrechetDistance)),
        _ => Err(Error::Config(format!(
            "unknown sample metric '{name}'; valid names: {NAME_HELP}"
        ))),
    }
}

/// Compute each named metric (default settings) on the same `samples` [n, dim] and `data`
/// [m, dim], returning `(canonical name, value)` in the order given.
///
/// All names are resolved before anything is computed, so an unknown name fails fast. Names that
/// resolve to the same metric (e.g. "ed" and "energy") are computed once. Each metric draws from
/// its own generator split off `rng`.
pub fn compute_all(
    names: &[String],
    samples: &[f32],
    data: &[f32],
    dim: usize,
    rng: &mut Rng,
) -> Result<Vec<(String, MetricValue)>> {
    let mut metrics: Vec<Box<dyn SampleMetric>> = Vec::with_capacity(names.len());
    for name in names {
        let metric = metric_by_name(name)?;
        if !metrics.iter().any(|m| m.name() == metric.name()) {
            metrics.push(metric);
        }
    }
    metrics
        .iter()
        .map(|metric| {
            let mut r = rng.split();
            let v = metric.compute(samples, data, dim, &mut r)?;
            Ok((metric.name().to_string(), v))
        })
        .collect()
}

// ----------------------------------------------------------------------------------------------
// Energy distance
// ----------------------------------------------------------------------------------------------

/// Energy distance (Székely & Rizzo 2013): `E(X, Y) = 2 E|X-Y| - E|X-X'| - E|Y-Y'|` with `|.|` the
/// Euclidean norm, X ~ samples and Y ~ data (independent, finite first moments). It is >= 0
/// and zero only when the distributions agree; its square root is a metric on such distributions.
/// The value returned is `E(X, Y)` itself (a squared-distance-like quantity, as `MMD^2`).
///
/// Estimator: the cross term is the mean over all `n m` pairs; the within-set terms are the
/// unbiased U-statistics `1/(n(n-1)) sum_{i != j} |x_i - x_j|`, so the whole estimate is
/// unbiased (and can be slightly negative when the distributions agree).
///
/// `stderr` is the first-order (Hoeffding 1948) standard error
/// `sqrt(Var g1(X) / n + Var g2(Y) / m)` with `g1(x) = 2 E|x-Y| - 2 E|x-X'|` and
/// `g2(y) = 2 E|X-y| - 2 E|y-Y'|`, estimated from the same pairwise sums. It is accurate when the
/// distributions differ; when they agree the U-statistic is degenerate, `g1` and `g2` are
/// constant and the reported error collapses towards 0 while the true spread is O(1/n).
///
/// Cost O(cap^2 dim) time, O(cap dim) memory, cap = `max_rows`.
#[derive(Clone, Debug)]
pub struct EnergyDistance {
    /// At most this many rows of each set are used; larger sets are subsampled without
    /// replacement with the rng (default 2000). Must be >= 2.
    pub max_rows: usize,
}

impl Default for EnergyDistance {
    fn default() -> Self {
        Self { max_rows: 2000 }
    }
}

impl SampleMetric for EnergyDistance {
    fn name(&self) -> &'static str {
        "energy-distance"
    }

    fn compute(
        &self,
        samples: &[f32],
        data: &[f32],
        dim: usize,
        rng: &mut Rng,
    ) -> Result<MetricValue> {
        check_cap(self.name(), self.max_rows)?;
        let (x, y) = prepare_pair(samples, data, dim, 2, self.max_rows, rng)?;
        let k = PairKernelSums::compute(&x, &y, dim, |d2| d2.sqrt());
        // ED = 2 A - B - C with A = cross mean, B, C = within-set U-statistics.
        Ok(k.combine(2.0, -1.0, -1.0))
    }
}

// ----------------------------------------------------------------------------------------------
// MMD
// ----------------------------------------------------------------------------------------------

/// Squared maximum mean discrepancy with the Gaussian RBF kernel
/// `k(x, y) = exp(-|x - y|^2 / (2 sigma^2))`, unbiased estimator (Gretton et al. 2012, eq. 3):
///
/// `MMD^2_u = 1/(n(n-1)) sum_{i != j} k(x_i, x_j) + 1/(m(m-1)) sum_{i != j} k(y_i, y_j)
///            - 2/(n m) sum_{i, j} k(x_i, y_j)`.
///
/// It is unbiased for `MMD^2`, so it can be slightly negative when the distributions agree. The
/// value returned is `MMD^2_u` itself (not its square root).
///
/// Bandwidth: `sigma` = [`Mmd::bandwidth`] if given, else the median heuristic used in the
/// experiments of Gretton et al. (2012): the median Euclidean distance between distinct points of the pooled set
/// (the rows used of both sets together, subsampled to [`Mmd::bandwidth_rows`] rows if larger).
///
/// `stderr` is the first-order (Hoeffding 1948) standard error, as for [`EnergyDistance`]
/// (`g1(x) = 2 E k(x, X') - 2 E k(x, Y)` and symmetrically); it is meaningful when the
/// distributions differ and collapses towards 0 when they agree (degenerate case).
///
/// Cost O(cap^2 dim), cap = `max_rows`.
#[derive(Clone, Debug)]
pub struct Mmd {
    /// At most this many rows of each set are used; larger sets are subsampled without
    /// replacement with the rng (default 2000). Must be >= 2.
    pub max_rows: usize,
    /// Kernel bandwidth `sigma` (> 0, in data units); `None` (default) for the median heuristic.
    pub bandwidth: Option<f64>,
    /// At most this many pooled rows enter the median heuristic (default 1000, i.e. about
    /// 500k distances); subsampled with the rng when the pooled set is larger. Must be >= 2.
    pub bandwidth_rows: usize,
}

impl Default for Mmd {
    fn default() -> Self {
        Self {
            max_rows: 2000,
            bandwidth: None,
            bandwidth_rows: 1000,
        }
    }
}

impl Mmd {
    /// MMD with a fixed bandwidth `sigma` and the default row cap.
    pub fn with_bandwidth(sigma: f64) -> Self {
        Self {
            bandwidth: Some(sigma),
            ..Self::default()
        }
    }
}

impl SampleMetric for Mmd {
    fn name(&self) -> &'static str {
        "mmd"
    }

    fn compute(
        &self,
        samples: &[f32],
        data: &[f32],
        dim: usize,
        rng: &mut Rng,
    ) -> Result<MetricValue> {
        check_cap(self.name(), self.max_rows)?;
        if let Some(s) = self.bandwidth {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::Config(format!(
                    "mmd: bandwidth must be finite and > 0, got {s}"
                )));
            }
        }
        if self.bandwidth_rows < 2 {
            return Err(Error::Config(format!(
                "mmd: bandwidth_rows must be >= 2, got {}",
                self.bandwidth_rows
            )));
        }
        let (x, y) = prepare_pair(samples, data, dim, 2, self.max_rows, rng)?;
        let sigma = match self.bandwidth {
            Some(s) => s,
            None => {
                let s = median_pooled_distance(&x, &y, dim, self.bandwidth_rows, rng);
                if !(s.is_finite() && s > 0.0) {
                    return Err(Error::Numerical(format!(
                        "mmd: median-heuristic bandwidth is {s} (the pooled points coincide); \
                         set a bandwidth"
                    )));
                }
                s
            }
        };
        let inv = 1.0 / (2.0 * sigma * sigma);
        let k = PairKernelSums::compute(&x, &y, dim, |d2| (-d2 * inv).exp());
        // MMD^2_u = B + C - 2 A.
        Ok(k.combine(-2.0, 1.0, 1.0))
    }
}

// ----------------------------------------------------------------------------------------------
// Sliced Wasserstein
// ----------------------------------------------------------------------------------------------

/// Sliced Wasserstein distance (Bonneel et al. 2015), returned as its **p-th power**:
///
/// `value = SW_p^p = (1/L) sum_{l=1..L} W_p^p(theta_l . X, theta_l . Y)`,
///
/// with `theta_l` drawn uniformly on the unit sphere S^{dim-1} (normalised Gaussian vectors from
/// the rng) and `W_p^p` the 1-D Wasserstein distance to the p-th power between the projected
/// empirical distributions, `int_0^1 |F^{-1}(t) - G^{-1}(t)|^p dt` with `F^{-1}`, `G^{-1}` the
/// empirical quantile functions (sorted projections). This integral is computed exactly by
/// merging the steps at `i/n` and `j/m`, so `n != m` is handled; for `n == m` it is
/// `(1/n) sum_i |x_(i) - y_(i)|^p`. `value.powf(1/p)` is `SW_p` in data units. The p-th power
/// is reported (like `MMD^2` and the energy distance, both squared-distance-like) because it is
/// a plain average over directions, whose standard error is direct:
///
/// `stderr` = standard deviation of the L per-direction values / sqrt(L), the Monte-Carlo error
/// over directions for these samples (it does not include the sampling error of the sets
/// themselves); `None` when L = 1.
///
/// Cost O(L (cap dim + cap log cap)), cap = `max_rows`.
#[derive(Clone, Debug)]
pub struct SlicedWasserstein {
    /// Number of random directions L (default 128). Must be >= 1.
    pub projections: usize,
    /// The order p >= 1 of the Wasserstein distance (default 2).
    pub p: f64,
    /// At most this many rows of each set are used; larger sets are subsampled without
    /// replacement with the rng (default 10000). Must be >= 1.
    pub max_rows: usize,
}

impl Default for SlicedWasserstein {
    fn default() -> Self {
        Self {
            projections: 128,
            p: 2.0,
            max_rows: 10_000,
        }
    }
}

impl SampleMetric for SlicedWasserstein {
    fn name(&self) -> &'static str {
        "sliced-wasserstein"
    }

    fn compute(
        &self,
        samples: &[f32],
        data: &[f32],
        dim: usize,
        rng: &mut Rng,
    ) -> Result<MetricValue> {
        if self.projections == 0 {
            return Err(Error::Config(
                "sliced-wasserstein: projections must be >= 1".into(),
            ));
        }
        if !(self.p.is_finite() && self.p >= 1.0) {
            return Err(Error::Config(format!(
                "sliced-wasserstein: p must be finite and >= 1, got {}",
                self.p
            )));
        }
        if self.max_rows == 0 {
            return Err(Error::Config(
                "sliced-wasserstein: max_rows must be >= 1".into(),
            ));
        }
        let (x, y) = prepare_pair(samples, data, dim, 1, self.max_rows, rng)?;
        let (n, m) = (x.len() / dim, y.len() / dim);
        // directions: [L, dim], each row a unit vector.
        let mut dirs = Vec::with_capacity(self.projections * dim);
        for _ in 0..self.projections {
            dirs.extend(random_unit_vector(dim, rng));
        }
        let p = self.p;
        let per_dir: Vec<f64> = dirs
            .par_chunks(dim)
            .map(|theta| {
                let mut a = project(&x, theta);
                let mut b = project(&y, theta);
                a.sort_unstable_by(f64::total_cmp);
                b.sort_unstable_by(f64::total_cmp);
                wasserstein_1d_pow(&a, &b, p)
            })
            .collect();
        let (mean, se) = mean_and_stderr(&per_dir);
        Ok(MetricValue {
            value: mean,
            stderr: se,
            n_samples: n,
            n_data: m,
        })
    }
}

/// A direction drawn uniformly on S^{dim-1}: a standard normal vector, normalised (redrawn in the
/// probability-zero event that its norm is not positive).
fn random_unit_vector(dim: usize, rng: &mut Rng) -> Vec<f64> {
    loop {
        let v: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
        let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm > 0.0 && norm.is_finite() {
            return v.into_iter().map(|a| a / norm).collect();
        }
    }
}

/// Projections `<row, theta>` of the rows of `x` [n, dim]: [n].
fn project(x: &[f64], theta: &[f64]) -> Vec<f64> {
    x.chunks_exact(theta.len())
        .map(|r| r.iter().zip(theta).map(|(a, t)| a * t).sum())
        .collect()
}

/// `W_p^p` between the empirical distributions of sorted `a` [n] and sorted `b` [m]:
/// `int_0^1 |F^{-1}(t) - G^{-1}(t)|^p dt`. Both quantile functions are step functions with steps at
/// multiples of 1/n and 1/m; time is counted in units of 1/(n m) so the merge is exact.
fn wasserstein_1d_pow(a: &[f64], b: &[f64], p: f64) -> f64 {
    let (n, m) = (a.len(), b.len());
    let cost = |d: f64| {
        let d = d.abs();
        if p == 2.0 {
            d * d
        } else if p == 1.0 {
            d
        } else {
            d.powf(p)
        }
    };
    let (mut i, mut j) = (0usize, 0usize);
    // t: the current position in units of 1/(n m); a[i] covers (i m, (i+1) m], b[j] (j n, (j+1) n].
    let mut t = 0usize;
    let mut acc = 0.0;
    while i < n && j < m {
        let end_a = (i + 1) * m;
        let end_b = (j + 1) * n;
        let end = end_a.min(end_b);
        acc += (end - t) as f64 * cost(a[i] - b[j]);
        t = end;
        if end_a == end {
            i += 1;
        }
        if end_b == end {
            j += 1;
        }
    }
    acc / (n as f64 * m as f64)
}

// ----------------------------------------------------------------------------------------------
// Shared pieces
// ----------------------------------------------------------------------------------------------

/// Per-row sums of a kernel `k` over the three pair sets of `x` [n, dim] and `y` [m, dim].
struct PairKernelSums {
    /// [n]: `sum_{j != i} k(x_i, x_j)`.
    xx: Vec<f64>,
    /// [m]: `sum_{j != i} k(y_i, y_j)`.
    yy: Vec<f64>,
    /// [n]: `sum_j k(x_i, y_j)`.
    xy_rows: Vec<f64>,
    /// [m]: `sum_i k(x_i, y_j)`.
    xy_cols: Vec<f64>,
}

/// Rows per rayon task in the pairwise sums (fixed, so the summation order is too).
const BLOCK: usize = 32;

impl PairKernelSums {
    /// `k` maps a squared Euclidean distance to the kernel value.
    fn compute(x: &[f64], y: &[f64], dim: usize, k: impl Fn(f64) -> f64 + Sync) -> Self {
        let (xx, yy) = (within_sums(x, dim, &k), within_sums(y, dim, &k));
        let (xy_rows, xy_cols) = cross_sums(x, y, dim, &k);
        Self {
            xx,
            yy,
            xy_rows,
            xy_cols,
        }
    }

    /// The estimate `wc A + wx B + wy C` with `A` the cross mean over all `n m` pairs and `B`, `C`
    /// the within-set U-statistics (means over ordered pairs `i != j`), with its first-order
    /// (Hoeffding) standard error `sqrt(Var g1 / n + Var g2 / m)`,
    /// `g1(x_i) = wc mean_j k(x_i, y_j) + 2 wx mean_{j != i} k(x_i, x_j)` and symmetrically `g2`.
    fn combine(&self, wc: f64, wx: f64, wy: f64) -> MetricValue {
        let (n, m) = (self.xx.len(), self.yy.len());
        let (nf, mf) = (n as f64, m as f64);
        let a = self.xy_rows.iter().sum::<f64>() / (nf * mf);
        let b = self.xx.iter().sum::<f64>() / (nf * (nf - 1.0));
        let c = self.yy.iter().sum::<f64>() / (mf * (mf - 1.0));
        let value = wc * a + wx * b + wy * c;
        let g1: Vec<f64> = self
            .xy_rows
            .iter()
            .zip(&self.xx)
            .map(|(&s, &w)| wc * s / mf + 2.0 * wx * w / (nf - 1.0))
            .collect();
        let g2: Vec<f64> = self
            .xy_cols
            .iter()
            .zip(&self.yy)
            .map(|(&s, &w)| wc * s / nf + 2.0 * wy * w / (mf - 1.0))
            .collect();
        let var = sample_variance(&g1) / nf + sample_variance(&g2) / mf;
        MetricValue {
            value,
            stderr: Some(var.max(0.0).sqrt()),
            n_samples: n,
            n_data: m,
        }
    }
}

fn sq_dist(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(u, v)| (u - v) * (u - v)).sum()
}

/// [n]: `sum_{j != i} k(|x_i - x_j|^2)` over rows of `x` [n, dim], each unordered pair evaluated
/// once. Blocks of rows give partial [n] vectors that are added in block order.
fn within_sums(x: &[f64], dim: usize, k: &(impl Fn(f64) -> f64 + Sync)) -> Vec<f64> {
    let n = x.len() / dim;
    let starts: Vec<usize> = (0..n).step_by(BLOCK).collect();
    let partials: Vec<Vec<f64>> = starts
        .par_iter()
        .map(|&s| {
            let mut acc = vec![0.0; n];
            for i in s..(s + BLOCK).min(n) {
                let xi = &x[i * dim..(i + 1) * dim];
                let mut row = 0.0;
                for j in (i + 1)..n {
                    let v = k(sq_dist(xi, &x[j * dim..(j + 1) * dim]));
                    row += v;
                    acc[j] += v;
                }
                acc[i] += row;
            }
            acc
        })
        .collect();
    let mut out = vec![0.0; n];
    for p in &partials {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}

/// Row sums [n] and column sums [m] of `k(|x_i - y_j|^2)` for `x` [n, dim], `y` [m, dim].
fn cross_sums(
    x: &[f64],
    y: &[f64],
    dim: usize,
    k: &(impl Fn(f64) -> f64 + Sync),
) -> (Vec<f64>, Vec<f64>) {
    let (n, m) = (x.len() / dim, y.len() / dim);
    let blocks: Vec<(Vec<f64>, Vec<f64>)> = x
        .par_chunks(BLOCK * dim)
        .map(|xb| {
            let mut cols = vec![0.0; m];
            let rows: Vec<f64> = xb
                .chunks_exact(dim)
                .map(|xi| {
                    let mut row = 0.0;
                    for (j, yj) in y.chunks_exact(dim).enumerate() {
                        let v = k(sq_dist(xi, yj));
                        row += v;
                        cols[j] += v;
                    }
                    row
                })
                .collect();
            (rows, cols)
        })
        .collect();
    let mut rows = Vec::with_capacity(n);
    let mut cols = vec![0.0; m];
    for (r, c) in blocks {
        rows.extend(r);
        for (o, v) in cols.iter_mut().zip(&c) {
            *o += v;
        }
    }
    (rows, cols)
}

/// Median Euclidean distance over distinct pairs of the pooled rows of `x` and `y` (both
/// [_, dim]); the pooled set is subsampled to `max_rows` rows with the rng if larger. The median
/// of an even count is the mean of the two middle values.
fn median_pooled_distance(x: &[f64], y: &[f64], dim: usize, max_rows: usize, rng: &mut Rng) -> f64 {
    let pooled: Vec<&[f64]> = x.chunks_exact(dim).chain(y.chunks_exact(dim)).collect();
    let rows: Vec<&[f64]> = match choose_rows(pooled.len(), max_rows, rng) {
        Some(idx) => idx.iter().map(|&i| pooled[i]).collect(),
        None => pooled,
    };
    let r = rows.len();
    let mut d2: Vec<f64> = (0..r)
        .into_par_iter()
        .flat_map_iter(|i| {
            let rows = &rows;
            ((i + 1)..r).map(move |j| sq_dist(rows[i], rows[j]))
        })
        .collect();
    let len = d2.len();
    if len == 0 {
        return 0.0;
    }
    let mid = len / 2;
    let (lower, &mut upper, _) = d2.select_nth_unstable_by(mid, f64::total_cmp);
    // squared distances are monotone in distance, so take the median there and then the root.
    if len % 2 == 1 {
        upper.sqrt()
    } else {
        let below = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        0.5 * (below.sqrt() + upper.sqrt())
    }
}

/// `k` of `0..n` drawn without replacement (partial Fisher-Yates), in increasing order; `None`
/// when `k >= n` (use every row, and draw nothing from the rng).
fn choose_rows(n: usize, k: usize, rng: &mut Rng) -> Option<Vec<usize>> {
    if k >= n {
        return None;
    }
    let mut idx: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + rng.below(n - i);
        idx.swap(i, j);
    }
    idx.truncate(k);
    idx.sort_unstable();
    Some(idx)
}

fn check_cap(metric: &str, max_rows: usize) -> Result<()> {
    if max_rows < 2 {
        return Err(Error::Config(format!(
            "{metric}: max_rows must be >= 2, got {max_rows}"
        )));
    }
    Ok(())
}

/// Validate `set` as a [rows, dim] matrix with at least `min_rows` rows of finite values;
/// returns the row count.
pub(crate) fn check_set(what: &str, set: &[f32], dim: usize, min_rows: usize) -> Result<usize> {
    if dim == 0 {
        return Err(Error::Shape(
            "sample metric: dim must be >= 1, got 0".into(),
        ));
    }
    if set.is_empty() {
        return Err(Error::data(what, "the set is empty (0 rows)"));
    }
    if !set.len().is_multiple_of(dim) {
        return Err(Error::Shape(format!(
            "{what}: {} values is not a multiple of dim {dim}",
            set.len()
        )));
    }
    let rows = set.len() / dim;
    if rows < min_rows {
        return Err(Error::data(
            what,
            format!("{rows} row(s), this metric needs at least {min_rows}"),
        ));
    }
    if let Some(pos) = set.iter().position(|v| !v.is_finite()) {
        return Err(Error::data(
            what,
            format!(
                "non-finite value {} at row {}, column {}",
                set[pos],
                pos / dim,
                pos % dim
            ),
        ));
    }
    Ok(rows)
}

/// Validate both sets and return the rows used of each (subsampled to `cap` with the rng), as
/// f64: ([n', dim], [m', dim]).
fn prepare_pair(
    samples: &[f32],
    data: &[f32],
    dim: usize,
    min_rows: usize,
    cap: usize,
    rng: &mut Rng,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let n = check_set("samples", samples, dim, min_rows)?;
    let m = check_set("held-out data", data, dim, min_rows)?;
    let x = take_rows(samples, dim, choose_rows(n, cap, rng));
    let y = take_rows(data, dim, choose_rows(m, cap, rng));
    Ok((x, y))
}

fn take_rows(set: &[f32], dim: usize, rows: Option<Vec<usize>>) -> Vec<f64> {
    match rows {
        None => set.iter().map(|&v| v as f64).collect(),
        Some(idx) => idx
            .iter()
            .flat_map(|&i| set[i * dim..(i + 1) * dim].iter().map(|&v| v as f64))
            .collect(),
    }
}

/// Unbiased sample variance (n - 1 denominator); 0 for fewer than two values.
fn sample_variance(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / (n - 1.0)
}

/// Mean and standard error of the mean (`None` for a single value).
fn mean_and_stderr(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let se = (v.len() >= 2).then(|| (sample_variance(v) / n).sqrt());
    (mean, se)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wasserstein_1d_unequal_sizes_by_hand() {
        // F^{-1}: 0 on (0, 1/2], 1 on (1/2, 1]; G^{-1}: 0, 1, 2 on thirds. |diff| = 0, 1, 0, 1 on
        // (0,1/3], (1/3,1/2], (1/2,2/3], (2/3,1] -> 1/6 + 1/3 = 1/2 for any p.
        let w = wasserstein_1d_pow(&[0.0, 1.0], &[0.0, 1.0, 2.0], 2.0);
        assert!((w - 0.5).abs() < 1e-12, "{w}");
        let w3 = wasserstein_1d_pow(&[0.0, 1.0], &[0.0, 1.0, 2.0], 3.0);
        assert!((w3 - 0.5).abs() < 1e-12, "{w3}");
        // equal sizes: mean of |sorted diffs|^p
        let w = wasserstein_1d_pow(&[0.0, 1.0, 5.0], &[1.0, 2.0, 3.0], 2.0);
        assert!((w - (1.0 + 1.0 + 4.0) / 3.0).abs() < 1e-12, "{w}");
    }

    #[test]
    fn choose_rows_is_a_subset_without_repeats() {
        let mut rng = Rng::new(3);
        let idx = choose_rows(50, 20, &mut rng).unwrap();
        assert_eq!(idx.len(), 20);
        assert!(idx.windows(2).all(|w| w[0] < w[1]));
        assert!(idx.iter().all(|&i| i < 50));
        assert!(choose_rows(10, 10, &mut rng).is_none());
    }

    #[test]
    fn within_and_cross_sums_match_a_direct_loop() {
        let mut rng = Rng::new(5);
        let dim = 3;
        let x: Vec<f64> = (0..70 * dim).map(|_| rng.normal()).collect();
        let y: Vec<f64> = (0..45 * dim).map(|_| rng.normal()).collect();
        let k = |d2: f64| d2.sqrt();
        let s = PairKernelSums::compute(&x, &y, dim, k);
        fn row(v: &[f64], i: usize) -> &[f64] {
            &v[i * 3..(i + 1) * 3]
        }
        for i in 0..70 {
            let want: f64 = (0..70)
                .filter(|&j| j != i)
                .map(|j| k(sq_dist(row(&x, i), row(&x, j))))
                .sum();
            assert!((s.xx[i] - want).abs() < 1e-9);
            let want: f64 = (0..45).map(|j| k(sq_dist(row(&x, i), row(&y, j)))).sum();
            assert!((s.xy_rows[i] - want).abs() < 1e-9);
        }
        for j in 0..45 {
            let want: f64 = (0..70).map(|i| k(sq_dist(row(&x, i), row(&y, j)))).sum();
            assert!((s.xy_cols[j] - want).abs() < 1e-9);
        }
    }

    #[test]
    fn median_of_pooled_distances() {
        // 1-D points 0, 1, 3 | 6: distances 1, 3, 6, 2, 5, 3 -> sorted 1 2 3 3 5 6 -> median 3.
        let mut rng = Rng::new(0);
        let med = median_pooled_distance(&[0.0, 1.0, 3.0], &[6.0], 1, 100, &mut rng);
        assert!((med - 3.0).abs() < 1e-12, "{med}");
        // 0, 1 | 3: distances 1, 3, 2 -> median 2
        let med = median_pooled_distance(&[0.0, 1.0], &[3.0], 1, 100, &mut rng);
        assert!((med - 2.0).abs() < 1e-12, "{med}");
    }
}
