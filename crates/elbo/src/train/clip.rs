//! Gradient clipping by global L2 norm, as PyTorch's `torch.nn.utils.clip_grad_norm_`
//! (Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural networks").

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

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

/// [`grad_norm`] left on the gradients' device: a scalar `f64` tensor, with no host
/// synchronisation (0 on `device` when no parameter has a gradient).
pub fn grad_norm_tensor(
    params: &[(String, Var)],
    grads: &GradStore,
    device: &Device,
) -> Result<Tensor> {
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
        Some(t) => Ok(t.sqrt()?),
        None => Ok(Tensor::zeros((), DType::F64, device)?),
    }
}

/// [`clip_grad_norm`] without reading the norm on the host (for GPU devices, where that read
/// waits for the whole step): every gradient is multiplied by the device scalar
/// `norm > max_norm ? max_norm / (norm + 1e-6) : 1`, and the norm before clipping is returned
/// as a scalar `f64` tensor. For a finite norm the gradients are those of [`clip_grad_norm`] (the
/// same `f32` scale; a factor of exactly 1 below the bound). A NaN norm leaves them unscaled, as
/// [`clip_grad_norm`]; an infinite one scales them by 0 (NaN where a gradient is infinite) where
/// [`clip_grad_norm`] leaves them: either way the step's weights stop being finite and training
/// stops at the next check.
pub fn clip_grad_norm_tensor(
    params: &[(String, Var)],
    grads: &mut GradStore,
    max_norm: f64,
    device: &Device,
) -> Result<Tensor> {
    if max_norm.is_nan() || max_norm <= 0.0 {
        return Err(Error::Config(format!(
            "gradient clipping: max_norm must be > 0, got {max_norm}"
        )));
    }
    let norm = grad_norm_tensor(params, grads, device)?;
    if max_norm.is_infinite() {
        return Ok(norm);
    }
    let bound = Tensor::new(max_norm, device)?;
    let shrink = bound.div(&norm.affine(1.0, 1e-6)?)?;
    let scale = norm
        .gt(&bound)?
        .where_cond(&shrink, &Tensor::ones((), DType::F64, device)?)?;
    for (_, var) in params {
        let Some(g) = grads.get(var.as_tensor()) else {
            continue;
        };
        let scaled = g.detach().broadcast_mul(&scale.to_dtype(g.dtype())?)?;
        grads.insert(var.as_tensor(), scaled);
    }
    Ok(norm)
}
