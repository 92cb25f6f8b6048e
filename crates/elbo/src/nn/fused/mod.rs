//! Fused CPU kernels for the hot paths of MLP training and sampling.
//!
//! - [`linear_act`]: `act(x W^T + b)` as one candle custom op with its own backward pass (the
//!   bias add and SiLU and their gradients fused around candle's GEMM), used by
//!   [`crate::nn::Linear`] and [`crate::nn::Mlp`];
//! - [`linear_act_inference`]: the same without recording an autograd graph;
//! - in-place AdamW and EMA updates (crate-internal; used by [`crate::train::optim::AdamW`] and
//!   [`crate::train::ema::Ema`]).
//!
//! Every entry point runs the fused kernel only on the CPU with `f32` tensors and falls back to
//! the equivalent composition of candle ops elsewhere, so results agree up to float rounding.
//! SiLU uses [`exp_f32`], a branch-free `exp` with relative error below 3e-7, in place of libm.

mod inplace;
mod kernels;
mod linear;

use candle_core::{DType, Tensor};

pub(crate) use inplace::{adamw_inplace, ema_inplace};
pub(crate) use kernels::AdamWScalars;
pub use kernels::{exp_f32, silu_f32};

use crate::Result;

/// The activation applied after the affine map by [`linear_act`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FusedAct {
    /// No activation: `x W^T + b`.
    Identity,
    /// `silu(z) = z sigmoid(z)`.
    Silu,
}

/// True when every tensor is on the CPU with dtype `f32`, the case the fused kernels handle.
pub fn cpu_f32(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// True when [`linear_act`] takes the fused path for these operands: CPU, `f32`, `x: [B, in]`,
/// `w: [out, in]`, `b: [out]` with `b` contiguous.
fn fusable(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    cpu_f32(&[x, w, b])
        && x.rank() == 2
        && w.rank() == 2
        && b.rank() == 1
        && b.is_contiguous()
        && x.dim(1).ok() == w.dim(1).ok()
        && w.dim(0).ok() == b.dim(0).ok()
}

/// The composed reference: `act(x W^T + b)` from candle ops (records gradients).
fn composed(x: &Tensor, w: &Tensor, b: &Tensor, act: FusedAct) -> Result<Tensor> {
    let z = x.matmul(&w.t()?)?.broadcast_add(b)?;
    Ok(match act {
        FusedAct::Identity => z,
        FusedAct::Silu => z.silu()?,
    })
}

/// `act(x W^T + b)` for `x: [B, in]`, `w: [out, in]`, `b: [out]`, recording gradients for every
/// input that tracks them. On CPU `f32` this is one fused custom op whose backward pass gives
/// `dx`, `dW` and `db`; elsewhere it is the composition of candle ops.
pub fn linear_act(x: &Tensor, w: &Tensor, b: &Tensor, act: FusedAct) -> Result<Tensor> {
    if !fusable(x, w, b) {
        return composed(x, w, b, act);
    }
    let save = x.track_op() || w.track_op() || b.track_op();
    Ok(x.apply_op3(w, b, linear::LinearAct::new(act, save))?)
}

/// [`linear_act`] without an autograd graph (the result never tracks gradients), for sampling
/// and evaluation: nothing is saved for a backward pass.
pub fn linear_act_inference(x: &Tensor, w: &Tensor, b: &Tensor, act: FusedAct) -> Result<Tensor> {
    if !fusable(x, w, b) {
        return composed(&x.detach(), &w.detach(), &b.detach(), act);
    }
    Ok(x.apply_op3_no_bwd(w, b, &linear::LinearAct::new(act, false))?)
}
