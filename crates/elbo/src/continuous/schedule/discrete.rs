//! Discrete-time DDPM noise schedules (Ho et al. 2020, Sec. 2) with diffusers' exact conventions.
//!
//! The forward chain q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), t = 0..N-1 (diffusers
//! indexes timesteps from 0), has the closed-form marginal q(x_t | x_0) = N(sqrt(abar_t) x_0,
//! (1 - abar_t) I) with abar_t = prod_{s <= t} (1 - beta_s) (Ho et al. 2020, eq. 4), i.e. the EDM
//! noise level sigma_t = sqrt((1 - abar_t) / abar_t) after scaling x_t by 1 / sqrt(abar_t).
//!
//! diffusers builds betas and alphas_cumprod as float32 tensors; [`Precision::F32`] reproduces
//! those numbers bit for bit (betas rounded to f32, alphas = 1 - beta in f32, the cumulative product
//! accumulated in f64 and rounded to f32 as PyTorch's CPU `cumprod` does, the posterior variance in
//! f32 arithmetic), while [`Precision::F64`] keeps everything in double precision.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// How betas are laid out over the N training timesteps (diffusers' `beta_schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// beta_t = linspace(beta_start, beta_end, N) (Ho et al. 2020: 1e-4 .. 0.02).
    Linear,
    /// beta_t = linspace(sqrt(beta_start), sqrt(beta_end), N)^2 (latent diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal 2021, eq. 17: abar(t) = cos^2((t/N + s)/(1 + s)
    /// pi/2) with s = 0.008, beta_t = min(1 - abar((t+1)/N) / abar(t/N), 0.999).
    #[serde(alias = "cosine")]
    SquaredcosCapV2,
}

impl BetaSchedule {
    /// diffusers' name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::ScaledLinear => "scaled_linear",
            Self::SquaredcosCapV2 => "squaredcos_cap_v2",
        }
    }

    /// From diffusers' name (`linear`, `scaled_linear`, `squaredcos_cap_v2`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linear" => Ok(Self::Linear),
            "scaled_linear" => Ok(Self::ScaledLinear),
            "squaredcos_cap_v2" | "cosine" => Ok(Self::SquaredcosCapV2),
            other => Err(Error::Config(format!(
                "unknown beta schedule '{other}'; known: linear, scaled_linear, squaredcos_cap_v2"
            ))),
        }
    }
}

/// Arithmetic precision of a [`DiscreteSchedule`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Precision {
    /// Double precision throughout.
    F64,
    /// diffusers' float32 tensors, reproduced exactly.
    F32,
}

/// `np.linspace(start, stop, n)`: `start + i * step` with the last point set to `stop`.
pub fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` on CPU, bit for bit: float32 end points,
/// step = f32(end - start) / (n - 1) in float32, the first half start + i step and the second
/// half end - (n - 1 - i) step, each with one (fused) rounding.
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    if n < 2 {
        return (0..n).map(|_| s).collect();
    }
    let step = (e - s) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, s)
            } else {
                (-step).mul_add((n - 1 - i) as f32, e)
            }
        })
        .collect()
}

/// The `alpha_bar` of the cosine schedule (Nichol & Dhariwal 2021, eq. 17), t in [0, 1].
fn cosine_alpha_bar(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
        .cos()
        .powi(2)
}

/// A discrete VP schedule: betas and alphas_cumprod over N timesteps (index = timestep).
#[derive(Clone, Debug, PartialEq)]
pub struct DiscreteSchedule {
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    precision: Precision,
}

impl DiscreteSchedule {
    /// A schedule of `n` timesteps; `beta_start` / `beta_end` are used by the linear kinds.
    pub fn new(
        kind: BetaSchedule,
        n: usize,
        beta_start: f64,
        beta_end: f64,
        precision: Precision,
    ) -> Result<Self> {
        if n < 2 {
            return Err(Error::Config(format!(
                "a discrete schedule needs at least 2 timesteps, got {n}"
            )));
        }
        if !(beta_start > 0.0 && beta_end < 1.0 && beta_start <= beta_end) {
            return Err(Error::Config(format!(
                "betas must satisfy 0 < beta_start <= beta_end < 1 (got {beta_start}, {beta_end})"
            )));
        }
        let betas = match kind {
            BetaSchedule::Linear => match precision {
                Precision::F64 => np_linspace(beta_start, beta_end, n),
                Precision::F32 => torch_linspace_f32(beta_start, beta_end, n)
                    .into_iter()
                    .map(f64::from)
                    .collect(),
            },
            BetaSchedule::ScaledLinear => match precision {
                Precision::F64 => np_linspace(beta_start.sqrt(), beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                // torch squares the float32 linspace in float32
                Precision::F32 => torch_linspace_f32(beta_start.sqrt(), beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| f64::from(b * b))
                    .collect(),
            },
            BetaSchedule::SquaredcosCapV2 => (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    (1.0 - cosine_alpha_bar(t2) / cosine_alpha_bar(t1)).min(0.999)
                })
                .collect(),
        };
        Self::from_betas(betas, precision)
    }

    /// diffusers' defaults for `n` steps: beta_start 1e-4, beta_end 0.02, in `precision`.
    pub fn ddpm(kind: BetaSchedule, n: usize, precision: Precision) -> Result<Self> {
        Self::new(kind, n, 1e-4, 0.02, precision)
    }

    /// A schedule from explicit betas, each in (0, 1).
    pub fn from_betas(betas: Vec<f64>, precision: Precision) -> Result<Self> {
        if let Some((i, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, b)| !(**b > 0.0 && **b < 1.0))
        {
            return Err(Error::Config(format!(
                "beta at timestep {i} is {b}; every beta must lie in (0, 1)"
            )));
        }
        let (betas, alphas_cumprod) = match precision {
            Precision::F64 => {
                let mut acc = 1.0;
                let ac = betas
                    .iter()
                    .map(|b| {
                        acc *= 1.0 - b;
                        acc
                    })
                    .collect();
                (betas, ac)
            }
            Precision::F32 => {
                let b32: Vec<f32> = betas.iter().map(|&b| b as f32).collect();
                let mut acc = 1.0f64;
                let ac = b32
                    .iter()
                    .map(|&b| {
                        acc *= (1.0f32 - b) as f64;
                        acc as f32 as f64
                    })
                    .collect();
                (b32.into_iter().map(f64::from).collect(), ac)
            }
        };
        Ok(Self {
            betas,
            alphas_cumprod,
            precision,
        })
    }

    /// Number of training timesteps N.
    pub fn len(&self) -> usize {
        self.betas.len()
    }

    /// Always false: a schedule has at least 2 timesteps.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// The precision the schedule was built in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// beta_t for t = 0..N-1.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// abar_t = prod_{s<=t} (1 - beta_s) for t = 0..N-1.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// abar at timestep `t`, with abar_{-1} = 1 (no noise); an error past the last timestep.
    pub fn alpha_bar(&self, t: i64) -> Result<f64> {
        if t < 0 {
            return Ok(1.0);
        }
        self.alphas_cumprod.get(t as usize).copied().ok_or_else(|| {
            Error::Config(format!(
                "timestep {t} is outside the schedule's 0..{}",
                self.len()
            ))
        })
    }

    /// EDM noise levels sigma_t = sqrt((1 - abar_t) / abar_t), increasing in t (in f64 from the
    /// stored abar in either precision, so that VP samplers and denoiser adapters agree exactly).
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect()
    }

    /// The DDPM posterior variance beta~_t of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7), as
    /// diffusers' `fixed_small` variance: (1 - abar_{t-1}) / (1 - abar_t) * beta_t, clamped at
    /// 1e-20 (so t = 0 gives 1e-20).
    pub fn posterior_variance(&self, t: usize) -> Result<f64> {
        let a_t = self.alpha_bar(t as i64)?;
        let a_prev = self.alpha_bar(t as i64 - 1)?;
        Ok(match self.precision {
            Precision::F64 => ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).max(1e-20),
            Precision::F32 => {
                let (a_t, a_prev) = (a_t as f32, a_prev as f32);
                let beta = 1.0f32 - a_t / a_prev;
                ((1.0f32 - a_prev) / (1.0f32 - a_t) * beta).max(1e-20) as f64
            }
        })
    }

    /// The reverse transitions for a decreasing list of timesteps: each goes to the next one in
    /// the list, the last to abar = 1 (x_0). This is the textbook DDPM/DDIM chain (Song et al.
    /// 2021a, eq. 12 on a sub-sequence tau).
    pub fn transitions(&self, timesteps: &[usize]) -> Result<Vec<Transition>> {
        check_decreasing(timesteps)?;
        timesteps
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let prev = timesteps.get(i + 1).map(|&p| p as i64).unwrap_or(-1);
                Ok(Transition {
                    alpha_bar: self.alpha_bar(t as i64)?,
                    alpha_bar_prev: self.alpha_bar(prev)?,
                })
            })
            .collect()
    }

    /// diffusers' DDIM / DDPM transitions: from timestep t to t - N / n (integer division; n =
    /// `timesteps.len()`) whatever the next listed timestep is, and below 0 to `final_alpha_bar`
    /// (1 with `set_alpha_to_one`, else abar_0). With `linspace` spacing the two differ: 999 goes
    /// to 899 while the next listed timestep of 10 is 888.
    pub fn diffusers_transitions(
        &self,
        timesteps: &[usize],
        set_alpha_to_one: bool,
    ) -> Result<Vec<Transition>> {
        check_decreasing(timesteps)?;
        let ratio = (self.len() / timesteps.len().max(1)) as i64;
        let final_alpha_bar = if set_alpha_to_one {
            1.0
        } else {
            self.alphas_cumprod[0]
        };
        timesteps
            .iter()
            .map(|&t| {
                let prev = t as i64 - ratio;
                Ok(Transition {
                    alpha_bar: self.alpha_bar(t as i64)?,
                    alpha_bar_prev: if prev >= 0 {
                        self.alpha_bar(prev)?
                    } else {
                        final_alpha_bar
                    },
                })
            })
            .collect()
    }
}

/// One reverse step of a VP sampler, from noise level abar to abar_prev >= abar.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Transition {
    /// abar at the current (noisier) level.
    pub alpha_bar: f64,
    /// abar at the level the step goes to (1 = clean data).
    pub alpha_bar_prev: f64,
}

fn check_decreasing(timesteps: &[usize]) -> Result<()> {
    if timesteps.is_empty() {
        return Err(Error::Config("the timestep list is empty".into()));
    }
    if timesteps.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::Config(format!(
            "timesteps must be strictly decreasing, got {timesteps:?}"
        )));
    }
    Ok(())
}

/// `np.interp(x, 0..len, table)`: linear interpolation in t of a per-timestep table, clamped to
/// the ends.
pub fn interp_table(x: f64, table: &[f64]) -> f64 {
    if table.is_empty() {
        return f64::NAN;
    }
    if x <= 0.0 {
        return table[0];
    }
    let last = table.len() - 1;
    if x >= last as f64 {
        return table[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    table[i] + w * (table[i + 1] - table[i])
}
