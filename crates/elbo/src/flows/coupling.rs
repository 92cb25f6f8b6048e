//! Coupling layers: half of the dimensions pass unchanged and condition an invertible map of
//! the other half, so the Jacobian is triangular and its determinant is the product of the
//! changed half's scales.
//!
//! With a binary mask `b` (1 = kept) and a conditioner network `NN(b ⊙ x)`:
//!
//! - additive (NICE; Dinh et al. 2015, eq. 7): `z = x + (1 - b) ⊙ t`, `log |det J| = 0`;
//! - affine (RealNVP; Dinh et al. 2017, eq. 9): `z = b ⊙ x + (1 - b) ⊙ (x ⊙ exp(s) + t)`,
//!   `log |det J| = Σ_j (1 - b_j) s_j` (eq. 6), with `s = scale ⊙ tanh(s̃)` bounded as in the
//!   RealNVP reference implementation.
//!
//! Both halves of `s̃, t` come from one MLP whose read-out starts near zero, so every coupling
//! starts near the identity (Kingma & Dhariwal 2018, sec. 3.3).

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::Bijector;
use crate::nn::{Activation, Mlp, ParamInit};
use crate::Result;

/// Additive (volume-preserving) or affine coupling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CouplingKind {
    /// `z = x + t(x_kept)` (NICE).
    Additive,
    /// `z = x ⊙ exp(s(x_kept)) + t(x_kept)` (RealNVP, Glow).
    Affine,
}

/// Which dimensions a coupling keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mask {
    /// Keep the dimensions whose index has parity `p` (0 or 1): the flat checkerboard.
    Parity(usize),
    /// Keep the first half (`false`) or the second half (`true`) of the dimensions: the
    /// channel mask on flat data.
    Half(bool),
}

impl Mask {
    /// The mask `b` as a `[1, D]` tensor of 0 and 1 (1 = kept).
    pub fn tensor(&self, d: usize, dev: &Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..d)
            .map(|j| {
                let keep = match *self {
                    Mask::Parity(p) => j % 2 == p,
                    Mask::Half(second) => (j >= d / 2) == second,
                };
                if keep {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, (1, d), dev)?)
    }
}

/// A coupling layer on `[B, D]` rows with an MLP conditioner.
pub struct Coupling {
    kind: CouplingKind,
    /// `b`, `[1, D]`.
    keep: Tensor,
    /// `1 - b`, `[1, D]`.
    change: Tensor,
    net: Mlp,
    /// The bound of `s` per dimension (affine only), `[D]`.
    scale: Option<Var>,
    d: usize,
}

impl Coupling {
    /// A coupling on `d` dimensions whose conditioner has `depth` hidden layers of `hidden`
    /// units. Parameters: `net.*` and (affine) `scale`.
    pub fn new(
        p: &mut ParamInit,
        kind: CouplingKind,
        mask: Mask,
        d: usize,
        hidden: usize,
        depth: usize,
        act: Activation,
    ) -> Result<Self> {
        let keep = mask.tensor(d, p.device())?;
        let change = (1.0 - &keep)?;
        let outs = match kind {
            CouplingKind::Additive => d,
            CouplingKind::Affine => 2 * d,
        };
        let net = Mlp::with_output_scale(&mut p.push("net"), d, hidden, depth, outs, act, 1e-2)?;
        let scale = match kind {
            CouplingKind::Additive => None,
            CouplingKind::Affine => Some(p.constant("scale", &[d], 1.0)?),
        };
        Ok(Self {
            kind,
            keep,
            change,
            net,
            scale,
            d,
        })
    }

    /// `(s, t)` for the kept part `x_kept = b ⊙ x`, both zero on the kept dimensions, `[B, D]`
    /// (`s` is `None` for the additive coupling).
    fn shift_and_log_scale(&self, x_kept: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let h = self.net.forward(x_kept)?; // [B, D] or [B, 2D]
        match (&self.kind, &self.scale) {
            (CouplingKind::Affine, Some(scale)) => {
                let s = h
                    .narrow(1, 0, self.d)?
                    .tanh()?
                    .broadcast_mul(scale.as_tensor())?
                    .broadcast_mul(&self.change)?; // [B, D]
                let t = h.narrow(1, self.d, self.d)?.broadcast_mul(&self.change)?;
                Ok((Some(s), t))
            }
            _ => Ok((None, h.broadcast_mul(&self.change)?)),
        }
    }
}

impl Bijector for Coupling {
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (s, t) = self.shift_and_log_scale(&x.broadcast_mul(&self.keep)?)?;
        match s {
            // on kept dimensions s = t = 0, so z = x there
            Some(s) => {
                let z = ((x * s.exp()?)? + t)?;
                Ok((z, s.sum(1)?))
            }
            None => {
                let z = (x + t)?;
                let zero = Tensor::zeros(x.dim(0)?, DType::F32, x.device())?;
                Ok((z, zero))
            }
        }
    }

    fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        // the kept half of z is the kept half of x
        let (s, t) = self.shift_and_log_scale(&z.broadcast_mul(&self.keep)?)?;
        let y = (z - t)?;
        Ok(match s {
            Some(s) => (y * s.neg()?.exp()?)?,
            None => y,
        }
        .detach())
    }
}
