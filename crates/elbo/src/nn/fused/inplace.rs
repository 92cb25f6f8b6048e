//! In-place optimiser-state updates on CPU through candle's `inplace_op` machinery.
//!
//! candle's in-place ops write one destination tensor. An AdamW step writes three (the
//! parameter and its two moments), so the op nests: the op on the parameter (reading the
//! gradient) runs an op on the first moment, which runs an op on the second; the innermost one
//! holds all four slices and does the whole update in one pass. Each level locks a different
//! storage, so the nesting needs the moments to own their storage (callers create them with
//! `Tensor::zeros` or `Tensor::copy`, never as views of one another).

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, InplaceOp1, InplaceOp2, Layout, Tensor};

use super::kernels::{self, AdamWScalars};
use super::linear::{f32_slice, f32_slice_mut};

/// One AdamW update of the parameter `p` and its moments `m`, `v` from the gradient `g`, in
/// place, in one pass over the four slices (CPU, f32, contiguous, equal element counts, and four
/// distinct storages).
pub(crate) fn adamw_inplace(
    p: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    h: AdamWScalars,
) -> candle_core::Result<()> {
    p.inplace_op2(g, &ParamStage { m, v, h })
}

/// Outer level: the parameter (destination) and the gradient (source).
struct ParamStage<'a> {
    m: &'a Tensor,
    v: &'a Tensor,
    h: AdamWScalars,
}

impl InplaceOp2 for ParamStage<'_> {
    fn name(&self) -> &'static str {
        "elbo-adamw"
    }

    fn cpu_fwd(
        &self,
        ps: &mut CpuStorage,
        pl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let p = f32_slice_mut(ps, pl, "AdamW parameter")?;
        let g = f32_slice(gs, gl, "AdamW gradient")?;
        if g.len() != p.len() {
            bail!(
                "AdamW: gradient has {} elements, parameter {}",
                g.len(),
                p.len()
            )
        }
        self.m.inplace_op1(&MomentStage {
            p: RefCell::new(Some(p)),
            g,
            v: self.v,
            h: self.h,
        })
    }
}

/// Middle level: the first moment.
struct MomentStage<'a, 'b> {
    p: RefCell<Option<&'b mut [f32]>>,
    g: &'b [f32],
    v: &'a Tensor,
    h: AdamWScalars,
}

impl InplaceOp1 for MomentStage<'_, '_> {
    fn name(&self) -> &'static str {
        "elbo-adamw-m"
    }

    fn cpu_fwd(&self, ms: &mut CpuStorage, ml: &Layout) -> candle_core::Result<()> {
        let m = f32_slice_mut(ms, ml, "AdamW first moment")?;
        let Some(p) = self.p.borrow_mut().take() else {
            bail!("{}: run twice", self.name())
        };
        self.v.inplace_op1(&FinalStage {
            p: RefCell::new(Some(p)),
            m: RefCell::new(Some(m)),
            g: self.g,
            h: self.h,
        })
    }
}

/// Inner level: the second moment; does the update.
struct FinalStage<'b, 'c> {
    p: RefCell<Option<&'b mut [f32]>>,
    m: RefCell<Option<&'c mut [f32]>>,
    g: &'b [f32],
    h: AdamWScalars,
}

impl InplaceOp1 for FinalStage<'_, '_> {
    fn name(&self) -> &'static str {
        "elbo-adamw-v"
    }

    fn cpu_fwd(&self, vs: &mut CpuStorage, vl: &Layout) -> candle_core::Result<()> {
        let v = f32_slice_mut(vs, vl, "AdamW second moment")?;
        let (Some(p), Some(m)) = (self.p.borrow_mut().take(), self.m.borrow_mut().take()) else {
            bail!("{}: run twice", self.name())
        };
        if m.len() != p.len() || v.len() != p.len() {
            bail!(
                "AdamW: moments have {} and {} elements, parameter {}",
                m.len(),
                v.len(),
                p.len()
            )
        }
        kernels::adamw_update(p, m, v, self.g, &self.h);
        Ok(())
    }
}

/// `e <- d e + (1 - d) p` in place (CPU; f32 or f64, both the same dtype; contiguous).
pub(crate) fn ema_inplace(e: &Tensor, p: &Tensor, d: f64) -> candle_core::Result<()> {
    e.inplace_op2(p, &EmaStage { d })
}

struct EmaStage {
    d: f64,
}

impl InplaceOp2 for EmaStage {
    fn name(&self) -> &'static str {
        "elbo-ema"
    }

    fn cpu_fwd(
        &self,
        es: &mut CpuStorage,
        el: &Layout,
        ps: &CpuStorage,
        pl: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((e0, e1)), Some((p0, p1))) = (el.contiguous_offsets(), pl.contiguous_offsets())
        else {
            bail!("{}: the tensors are not contiguous", self.name())
        };
        if e1 - e0 != p1 - p0 {
            bail!("{}: {} vs {} elements", self.name(), e1 - e0, p1 - p0)
        }
        let d = self.d;
        match (es, ps) {
            (CpuStorage::F32(e), CpuStorage::F32(p)) => {
                kernels::ema_update(&mut e[e0..e1], &p[p0..p1], d as f32, (1.0 - d) as f32)
            }
            (CpuStorage::F64(e), CpuStorage::F64(p)) => {
                kernels::ema_update(&mut e[e0..e1], &p[p0..p1], d, 1.0 - d)
            }
            (e, p) => bail!(
                "{}: unsupported dtypes {:?} / {:?}",
                self.name(),
                e.dtype(),
                p.dtype()
            ),
        }
        Ok(())
    }
}
