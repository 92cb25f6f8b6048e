//! 2-D convolution (cross-correlation, as `torch.nn.Conv2d`) computed as im2col + GEMM on
//! channels-last images `[B, H, W, C]`.
//!
//! A `k x k` convolution with stride `s` and zero padding `p` is `cols(x) W^T + b`, where
//! `cols(x): [B H' W', k k C]` gathers each output pixel's receptive field and
//! `W: [out, k k C]`. In the channels-last layout the `k` pixels of one kernel row are adjacent,
//! so the gather is one `memcpy` of `k C` floats per kernel row. On CPU `f32` the whole
//! convolution is one custom op, [`Conv2dOp`] (threaded tiles, never the whole column matrix:
//! `tiled.rs`), whose backward recomputes the columns and returns `dW = dy^T cols`,
//! `db = sum dy` and `dx` (a convolution of `dy` for stride 1, `col2im(dy W)` otherwise): only
//! image-sized gradients pass through candle's gradient store. A per-image shift of the output
//! (`[B, out]`, e.g. a time embedding) can ride on the bias ([`Conv2d::forward_nhwc_shifted`]). [`Im2Col`] and its adjoint [`Col2Im`] are also custom ops with each
//! other as backward. 1x1 convolutions are the fused linear op of [`crate::nn::fused`]. Other
//! devices fall back to candle's `conv2d` (NCHW).
//!
//! candle's own CPU `conv2d` is the reference in `tests/nn/unet.rs`; its backward (a naive
//! transposed convolution, gradients accumulated through the graph) made a U-Net training step
//! several times slower, and it derives the width of the input gradient from the height, which
//! is wrong for strided inputs whose height and width leave different remainders.

mod im2col;
mod op;
mod tiled;

pub use im2col::{Col2Im, Im2Col};
pub use op::Conv2dOp;
pub use tiled::TILE_FLOATS;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Tensor, Var};

use super::fused::{self, FusedAct};
use super::ParamInit;
use crate::{Error, Result};

/// The geometry of a square convolution window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Kernel size `k`.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on every side.
    pub padding: usize,
}

impl Window {
    /// Output size along a dimension of input size `n`, or `None` if the window does not fit.
    pub fn out_size(&self, n: usize) -> Option<usize> {
        (n + 2 * self.padding)
            .checked_sub(self.k)
            .map(|r| r / self.stride + 1)
    }
}

/// A contiguous `f32` view of `s` under layout `l`.
pub(crate) fn f32_contiguous<'a>(
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

/// A `k x k` convolution with weight `[out, k k in]` (column order `(ky, kx, c)`) and bias
/// `[out]`, on channels-last images.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Var,
    bias: Var,
    win: Window,
    c_in: usize,
}

impl Conv2d {
    /// Initialised as `torch.nn.Conv2d`: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)),
    /// `fan_in = in k^2` (Kaiming-uniform with a = sqrt(5), He et al. 2015).
    pub fn new(p: &mut ParamInit, c_in: usize, c_out: usize, win: Window) -> Result<Self> {
        Self::with_scale(p, c_in, c_out, win, 1.0)
    }

    /// [`Conv2d::new`] with both bounds multiplied by `scale` (a read-out that starts near
    /// zero, yet passes gradient to the layers before it from the first step).
    pub fn with_scale(
        p: &mut ParamInit,
        c_in: usize,
        c_out: usize,
        win: Window,
        scale: f64,
    ) -> Result<Self> {
        Self::check(c_in, c_out, win)?;
        let fan_in = c_in * win.k * win.k;
        let bound = scale / (fan_in as f64).sqrt();
        Ok(Self {
            weight: p.uniform("weight", &[c_out, fan_in], bound)?,
            bias: p.uniform("bias", &[c_out], bound)?,
            win,
            c_in,
        })
    }

    /// A convolution whose weight and bias start at zero (the output layers of the residual
    /// blocks and the head in improved DDPM, so each block starts as the identity).
    pub fn zeros(p: &mut ParamInit, c_in: usize, c_out: usize, win: Window) -> Result<Self> {
        Self::check(c_in, c_out, win)?;
        Ok(Self {
            weight: p.constant("weight", &[c_out, c_in * win.k * win.k], 0.0)?,
            bias: p.constant("bias", &[c_out], 0.0)?,
            win,
            c_in,
        })
    }

    fn check(c_in: usize, c_out: usize, win: Window) -> Result<()> {
        if c_in == 0 || c_out == 0 || win.k == 0 || win.stride == 0 {
            return Err(Error::Config(format!(
                "conv2d: channels ({c_in} -> {c_out}), kernel size ({}) and stride ({}) must be \
                 at least 1",
                win.k, win.stride
            )));
        }
        Ok(())
    }

    /// The kernel `[out, k k in]`, columns in `(ky, kx, c)` order.
    pub fn weight(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The kernel in PyTorch's layout `[out, in, k, k]` (a copy).
    pub fn weight_oihw(&self) -> Result<Tensor> {
        let (o, k) = (self.weight.dim(0)?, self.win.k);
        Ok(self
            .weight
            .as_tensor()
            .reshape((o, k, k, self.c_in))?
            .permute((0, 3, 1, 2))?
            .contiguous()?)
    }

    /// The bias, `[out]`.
    pub fn bias(&self) -> &Tensor {
        self.bias.as_tensor()
    }

    /// `x: [B, H, W, in]` (channels last) -> `[B, H', W', out]`,
    /// `H' = (H + 2 p - k) / s + 1`; `silu` applies SiLU to the result (fused).
    pub fn forward_nhwc(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        self.run_nhwc(x, silu, None)
    }

    /// [`Conv2d::forward_nhwc`] plus a per-image shift `[B, out]` of every output pixel (e.g. a
    /// projected time embedding), added inside the convolution on CPU `f32`.
    pub fn forward_nhwc_shifted(&self, x: &Tensor, shift: &Tensor) -> Result<Tensor> {
        self.run_nhwc(x, false, Some(shift))
    }

    fn run_nhwc(&self, x: &Tensor, silu: bool, shift: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4().map_err(|_| {
            Error::Shape(format!(
                "conv2d: expected channels-last input [B, H, W, C], got {:?}",
                x.dims()
            ))
        })?;
        if c != self.c_in {
            return Err(Error::Shape(format!(
                "conv2d: input has {c} channels, the kernel expects {}",
                self.c_in
            )));
        }
        let (Some(ho), Some(wo)) = (self.win.out_size(h), self.win.out_size(w)) else {
            return Err(Error::Shape(format!(
                "conv2d: a {k}x{k} window does not fit a {h}x{w} image",
                k = self.win.k
            )));
        };
        let c_out = self.weight.dim(0)?;
        if let Some(sh) = shift {
            if sh.dims() != [b, c_out] {
                return Err(Error::Shape(format!(
                    "conv2d: shift {:?} must be [B, out] = [{b}, {c_out}]",
                    sh.dims()
                )));
            }
        }
        // the shift broadcast over the pixels of its image, for the composed paths
        let add_shift = |y: Tensor| -> Result<Tensor> {
            Ok(match shift {
                Some(sh) => y.broadcast_add(&sh.reshape((b, 1, 1, c_out))?)?, // [B, H', W', out]
                None => y,
            })
        };
        let act = if silu {
            FusedAct::Silu
        } else {
            FusedAct::Identity
        };
        let cols = if self.win
            == (Window {
                k: 1,
                stride: 1,
                padding: 0,
            }) {
            x.reshape((b * h * w, c))? // [B H W, C]: a 1x1 convolution is a linear map
        } else if fused::cpu_f32(&[x, self.weight.as_tensor(), self.bias.as_tensor()])
            && shift.is_none_or(|sh| fused::cpu_f32(&[sh]))
        {
            let bias = match shift {
                Some(sh) => sh.broadcast_add(self.bias.as_tensor())?.contiguous()?, // [B, out]
                None => self.bias.as_tensor().clone(),
            };
            let y = x.contiguous()?.apply_op3(
                self.weight.as_tensor(),
                &bias,
                Conv2dOp { win: self.win },
            )?; // [B H' W', out]
            let y = y.reshape((b, ho, wo, ()))?;
            return Ok(if silu { y.silu()? } else { y });
        } else {
            // other devices: candle's convolution in NCHW
            let y = x
                .permute((0, 3, 1, 2))?
                .conv2d(
                    &self.weight_oihw()?,
                    self.win.padding,
                    self.win.stride,
                    1,
                    1,
                )?
                .permute((0, 2, 3, 1))?
                .broadcast_add(self.bias.as_tensor())?; // [B, H', W', out]
            let y = add_shift(y)?;
            return Ok(if silu { y.silu()? } else { y });
        };
        if shift.is_some() {
            let y = fused::linear_act(
                &cols,
                self.weight.as_tensor(),
                self.bias.as_tensor(),
                FusedAct::Identity,
            )?;
            let y = add_shift(y.reshape((b, ho, wo, ()))?)?;
            return Ok(if silu { y.silu()? } else { y });
        }
        let y = fused::linear_act(&cols, self.weight.as_tensor(), self.bias.as_tensor(), act)?;
        Ok(y.reshape((b, ho, wo, ()))?) // [B, H', W', out]
    }

    /// `x: [B, in, H, W]` (channels first) -> `[B, out, H', W']` (two layout copies around
    /// [`Conv2d::forward_nhwc`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            return Err(Error::Shape(format!(
                "conv2d: expected input [B, C, H, W], got {:?}",
                x.dims()
            )));
        }
        let y = self.forward_nhwc(&x.permute((0, 2, 3, 1))?.contiguous()?, false)?;
        Ok(y.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_nn::VarMap;

    /// The per-image shift inside the op matches a broadcast add after the convolution, values
    /// and the gradients of the input, the kernel, the bias and the shift (3x3 and stride 2,
    /// and the 1x1 path).
    #[test]
    fn shifted_matches_a_broadcast_add() {
        let dev = Device::Cpu;
        let mut rng = crate::Rng::new(11);
        for (win, ci, co) in [
            (
                Window {
                    k: 3,
                    stride: 1,
                    padding: 1,
                },
                5,
                7,
            ),
            (
                Window {
                    k: 3,
                    stride: 2,
                    padding: 1,
                },
                3,
                4,
            ),
            (
                Window {
                    k: 1,
                    stride: 1,
                    padding: 0,
                },
                6,
                3,
            ),
        ] {
            let vm = VarMap::new();
            let mut prng = crate::Rng::new(12);
            let conv = Conv2d::new(&mut ParamInit::new(&vm, &mut prng, &dev), ci, co, win).unwrap();
            let x = Var::from_tensor(&rng.normal_tensor(&[3, 7, 6, ci], &dev).unwrap()).unwrap();
            let e = Var::from_tensor(&rng.normal_tensor(&[3, co], &dev).unwrap()).unwrap();
            let fused = conv
                .forward_nhwc_shifted(x.as_tensor(), e.as_tensor())
                .unwrap();
            let composed = conv
                .forward_nhwc(x.as_tensor(), false)
                .unwrap()
                .broadcast_add(&e.as_tensor().reshape((3, 1, 1, co)).unwrap())
                .unwrap();
            let r = rng.normal_tensor(fused.dims(), &dev).unwrap();
            let grads = |y: &Tensor| {
                let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                [x.as_tensor(), conv.weight(), conv.bias(), e.as_tensor()]
                    .map(|t| g.get(t).unwrap().flatten_all().unwrap())
            };
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let pairs = [(fused.clone(), composed.clone())]
                .into_iter()
                .chain(grads(&fused).into_iter().zip(grads(&composed)));
            for (i, (a, b)) in pairs.enumerate() {
                for (u, v) in flat(&a).iter().zip(flat(&b)) {
                    assert!(
                        (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                        "{win:?} #{i}: {u} vs {v}"
                    );
                }
            }
        }
    }
}
