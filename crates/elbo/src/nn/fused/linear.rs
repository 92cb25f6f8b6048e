//! The fused `act(x W^T + b)` custom op (CPU, f32) and its backward pass.
//!
//! Forward: the packed GEMM of [`super::packed`] (W packed once per call, the rows of `x` read
//! per cache block), which adds the bias and applies the activation to each block of rows while
//! it is in cache, saving `act'(z)` for the backward pass when a graph is recorded; candle's
//! matmul and a separate pass when an operand is not contiguous. Backward: one pass computes
//! `dz = dy * act'(z)` and the bias gradient (the column sums of `dz`) together, then two GEMMs
//! through candle's matmul (the `gemm` crate, which measured faster than the packed GEMM for
//! these shapes) give `dx = dz W` and `dW = dz^T x`; a gradient is computed only for the inputs
//! that track one.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};

use super::kernels::{self, RowAct};
use super::packed::PackedLinear;

/// A contiguous `f32` view of `s` under layout `l`.
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        bail!("{what}: expected f32, got {:?}", s.dtype())
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => bail!("{what}: the tensor is not contiguous"),
    }
}

/// A mutable contiguous `f32` view of `s` under layout `l`.
pub(crate) fn f32_slice_mut<'a>(
    s: &'a mut CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a mut [f32]> {
    let dtype = s.dtype();
    let CpuStorage::F32(v) = s else {
        bail!("{what}: expected f32, got {dtype:?}")
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut v[a..b]),
        None => bail!("{what}: the tensor is not contiguous"),
    }
}

/// `act(x W^T + b)` for `x: [B, in]`, `W: [out, in]`, `b: [out]`.
pub(crate) struct LinearAct {
    act: RowAct,
    /// `silu'(z)` from the forward pass, `[B, out]` row-major; `None` inside when not recorded
    /// (identity activation, or no input tracks a gradient).
    deriv: Mutex<Option<Vec<f32>>>,
    /// Whether the forward pass should save `silu'(z)`.
    save: bool,
}

impl LinearAct {
    /// The op; `save` asks the forward pass to keep what the backward pass needs.
    pub(crate) fn new(act: RowAct, save: bool) -> Self {
        Self {
            act,
            deriv: Mutex::new(None),
            save,
        }
    }
}

impl CustomOp3 for LinearAct {
    fn name(&self) -> &'static str {
        match self.act {
            RowAct::Identity => "elbo-linear",
            RowAct::Silu => "elbo-linear-silu",
            RowAct::GeluErf => "elbo-linear-gelu",
        }
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
        let (rows, d_in) = xl.shape().dims2()?;
        let (d_out, w_in) = wl.shape().dims2()?;
        let b_out = bl.shape().dims1()?;
        if w_in != d_in || b_out != d_out {
            bail!(
                "{}: x {:?}, W {:?} and b {:?} do not fit together",
                self.name(),
                xl.dims(),
                wl.dims(),
                bl.dims()
            )
        }
        let b = f32_slice(bs, bl, "fused linear bias")?;
        let save = self.act != RowAct::Identity && self.save;
        if let (Ok(x), Ok(w)) = (f32_slice(xs, xl, "x"), f32_slice(ws, wl, "W")) {
            // the packed GEMM with bias and activation applied in cache (see `packed`)
            let (y, d) = PackedLinear::new(w, b, d_out, d_in)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))?
                .forward_new(x, rows, self.act, save);
            if let Some(d) = d {
                match self.deriv.lock() {
                    Ok(mut g) => *g = Some(d),
                    Err(_) => bail!("{}: saved-derivative lock poisoned", self.name()),
                }
            }
            return Ok((CpuStorage::F32(y), Shape::from((rows, d_out))));
        }
        let z = xs.matmul(ws, (1, rows, d_out, d_in), xl, &wl.transpose(0, 1)?)?;
        let CpuStorage::F32(mut y) = z else {
            bail!("{}: expected f32 inputs, got {:?}", self.name(), xs.dtype())
        };
        if self.act != RowAct::Identity && self.save {
            let mut d = vec![0f32; y.len()];
            kernels::bias_act_rows(&mut y, Some(&mut d), b, self.act);
            match self.deriv.lock() {
                Ok(mut g) => *g = Some(d),
                Err(_) => bail!("{}: saved-derivative lock poisoned", self.name()),
            }
        } else {
            kernels::bias_act_rows(&mut y, None, b, self.act);
        }
        Ok((CpuStorage::F32(y), Shape::from((rows, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (gz, bias_grad) = match self.act {
            RowAct::Identity => (grad.clone(), grad.apply_op1_no_bwd(&ColumnSums)?),
            RowAct::Silu | RowAct::GeluErf => {
                let guard = match self.deriv.lock() {
                    Ok(g) => g,
                    Err(_) => bail!("{}: saved-derivative lock poisoned", self.name()),
                };
                let Some(deriv) = guard.as_deref() else {
                    bail!("{}: backward without a saved forward pass", self.name())
                };
                let op = SiluBackward {
                    deriv,
                    col_sums: Mutex::new(Vec::new()),
                };
                let gz = grad.apply_op1_no_bwd(&op)?;
                let sums = match op.col_sums.into_inner() {
                    Ok(s) => s,
                    Err(_) => bail!("{}: bias-gradient lock poisoned", self.name()),
                };
                let n = sums.len();
                (gz, Tensor::from_vec(sums, n, grad.device())?)
            }
        };
        let gx = if x.track_op() {
            Some(gz.matmul(w)?) // [B, out] x [out, in]
        } else {
            None
        };
        let gw = if w.track_op() {
            Some(gz.t()?.matmul(x)?) // [out, B] x [B, in]
        } else {
            None
        };
        let gb = b.track_op().then_some(bias_grad);
        Ok((gx, gw, gb))
    }
}

/// `dz = dy * silu'(z)` for `dy: [B, out]`, also leaving the column sums of `dz` (the bias
/// gradient) in `col_sums`.
struct SiluBackward<'a> {
    deriv: &'a [f32],
    col_sums: Mutex<Vec<f32>>,
}

impl CustomOp1 for SiluBackward<'_> {
    fn name(&self) -> &'static str {
        "elbo-silu-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, cols) = l.shape().dims2()?;
        let g = f32_slice(s, l, self.name())?;
        if g.len() != self.deriv.len() {
            bail!(
                "{}: gradient has {} elements but the forward pass saved {}",
                self.name(),
                g.len(),
                self.deriv.len()
            )
        }
        let mut out = vec![0f32; g.len()];
        let sums = kernels::mul_colsum(g, Some((self.deriv, &mut out)), cols);
        match self.col_sums.lock() {
            Ok(mut c) => *c = sums,
            Err(_) => bail!("{}: lock poisoned", self.name()),
        }
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// The column sums of a `[B, out]` matrix, `[out]`.
struct ColumnSums;

impl CustomOp1 for ColumnSums {
    fn name(&self) -> &'static str {
        "elbo-column-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, cols) = l.shape().dims2()?;
        let g = f32_slice(s, l, self.name())?;
        let sums = kernels::mul_colsum(g, None, cols);
        Ok((CpuStorage::F32(sums), Shape::from(cols)))
    }
}
