//! Nearest-neighbour upsampling by 2 (the `Upsample` of Ho et al. 2020 before its
//! convolution), composed from candle ops and as one channels-last custom op.
//!
//! The composition is a reshape of a broadcast: its forward pass materialises the broadcast
//! through a strided copy and its backward pass reduces over the two broadcast axes with
//! candle's generic strided sum. [`Upsample2Nhwc`] copies each input pixel's `C` channels into
//! its 2x2 block directly (each output row is built once and copied to the row below), and its
//! backward pass is the adjoint: the sum of each 2x2 block of the gradient, one contiguous run
//! of `C` channels at a time.

use candle_core::{bail, CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::nn::conv::f32_contiguous;
use crate::nn::fused;
use crate::Result;

/// Input floats below which the op runs on the calling thread.
const PAR_MIN: usize = 1 << 15;

/// Nearest-neighbour upsampling by 2 as a reshape of a broadcast (so its gradient is the sum
/// over each 2x2 block): `[B, C, H, W]` -> `[B, C, 2H, 2W]`.
pub fn upsample_nearest2(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// [`upsample_nearest2`] on channels-last maps: `[B, H, W, C]` -> `[B, 2H, 2W, C]`; one
/// [`Upsample2Nhwc`] op on CPU `f32`, the composition elsewhere.
pub fn upsample_nearest2_nhwc(x: &Tensor) -> Result<Tensor> {
    x.dims4()?;
    if fused::cpu_f32(&[x]) {
        return Ok(x.contiguous()?.apply_op1(Upsample2Nhwc)?);
    }
    upsample_nearest2_nhwc_composed(x)
}

/// The composed reference of [`upsample_nearest2_nhwc`] (candle ops, records gradients).
pub fn upsample_nearest2_nhwc_composed(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    Ok(x.reshape((b, h, 1, w, 1, c))?
        .broadcast_as((b, h, 2, w, 2, c))?
        .reshape((b, 2 * h, 2 * w, c))?)
}

/// Nearest-neighbour upsampling by 2 of contiguous channels-last `f32` maps on the CPU,
/// `[B, H, W, C]` -> `[B, 2H, 2W, C]`; its backward pass sums each 2x2 block.
#[derive(Clone, Copy, Debug)]
pub struct Upsample2Nhwc;

/// One input row `[W, C]` to the two output rows `[2, 2W, C]` it covers.
fn up_row(src: &[f32], dst: &mut [f32], c: usize) {
    let (top, bottom) = dst.split_at_mut(dst.len() / 2);
    for (px, pair) in src.chunks_exact(c).zip(top.chunks_exact_mut(2 * c)) {
        pair[..c].copy_from_slice(px);
        pair[c..].copy_from_slice(px);
    }
    bottom.copy_from_slice(top);
}

/// The two gradient rows `[2, 2W, C]` of one input row to its gradient `[W, C]`.
fn down_row(src: &[f32], dst: &mut [f32], c: usize) {
    let (top, bottom) = src.split_at(src.len() / 2);
    for ((d, t), u) in dst
        .chunks_exact_mut(c)
        .zip(top.chunks_exact(2 * c))
        .zip(bottom.chunks_exact(2 * c))
    {
        for j in 0..c {
            d[j] = (t[j] + t[c + j]) + (u[j] + u[c + j]);
        }
    }
}

/// Apply `f(input row, output rows)` to the `n` row pairs, in parallel when large.
fn rows(src: &[f32], dst: &mut [f32], n: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) {
    if n == 0 || src.is_empty() || dst.is_empty() {
        return;
    }
    let (sr, dr) = (src.len() / n, dst.len() / n);
    if src.len().max(dst.len()) < PAR_MIN {
        for (s, d) in src.chunks_exact(sr).zip(dst.chunks_exact_mut(dr)) {
            f(s, d);
        }
    } else {
        src.par_chunks_exact(sr)
            .zip(dst.par_chunks_exact_mut(dr))
            .for_each(|(s, d)| f(s, d));
    }
}

impl CustomOp1 for Upsample2Nhwc {
    fn name(&self) -> &'static str {
        "elbo-upsample2-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = l.shape().dims4()?;
        let x = f32_contiguous(s, l, self.name())?;
        let mut y = vec![0f32; 4 * x.len()];
        rows(x, &mut y, b * h, |s, d| up_row(s, d, c));
        Ok((CpuStorage::F32(y), Shape::from((b, 2 * h, 2 * w, c))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Upsample2Backward)?))
    }
}

/// The adjoint of [`Upsample2Nhwc`]: `[B, 2H, 2W, C]` -> `[B, H, W, C]`, summing each 2x2
/// block.
#[derive(Clone, Copy, Debug)]
struct Upsample2Backward;

impl CustomOp1 for Upsample2Backward {
    fn name(&self) -> &'static str {
        "elbo-upsample2-nhwc-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, h2, w2, c) = l.shape().dims4()?;
        if h2 % 2 != 0 || w2 % 2 != 0 {
            bail!("upsample backward: odd gradient size {:?}", l.dims())
        }
        let g = f32_contiguous(s, l, self.name())?;
        let (h, w) = (h2 / 2, w2 / 2);
        let mut dx = vec![0f32; b * h * w * c];
        rows(g, &mut dx, b * h, |s, d| down_row(s, d, c));
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1(Upsample2Nhwc)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op and the composition agree exactly, values and gradients, on odd channel counts
    /// and on maps large enough for the parallel path.
    #[test]
    fn op_matches_the_composition() {
        let mut rng = crate::Rng::new(3);
        for dims in [[2, 3, 5, 7], [1, 1, 1, 1], [3, 14, 14, 64]] {
            let x = Var::from_tensor(&rng.normal_tensor(&dims, &Device::Cpu).unwrap()).unwrap();
            let (b, h, w, c) = (dims[0], dims[1], dims[2], dims[3]);
            let r = rng
                .normal_tensor(&[b, 2 * h, 2 * w, c], &Device::Cpu)
                .unwrap();
            let run = |f: fn(&Tensor) -> Result<Tensor>| {
                let y = f(x.as_tensor()).unwrap();
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
                (
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    gx.to_vec1::<f32>().unwrap(),
                )
            };
            let (y1, g1) = run(upsample_nearest2_nhwc);
            let (y2, g2) = run(upsample_nearest2_nhwc_composed);
            assert_eq!(y1, y2, "{dims:?}: values");
            for (a, e) in g1.iter().zip(&g2) {
                assert!(
                    (a - e).abs() <= 1e-5 * (1.0 + e.abs()),
                    "{dims:?}: {a} vs {e}"
                );
            }
        }
    }
}
