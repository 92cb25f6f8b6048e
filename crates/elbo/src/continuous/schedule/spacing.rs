//! Inference timesteps: how n sampling steps are spread over N training timesteps, with the
//! conventions of each diffusers scheduler family (`linspace`, `leading`, `trailing`, and
//! `steps_offset`; Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
//! Flawed", Table 2). NumPy's `round` (ties to even) is reproduced.

use serde::{Deserialize, Serialize};

use super::discrete::np_linspace;
use crate::{Error, Result};

/// How inference timesteps are spread over the N training timesteps (diffusers' `timestep_spacing`,
/// Lin et al. 2024, Table 2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// Evenly from N-1 down to 0, both ends included.
    Linspace,
    /// Multiples of N / n (integer division) from 0, plus `steps_offset`.
    Leading,
    /// Down from N in steps of N / n (float), minus 1: always includes N-1.
    Trailing,
}

impl TimestepSpacing {
    /// From diffusers' name (`linspace`, `leading`, `trailing`).
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "linspace" => Ok(Self::Linspace),
            "leading" => Ok(Self::Leading),
            "trailing" => Ok(Self::Trailing),
            other => Err(Error::Config(format!(
                "unknown timestep spacing '{other}'; known: linspace, leading, trailing"
            ))),
        }
    }
}

fn check_steps(n_train: usize, n: usize) -> Result<()> {
    if n == 0 || n > n_train {
        return Err(Error::Config(format!(
            "number of sampling steps must be in 1..={n_train}, got {n}"
        )));
    }
    Ok(())
}

/// DDIM / DDPM inference timesteps (diffusers `DDIMScheduler.set_timesteps`): integers, decreasing.
/// `steps_offset` applies to `leading` only.
pub fn ddim_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    check_steps(n_train, n)?;
    let t: Vec<usize> = match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| v.round_ties_even() as usize)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n).rev().map(|i| i * ratio + steps_offset).collect()
        }
        TimestepSpacing::Trailing => trailing(n_train as f64, n_train, n)
            .into_iter()
            .map(|v| v as usize)
            .collect(),
    };
    if let Some(&bad) = t.iter().find(|&&v| v >= n_train) {
        return Err(Error::Config(format!(
            "timestep {bad} (steps_offset {steps_offset}) is past the last training timestep {}",
            n_train - 1
        )));
    }
    Ok(t)
}

/// `np.arange(start, 0, -N/n).round() - 1`.
fn trailing(start: f64, n_train: usize, n: usize) -> Vec<f64> {
    let ratio = n_train as f64 / n as f64;
    let mut v = Vec::new();
    let mut i = 0usize;
    loop {
        let x = start - i as f64 * ratio;
        if x <= 0.0 {
            break;
        }
        v.push(x.round_ties_even() - 1.0);
        i += 1;
    }
    v
}

/// Euler / Heun inference timesteps (diffusers `EulerDiscreteScheduler.set_timesteps`): float,
/// decreasing; `linspace` is not rounded. `steps_offset` applies to `leading` only.
pub fn euler_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<f64>> {
    check_steps(n_train, n)?;
    Ok(match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, n)
            .into_iter()
            .rev()
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(n_train as f64, n_train, n),
    })
}

/// DPM-Solver multistep inference timesteps (diffusers `DPMSolverMultistepScheduler`): n + 1
/// points laid out and the last (0) dropped, integers, decreasing.
pub fn dpm_solver_timesteps(
    spacing: TimestepSpacing,
    n_train: usize,
    n: usize,
    steps_offset: usize,
) -> Result<Vec<usize>> {
    check_steps(n_train, n)?;
    let v: Vec<f64> = match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<f64> = np_linspace(0.0, (n_train - 1) as f64, n + 1)
                .into_iter()
                .rev()
                .map(f64::round_ties_even)
                .collect();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / (n + 1);
            (1..=n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(n_train as f64, n_train, n),
    };
    Ok(v.into_iter().map(|x| x as usize).collect())
}
