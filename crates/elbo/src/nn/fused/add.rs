//! The residual sum `a + b` of two same-shape CPU `f32` tensors as a custom op on rayon's pool.
//!
//! Candle's element-wise binary ops split large tensors over a separate barrier pool whose
//! worker spins between calls. In a training step whose other kernels (convolutions, norms)
//! run on rayon's threads, that worker and rayon's compete for the same cores, and on a
//! two-core machine the waits cost more than the sums. This op keeps the sum on rayon's pool;
//! its backward pass hands the output gradient to both inputs unchanged. The composed
//! reference is candle's `a + b`.

use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_f32;
use super::kernels::PAR_MIN;
use crate::Result;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 14;

/// `a + b` for same-shape tensors (records gradients); one rayon-parallel op on CPU `f32`,
/// candle's addition otherwise.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !cpu_f32(&[a, b]) || a.dims() != b.dims() {
        return Ok((a + b)?);
    }
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, ResidualAdd)?)
}

/// The op behind [`add`].
#[derive(Clone, Copy, Debug)]
struct ResidualAdd;

impl CustomOp2 for ResidualAdd {
    fn name(&self) -> &'static str {
        "elbo-residual-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.dims() != l2.dims() {
            bail!("residual add: shapes {:?} and {:?}", l1.dims(), l2.dims())
        }
        let a = crate::nn::conv::f32_contiguous(s1, l1, self.name())?;
        let b = crate::nn::conv::f32_contiguous(s2, l2, self.name())?;
        let mut y = vec![0f32; a.len()];
        let sum = |(y, (a, b)): (&mut [f32], (&[f32], &[f32]))| {
            for ((y, a), b) in y.iter_mut().zip(a).zip(b) {
                *y = a + b;
            }
        };
        if a.len() < PAR_MIN {
            sum((&mut y, (a, b)));
        } else {
            y.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(sum);
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.clone()), Some(grad.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Values and both gradients agree with candle's addition, on a small and a parallel size.
    #[test]
    fn matches_candle_add() {
        let mut rng = crate::Rng::new(5);
        for dims in [[2usize, 3, 5], [4, 100, 97]] {
            let a = Var::from_tensor(&rng.normal_tensor(&dims, &Device::Cpu).unwrap()).unwrap();
            let b = Var::from_tensor(&rng.normal_tensor(&dims, &Device::Cpu).unwrap()).unwrap();
            let r = rng.normal_tensor(&dims, &Device::Cpu).unwrap();
            let run = |y: Tensor| {
                let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                [
                    y,
                    g.get(a.as_tensor()).unwrap().clone(),
                    g.get(b.as_tensor()).unwrap().clone(),
                ]
                .map(|t| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            };
            let fused = run(add(a.as_tensor(), b.as_tensor()).unwrap());
            let composed = run((a.as_tensor() + b.as_tensor()).unwrap());
            assert_eq!(fused, composed, "{dims:?}");
        }
    }
}
