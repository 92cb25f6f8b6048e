//! Group normalisation (Wu & He 2018, "Group Normalization", eq. 1-3), optionally followed by
//! SiLU, with a differentiable composition and a fused channels-last CPU kernel.
//!
//! For `x` with `C` channels split into `G` groups, each (example, group) is normalised by its
//! own mean and biased variance over the group's channels and positions, then scaled and
//! shifted per channel: `y = (x - mu) / sqrt(var + eps) * gamma_c + beta_c`.
//!
//! [`group_norm`] (channels first, candle ops) is the reference. [`group_norm_nhwc`] runs on
//! channels-last `[B, ..., C]` as one custom op on CPU `f32` ([`GroupNormOp`]) whose backward
//! is the closed form (with `xhat = (x - mu) / sigma`, `g = dL/dy * gamma`, means over the
//! group): `dx = (g - mean(g) - xhat mean(g xhat)) / sigma`, `dgamma = sum dL/dy xhat`,
//! `dbeta = sum dL/dy`, after multiplying `dL/dy` by `silu'(y)` when SiLU is fused.
//! (candle-nn's `GroupNorm` is a composition too, but built through `VarBuilder`.)

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor, Var};
use rayon::prelude::*;

use super::conv::f32_contiguous;
use super::fused::{self, exp_f32};
use super::ParamInit;
use crate::{Error, Result};

fn check(dims: &[usize], c: usize, groups: usize, weight: &Tensor, bias: &Tensor) -> Result<()> {
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::Shape(format!(
            "group norm: {groups} groups do not divide {c} channels (input {dims:?})"
        )));
    }
    if weight.dims() != [c] || bias.dims() != [c] {
        return Err(Error::Shape(format!(
            "group norm: weight {:?} and bias {:?} must be [{c}]",
            weight.dims(),
            bias.dims()
        )));
    }
    Ok(())
}

/// Group norm of channels-first `x: [B, C, ...]` with per-channel `weight`, `bias: [C]`
/// (composed from candle ops; the reference for [`group_norm_nhwc`]).
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
    check(&dims, c, groups, weight, bias)?;
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

/// Group norm (then SiLU when `silu`) of channels-last `x: [B, ..., C]`. One fused op with its
/// own backward on CPU `f32`; a composition of candle ops elsewhere.
pub fn group_norm_nhwc(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 {
        return Err(Error::Shape(format!(
            "group norm: expected [B, ..., C], got {dims:?}"
        )));
    }
    let (b, c) = (dims[0], dims[dims.len() - 1]);
    check(&dims, c, groups, weight, bias)?;
    if fused::cpu_f32(&[x, weight, bias]) {
        let op = GroupNormOp {
            groups,
            eps: eps as f32,
            silu,
        };
        let x3 = x.reshape((b, (), c))?.contiguous()?; // [B, S, C]
        let y = x3.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)?;
        return Ok(y.reshape(dims)?);
    }
    let xg = x.reshape((b, (), groups, c / groups))?; // [B, S, G, C/G]
    let mean = xg.mean_keepdim(3)?.mean_keepdim(1)?; // [B, 1, G, 1]
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(3)?.mean_keepdim(1)?; // [B, 1, G, 1]
    let xn = xc
        .broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?
        .reshape(dims)?;
    let y = xn.broadcast_mul(weight)?.broadcast_add(bias)?;
    Ok(if silu { y.silu()? } else { y })
}

/// The fused group norm (+ SiLU) on `x: [B, S, C]`, `gamma`, `beta: [C]` (CPU, f32).
#[derive(Clone, Copy, Debug)]
pub struct GroupNormOp {
    /// Number of groups (divides `C`).
    pub groups: usize,
    /// Variance floor.
    pub eps: f32,
    /// Apply SiLU after the affine map.
    pub silu: bool,
}

#[inline(always)]
fn sigmoid(y: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-y))
}

/// Per-group mean and `1 / sqrt(var + eps)` of one example `x: [S, C]`: per-channel sums in
/// f32 (vectorised over the channels of a row), combined per group in f64; the variance is
/// taken around the mean (two passes) so it does not cancel.
#[inline(always)]
fn group_stats(x: &[f32], c: usize, groups: usize, eps: f32) -> Vec<(f32, f32)> {
    let cg = c / groups;
    let n = (x.len() / c * cg) as f64;
    let mut s1 = vec![0f32; c];
    for row in x.chunks_exact(c) {
        for (a, &v) in s1.iter_mut().zip(row) {
            *a += v;
        }
    }
    let means: Vec<f32> = s1
        .chunks_exact(cg)
        .map(|g| (g.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32)
        .collect();
    let mc: Vec<f32> = (0..c).map(|j| means[j / cg]).collect();
    let mut s2 = vec![0f32; c];
    for row in x.chunks_exact(c) {
        for ((a, &v), &m) in s2.iter_mut().zip(row).zip(&mc) {
            let d = v - m;
            *a += d * d;
        }
    }
    s2.chunks_exact(cg)
        .zip(&means)
        .map(|(g, &m)| {
            let var = (g.iter().map(|&v| f64::from(v)).sum::<f64>() / n) as f32;
            (m, 1.0 / (var + eps).sqrt())
        })
        .collect()
}

/// Group norm (+ SiLU) of one example `x: [S, C]` into `y` (the per-example kernel of
/// [`GroupNormOp`], built for AVX2 + FMA when the CPU has them).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn forward_example_base(
    x: &[f32],
    y: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    g: usize,
    eps: f32,
    silu: bool,
) {
    let c = gamma.len();
    let cg = c / g;
    let st = group_stats(x, c, g, eps);
    // y = x a_c + b_c with a_c = rstd gamma_c, b_c = beta_c - mean a_c
    let a: Vec<f32> = (0..c).map(|j| st[j / cg].1 * gamma[j]).collect();
    let sh: Vec<f32> = (0..c).map(|j| beta[j] - st[j / cg].0 * a[j]).collect();
    let (a, sh) = (&a[..c], &sh[..c]);
    for (yr, xr) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        let (yr, xr) = (&mut yr[..c], &xr[..c]);
        if silu {
            for j in 0..c {
                let v = xr[j] * a[j] + sh[j];
                yr[j] = v * sigmoid(v);
            }
        } else {
            for j in 0..c {
                yr[j] = xr[j] * a[j] + sh[j];
            }
        }
    }
}

/// The backward pass of [`GroupNormOp`] on one example: `dx` from `x`, `dL/dout` (`go`), and
/// the per-channel sums `(sum dy xhat, sum dy)` for the parameter gradients.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn backward_example_base(
    x: &[f32],
    go: &[f32],
    dx: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    g: usize,
    eps: f32,
    silu: bool,
) -> (Vec<f32>, Vec<f32>) {
    let c = gamma.len();
    let cg = c / g;
    let n = (x.len() / c.max(1) * cg) as f32;
    let st = group_stats(x, c, g, eps);
    let mc: Vec<f32> = (0..c).map(|j| st[j / cg].0).collect();
    let rc: Vec<f32> = (0..c).map(|j| st[j / cg].1).collect();
    let (mut sdy, mut sdyx) = (vec![0f32; c], vec![0f32; c]);
    // pass 1: dy (after SiLU'), stored in dx, and per-channel sums of dy, dy xhat;
    // y = x a + b and xhat = x r + o per channel
    let a: Vec<f32> = (0..c).map(|j| rc[j] * gamma[j]).collect();
    let bsh: Vec<f32> = (0..c).map(|j| beta[j] - mc[j] * a[j]).collect();
    let o: Vec<f32> = (0..c).map(|j| -mc[j] * rc[j]).collect();
    let (a, bsh, o, rc_) = (&a[..c], &bsh[..c], &o[..c], &rc[..c]);
    let (s1, s2) = (&mut sdy[..c], &mut sdyx[..c]);
    for ((dr, xr), gr) in dx
        .chunks_exact_mut(c)
        .zip(x.chunks_exact(c))
        .zip(go.chunks_exact(c))
    {
        let (dr, xr, gr) = (&mut dr[..c], &xr[..c], &gr[..c]);
        if silu {
            for j in 0..c {
                let y = xr[j] * a[j] + bsh[j];
                let sg = sigmoid(y);
                let dy = gr[j] * sg * (1.0 + y * (1.0 - sg));
                dr[j] = dy;
                s1[j] += dy;
                s2[j] += dy * (xr[j] * rc_[j] + o[j]);
            }
        } else {
            for j in 0..c {
                let dy = gr[j];
                dr[j] = dy;
                s1[j] += dy;
                s2[j] += dy * (xr[j] * rc_[j] + o[j]);
            }
        }
    }
    // group means of g = dy gamma and g xhat
    let mut m1 = vec![0f32; g];
    let mut m2 = vec![0f32; g];
    for j in 0..c {
        m1[j / cg] += sdy[j] * gamma[j] / n;
        m2[j / cg] += sdyx[j] * gamma[j] / n;
    }
    // pass 2: dx = r (dy gamma - m1 - xhat m2)
    let m1c: Vec<f32> = (0..c).map(|j| m1[j / cg]).collect();
    let m2c: Vec<f32> = (0..c).map(|j| m2[j / cg]).collect();
    // dx = r dy gamma - r m1 - (x r + o) r m2 = x p + dy q + u per channel
    let p: Vec<f32> = (0..c).map(|j| -rc[j] * rc[j] * m2c[j]).collect();
    let q: Vec<f32> = (0..c).map(|j| rc[j] * gamma[j]).collect();
    let u: Vec<f32> = (0..c)
        .map(|j| -rc[j] * m1c[j] - o[j] * rc[j] * m2c[j])
        .collect();
    let (p, q, u) = (&p[..c], &q[..c], &u[..c]);
    for (dr, xr) in dx.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
        let (dr, xr) = (&mut dr[..c], &xr[..c]);
        for j in 0..c {
            dr[j] = xr[j] * p[j] + dr[j] * q[j] + u[j];
        }
    }
    (sdyx, sdy)
}

/// Defines `$public`, which runs `$base` compiled for AVX-512 (as `$avx512`) or AVX2 + FMA (as
/// `$avx2`) when the CPU has them and as built otherwise (wider vectors for the same
/// straight-line loops, which are vectorised across channels; Rust does not contract
/// `a * b + c` into an FMA, so every build gives identical results).
macro_rules! dispatch {
    ($public:ident / $avx512:ident / $avx2:ident => $base:ident ($($p:ident : $t:ty),*) $(-> $ret:ty)?) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx512($($p: $t),*) $(-> $ret)? {
            $base($($p),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx2($($p: $t),*) $(-> $ret)? {
            $base($($p),*)
        }

        #[allow(clippy::too_many_arguments)]
        fn $public($($p: $t),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `$avx512` is built for; no other
                    // precondition.
                    return unsafe { $avx512($($p),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `$avx2` is built for; no other
                    // precondition.
                    return unsafe { $avx2($($p),*) };
                }
            }
            $base($($p),*)
        }
    };
}

dispatch!(forward_example / forward_example_avx512 / forward_example_avx2 => forward_example_base(
    x: &[f32], y: &mut [f32], gamma: &[f32], beta: &[f32], g: usize, eps: f32, silu: bool
));
dispatch!(backward_example / backward_example_avx512 / backward_example_avx2 => backward_example_base(
    x: &[f32], go: &[f32], dx: &mut [f32], gamma: &[f32], beta: &[f32], g: usize, eps: f32,
    silu: bool
) -> (Vec<f32>, Vec<f32>));

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "elbo-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, c) = xl.shape().dims3()?;
        let (x, gamma, beta) = (
            f32_contiguous(xs, xl, self.name())?,
            f32_contiguous(ws, wl, self.name())?,
            f32_contiguous(bs, bl, self.name())?,
        );
        let g = self.groups;
        if g == 0 || c % g != 0 || gamma.len() != c || beta.len() != c {
            bail!("group norm: bad shapes x {:?}, {} groups", xl.dims(), g)
        }
        let mut out = vec![0f32; b * s * c];
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), xl.shape().clone()));
        }
        out.par_chunks_mut(s * c)
            .zip(x.par_chunks(s * c))
            .for_each(|(y, x)| forward_example(x, y, gamma, beta, g, self.eps, self.silu));
        Ok((CpuStorage::F32(out), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = GroupNormBackward {
            fwd: *self,
            beta: beta.to_vec1::<f32>()?,
            param_grads: Mutex::new(None),
        };
        let dx = x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &op)?;
        let Ok(Some((dg, db))) = op.param_grads.into_inner() else {
            bail!("group norm backward: the parameter gradients were not computed")
        };
        let c = dg.len();
        let dev = x.device();
        Ok((
            x.track_op().then_some(dx),
            Some(Tensor::from_vec(dg, c, dev)?),
            Some(Tensor::from_vec(db, c, dev)?),
        ))
    }
}

/// The backward pass of [`GroupNormOp`] as an op on `(x, gamma, dL/dout)` giving `dL/dx`, and
/// leaving `(dgamma, dbeta)` in `param_grads`.
struct GroupNormBackward {
    fwd: GroupNormOp,
    beta: Vec<f32>,
    param_grads: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp3 for GroupNormBackward {
    fn name(&self) -> &'static str {
        "elbo-group-norm-backward"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, s, c) = xl.shape().dims3()?;
        let (x, gamma, gout) = (
            f32_contiguous(xs, xl, self.name())?,
            f32_contiguous(ws, wl, self.name())?,
            f32_contiguous(gs, gl, self.name())?,
        );
        if gout.len() != x.len() || gamma.len() != c || self.beta.len() != c {
            bail!(
                "group norm backward: gradient {:?} for input {:?}",
                gl.dims(),
                xl.dims()
            )
        }
        let (g, eps, silu) = (self.fwd.groups, self.fwd.eps, self.fwd.silu);
        let beta = &self.beta;
        let mut dx = vec![0f32; b * s * c];
        let partial: Vec<(Vec<f32>, Vec<f32>)> = dx
            .par_chunks_mut(s * c)
            .zip(x.par_chunks(s * c))
            .zip(gout.par_chunks(s * c))
            .map(|((dx, x), go)| backward_example(x, go, dx, gamma, beta, g, eps, silu))
            .collect();
        let mut dgamma = vec![0f32; c];
        let mut dbeta = vec![0f32; c];
        for (a, bb) in &partial {
            for j in 0..c {
                dgamma[j] += a[j];
                dbeta[j] += bb[j];
            }
        }
        match self.param_grads.lock() {
            Ok(mut p) => *p = Some((dgamma, dbeta)),
            Err(_) => bail!("group norm backward: lock poisoned"),
        }
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
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
        if groups == 0 || !channels.is_multiple_of(groups) {
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

    /// Channels-first `x: [B, C, ...]` -> same shape (composed ops).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(
            x,
            self.groups,
            self.weight.as_tensor(),
            self.bias.as_tensor(),
            self.eps,
        )
    }

    /// Channels-last `x: [B, ..., C]` -> same shape, then SiLU when `silu` (fused on CPU).
    pub fn forward_nhwc(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        group_norm_nhwc(
            x,
            self.groups,
            self.weight.as_tensor(),
            self.bias.as_tensor(),
            self.eps,
            silu,
        )
    }
}
