//! Rectified-flow Euler sampling (diffusers' `FlowMatchEulerDiscreteScheduler`): on x_s =
//! (1 - s) x_0 + s eps, x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, s_i), with the grid from
//! [`flow_match_sigmas`](crate::continuous::schedule::flow_match_sigmas) (its `shift` spends
//! more steps at high noise; Esser et al. 2024, Sec. 5.3.2).

use candle_core::Tensor;

use super::lin;
use crate::continuous::VelocityField;
use crate::{Error, Result};

/// Euler over the decreasing flow times `sigmas` (in [0, 1], s = 1 noise) from `x` at sigmas[0].
///
/// `model` is a field in diffusers' (noise) time: on x_s = (1 - s) x_0 + s eps it returns
/// dx_s/ds = eps - x_0 at `s`. A flow-matching field in this crate's time (data at t = 1, as
/// [`crate::continuous::cnf`] integrates it) is passed as [`TimeFlip`](super::TimeFlip)`(&field)`.
pub fn flow_euler(model: &dyn VelocityField, sigmas: &[f64], x: &Tensor) -> Result<Tensor> {
    if sigmas.len() < 2
        || sigmas.iter().any(|s| !(0.0..=1.0).contains(s))
        || sigmas.windows(2).any(|w| w[1] >= w[0])
    {
        return Err(Error::Config(format!(
            "flow times must be at least 2, strictly decreasing, in [0, 1]; got {sigmas:?}"
        )));
    }
    let mut x = x.clone();
    for w in sigmas.windows(2) {
        let v = model.velocity(&x, w[0])?;
        x = lin(&x, 1.0, &v, w[1] - w[0])?;
    }
    Ok(x)
}
