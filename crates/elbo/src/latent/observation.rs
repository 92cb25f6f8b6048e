//! Observation models `p(x | z)` of latent-variable decoders: the distribution the decoder's
//! output parameterises, its log-probability of a batch in the data's own units, and a draw
//! from it. Each is a proper distribution over the data's support, so a decoder's ELBO is a
//! bound on the NLL of the data as stored (levels for discrete data, no dequantization).
//!
//! - Bernoulli for two levels (binarized images; Kingma & Welling 2014, appendix C.1);
//! - categorical over the `L` levels of each value (a softmax per dimension; van den Oord et al.
//!   2016, PixelRNN sec. 3.4), for a few levels (`L <= 32`);
//! - discretized logistic for many levels (Salimans et al. 2017, PixelCNN++ eq. 2): the mass of
//!   a logistic on each level's bin of the centred grid in [-1, 1], the edge bins open-ended;
//! - Gaussian with a learned per-dimension scale for continuous data (factor analysis when the
//!   decoder is linear; Tipping & Bishop 1999).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::data::DataKind;
use crate::{Error, Result, Rng};

/// Largest number of levels the automatic choice models with a categorical.
pub const CATEGORICAL_MAX_LEVELS: usize = 32;

/// Which observation model a decoder uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Observation {
    /// Bernoulli for 2 levels, categorical up to 32 levels, discretized logistic above, Gaussian
    /// for continuous data.
    Auto,
    /// Independent Bernoulli pixels (2 levels only).
    Bernoulli,
    /// A categorical over the levels of each value.
    Categorical,
    /// A discretized logistic on the levels' bins.
    Logistic,
    /// A diagonal Gaussian (continuous data only).
    Gaussian,
}

/// An observation model bound to the data: what the decoder must output and how to score it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObservationModel {
    /// Logits, one per dimension.
    Bernoulli,
    /// Logits `[D, L]` per example.
    Categorical {
        /// Levels per value.
        levels: usize,
    },
    /// Mean and log-scale per dimension.
    Logistic {
        /// Levels per value.
        levels: usize,
    },
    /// Mean per dimension (the log-scale is a separate parameter vector).
    Gaussian,
}

impl Observation {
    /// The model for data of `kind`, or an error naming the choices that fit it.
    pub fn resolve(self, kind: DataKind) -> Result<ObservationModel> {
        let bad = |what: &str| {
            Err(Error::Config(format!(
                "model.observation = \"{what}\" does not fit {}; use auto, {}",
                match kind {
                    DataKind::Continuous => "continuous data".to_string(),
                    DataKind::Discrete { levels } => format!("data with {levels} levels"),
                },
                match kind {
                    DataKind::Continuous => "or gaussian",
                    DataKind::Discrete { levels: 2 } => "bernoulli, categorical or logistic",
                    DataKind::Discrete { .. } => "categorical or logistic",
                }
            )))
        };
        match (self, kind) {
            (Observation::Auto, DataKind::Continuous)
            | (Observation::Gaussian, DataKind::Continuous) => Ok(ObservationModel::Gaussian),
            (Observation::Auto, DataKind::Discrete { levels: 2 })
            | (Observation::Bernoulli, DataKind::Discrete { levels: 2 }) => {
                Ok(ObservationModel::Bernoulli)
            }
            (Observation::Auto, DataKind::Discrete { levels })
                if levels <= CATEGORICAL_MAX_LEVELS =>
            {
                Ok(ObservationModel::Categorical { levels })
            }
            (Observation::Auto, DataKind::Discrete { levels })
            | (Observation::Logistic, DataKind::Discrete { levels }) => {
                Ok(ObservationModel::Logistic { levels })
            }
            (Observation::Categorical, DataKind::Discrete { levels }) => {
                Ok(ObservationModel::Categorical { levels })
            }
            (Observation::Bernoulli, _) => bad("bernoulli"),
            (Observation::Categorical, _) => bad("categorical"),
            (Observation::Logistic, _) => bad("logistic"),
            (Observation::Gaussian, _) => bad("gaussian"),
        }
    }
}

impl ObservationModel {
    /// Decoder outputs per dimension.
    pub fn outputs_per_dim(&self) -> usize {
        match self {
            ObservationModel::Bernoulli | ObservationModel::Gaussian => 1,
            ObservationModel::Categorical { levels } => *levels,
            ObservationModel::Logistic { .. } => 2,
        }
    }

    /// A name for reports.
    pub fn name(&self) -> String {
        match self {
            ObservationModel::Bernoulli => "Bernoulli".into(),
            ObservationModel::Categorical { levels } => format!("categorical over {levels} levels"),
            ObservationModel::Logistic { levels } => {
                format!("discretized logistic on {levels} levels")
            }
            ObservationModel::Gaussian => "diagonal Gaussian".into(),
        }
    }

    /// `log p(x | z)` per row, `[N]`, for decoder outputs `out: [N, D * outputs_per_dim]`,
    /// data `x: [N, D]` in its own units (levels, or real values), and for the Gaussian the
    /// per-dimension log-scale `log_scale: [D]`.
    pub fn log_prob(&self, out: &Tensor, x: &Tensor, log_scale: Option<&Tensor>) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let (n, d) = x.dims2()?;
        let lp = match *self {
            ObservationModel::Bernoulli => {
                // x l - softplus(l)
                (x.mul(out)? - softplus(out)?)?
            }
            ObservationModel::Categorical { levels } => {
                let logits = out.reshape((n, d, levels))?; // [N, D, L]
                let lse = logsumexp_last(&logits)?; // [N, D]
                let idx = x.to_dtype(DType::U32)?.unsqueeze(2)?; // [N, D, 1]
                (logits.gather(&idx, 2)?.squeeze(2)? - lse)?
            }
            ObservationModel::Logistic { levels } => {
                let out = out.reshape((n, d, 2))?;
                let mean = out.narrow(2, 0, 1)?.squeeze(2)?; // [N, D]
                let log_s = out.narrow(2, 1, 1)?.squeeze(2)?.clamp(-7f32, 5f32)?; // [N, D]
                discretized_logistic_log_prob(&x, &mean, &log_s, levels)?
            }
            ObservationModel::Gaussian => {
                let ls = log_scale.ok_or_else(|| {
                    Error::Shape("a Gaussian observation model needs its log-scale".into())
                })?;
                let z = x.sub(out)?.broadcast_div(&ls.exp()?)?; // [N, D]
                let c = 0.5 * (2.0 * std::f64::consts::PI).ln();
                ((z.sqr()? * -0.5)?.broadcast_sub(ls)? - c)?
            }
        };
        Ok(lp.sum(1)?)
    }

    /// The decoder's expected value in model space (the levels' centred grid in [-1, 1]),
    /// `[N, D]`, differentiable in `out`: `2 sigmoid(l) - 1` (Bernoulli), `Σ_k softmax(l)_k c_k`
    /// over the grid points `c_k` (categorical), the location `μ` (discretized logistic, whose
    /// mean it is up to the clipping of the outer bins), the mean itself (Gaussian).
    pub fn mean(&self, out: &Tensor) -> Result<Tensor> {
        let n = out.dim(0)?;
        let d = out.dim(1)? / self.outputs_per_dim();
        Ok(match *self {
            ObservationModel::Bernoulli => {
                softplus(&out.neg()?)?.neg()?.exp()?.affine(2.0, -1.0)?
            }
            ObservationModel::Categorical { levels } => {
                let logits = out.reshape((n, d, levels))?; // [N, D, L]
                let lse = logsumexp_last(&logits)?.unsqueeze(2)?; // [N, D, 1]
                let p = logits.broadcast_sub(&lse)?.exp()?; // [N, D, L]
                let grid: Vec<f32> = (0..levels)
                    .map(|k| (2.0 * k as f64 / (levels - 1) as f64 - 1.0) as f32)
                    .collect();
                let c = Tensor::from_vec(grid, (1, 1, levels), out.device())?;
                p.broadcast_mul(&c)?.sum(2)? // [N, D]
            }
            ObservationModel::Logistic { .. } => {
                out.reshape((n, d, 2))?.narrow(2, 0, 1)?.squeeze(2)? // [N, D]
            }
            ObservationModel::Gaussian => out.clone(),
        })
    }

    /// Draw `x ~ p(x | z)` (or its most likely value with `mean`) from decoder outputs, in the
    /// data's units.
    pub fn sample(
        &self,
        out: &Tensor,
        log_scale: Option<&Tensor>,
        mean: bool,
        rng: &mut Rng,
    ) -> Result<Tensor> {
        let dev = out.device().clone();
        let n = out.dim(0)?;
        let d = out.dim(1)? / self.outputs_per_dim();
        Ok(match *self {
            ObservationModel::Bernoulli => {
                let p = candle_nn::ops::sigmoid(out)?;
                if mean {
                    p.ge(0.5)?.to_dtype(DType::F32)?
                } else {
                    let u = rng.uniform_tensor(&[n, d], &dev)?;
                    u.lt(&p)?.to_dtype(DType::F32)?
                }
            }
            ObservationModel::Categorical { levels } => {
                let logits = out.reshape((n, d, levels))?; // [N, D, L]
                if mean {
                    logits.argmax(2)?.to_dtype(DType::F32)?
                } else {
                    // Gumbel-max: argmax(l + g), g = -log(-log u)
                    let u = rng
                        .uniform_tensor(&[n, d, levels], &dev)?
                        .clamp(1e-20f32, 1.0)?;
                    let g = u.log()?.neg()?.log()?.neg()?;
                    (logits + g)?.argmax(2)?.to_dtype(DType::F32)?
                }
            }
            ObservationModel::Logistic { levels } => {
                let out = out.reshape((n, d, 2))?;
                let mu = out.narrow(2, 0, 1)?.squeeze(2)?;
                let y = if mean {
                    mu
                } else {
                    let ls = out.narrow(2, 1, 1)?.squeeze(2)?.clamp(-7f32, 5f32)?;
                    let u = rng
                        .uniform_tensor(&[n, d], &dev)?
                        .clamp(1e-6f32, 1.0 - 1e-6)?;
                    let logit = (u.log()? - (u.affine(-1.0, 1.0)?).log()?)?;
                    (mu + logit.mul(&ls.exp()?)?)?
                };
                let k = ((y + 1.0)? * ((levels - 1) as f64 / 2.0))?;
                k.round()?.clamp(0f32, (levels - 1) as f32)?
            }
            ObservationModel::Gaussian => {
                if mean {
                    out.clone()
                } else {
                    let ls = log_scale.ok_or_else(|| {
                        Error::Shape("a Gaussian observation model needs its log-scale".into())
                    })?;
                    let e = rng.normal_tensor(&[n, d], &dev)?;
                    (out + e.broadcast_mul(&ls.exp()?)?)?
                }
            }
        })
    }
}

/// `log(1 + e^x)`, stable for large |x| and differentiable: `max(x, 0) + log(1 + e^{-|x|})`.
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// `log Σ_j e^{x_j}` over the last dimension, with the maximum detached.
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    Ok((x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()? + m)?.squeeze(D::Minus1)?)
}

/// `log P(x = k)` of a logistic(mean, e^{log_s}) on the bins of the centred grid of `levels`
/// values in [-1, 1] (PixelCNN++ eq. 2): `σ((c_k + δ/2 - μ)/s) - σ((c_k - δ/2 - μ)/s)` with
/// `δ = 2 / (L - 1)`, the first bin reaching to -∞ and the last to +∞. Where the difference
/// underflows, the density at the centre times δ stands in (as in the reference code).
pub fn discretized_logistic_log_prob(
    k: &Tensor,
    mean: &Tensor,
    log_s: &Tensor,
    levels: usize,
) -> Result<Tensor> {
    let delta = 2.0 / (levels - 1) as f64;
    let c = ((k * delta)? - 1.0)?; // [N, D]
    let centred = c.sub(mean)?;
    let inv_s = log_s.neg()?.exp()?;
    let plus = ((&centred + delta / 2.0)? * &inv_s)?;
    let minus = ((&centred - delta / 2.0)? * &inv_s)?;
    // log σ(plus), log(1 - σ(minus))
    let log_cdf_plus = softplus(&plus.neg()?)?.neg()?;
    let log_one_minus_cdf_min = softplus(&minus)?.neg()?;
    let cdf_delta = (candle_nn::ops::sigmoid(&plus)? - candle_nn::ops::sigmoid(&minus)?)?;
    let mid_in = (&centred * &inv_s)?;
    // log pdf at the centre: m - log s - 2 softplus(m), m = (c - μ)/s
    let log_pdf_mid = ((&mid_in - log_s)? - (softplus(&mid_in)? * 2.0)?)?;
    let mid = cdf_delta.ge(1e-5)?.where_cond(
        &cdf_delta.clamp(1e-12f32, 1.0)?.log()?,
        &(log_pdf_mid + delta.ln())?,
    )?;
    let lo = k.le(0.0)?;
    let hi = k.ge((levels - 1) as f64)?;
    Ok(lo.where_cond(&log_cdf_plus, &hi.where_cond(&log_one_minus_cdf_min, &mid)?)?)
}

/// `log (1/K) Σ_k e^{w_k}` of each row of `w: [N, K]` (`[N]`), as f64 on the host: the
/// importance-weighted bound's estimator.
pub fn log_mean_exp_rows(w: &[Vec<f64>]) -> Vec<f64> {
    w.iter()
        .map(|r| {
            let m = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !m.is_finite() {
                return m;
            }
            m + (r.iter().map(|v| (v - m).exp()).sum::<f64>() / r.len() as f64).ln()
        })
        .collect()
}
