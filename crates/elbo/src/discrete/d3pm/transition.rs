//! Transition matrices of a discrete diffusion (Austin et al. 2021, sec. 3): the one-step
//! matrices `Q_t` with `[Q_t]_{ij} = q(x_t = j | x_{t-1} = i)`, their products
//! `Qbar_{t|s} = Q_{s+1} ... Q_t` (so `q(x_t | x_s) = x_s Qbar_{t|s}`) and `Qbar_t = Qbar_{t|0}`.
//!
//! States are `0..K`: the data tokens `0..V` and, for the absorbing matrix, MASK = V (K = V + 1).
//! The uniform and absorbing matrices (D3PM sec. 3.1, app. A.2) both have the form
//! `Q = a I + (1 - a) 1 m^T` for a distribution `m` (uniform: `1/V`; absorbing: `e_MASK`), a class
//! closed under products (`a` multiplies), so `Qbar_{t|s}` has `a = alpha_bar_t / alpha_bar_s` in
//! closed form and every row or column costs O(K). [`DenseTransition`] takes explicit per-step
//! matrices (a nearest-neighbour or any custom matrix) and multiplies them out.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A `K x K` row-stochastic matrix, row-major.
pub type Matrix = Vec<Vec<f64>>;

/// The interface of a discrete forward process with `T` steps.
pub trait Transition {
    /// Number of states K (data tokens first, then any extra state such as MASK).
    fn states(&self) -> usize;
    /// Number of data tokens V (x_0 takes values in `0..V`).
    fn data_states(&self) -> usize;
    /// Number of diffusion steps T.
    fn steps(&self) -> usize;
    /// `Qbar_{t|s} = Q_{s+1} ... Q_t` for `0 <= s <= t <= T` (the identity when `s = t`).
    fn between(&self, s: usize, t: usize) -> Matrix;
    /// The prior p(x_T) over the K states.
    fn prior(&self) -> Vec<f64>;
    /// The one-step matrix `Q_t` (t >= 1).
    fn step(&self, t: usize) -> Matrix {
        self.between(t - 1, t)
    }
    /// `Qbar_t = Q_1 ... Q_t`: the forward marginal is `q(x_t | x_0) = x_0 Qbar_t` (D3PM eq. 2).
    fn cumulative(&self, t: usize) -> Matrix {
        self.between(0, t)
    }
    /// `p Qbar_s` for a distribution `p` over the V data tokens: `sum_{x0} p(x0) q(x_s | x0)`,
    /// a distribution over the K states.
    fn propagate(&self, p: &[f64], s: usize) -> Vec<f64> {
        let q = self.cumulative(s);
        let mut out = vec![0.0; self.states()];
        for (pi, row) in p.iter().zip(&q) {
            out.iter_mut().zip(row).for_each(|(o, r)| *o += pi * r);
        }
        out
    }
    /// Column `j` of `Qbar_{t|s}`: `q(x_t = j | x_s = .)` over the K states.
    fn column(&self, s: usize, t: usize, j: usize) -> Vec<f64> {
        self.between(s, t).iter().map(|row| row[j]).collect()
    }
    /// `Some((a, m))` when `Qbar_s = a I + (1 - a) 1 m^T` (then `p Qbar_s = a p + (1 - a) m`
    /// costs O(K) per token); `None` for a general matrix.
    fn mixture(&self, s: usize) -> Option<(f64, Vec<f64>)> {
        let _ = s;
        None
    }
}

/// Which structured matrix (`[model] matrix`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MatrixKind {
    /// `Q_t = (1 - beta_t) I + beta_t 1 1^T / V` (D3PM sec. 3.1, uniform).
    Uniform,
    /// Each token moves to MASK (id V) with probability `beta_t` and MASK stays (D3PM sec. 3.1,
    /// absorbing state).
    #[default]
    Absorbing,
}

/// The noise schedule `alpha_bar_t = prod_{s <= t} (1 - beta_s)` (`[model] schedule`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// `beta_t = 1 / (T - t + 1)`, so `alpha_bar_t = 1 - t/T`: D3PM's mutual-information
    /// schedule for the absorbing matrix (D3PM sec. 4 / app. A.2), the same linear schedule as
    /// MDLM's log-linear `alpha_t = 1 - t`.
    #[default]
    MutualInformation,
    /// `alpha_bar_t = cos(pi/2 (t/T + s)/(1 + s)) / cos(pi/2 s/(1 + s))`, s = 0.008 (Nichol &
    /// Dhariwal 2021, eq. 17), as D3PM uses for the uniform matrix (D3PM app. A.2).
    Cosine,
}

impl Schedule {
    /// `alpha_bar_t` for `t` in `0..=T` (1 at t = 0, 0 at t = T up to rounding).
    pub fn alpha_bar(self, t: usize, steps: usize) -> f64 {
        let u = t.min(steps) as f64 / steps.max(1) as f64;
        match self {
            Self::MutualInformation => 1.0 - u,
            Self::Cosine => {
                let s = 0.008;
                let f = |u: f64| (std::f64::consts::FRAC_PI_2 * (u + s) / (1.0 + s)).cos();
                (f(u) / f(0.0)).clamp(0.0, 1.0)
            }
        }
    }
}

/// The uniform or absorbing matrix under a schedule, in closed form.
#[derive(Clone, Debug, PartialEq)]
pub struct StructuredTransition {
    /// Uniform or absorbing.
    pub kind: MatrixKind,
    /// The schedule of `alpha_bar_t`.
    pub schedule: Schedule,
    /// Data tokens V.
    pub vocab: usize,
    /// Steps T.
    pub steps: usize,
}

impl StructuredTransition {
    /// A checked transition: V >= 2, T >= 1.
    pub fn new(kind: MatrixKind, schedule: Schedule, vocab: usize, steps: usize) -> Result<Self> {
        if vocab < 2 || steps == 0 {
            return Err(Error::Config(format!(
                "a D3PM transition needs V >= 2 tokens and diffusion_steps >= 1, got V = {vocab}, \
                 T = {steps}"
            )));
        }
        Ok(Self {
            kind,
            schedule,
            vocab,
            steps,
        })
    }

    /// `alpha_bar_t`.
    pub fn alpha_bar(&self, t: usize) -> f64 {
        self.schedule.alpha_bar(t, self.steps)
    }

    /// The coefficient `a` of `Qbar_{t|s} = a I + (1 - a) 1 m^T`: `alpha_bar_t / alpha_bar_s`.
    fn coef(&self, s: usize, t: usize) -> f64 {
        let (num, den) = (self.alpha_bar(t), self.alpha_bar(s));
        if s == t {
            1.0
        } else if den <= 0.0 {
            0.0
        } else {
            (num / den).clamp(0.0, 1.0)
        }
    }

    /// The stationary distribution `m` over the K states.
    fn m(&self) -> Vec<f64> {
        match self.kind {
            MatrixKind::Uniform => vec![1.0 / self.vocab as f64; self.vocab],
            MatrixKind::Absorbing => {
                let mut m = vec![0.0; self.vocab + 1];
                m[self.vocab] = 1.0;
                m
            }
        }
    }
}

impl Transition for StructuredTransition {
    fn states(&self) -> usize {
        match self.kind {
            MatrixKind::Uniform => self.vocab,
            MatrixKind::Absorbing => self.vocab + 1,
        }
    }

    fn data_states(&self) -> usize {
        self.vocab
    }

    fn steps(&self) -> usize {
        self.steps
    }

    fn between(&self, s: usize, t: usize) -> Matrix {
        let a = self.coef(s, t);
        let m = self.m();
        (0..m.len())
            .map(|i| {
                let mut row: Vec<f64> = m.iter().map(|mj| (1.0 - a) * mj).collect();
                row[i] += a;
                row
            })
            .collect()
    }

    fn prior(&self) -> Vec<f64> {
        self.m()
    }

    fn propagate(&self, p: &[f64], s: usize) -> Vec<f64> {
        // p (a I + (1 - a) 1 m^T) = a p + (1 - a) m, as p sums to 1
        let a = self.coef(0, s);
        let mut out: Vec<f64> = self.m().iter().map(|mj| (1.0 - a) * mj).collect();
        out.iter_mut().zip(p).for_each(|(o, pi)| *o += a * pi);
        out
    }

    fn mixture(&self, s: usize) -> Option<(f64, Vec<f64>)> {
        Some((self.coef(0, s), self.m()))
    }

    fn column(&self, s: usize, t: usize, j: usize) -> Vec<f64> {
        let a = self.coef(s, t);
        let mj = self.m()[j];
        let mut col = vec![(1.0 - a) * mj; self.states()];
        col[j] += a;
        col
    }
}

/// A transition from explicit one-step matrices `Q_1 ... Q_T` (any K x K row-stochastic
/// matrices whose first V states are the data tokens) and a prior; products are multiplied out.
#[derive(Clone, Debug, PartialEq)]
pub struct DenseTransition {
    steps: Vec<Matrix>,
    vocab: usize,
    prior: Vec<f64>,
}

impl DenseTransition {
    /// Checks every matrix is K x K and row-stochastic, V <= K and the prior has K entries.
    pub fn new(steps: Vec<Matrix>, vocab: usize, prior: Vec<f64>) -> Result<Self> {
        let k = prior.len();
        let ok = !steps.is_empty()
            && vocab >= 1
            && vocab <= k
            && steps.iter().all(|q| {
                q.len() == k
                    && q.iter().all(|r| {
                        r.len() == k
                            && r.iter().all(|x| *x >= 0.0)
                            && (r.iter().sum::<f64>() - 1.0).abs() < 1e-9
                    })
            });
        if !ok {
            return Err(Error::Config(
                "a dense transition needs T >= 1 row-stochastic K x K matrices, V <= K data \
                 states and a prior over K states"
                    .into(),
            ));
        }
        Ok(Self {
            steps,
            vocab,
            prior,
        })
    }

    /// The dense matrices of any transition (a reference for tests).
    pub fn of(tr: &dyn Transition) -> Result<Self> {
        let steps = (1..=tr.steps()).map(|t| tr.step(t)).collect();
        Self::new(steps, tr.data_states(), tr.prior())
    }
}

/// `a b` for square matrices.
pub fn matmul(a: &Matrix, b: &Matrix) -> Matrix {
    a.iter()
        .map(|row| {
            (0..b.len())
                .map(|j| row.iter().zip(b).map(|(x, bk)| x * bk[j]).sum())
                .collect()
        })
        .collect()
}

impl Transition for DenseTransition {
    fn states(&self) -> usize {
        self.prior.len()
    }

    fn data_states(&self) -> usize {
        self.vocab
    }

    fn steps(&self) -> usize {
        self.steps.len()
    }

    fn between(&self, s: usize, t: usize) -> Matrix {
        let k = self.states();
        let id: Matrix = (0..k)
            .map(|i| (0..k).map(|j| f64::from(u8::from(i == j))).collect())
            .collect();
        self.steps[s.min(t)..t]
            .iter()
            .fold(id, |acc, q| matmul(&acc, q))
    }

    fn prior(&self) -> Vec<f64> {
        self.prior.clone()
    }
}
