//! Dequantization: how discrete data (levels 0..L-1) meets a density on R^D, in one place for
//! every continuous family.
//!
//! Discrete levels live at the grid values c_k = -1 + 2k/(L-1) of model space (Ho et al. 2020,
//! sec. 3.3 for L = 256). Uniform dequantization spreads level k over its bin c_k ± 1/(L-1):
//! for a density p on model space and y = x + u, u ~ U[0, 1)^D in level units,
//!
//!   log P(x) >= E_u[log p(c(x + u))] + D log(2/(L-1))        (Theis et al. 2016, eq. 7),
//!
//! the last term being the bin width's Jacobian ([`DataScale::log_jacobian`]). Variational
//! dequantization (Ho et al. 2019, sec. 3.1, eq. 12) draws u from a learned conditional density
//! q(u | x) on the unit cube instead and subtracts its log-density,
//!
//!   log P(x) >= E_{u~q(·|x)}[log p(c(x + u)) - log q(u | x)] + D log(2/(L-1)),
//!
//! which is uniform dequantization when q is uniform and can only be tighter at its optimum
//! ([`VariationalDequantizer`]).

mod variational;

pub use variational::VariationalDequantizer;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::DataKind;
use crate::{Error, Result, Rng};

/// Which dequantization a family's bound on discrete data uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dequantization {
    /// u ~ U[0, 1)^D (Theis et al. 2016).
    #[default]
    Uniform,
    /// u ~ q(u | x), a learned conditional flow (Flow++; Ho et al. 2019, sec. 3.1).
    Variational,
}

/// How discrete levels sit in model space [-1, 1] and spread over their bins under uniform
/// dequantization (Theis et al. 2016; Ho et al. 2019). One convention serves every family;
/// the other exists only so that flow-matching runs of earlier releases keep their numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Bins {
    /// Level k at c_k = -1 + 2k/(L-1) (so ±1 are levels; Ho et al. 2020, sec. 3.3), its bin
    /// c_k ± 1/(L-1); decoded by rounding. The convention of every family.
    #[default]
    Centred,
    /// Level k's bin is [2k/L - 1, 2(k+1)/L - 1), the bins tiling [-1, 1); decoded by the
    /// floor. What flow matching used before the conventions were merged (old runs only).
    Tiled,
}

/// Maps between the data's units and model space: the one place that fixes where levels sit,
/// how they are dequantized and the Jacobian of that map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataScale {
    /// Number of levels of discrete data, `None` for continuous data.
    pub levels: Option<usize>,
    /// Where the levels' bins lie.
    pub bins: Bins,
}

impl DataScale {
    /// From the data's kind, with the centred bins; discrete data needs at least 2 levels.
    pub fn new(kind: DataKind) -> Result<Self> {
        Self::with_bins(kind, Bins::Centred)
    }

    /// From the data's kind with the given bins.
    pub fn with_bins(kind: DataKind, bins: Bins) -> Result<Self> {
        match kind {
            DataKind::Continuous => Ok(Self { levels: None, bins }),
            DataKind::Discrete { levels } if levels >= 2 => Ok(Self {
                levels: Some(levels),
                bins,
            }),
            DataKind::Discrete { levels } => Err(Error::Config(format!(
                "a density on discrete data needs at least 2 levels, got {levels}"
            ))),
        }
    }

    /// Levels k -> the centres of their bins (continuous data unchanged).
    pub fn to_grid(&self, batch: &Tensor) -> Result<Tensor> {
        let batch = batch.to_dtype(DType::F32)?;
        Ok(match (self.levels, self.bins) {
            (None, _) => batch,
            (Some(l), Bins::Centred) => ((batch * (2.0 / (l - 1) as f64))? - 1.0)?,
            (Some(l), Bins::Tiled) => (((batch + 0.5)? * (2.0 / l as f64))? - 1.0)?,
        })
    }

    /// Levels k -> a uniform point of their bins, u ~ U[0, 1) per value (continuous data
    /// unchanged): c_k + (u - 1/2) · 2/(L-1) (centred) or (k + u) · 2/L - 1 (tiled).
    pub fn dequantize(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let batch = batch.to_dtype(DType::F32)?;
        let Some(l) = self.levels else {
            return Ok(batch);
        };
        let u = rng.uniform_tensor(batch.dims(), batch.device())?; // [B, D]
        self.place(&batch, &u, l)
    }

    /// Levels k plus offsets `u` in [0, 1) (any draw, e.g. a variational dequantizer's) ->
    /// model space, as [`DataScale::dequantize`] maps its uniform draw; an error for
    /// continuous data.
    pub fn dequantize_with(&self, batch: &Tensor, u: &Tensor) -> Result<Tensor> {
        let Some(l) = self.levels else {
            return Err(Error::Config(
                "dequantization needs discrete data (levels), the data is continuous".into(),
            ));
        };
        self.place(&batch.to_dtype(DType::F32)?, u, l)
    }

    fn place(&self, batch: &Tensor, u: &Tensor, l: usize) -> Result<Tensor> {
        Ok(match self.bins {
            Bins::Centred => ((((batch + u)? - 0.5)? * (2.0 / (l - 1) as f64))? - 1.0)?,
            Bins::Tiled => (((batch + u)? * (2.0 / l as f64))? - 1.0)?,
        })
    }

    /// Model space -> the level whose bin holds x (continuous data unchanged).
    pub fn to_data(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match (self.levels, self.bins) {
            (None, _) => x.clone(),
            (Some(l), Bins::Centred) => {
                let k = ((x.to_dtype(DType::F32)? + 1.0)? * ((l - 1) as f64 / 2.0))?;
                k.round()?.clamp(0f32, (l - 1) as f32)?
            }
            (Some(l), Bins::Tiled) => {
                let y = ((x.to_dtype(DType::F32)? + 1.0)? * (l as f64 / 2.0))?;
                y.floor()?.clamp(0f32, (l - 1) as f32)?
            }
        })
    }

    /// log |dx/dy| per example for dequantized data y in level units: D log(bin width), the
    /// width 2/(L-1) (centred) or 2/L (tiled).
    pub fn log_jacobian(&self, dim: usize) -> f64 {
        match (self.levels, self.bins) {
            (None, _) => 0.0,
            (Some(l), Bins::Centred) => dim as f64 * (2.0 / (l - 1) as f64).ln(),
            (Some(l), Bins::Tiled) => dim as f64 * (2.0 / l as f64).ln(),
        }
    }

    /// The label of a likelihood under variational dequantization, or "" for continuous data.
    pub fn variational_note(&self) -> String {
        match self.levels {
            None => String::new(),
            Some(l) => format!(
                "; variational dequantization of {l} levels (Flow++): u ~ q(u|x), a learned \
                 conditional flow on the unit cube, with -log q(u|x) and the bin width's \
                 Jacobian (a bound on the discrete NLL)"
            ),
        }
    }

    /// The label of a dequantized likelihood's method, or "" for continuous data.
    pub fn dequantization_note(&self) -> String {
        let width = match self.bins {
            Bins::Centred => 1,
            Bins::Tiled => 0,
        };
        match self.levels {
            None => String::new(),
            Some(l) => format!(
                "; uniform dequantization of {l} levels, bin width 2/{} on [-1, 1] with its \
                 Jacobian (a bound on the discrete NLL)",
                l - width
            ),
        }
    }
}
