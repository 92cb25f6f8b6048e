//! Gradient clipping by global L2 norm, as PyTorch's `torch.nn.utils.clip_grad_norm_`
//! (Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks").

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// The global L2 norm of the gradients of `params`: `sqrt(sum over parameters of |g|^2)`.
/// Parameters without a gradient contribute nothing; with no gradients at all the norm is 0.
/// Each parameter's sum of squares is taken in the gradient's dtype and accumulated in f64; the
/// result comes to the host once.
pub fn grad_norm(params: &[(String, Var)], grads: &GradStore) -> Result<f64> {
    let mut total: Option<Tensor> = None;
    for (_, var) in params {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let sq = g.detach().sqr()?.sum_all()?.to_dtype(DType::F64)?;
        total = Some(match total {
            Some(t) => (t + sq)?,
            None => sq,
        });
    }
    match total {
        Some(t) => Ok(t.to_scalar::<f64>()?.sqrt()),
        None => Ok(0.0),
    }
}

/// Clip the gradients of `params` in place so that their global L2 norm is at most `max_norm`,
/// and return the norm before clipping.
///
/// As `torch.nn.utils.clip_grad_norm_`: when the norm exceeds `max_norm`, every gradient is
/// multiplied by `max_norm / (norm + 1e-6)`; otherwise nothing changes. A non-finite norm (NaN or
/// infinite gradients) is returned as is and the gradients are left unscaled, so the caller can
/// report the problem (e.g. skip the step or stop with [`Error::NonFiniteLoss`]).
///
/// `max_norm` must be > 0 (it may be infinite, which disables clipping).
pub fn clip_grad_norm(
    params: &[(String, Var)],
    grads: &mut GradStore,
    max_norm: f64,
) -> Result<f64> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Config(format!(
            "gradient clipping: max_norm must be > 0, got {max_norm}"
        )));
    }
    let norm = grad_norm(params, grads)?;
    if !norm.is_finite() || norm <= max_norm {
        return Ok(norm);
    }
    let scale = max_norm / (norm + 1e-6);
    for (_, var) in params {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let scaled = g.detach().affine(scale, 0.0)?;
        grads.insert(var.as_tensor(), scaled);
    }
    Ok(norm)
}
