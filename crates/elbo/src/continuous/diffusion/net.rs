//! The network behind every Gaussian-diffusion family, and the data <-> model-space maps.
//!
//! The backbone is an MLP on `concat(x, sinusoidal(time_scale · τ))` for flat / 2-D data, or the
//! U-Net of [`crate::nn::unet`] on square single-channel images (the family chooses the time
//! feature τ: DDPM's step index, a score SDE's 1000 t, EDM's 1000 c_noise = 250 ln σ). It
//! returns `out_per_dim` numbers per data dimension, dimension-major: 1 for an eps / x0 / v
//! prediction, L for the discrete-aware level logits of DDPM (U-Net: L output channels).
//!
//! The U-Net runs on what the data source calls square single-channel images of discrete
//! levels (digits 8x8, MNIST 28x28).
//!
//! The data <-> model-space map and its dequantization, [`DataScale`], live in
//! [`crate::continuous::dequantization`] (re-exported here).

use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use serde::{Deserialize, Serialize};

use crate::data::{DataKind, Layout};
use crate::model::DataInfo;
use crate::nn::{
    sinusoidal_embedding, sinusoidal_row, Activation, Mlp, PackedMlp, ParamInit, UNet, UNetConfig,
};
use crate::{Error, Result};

pub use crate::continuous::dequantization::{Bins, DataScale};

/// The `[model.net]` table of the continuous families: the backbone and its size.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// "auto" (the U-Net on images of at least 16x16, else the MLP), "mlp" or "unet".
    pub backbone: BackboneChoice,
    /// Width of each hidden layer of the MLP.
    pub hidden: usize,
    /// Number of hidden layers of the MLP.
    pub layers: usize,
    /// Size of the sinusoidal time embedding.
    pub time_embed_dim: usize,
    /// Times are multiplied by this before the sinusoidal embedding (1: smooth features of
    /// t in [0, 1]; 1000: DDPM's range).
    pub time_scale: f64,
    /// Hidden activation of the MLP.
    pub activation: Activation,
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            backbone: BackboneChoice::Auto,
            hidden: 256,
            layers: 4,
            time_embed_dim: 32,
            time_scale: 1.0,
            activation: Activation::Silu,
        }
    }
}

impl NetConfig {
    /// Check the sizes.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 || self.time_embed_dim < 2 {
            return Err(Error::Config(
                "model.net.hidden must be >= 1 and model.net.time_embed_dim >= 2".into(),
            ));
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(Error::Config(format!(
                "model.net.time_scale must be a positive number, got {}",
                self.time_scale
            )));
        }
        Ok(())
    }
}

/// Which backbone a config asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackboneChoice {
    /// The U-Net on images of at least 16x16, the MLP otherwise.
    #[default]
    Auto,
    /// Multi-layer perceptron on flat vectors.
    Mlp,
    /// U-Net on square single-channel images.
    #[serde(alias = "u-net")]
    Unet,
}

/// The backbone resolved for the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackboneKind {
    /// Multi-layer perceptron on flat vectors.
    Mlp,
    /// U-Net on `side x side` single-channel images.
    UNet {
        /// Image height = width.
        side: usize,
    },
}

/// The side of the examples when the data source calls them square single-channel images of
/// discrete levels, at least 8x8 (the U-Net's smallest input).
pub fn square_image_side(data: &DataInfo) -> Option<usize> {
    let discrete = matches!(data.kind, DataKind::Discrete { .. });
    match data.layout {
        Layout::Image {
            channels: 1,
            height,
            width,
        } if discrete && height == width && height >= 8 => Some(height),
        _ => None,
    }
}

impl BackboneKind {
    /// Resolve `model.backbone` ("auto", "mlp", "unet") for the data: auto is the U-Net on
    /// images of at least 16x16 (MNIST) and the MLP otherwise (on 8x8 digits 30 U-Net steps
    /// plus a 20-example VLB took 43 s on 2 shared cores with the fused convolution, 600 MLP
    /// steps plus the 297-example VLB 33 s).
    pub fn resolve(choice: BackboneChoice, data: &DataInfo) -> Result<Self> {
        use BackboneChoice as C;
        match (choice, square_image_side(data)) {
            (C::Mlp, _) | (C::Auto, None) => Ok(Self::Mlp),
            // the U-Net costs ~20-50x the MLP per step on CPU: auto keeps the MLP for 8x8 digits
            (C::Auto, Some(side)) if side < 16 => Ok(Self::Mlp),
            (C::Unet | C::Auto, Some(side)) => Ok(Self::UNet { side }),
            (C::Unet, None) => Err(Error::Config(format!(
                "the unet backbone needs square images of discrete data; this data has {} \
                 dimensions; use model.net.backbone = \"mlp\"",
                data.dim
            ))),
        }
    }
}

#[derive(Clone, Debug)]
enum Backbone {
    Mlp(Mlp),
    UNet { net: Box<UNet>, side: usize },
}

/// The MLP's weights packed for inference while a [`DenoiserNet::with_packed`] scope runs
/// (a clone starts without one).
#[derive(Default)]
struct PackScope(Mutex<Option<Arc<PackedMlp>>>);

impl PackScope {
    fn get(&self) -> Option<Arc<PackedMlp>> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
    fn set(&self, p: Option<Arc<PackedMlp>>) {
        if let Ok(mut g) = self.0.lock() {
            *g = p;
        }
    }
}

impl Clone for PackScope {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl std::fmt::Debug for PackScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.get().is_some() {
            "PackScope(active)"
        } else {
            "PackScope(idle)"
        })
    }
}

/// Clears the scope when [`DenoiserNet::with_packed`] returns or unwinds.
struct ScopeGuard<'a>(&'a PackScope);

impl Drop for ScopeGuard<'_> {
    fn drop(&mut self) {
        self.0.set(None);
    }
}

/// A time-conditioned network `([B, D], [B]) -> [B, D · out_per_dim]`.
#[derive(Clone, Debug)]
pub struct DenoiserNet {
    backbone: Backbone,
    time_embed_dim: usize,
    time_scale: f64,
    dim: usize,
    out_per_dim: usize,
    packed: PackScope,
}

impl DenoiserNet {
    /// Parameters under `p` (prefix `net`).
    pub fn new(
        p: &mut ParamInit,
        data: &DataInfo,
        out_per_dim: usize,
        cfg: &NetConfig,
    ) -> Result<Self> {
        if out_per_dim == 0 {
            return Err(Error::Config(
                "a network needs at least one output per dimension".into(),
            ));
        }
        let backbone = match BackboneKind::resolve(cfg.backbone, data)? {
            BackboneKind::Mlp => Backbone::Mlp(Mlp::new(
                &mut p.push("net"),
                data.dim + cfg.time_embed_dim,
                cfg.hidden,
                cfg.layers,
                data.dim * out_per_dim,
                cfg.activation,
            )?),
            BackboneKind::UNet { side } => {
                let base = if side >= 16 {
                    UNetConfig::mnist()
                } else {
                    UNetConfig::digits()
                };
                let ucfg = UNetConfig {
                    in_channels: 1,
                    out_channels: out_per_dim,
                    time_embed_dim: cfg.time_embed_dim,
                    time_scale: cfg.time_scale,
                    ..base
                };
                Backbone::UNet {
                    net: Box::new(UNet::new(&mut p.push("net"), ucfg)?),
                    side,
                }
            }
        };
        Ok(Self {
            backbone,
            time_embed_dim: cfg.time_embed_dim,
            time_scale: cfg.time_scale,
            dim: data.dim,
            out_per_dim,
            packed: PackScope::default(),
        })
    }

    /// Runs `f` with the MLP backbone's current weights packed once ([`PackedMlp`], the time
    /// embedding as its shared input): inside `f`, every [`DenoiserNet::forward`] without
    /// `grad` whose rows share one time runs through the packed GEMM instead of repacking the
    /// weights at each call. Samplers and the VLB call the network hundreds of times on frozen
    /// weights; on the digits MLP at batch 256 this halves a DDPM step. The values agree with
    /// the unpacked path up to float rounding. A no-op on the U-Net, off the CPU, for
    /// activations without a fused kernel, and inside an enclosing scope.
    pub fn with_packed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let Backbone::Mlp(mlp) = &self.backbone else {
            return f();
        };
        let (hidden, out) = mlp.layers();
        let w = hidden.first().unwrap_or(out).weight();
        if !crate::nn::fused::cpu_f32(&[w]) || self.packed.get().is_some() {
            return f();
        }
        let Some(p) = PackedMlp::new(mlp, self.time_embed_dim)? else {
            return f();
        };
        self.packed.set(Some(Arc::new(p)));
        let _guard = ScopeGuard(&self.packed);
        f()
    }

    /// Outputs per data dimension.
    pub fn out_per_dim(&self) -> usize {
        self.out_per_dim
    }

    /// `x: [B, D]`, time features `tau: [B]` -> `[B, D · out_per_dim]` (dimension-major). With
    /// `grad` false the MLP builds no autograd graph (sampling, the VLB); with `grad` true
    /// gradients reach the weights and x (training, reverse-mode divergences).
    pub fn forward(&self, x: &Tensor, tau: &Tensor, grad: bool) -> Result<Tensor> {
        if x.dim(1)? != self.dim {
            return Err(Error::Shape(format!(
                "network expects [B, {}], got {:?}",
                self.dim,
                x.dims()
            )));
        }
        let x = x.to_dtype(DType::F32)?;
        // inside a `with_packed` scope (MLP only), a no-grad call at one shared time
        if let Some(p) = (!grad).then(|| self.packed.get()).flatten() {
            if let Some(t) = shared_time(tau)? {
                let s = sinusoidal_row(t * self.time_scale, self.time_embed_dim, 10000.0)?;
                return p.forward_tensor(&x, &s);
            }
        }
        self.forward_unpacked(&x, tau, grad)
    }

    fn forward_unpacked(&self, x: &Tensor, tau: &Tensor, grad: bool) -> Result<Tensor> {
        let x = x.clone();
        match &self.backbone {
            Backbone::Mlp(mlp) => {
                let tau = (tau.to_dtype(DType::F32)? * self.time_scale)?;
                let temb = sinusoidal_embedding(&tau, self.time_embed_dim, 10000.0)?; // [B, E]
                let h = Tensor::cat(&[&x, &temb], 1)?; // [B, D + E]
                if grad {
                    mlp.forward(&h)
                } else {
                    mlp.forward_inference(&h)
                }
            }
            Backbone::UNet { net, side } => {
                let b = x.dim(0)?;
                let out = net.forward_flat(&x, &tau.to_dtype(DType::F32)?, (*side, *side))?; // [B, K·D]
                if self.out_per_dim == 1 {
                    return Ok(out);
                }
                Ok(out
                    .reshape((b, self.out_per_dim, self.dim))?
                    .transpose(1, 2)?
                    .contiguous()?
                    .reshape((b, self.dim * self.out_per_dim))?) // [B, D·K]
            }
        }
    }
}

/// The one time every row of `tau: [B]` shares, if they share one (and B > 0).
fn shared_time(tau: &Tensor) -> Result<Option<f64>> {
    let v = tau.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(match v.first() {
        Some(&t0) if v.iter().all(|&t| t == t0) => Some(t0 as f64),
        _ => None,
    })
}

/// Check `batch` is `[B, dim]`.
pub fn check_batch(batch: &Tensor, dim: usize, family: &str) -> Result<()> {
    match batch.dims() {
        [_, d] if *d == dim => Ok(()),
        dims => Err(Error::Shape(format!(
            "{family} expects batches of shape [B, {dim}], got {dims:?}"
        ))),
    }
}
