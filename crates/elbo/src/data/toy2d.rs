//! The eight 2-D toy distributions of FFJORD (Grathwohl et al. 2019, `lib/toy_data.py`).
//!
//! Each generator follows FFJORD's definition; those that call scikit-learn (`swissroll`,
//! `circles`, `moons`) reimplement `make_swiss_roll`, `make_circles` and `make_moons` with the
//! same construction (evenly spaced angles, shuffled, plus Gaussian noise). Samples match the
//! reference in distribution, not bit for bit. Two small departures keep batches exactly `n`
//! rows and i.i.d. where FFJORD is not: `pinwheel` spreads `n` points over its 5 arms as evenly
//! as possible (FFJORD returns `5 * (n / 5)` points), and `2spirals` draws the two arms from
//! independent base points (FFJORD mirrors the same points) and shuffles the rows.

use std::f64::consts::PI;
use std::sync::OnceLock;

use candle_core::{Device, Tensor};

use super::registry::DEFAULT_VAL_SIZE;
use super::{DataKind, DataSource, Layout};
use crate::{Error, Result, Rng};

/// FFJORD's `1.414` (not `sqrt(2)`): the 8gaussians scale divisor.
const SQRT2_FFJORD: f64 = 1.414;
/// Seed of the fixed generator that draws every toy test set.
const TEST_SEED: u64 = 0x07E5_75E7;
/// Seed of the fixed generator that draws every toy validation set (not the test seed).
const VAL_SEED: u64 = 0x7A11_D5E7;

/// One of the eight FFJORD 2-D toy distributions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Toy2d {
    /// sklearn `make_swiss_roll(noise=1.0)`, columns (x, z), divided by 5.
    SwissRoll,
    /// sklearn `make_circles(factor=0.5, noise=0.08)` times 3: radii 3 and 1.5.
    Circles,
    /// Four evenly filled rings of radii 3, 2.25, 1.5, 0.75 plus N(0, 0.08^2) noise.
    Rings,
    /// sklearn `make_moons(noise=0.1)` times 2 plus (-1, -0.2).
    Moons,
    /// Eight Gaussians (std 0.5/1.414) on a circle of radius 4/1.414.
    EightGaussians,
    /// Five curved arms (radial std 0.3, tangential std 0.1, rate 0.25), times 2.
    Pinwheel,
    /// Two interleaved spirals of 1.5 turns, divided by 3, plus N(0, 0.1^2) noise.
    TwoSpirals,
    /// Uniform on 8 squares of side 2 forming a checkerboard on [-4, 4]^2.
    Checkerboard,
    /// 25 Gaussians (std 0.05) on the grid {-4, -2, 0, 2, 4}^2, equally weighted: the
    /// mode-collapse benchmark of VEEGAN (Srivastava et al. 2017, sec. 5.1) and PacGAN (Lin et
    /// al. 2018, sec. 5). Not one of FFJORD's.
    Grid25,
}

impl Toy2d {
    /// FFJORD's eight in the order it lists them, then the 25-Gaussian grid (this order also
    /// picks each held-out stream).
    pub const ALL: [Toy2d; 9] = [
        Toy2d::SwissRoll,
        Toy2d::Circles,
        Toy2d::Rings,
        Toy2d::Moons,
        Toy2d::EightGaussians,
        Toy2d::Pinwheel,
        Toy2d::TwoSpirals,
        Toy2d::Checkerboard,
        Toy2d::Grid25,
    ];

    /// The toy set with this (FFJORD) name, e.g. `"8gaussians"`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.name() == name)
    }

    /// The FFJORD name: swissroll, circles, rings, moons, 8gaussians, pinwheel, 2spirals,
    /// checkerboard.
    pub fn name(&self) -> &'static str {
        match self {
            Toy2d::SwissRoll => "swissroll",
            Toy2d::Circles => "circles",
            Toy2d::Rings => "rings",
            Toy2d::Moons => "moons",
            Toy2d::EightGaussians => "8gaussians",
            Toy2d::Pinwheel => "pinwheel",
            Toy2d::TwoSpirals => "2spirals",
            Toy2d::Checkerboard => "checkerboard",
            Toy2d::Grid25 => "25gaussians",
        }
    }

    /// Position in [`Toy2d::ALL`].
    fn index(&self) -> usize {
        Self::ALL.iter().position(|t| t == self).unwrap_or(0)
    }

    /// `n` samples, row-major `[n, 2]`, drawn with `rng`.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<f32> {
        let pts = match self {
            Toy2d::SwissRoll => swissroll(n, rng),
            Toy2d::Circles => circles(n, rng),
            Toy2d::Rings => rings(n, rng),
            Toy2d::Moons => moons(n, rng),
            Toy2d::EightGaussians => eight_gaussians(n, rng),
            Toy2d::Pinwheel => pinwheel(n, rng),
            Toy2d::TwoSpirals => two_spirals(n, rng),
            Toy2d::Checkerboard => checkerboard(n, rng),
            Toy2d::Grid25 => grid25(n, rng),
        };
        pts.iter()
            .flat_map(|p| [p[0] as f32, p[1] as f32])
            .collect()
    }

    /// The differential entropy in nats where it is known in closed form or by quadrature:
    /// 8gaussians (about 2.8319), checkerboard (ln 32) and the 25-Gaussian grid (`ln 25 +
    /// ln(2 pi e 0.05^2)`, about 0.0653: its components, 40 standard deviations apart, overlap by
    /// less than `e^-200`); `None` for the others.
    pub fn entropy(&self) -> Option<f64> {
        match self {
            Toy2d::EightGaussians => Some(eight_gaussians_entropy()),
            Toy2d::Checkerboard => Some(32f64.ln()),
            Toy2d::Grid25 => {
                Some(25f64.ln() + (2.0 * PI * std::f64::consts::E * GRID25_STD * GRID25_STD).ln())
            }
            _ => None,
        }
    }

    /// The exact log-density at `(x, y)` where the density has a closed form (8gaussians,
    /// checkerboard, the 25-Gaussian grid; `-inf` off the support); `None` for the others.
    pub fn log_density(&self, x: f64, y: f64) -> Option<f64> {
        match self {
            Toy2d::Grid25 => Some(mixture_log_density(&grid25_centres(), GRID25_STD, x, y)),
            Toy2d::EightGaussians => Some(eight_gaussians_log_density(x, y)),
            Toy2d::Checkerboard => Some(if in_checkerboard(x, y) {
                -(32f64.ln())
            } else {
                f64::NEG_INFINITY
            }),
            _ => None,
        }
    }
}

/// numpy's `linspace(start, stop, num, endpoint)`.
fn linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let step = if div == 0 {
        0.0
    } else {
        (stop - start) / div as f64
    };
    (0..num).map(|i| start + step * i as f64).collect()
}

/// Shuffle the points, then add N(0, std^2) noise to every coordinate (sklearn's order).
fn shuffle_and_noise(pts: Vec<[f64; 2]>, std: f64, rng: &mut Rng) -> Vec<[f64; 2]> {
    let perm = rng.permutation(pts.len());
    perm.into_iter()
        .map(|i| {
            let p = pts[i];
            [p[0] + std * rng.normal(), p[1] + std * rng.normal()]
        })
        .collect()
}

fn swissroll(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    (0..n)
        .map(|_| {
            let t = 1.5 * PI * (1.0 + 2.0 * rng.uniform());
            // sklearn's y = 21 * uniform is dropped with column 1, so it is not drawn.
            let x = t * t.cos() + rng.normal();
            let z = t * t.sin() + rng.normal();
            [x / 5.0, z / 5.0]
        })
        .collect()
}

fn circles(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    let n_out = n / 2;
    let n_in = n - n_out;
    let mut pts = Vec::with_capacity(n);
    for (count, radius) in [(n_out, 1.0), (n_in, 0.5)] {
        for a in linspace(0.0, 2.0 * PI, count, false) {
            pts.push([radius * a.cos(), radius * a.sin()]);
        }
    }
    shuffle_and_noise(pts, 0.08, rng)
        .into_iter()
        .map(|p| [3.0 * p[0], 3.0 * p[1]])
        .collect()
}

fn rings(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    let q = n / 4;
    let mut pts = Vec::with_capacity(n);
    for (count, radius) in [(q, 1.0), (q, 0.75), (q, 0.5), (n - 3 * q, 0.25)] {
        for a in linspace(0.0, 2.0 * PI, count, false) {
            pts.push([3.0 * radius * a.cos(), 3.0 * radius * a.sin()]);
        }
    }
    shuffle_and_noise(pts, 0.08, rng)
}

fn moons(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    let n_out = n / 2;
    let n_in = n - n_out;
    let mut pts = Vec::with_capacity(n);
    for a in linspace(0.0, PI, n_out, true) {
        pts.push([a.cos(), a.sin()]);
    }
    for a in linspace(0.0, PI, n_in, true) {
        pts.push([1.0 - a.cos(), 1.0 - a.sin() - 0.5]);
    }
    shuffle_and_noise(pts, 0.1, rng)
        .into_iter()
        .map(|p| [2.0 * p[0] - 1.0, 2.0 * p[1] - 0.2])
        .collect()
}

/// The 8gaussians centres before the `/ 1.414` scaling.
fn eight_centres() -> [[f64; 2]; 8] {
    let d = 1.0 / 2f64.sqrt();
    let unit = [
        [1.0, 0.0],
        [-1.0, 0.0],
        [0.0, 1.0],
        [0.0, -1.0],
        [d, d],
        [d, -d],
        [-d, d],
        [-d, -d],
    ];
    unit.map(|c| [4.0 * c[0], 4.0 * c[1]])
}

fn eight_gaussians(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    let centres = eight_centres();
    (0..n)
        .map(|_| {
            let px = 0.5 * rng.normal();
            let py = 0.5 * rng.normal();
            let c = centres[rng.below(8)];
            [(px + c[0]) / SQRT2_FFJORD, (py + c[1]) / SQRT2_FFJORD]
        })
        .collect()
}

/// The centres and common standard deviation of the equally weighted isotropic Gaussian mixtures
/// among the toys (8gaussians after its scaling, the 25-Gaussian grid), for mode-coverage
/// metrics; `None` for the others.
pub fn mixture_modes(toy: Toy2d) -> Option<(Vec<[f64; 2]>, f64)> {
    match toy {
        Toy2d::EightGaussians => Some((
            eight_centres()
                .iter()
                .map(|c| [c[0] / SQRT2_FFJORD, c[1] / SQRT2_FFJORD])
                .collect(),
            0.5 / SQRT2_FFJORD,
        )),
        Toy2d::Grid25 => Some((grid25_centres(), GRID25_STD)),
        _ => None,
    }
}

/// Standard deviation of each component of the 25-Gaussian grid.
const GRID25_STD: f64 = 0.05;

/// The grid {-4, -2, 0, 2, 4}^2, row by row.
fn grid25_centres() -> Vec<[f64; 2]> {
    (0..25)
        .map(|k| [(k / 5) as f64 * 2.0 - 4.0, (k % 5) as f64 * 2.0 - 4.0])
        .collect()
}

fn grid25(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    let centres = grid25_centres();
    (0..n)
        .map(|_| {
            let c = centres[rng.below(25)];
            let (px, py) = (rng.normal(), rng.normal());
            [c[0] + GRID25_STD * px, c[1] + GRID25_STD * py]
        })
        .collect()
}

/// log of the equally weighted mixture of N(c, std^2 I) over `centres`, at `(x, y)`.
fn mixture_log_density(centres: &[[f64; 2]], std: f64, x: f64, y: f64) -> f64 {
    let logs: Vec<f64> = centres
        .iter()
        .map(|c| -((x - c[0]).powi(2) + (y - c[1]).powi(2)) / (2.0 * std * std))
        .collect();
    let m = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logs.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
    lse - (centres.len() as f64 * 2.0 * PI * std * std).ln()
}

/// Exact log-density of the 8gaussians mixture (after the `/ 1.414` scaling).
fn eight_gaussians_log_density(x: f64, y: f64) -> f64 {
    let s = 0.5 / SQRT2_FFJORD;
    let logs: Vec<f64> = eight_centres()
        .iter()
        .map(|c| {
            let dx = x - c[0] / SQRT2_FFJORD;
            let dy = y - c[1] / SQRT2_FFJORD;
            -(dx * dx + dy * dy) / (2.0 * s * s)
        })
        .collect();
    let m = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let lse = m + logs.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
    lse - (8.0 * 2.0 * PI * s * s).ln()
}

/// The differential entropy of the 8gaussians mixture by composite Simpson quadrature in polar
/// coordinates over one of the 16 congruent wedges (angle pi/8) of its dihedral symmetry.
fn eight_gaussians_entropy() -> f64 {
    static CACHE: OnceLock<f64> = OnceLock::new();
    *CACHE.get_or_init(|| {
        let s = 0.5 / SQRT2_FFJORD;
        let r_max = 4.0 / SQRT2_FFJORD + 14.0 * s;
        let (nr, nt) = (1200usize, 240usize); // both even, as Simpson's rule needs
        let (hr, ht) = (r_max / nr as f64, (PI / 8.0) / nt as f64);
        let w = |i: usize, n: usize| match i {
            0 => 1.0,
            i if i == n => 1.0,
            i if i % 2 == 1 => 4.0,
            _ => 2.0,
        };
        let mut total = 0.0;
        for i in 0..=nr {
            let r = hr * i as f64;
            let mut row = 0.0;
            for j in 0..=nt {
                let t = ht * j as f64;
                let lp = eight_gaussians_log_density(r * t.cos(), r * t.sin());
                row += w(j, nt) * lp.exp() * lp;
            }
            total += w(i, nr) * row * r;
        }
        -16.0 * total * hr * ht / 9.0
    })
}

fn pinwheel(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    let (radial_std, tangential_std, classes, rate) = (0.3, 0.1, 5usize, 0.25);
    let rads = linspace(0.0, 2.0 * PI, classes, false);
    let pts: Vec<[f64; 2]> = (0..n)
        .map(|i| {
            let label = i * classes / n.max(1);
            let f0 = rng.normal() * radial_std + 1.0;
            let f1 = rng.normal() * tangential_std;
            let a = rads[label] + rate * f0.exp();
            let (c, s) = (a.cos(), a.sin());
            // einsum("ti,tij->tj") with rotation [[c, -s], [s, c]].
            [2.0 * (f0 * c + f1 * s), 2.0 * (-f0 * s + f1 * c)]
        })
        .collect();
    let perm = rng.permutation(n);
    perm.into_iter().map(|i| pts[i]).collect()
}

fn two_spirals(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    let half = n / 2;
    let pts: Vec<[f64; 2]> = (0..n)
        .map(|i| {
            let t = rng.uniform().sqrt() * 540.0 * (2.0 * PI) / 360.0;
            let dx = -t.cos() * t + rng.uniform() * 0.5;
            let dy = t.sin() * t + rng.uniform() * 0.5;
            let sign = if i < half { 1.0 } else { -1.0 };
            [
                sign * dx / 3.0 + 0.1 * rng.normal(),
                sign * dy / 3.0 + 0.1 * rng.normal(),
            ]
        })
        .collect();
    let perm = rng.permutation(n);
    perm.into_iter().map(|i| pts[i]).collect()
}

fn checkerboard(n: usize, rng: &mut Rng) -> Vec<[f64; 2]> {
    (0..n)
        .map(|_| {
            let x1 = rng.uniform() * 4.0 - 2.0;
            let x2_ = rng.uniform() - (rng.below(2) as f64) * 2.0;
            let x2 = x2_ + x1.floor().rem_euclid(2.0);
            [2.0 * x1, 2.0 * x2]
        })
        .collect()
}

/// Whether `(x, y)` lies in one of the 8 checkerboard squares.
fn in_checkerboard(x: f64, y: f64) -> bool {
    let (x1, x2) = (x / 2.0, y / 2.0);
    if !(-2.0..2.0).contains(&x1) {
        return false;
    }
    let v = x2 - x1.floor().rem_euclid(2.0);
    (0.0..1.0).contains(&v) || (-2.0..-1.0).contains(&v)
}

/// A toy 2-D data set: fresh training samples from the run's generator, and fixed validation
/// and test sets, each drawn once from its own generator stream that does not depend on the run
/// seed.
#[derive(Clone, Debug)]
pub struct Toy2dSource {
    toy: Toy2d,
    val: Vec<f32>,
    test: Vec<f32>,
}

impl Toy2dSource {
    /// [`Toy2dSource::with_sizes`] with the default validation size (5000).
    pub fn new(toy: Toy2d, test_size: usize) -> Result<Self> {
        Self::with_sizes(toy, test_size, DEFAULT_VAL_SIZE)
    }

    /// A source for `toy` whose test set has `test_size` points, drawn once from
    /// `Rng::new(0x07E5_75E7).fork(k)`, and whose validation set has `val_size` points, drawn
    /// once from `Rng::new(0x7A11_D5E7).fork(k)` (`k`: index of `toy` in [`Toy2d::ALL`]).
    pub fn with_sizes(toy: Toy2d, test_size: usize, val_size: usize) -> Result<Self> {
        if test_size == 0 {
            return Err(Error::Config("data.test_size must be at least 1".into()));
        }
        if val_size == 0 {
            return Err(Error::Config("data.val_size must be at least 1".into()));
        }
        let mut rng = Rng::new(TEST_SEED).fork(toy.index() as u64);
        let test = toy.sample(test_size, &mut rng);
        let mut rng = Rng::new(VAL_SEED).fork(toy.index() as u64);
        let val = toy.sample(val_size, &mut rng);
        Ok(Self { toy, val, test })
    }

    /// Which toy distribution this is.
    pub fn toy(&self) -> Toy2d {
        self.toy
    }

    /// Number of validation points.
    pub fn n_val(&self) -> usize {
        self.val.len() / 2
    }

    /// Number of test points.
    pub fn n_test(&self) -> usize {
        self.test.len() / 2
    }
}

impl DataSource for Toy2dSource {
    fn name(&self) -> &str {
        self.toy.name()
    }

    fn dim(&self) -> usize {
        2
    }

    fn kind(&self) -> DataKind {
        DataKind::Continuous
    }

    fn layout(&self) -> Layout {
        Layout::Flat
    }

    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        if batch_size == 0 {
            return Err(Error::Config("batch size must be at least 1".into()));
        }
        let v = self.toy.sample(batch_size, rng);
        Ok(Tensor::from_vec(v, (batch_size, 2), device)?)
    }

    fn val_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.val.clone(),
            (self.n_val(), 2),
            device,
        )?)
    }

    fn test_set(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.test.clone(),
            (self.n_test(), 2),
            device,
        )?)
    }

    fn entropy(&self) -> Option<f64> {
        self.toy.entropy()
    }
}
