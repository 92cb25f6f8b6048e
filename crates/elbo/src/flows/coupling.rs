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
//! On flat rows `[B, D]` the conditioner is an MLP; on channels-last images `[B, H, W, C]` it
//! is a convolutional network ([`ConvNet`]) and the masks are RealNVP's spatial checkerboard
//! and channel masks (Dinh et al. 2017, sec. 3.4, Fig. 3). Both halves of `s̃, t` come from one
//! network whose read-out starts near zero, so every coupling starts near the identity (Kingma
//! & Dhariwal 2018, sec. 3.3).

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::conv_net::ConvNet;
use super::Bijector;
use crate::nn::{Activation, Mlp, ParamInit};
use crate::{Error, Result};

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
    /// The checkerboard: keep the positions whose index (flat rows) or sum of row and column
    /// (images, every channel alike) has parity `p` (0 or 1).
    Parity(usize),
    /// The channel mask: keep the first half (`false`) or the second half (`true`) of the
    /// last axis (the dimensions of a flat row, the channels of an image).
    Half(bool),
}

impl Mask {
    /// The mask `b` over one example of shape `shape` (`[D]` or `[H, W, C]`) as a
    /// `[1, ..shape]` tensor of 0 and 1 (1 = kept).
    pub fn tensor(&self, shape: &[usize], dev: &Device) -> Result<Tensor> {
        let (h, w, c) = match *shape {
            [d] => (1, d, 1),
            [h, w, c] => (h, w, c),
            _ => {
                return Err(Error::Shape(format!(
                    "a coupling mask needs a flat [D] or image [H, W, C] shape, got {shape:?}"
                )))
            }
        };
        let f = shape[shape.len() - 1];
        let mut v = Vec::with_capacity(h * w * c);
        for i in 0..h {
            for j in 0..w {
                for k in 0..c {
                    let last = if shape.len() == 1 { j } else { k };
                    let keep = match *self {
                        Mask::Parity(p) => (i + j) % 2 == p,
                        Mask::Half(second) => (last >= f / 2) == second,
                    };
                    v.push(if keep { 1f32 } else { 0.0 });
                }
            }
        }
        let mut dims = vec![1];
        dims.extend_from_slice(shape);
        Ok(Tensor::from_vec(v, dims, dev)?)
    }
}

/// The network computing `(s̃, t)` from the kept part.
enum Conditioner {
    Mlp(Mlp),
    Conv(ConvNet),
}

/// A coupling layer on flat rows `[B, D]` (MLP conditioner) or channels-last images
/// `[B, H, W, C]` (convolutional conditioner).
pub struct Coupling {
    kind: CouplingKind,
    /// `b`, `[1, D]` or `[1, H, W, C]`.
    keep: Tensor,
    /// `1 - b`, shaped as `keep`.
    change: Tensor,
    net: Conditioner,
    /// The bound of `s` per entry of the last axis (affine only), `[D]` or `[C]`.
    scale: Option<Var>,
    /// Length of the last axis (`D` or `C`).
    f: usize,
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
        let outs = Self::outs(kind, d);
        let net = Mlp::with_output_scale(&mut p.push("net"), d, hidden, depth, outs, act, 1e-2)?;
        Self::assemble(p, kind, mask, &[d], Conditioner::Mlp(net))
    }

    /// A coupling on channels-last images of shape `(h, w, c)` whose conditioner is a
    /// [`ConvNet`] of `hidden` channels. Parameters: `net.*` and (affine) `scale`.
    pub fn conv(
        p: &mut ParamInit,
        kind: CouplingKind,
        mask: Mask,
        (h, w, c): (usize, usize, usize),
        hidden: usize,
        act: Activation,
    ) -> Result<Self> {
        if let (Mask::Half(_), true) = (mask, c < 2) {
            return Err(Error::Config(format!(
                "a channel-mask coupling needs at least 2 channels, the image has {c} (squeeze \
                 first, or use the checkerboard mask)"
            )));
        }
        let net = ConvNet::new(&mut p.push("net"), c, hidden, Self::outs(kind, c), act)?;
        Self::assemble(p, kind, mask, &[h, w, c], Conditioner::Conv(net))
    }

    fn outs(kind: CouplingKind, f: usize) -> usize {
        match kind {
            CouplingKind::Additive => f,
            CouplingKind::Affine => 2 * f,
        }
    }

    fn assemble(
        p: &mut ParamInit,
        kind: CouplingKind,
        mask: Mask,
        shape: &[usize],
        net: Conditioner,
    ) -> Result<Self> {
        let keep = mask.tensor(shape, p.device())?;
        let change = (1.0 - &keep)?;
        let f = shape[shape.len() - 1];
        let scale = match kind {
            CouplingKind::Additive => None,
            CouplingKind::Affine => Some(p.constant("scale", &[f], 1.0)?),
        };
        Ok(Self {
            kind,
            keep,
            change,
            net,
            scale,
            f,
        })
    }

    /// `(s, t)` for the kept part `x_kept = b ⊙ x`, both zero on the kept dimensions and
    /// shaped as `x` (`s` is `None` for the additive coupling).
    fn shift_and_log_scale(&self, x_kept: &Tensor) -> Result<(Option<Tensor>, Tensor)> {
        let h = match &self.net {
            Conditioner::Mlp(m) => m.forward(x_kept)?, // [B, D] or [B, 2D]
            Conditioner::Conv(c) => c.forward(x_kept)?, // [B, H, W, C] or [B, H, W, 2C]
        };
        let last = h.rank() - 1;
        match (&self.kind, &self.scale) {
            (CouplingKind::Affine, Some(scale)) => {
                let s = h
                    .narrow(last, 0, self.f)?
                    .tanh()?
                    .broadcast_mul(scale.as_tensor())?
                    .broadcast_mul(&self.change)?; // shaped as x
                let t = h
                    .narrow(last, self.f, self.f)?
                    .broadcast_mul(&self.change)?;
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
                Ok((z, s.flatten_from(1)?.sum(1)?))
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
