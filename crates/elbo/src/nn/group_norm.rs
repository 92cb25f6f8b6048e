//! Group normalisation (Wu & He 2018, "Group Normalization", eq. 1-3) built from differentiable
//! candle ops.
//!
//! For `x: [B, C, ...]` the channels are split into `G` groups; each (example, group) is
//! normalised by its own mean and biased variance over the group's channels and positions,
//! then scaled and shifted per channel: `y = (x - mu) / sqrt(var + eps) * gamma_c + beta_c`.
//! (candle-nn's `GroupNorm` is also a composition, but it is built through `VarBuilder`, whose
//! initialisation we do not use.)

use candle_core::{Tensor, Var};

use super::ParamInit;
use crate::{Error, Result};

/// Group norm of `x: [B, C, ...]` over `groups` groups with per-channel `weight`, `bias: [C]`.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        return Err(Error::Shape(format!(
            "group norm: expected [B, C, ...], got {dims:?}"
        )));
    }
    let (b, c) = (dims[0], dims[1]);
    if groups == 0 || c % groups != 0 {
        return Err(Error::Shape(format!(
            "group norm: {groups} groups do not divide {c} channels"
        )));
    }
    if weight.dims() != [c] || bias.dims() != [c] {
        return Err(Error::Shape(format!(
            "group norm: weight {:?} and bias {:?} must be [{c}]",
            weight.dims(),
            bias.dims()
        )));
    }
    let xg = x.reshape((b, groups, ()))?; // [B, G, C/G * S]
    let mean = xg.mean_keepdim(2)?; // [B, G, 1]
    let xc = xg.broadcast_sub(&mean)?; // [B, G, C/G * S]
    let var = xc.sqr()?.mean_keepdim(2)?; // [B, G, 1]
    let xn = xc.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?; // [B, G, C/G * S]
    let mut wdims = vec![1; dims.len()];
    wdims[1] = c;
    Ok(xn
        .reshape(dims)?
        .broadcast_mul(&weight.reshape(wdims.clone())?)?
        .broadcast_add(&bias.reshape(wdims)?)?)
}

/// A group norm layer: weight (init 1) and bias (init 0) of width `C`, eps 1e-5.
#[derive(Clone, Debug)]
pub struct GroupNorm {
    weight: Var,
    bias: Var,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    /// Parameters `weight`, `bias: [channels]` under `p`; `groups` must divide `channels`.
    pub fn new(p: &mut ParamInit, groups: usize, channels: usize) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            return Err(Error::Config(format!(
                "group norm: {groups} groups do not divide {channels} channels"
            )));
        }
        Ok(Self {
            weight: p.constant("weight", &[channels], 1.0)?,
            bias: p.constant("bias", &[channels], 0.0)?,
            groups,
            eps: 1e-5,
        })
    }

    /// `x: [B, C, ...]` -> same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(
            x,
            self.groups,
            self.weight.as_tensor(),
            self.bias.as_tensor(),
            self.eps,
        )
    }
}
