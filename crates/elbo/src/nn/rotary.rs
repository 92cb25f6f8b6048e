//! Rotary position embeddings (RoPE; Su et al. 2021, "RoFormer", eq. 34), as a differentiable
//! composition of candle ops.
//!
//! Each head's query and key at position `m` are rotated pairwise by the angles `m θ_i`,
//! `θ_i = base^(-2i / dh)`, `i < dh / 2`, so the score `<R_m q, R_n k> = <q, R_{n-m} k>`
//! depends on the offset `n - m` only. The pairs are `(x_i, x_{i + dh/2})` (the "rotate half"
//! layout of GPT-NeoX and LLaMA, equivalent to the paper's interleaved pairs up to a fixed
//! permutation of the head's coordinates):
//! `RoPE(x)_m = x cos(m θ) + rotate_half(x) sin(m θ)`, `rotate_half(x) = [-x_2, x_1]`.
//!
//! A bidirectional transformer has no other source of order: with learned absolute positions a
//! masked diffusion LM must learn every position from scratch, and on Shakespeare it sat at the
//! unigram loss for thousands of steps. Rotary angles give the relative-offset structure for
//! free. An any-order model rotates each query by the position it predicts and each key by the
//! position of its token ([`RotaryAt::Rows`]), so its scores see the offset between the two
//! whatever the order. candle's own `rope` kernels record no gradient, hence this composition; on CPU `f32`
//! the packed form runs one custom op whose backward is the inverse rotation (the composition,
//! eight strided passes, cost a quarter of an MDLM training step).

use std::sync::Arc;

use candle_core::{bail, CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::{Error, Result};

/// Default base of the angles (Su et al. 2021).
pub const ROPE_BASE: f64 = 10_000.0;

/// Where the queries and keys of a `[B, T, ...]` input sit.
#[derive(Clone, Copy, Debug)]
pub enum RotaryAt<'a> {
    /// Every row at positions `start..start + T` (queries and keys alike).
    From(usize),
    /// Per token (`B * T` entries each, row-major): the query's position and the key's.
    Rows {
        /// Position of each query.
        q: &'a [u32],
        /// Position of each key.
        k: &'a [u32],
    },
}

/// Owned form of [`RotaryAt`] for the op.
#[derive(Clone, Debug)]
enum At {
    From(usize),
    Rows(Arc<(Vec<u32>, Vec<u32>)>),
}

impl At {
    /// Positions of the query and the key of flat token index `r` (`r % t` is the step).
    fn of(&self, r: usize, t: usize) -> (usize, usize) {
        match self {
            At::From(s) => (s + r % t, s + r % t),
            At::Rows(p) => (p.0[r] as usize, p.1[r] as usize),
        }
    }
}

/// Cosine and sine tables of the rotary angles for positions `0..max_len`.
#[derive(Clone, Debug)]
pub struct Rotary {
    /// `cos(m θ_i)` repeated over both halves: `[max_len, dh]`.
    cos: Tensor,
    /// `sin(m θ_i)` repeated over both halves: `[max_len, dh]`.
    sin: Tensor,
    /// Host copies of `cos` and `sin` for the CPU op.
    host: Arc<(Vec<f32>, Vec<f32>)>,
    heads: usize,
    head_dim: usize,
}

impl Rotary {
    /// Tables for `heads` heads of `d_model / heads` each; the head width must be even.
    pub fn new(max_len: usize, d_model: usize, heads: usize, device: &Device) -> Result<Self> {
        if heads == 0 || !d_model.is_multiple_of(heads) || !(d_model / heads).is_multiple_of(2) {
            return Err(Error::Config(format!(
                "rotary positions need an even head width: d_model {d_model} / {heads} heads"
            )));
        }
        let dh = d_model / heads;
        let half = dh / 2;
        let mut cos = Vec::with_capacity(max_len * dh);
        let mut sin = Vec::with_capacity(max_len * dh);
        for m in 0..max_len {
            for _half in 0..2 {
                for i in 0..half {
                    let theta = ROPE_BASE.powf(-2.0 * i as f64 / dh as f64);
                    let a = m as f64 * theta;
                    cos.push(a.cos() as f32);
                    sin.push(a.sin() as f32);
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_slice(&cos, (max_len, dh), device)?,
            sin: Tensor::from_slice(&sin, (max_len, dh), device)?,
            host: Arc::new((cos, sin)),
            heads,
            head_dim: dh,
        })
    }

    /// Number of positions the tables cover.
    pub fn max_len(&self) -> usize {
        self.host.0.len() / self.head_dim
    }

    /// Checks `at` for an input of `b` rows of `t` tokens against the tables.
    fn check(&self, at: RotaryAt, b: usize, t: usize) -> Result<()> {
        let top = match at {
            RotaryAt::From(s) => s + t,
            RotaryAt::Rows { q, k } => {
                if q.len() != b * t || k.len() != b * t {
                    return Err(Error::Shape(format!(
                        "rotary: {} query and {} key positions for {b} x {t} tokens",
                        q.len(),
                        k.len()
                    )));
                }
                q.iter()
                    .chain(k)
                    .map(|&p| p as usize + 1)
                    .max()
                    .unwrap_or(0)
            }
        };
        if top > self.max_len() {
            return Err(Error::Shape(format!(
                "rotary positions up to {top} exceed the table's {}",
                self.max_len()
            )));
        }
        Ok(())
    }

    /// `cos` and `sin` rows for `t` steps of `b` rows -> two `[B, T, 1, 1, dh]` tensors.
    fn angles(&self, at: RotaryAt, b: usize, t: usize, keys: bool) -> Result<(Tensor, Tensor)> {
        let dh = self.head_dim;
        Ok(match at {
            RotaryAt::From(s) => {
                let c = self.cos.narrow(0, s, t)?.reshape((1, t, 1, 1, dh))?; // [1, T, 1, 1, dh]
                let n = self.sin.narrow(0, s, t)?.reshape((1, t, 1, 1, dh))?;
                (c, n)
            }
            RotaryAt::Rows { q, k } => {
                let pos = if keys { k } else { q };
                let idx = Tensor::from_slice(pos, b * t, self.cos.device())?;
                let c = self.cos.index_select(&idx, 0)?.reshape((b, t, 1, 1, dh))?; // [B, T, 1, 1, dh]
                let n = self.sin.index_select(&idx, 0)?.reshape((b, t, 1, 1, dh))?;
                (c, n)
            }
        })
    }

    /// `x cos + rotate_half(x) sin` for `x: [B, T, G, H, dh]` and angle tables broadcastable
    /// to it.
    fn rotate(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let half = self.head_dim / 2;
        let x1 = x.narrow(4, 0, half)?; // [B, T, G, H, dh/2]
        let x2 = x.narrow(4, half, half)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], 4)?; // [B, T, G, H, dh]
        Ok((x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?)?)
    }

    /// Rotates the queries and keys of a packed projection `qkv: [B, T, 3D]` (q, k, v one
    /// after the other, heads side by side) at positions `at`; the values pass through
    /// unchanged. Returns `[B, T, 3D]`, ready for the packed attention. On CPU `f32` one op.
    pub fn apply_qkv(&self, qkv: &Tensor, at: RotaryAt) -> Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let (h, dh) = (self.heads, self.head_dim);
        if d3 != 3 * h * dh {
            return Err(Error::Shape(format!(
                "rotary: qkv {:?}, expected [B, T, {}]",
                qkv.dims(),
                3 * h * dh
            )));
        }
        self.check(at, b, t)?;
        if crate::nn::fused::cpu_f32(&[qkv]) {
            let at = match at {
                RotaryAt::From(s) => At::From(s),
                RotaryAt::Rows { q, k } => At::Rows(Arc::new((q.to_vec(), k.to_vec()))),
            };
            let op = RotaryOp {
                host: self.host.clone(),
                at,
                heads: h,
                head_dim: dh,
                inverse: false,
            };
            return Ok(qkv.contiguous()?.apply_op1(op)?);
        }
        self.apply_qkv_composed(qkv, at)
    }

    /// [`Rotary::apply_qkv`] as a composition of candle ops (any device; the tests' reference).
    pub fn apply_qkv_composed(&self, qkv: &Tensor, at: RotaryAt) -> Result<Tensor> {
        let (b, t, d3) = qkv.dims3()?;
        let (h, dh) = (self.heads, self.head_dim);
        self.check(at, b, t)?;
        let x = qkv.reshape((b, t, 3, h, dh))?; // [B, T, 3, H, dh]
        let (qc, qs) = self.angles(at, b, t, false)?;
        let (kc, ks) = self.angles(at, b, t, true)?;
        let q = self.rotate(&x.narrow(2, 0, 1)?, &qc, &qs)?; // [B, T, 1, H, dh]
        let k = self.rotate(&x.narrow(2, 1, 1)?, &kc, &ks)?;
        let v = x.narrow(2, 2, 1)?; // [B, T, 1, H, dh]
        Ok(Tensor::cat(&[&q, &k, &v], 2)?.reshape((b, t, d3))?)
    }

    /// Rotates `x: [B, H, T, dh]` (queries or keys with heads first) at positions
    /// `start..start + T`.
    pub fn apply_heads(&self, x: &Tensor, start: usize) -> Result<Tensor> {
        let (b, h, t, dh) = x.dims4()?;
        if dh != self.head_dim {
            return Err(Error::Shape(format!(
                "rotary: head width {dh}, expected {}",
                self.head_dim
            )));
        }
        let at = RotaryAt::From(start);
        self.check(at, b, t)?;
        let (c, s) = self.angles(at, b, t, false)?;
        let y = x.transpose(1, 2)?.reshape((b, t, 1, h, dh))?; // [B, T, 1, H, dh]
        let y = self.rotate(&y, &c, &s)?; // [B, T, 1, H, dh]
        Ok(y.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()?) // [B, H, T, dh]
    }
}

/// The packed rotation `[B, T, 3D] -> [B, T, 3D]` on CPU `f32`: queries and keys rotated at
/// their positions, values copied. Its backward is the inverse rotation (angles negated),
/// itself this op with `inverse` set.
struct RotaryOp {
    host: Arc<(Vec<f32>, Vec<f32>)>,
    at: At,
    heads: usize,
    head_dim: usize,
    inverse: bool,
}

impl CustomOp1 for RotaryOp {
    fn name(&self) -> &'static str {
        "elbo-rotary"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(v) = s else {
            bail!("rotary: expected f32 storage")
        };
        let Some((a, z)) = l.contiguous_offsets() else {
            bail!("rotary: the input is not contiguous")
        };
        let x = &v[a..z];
        let (dh, d) = (self.head_dim, self.heads * self.head_dim);
        let (half, row) = (dh / 2, 3 * d);
        let t = match l.dims() {
            [_, t, w] if *w == row => *t,
            dims => bail!("rotary: input {dims:?}, expected [B, T, {row}]"),
        };
        let (cos, sin) = (&self.host.0, &self.host.1);
        let rows = x.len() / row;
        if (0..rows).any(|r| {
            let (pq, pk) = self.at.of(r, t);
            (pq.max(pk) + 1) * dh > cos.len()
        }) {
            bail!("rotary: positions beyond the table")
        }
        let sign = if self.inverse { -1.0f32 } else { 1.0 };
        let mut y = vec![0f32; x.len()];
        let one_row = |(r, (xr, yr)): (usize, (&[f32], &mut [f32]))| {
            let (pq, pk) = self.at.of(r, t);
            for (part, pos) in [(0usize, pq), (1, pk)] {
                let (c, sn) = (&cos[pos * dh..][..half], &sin[pos * dh..][..half]);
                for head in 0..self.heads {
                    let off = part * d + head * dh;
                    let (x1, x2) = xr[off..][..dh].split_at(half);
                    let (y1, y2) = yr[off..][..dh].split_at_mut(half);
                    for i in 0..half {
                        let s = sign * sn[i];
                        y1[i] = x1[i] * c[i] - x2[i] * s;
                        y2[i] = x2[i] * c[i] + x1[i] * s;
                    }
                }
            }
            yr[2 * d..].copy_from_slice(&xr[2 * d..]);
        };
        if x.len() >= 1 << 15 {
            x.par_chunks_exact(row)
                .zip(y.par_chunks_exact_mut(row))
                .enumerate()
                .for_each(one_row);
        } else {
            x.chunks_exact(row)
                .zip(y.chunks_exact_mut(row))
                .enumerate()
                .for_each(one_row);
        }
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let inverse = RotaryOp {
            host: self.host.clone(),
            at: self.at.clone(),
            heads: self.heads,
            head_dim: self.head_dim,
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1(inverse)?))
    }
}
