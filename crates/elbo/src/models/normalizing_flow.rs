//! Normalizing flows, one family with a choice of architecture: NICE (additive couplings and a
//! diagonal scaling; Dinh et al. 2015), RealNVP (affine couplings with alternating masks, each
//! followed by ActNorm or, with `norm = "batchnorm"`, the paper's batch normalisation, sec. 3.7;
//! Dinh et al. 2017) and Glow (steps of ActNorm, an
//! invertible LU-decomposed linear map and an affine coupling; Kingma & Dhariwal 2018). On
//! flat data the conditioners are MLPs on the data vector. On images they are convolutional
//! networks inside the multi-scale architecture ([`MultiScale`]; Dinh et al. 2017, sec. 3.6):
//! each of `levels` scales squeezes the image (2x2 pixels into 4x the channels), applies
//! `layers` steps and factors half of the channels out to a Gaussian prior. A RealNVP step is
//! an affine coupling (checkerboard masks in the first half of a scale's steps, channel masks
//! in the second and on a single pixel) and ActNorm (or batch norm); a Glow step is ActNorm, the invertible 1x1 convolution with the
//! LU-decomposed weight ([`LuLinear`] over the channels) and an affine channel coupling; a NICE
//! step is an additive coupling, with a per-channel scaling at the end of each scale.
//!
//! The likelihood is exact: `-log p(x) = -log N(f(x); 0, I) - log |det ∂f/∂x|` with every
//! log-determinant in closed form ([`crate::flows`]). On discrete data (levels 0..L-1) the flow
//! is a density on the dequantized grid of [`DataScale`] (uniform dequantization with the
//! bin-width Jacobian), so the reported figure is a bound on the discrete NLL (Theis et al.
//! 2016). Sampling inverts the flow exactly from `z ~ N(0, T² I)`.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::dequantization::{DataScale, Dequantization, VariationalDequantizer};
use crate::continuous::diffusion::net::check_batch;
use crate::data::Layout;
use crate::flows::{
    ActNorm, BatchNorm, Bijector, Coupling, CouplingKind, Flow, LuLinear, Mask, MultiScale,
    Scaling, Split, SplitPrior, Squeeze,
};
use crate::model::{likelihood_choice, DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::{Activation, ParamInit};
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, NllKind, Result, Rng};

/// The `[model]` table of `normalizing-flow`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// "nice", "realnvp" or "glow".
    pub variant: Variant,
    /// Coupling layers (NICE, RealNVP) or flow steps (Glow); per scale on images.
    pub layers: usize,
    /// Units of each hidden layer of a coupling's MLP conditioner, or channels of its
    /// convolutional conditioner.
    pub hidden: usize,
    /// Hidden layers per MLP conditioner (the convolutional one has a fixed 3x3, 1x1, 3x3
    /// shape).
    pub depth: usize,
    /// MLPs on the flat data vector, or convolutional conditioners in the multi-scale
    /// architecture; `auto` picks the latter on images.
    pub conditioner: ConditionerChoice,
    /// Scales of the multi-scale architecture on images (each halves the height and width).
    pub levels: usize,
    /// The density of the channels factored out at each scale: `learned` (Glow's conditional
    /// Gaussian) or `standard` (RealNVP's N(0, I)).
    pub prior: SplitPrior,
    /// How discrete data is dequantized: `uniform` or `variational` (a learned q(u | x) whose
    /// MLP has `hidden` units and `depth` layers; Ho et al. 2019). Unused on continuous data.
    pub dequantization: Dequantization,
    /// The conditioners' activation.
    pub activation: Activation,
    /// Sampling temperature `T`: `z ~ N(0, T² I)` (1 draws from the model itself).
    pub temperature: f64,
    /// RealNVP's normalisation after each coupling: `actnorm` or `batchnorm` (Dinh et al.
    /// 2017, sec. 3.7: batch statistics in training, running averages at evaluation).
    #[serde(skip_serializing_if = "Norm::is_actnorm")]
    pub norm: Norm,
}

/// The normalisation layer of RealNVP.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Norm {
    /// ActNorm (data-dependent initialisation, then trainable).
    #[default]
    Actnorm,
    /// Batch normalisation with running averages.
    Batchnorm,
}

impl Norm {
    fn is_actnorm(&self) -> bool {
        *self == Norm::Actnorm
    }

    /// The layer on `d` dimensions (channels), parameters under `p`.
    fn layer(self, p: &mut ParamInit, d: usize) -> Result<Box<dyn Bijector>> {
        Ok(match self {
            Norm::Actnorm => Box::new(ActNorm::new(&mut p.push("actnorm"), d)?),
            Norm::Batchnorm => Box::new(BatchNorm::new(&mut p.push("batchnorm"), d)?),
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            variant: Variant::Realnvp,
            layers: 8,
            hidden: 128,
            depth: 2,
            conditioner: ConditionerChoice::Auto,
            levels: 2,
            prior: SplitPrior::Learned,
            dequantization: Dequantization::Uniform,
            activation: Activation::Silu,
            temperature: 1.0,
            norm: Norm::Actnorm,
        }
    }
}

/// The architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Additive couplings with alternating masks, then a diagonal scaling.
    Nice,
    /// Affine couplings with alternating masks, each followed by ActNorm.
    Realnvp,
    /// Steps of ActNorm, an LU-decomposed invertible linear map and an affine coupling.
    Glow,
}

/// Which networks condition the couplings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConditionerChoice {
    /// Convolutional on images, MLP otherwise.
    #[default]
    Auto,
    /// MLPs on the flat data vector (any layout).
    Mlp,
    /// Convolutional networks in the multi-scale architecture (images only).
    Conv,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Nice => "NICE",
            Variant::Realnvp => "RealNVP",
            Variant::Glow => "Glow",
        }
    }
}

impl Config {
    /// Parameters of one conditioner MLP on `d` inputs with `outs` outputs.
    fn mlp_params(&self, d: usize, outs: usize) -> usize {
        let h = self.hidden;
        match self.depth {
            0 => d * outs + outs,
            n => d * h + h + (n - 1) * (h * h + h) + h * outs + outs,
        }
    }

    /// The image shape `(H, W, C)` when the convolutional architecture is used on `data`,
    /// `None` for the flat one; an error for a convolutional choice on non-image data.
    fn image_shape(&self, data: &DataInfo) -> Result<Option<(usize, usize, usize)>> {
        match (self.conditioner, data.layout) {
            (
                ConditionerChoice::Auto | ConditionerChoice::Conv,
                Layout::Image {
                    channels,
                    height,
                    width,
                },
            ) => {
                let f = 1usize << self.levels;
                if height % f != 0 || width % f != 0 {
                    return Err(Error::Config(format!(
                        "model.levels = {} halves a {height}x{width} image {} times, but its \
                         sides are not divisible by {f}: lower model.levels (or set \
                         model.conditioner = \"mlp\")",
                        self.levels, self.levels
                    )));
                }
                Ok(Some((height, width, channels)))
            }
            (ConditionerChoice::Conv, layout) => Err(Error::Config(format!(
                "model.conditioner = \"conv\" needs image data, this data's layout is \
                 {layout:?}: use \"mlp\" or \"auto\""
            ))),
            _ => Ok(None),
        }
    }

    /// Parameters of one convolutional conditioner `c_in -> hidden -> hidden -> c_out`.
    fn conv_params(&self, c_in: usize, c_out: usize) -> usize {
        let h = self.hidden;
        9 * c_in * h + h + h * h + h + 9 * h * c_out + c_out
    }

    /// The exact parameter count of the multi-scale flow on `(H, W, C)` images.
    fn image_param_count(&self, (_, _, c0): (usize, usize, usize)) -> usize {
        let mut total = 0;
        let mut c = c0;
        for l in 0..self.levels {
            c *= 4; // the squeeze
            let step = match self.variant {
                Variant::Nice => self.conv_params(c, c),
                Variant::Realnvp => self.conv_params(c, 2 * c) + c + 2 * c,
                Variant::Glow => 2 * c + 2 * c * c + c + self.conv_params(c, 2 * c) + c,
            };
            total += self.layers * step;
            if self.variant == Variant::Nice {
                total += c;
            }
            if l + 1 < self.levels {
                let (kept, out) = (c / 2, c - c / 2);
                if self.prior == SplitPrior::Learned {
                    total += 9 * kept * 2 * out + 2 * out;
                }
                c = kept;
            }
        }
        total
    }

    /// Parameters of the variational dequantizer on `data` (none for uniform dequantization
    /// or continuous data).
    fn dequantizer_params(&self, data: &DataInfo) -> usize {
        match (self.dequantization, data.levels()) {
            (Dequantization::Variational, Some(_)) => self.mlp_params(data.dim, 2 * data.dim),
            _ => 0,
        }
    }

    /// The exact parameter count on `d` dimensions (flat architecture).
    fn param_count(&self, d: usize) -> usize {
        let n = self.layers;
        match self.variant {
            Variant::Nice => n * self.mlp_params(d, d) + d,
            Variant::Realnvp => n * (self.mlp_params(d, 2 * d) + d + 2 * d),
            Variant::Glow => n * (2 * d + 2 * d * d + d + self.mlp_params(d, 2 * d) + d),
        }
    }
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "normalizing flow: NICE, RealNVP or Glow couplings (exact change-of-variables likelihood)";
    const LIKELIHOODS: &'static [&'static str] = &["exact"];

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.layers == 0 || self.layers > 256 {
            return bad(format!(
                "model.layers must be in 1..=256, got {}",
                self.layers
            ));
        }
        if self.hidden == 0 {
            return bad("model.hidden must be at least 1".into());
        }
        if self.norm == Norm::Batchnorm && self.variant != Variant::Realnvp {
            return bad(format!(
                "model.norm = \"batchnorm\" is RealNVP's (variant = \"realnvp\"); {} uses its \
                 own layers, so leave model.norm at \"actnorm\"",
                self.variant.name()
            ));
        }
        if self.levels == 0 || self.levels > 8 {
            return bad(format!(
                "model.levels must be in 1..=8, got {}",
                self.levels
            ));
        }
        if self.depth > 16 {
            return bad(format!(
                "model.depth must be at most 16, got {}",
                self.depth
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "model.temperature must be > 0, got {}",
                self.temperature
            ));
        }
        Ok(())
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        let d = data.dim;
        if let Ok(Some(shape)) = self.image_shape(data) {
            // per step: the conditioner's two hidden maps (hidden channels per 4 pixels after
            // the first squeeze) and a handful of image-sized tensors, with gradients
            let pixels = (shape.0 * shape.1 / 4).max(1);
            return MemoryEstimate {
                params: (self.image_param_count(shape) + self.dequantizer_params(data)) as u64,
                activations: estimate::prod(&[
                    batch,
                    self.layers * self.levels,
                    pixels * 3 * self.hidden + 12 * d,
                    8,
                ]),
                fixed: estimate::prod(&[d, 64]),
            };
        }
        let width = self.hidden.max(2 * d);
        MemoryEstimate {
            params: (self.param_count(d) + self.dequantizer_params(data)) as u64,
            // per layer: the conditioner's hidden activations and a handful of [B, D] tensors,
            // each with its gradient
            activations: estimate::prod(&[batch, self.layers, width * (self.depth + 1) + 8 * d, 8]),
            fixed: estimate::prod(&[d, d, 32]),
        }
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        self.image_shape(data)?;
        Ok(Box::new(NormalizingFlow::new(self, *data, device, rng)?))
    }
}

/// The flow proper: on the flat data vector, or multi-scale on channels-last images.
enum Net {
    Flat(Flow),
    /// With the data's `(H, W, C)`.
    Image(MultiScale, (usize, usize, usize)),
}

/// A normalizing flow on flat data or images.
pub struct NormalizingFlow {
    core: ModelCore,
    cfg: Config,
    scale: DataScale,
    net: Net,
    /// q(u | x) under variational dequantization.
    dequantizer: Option<VariationalDequantizer>,
}

impl NormalizingFlow {
    /// The flow of `cfg` on data shaped like `data`, initial weights from `rng`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        cfg.validate()?;
        let d = data.dim;
        if d < 2 {
            return Err(Error::Shape(format!(
                "a coupling flow needs at least 2 dimensions, the data has {d}"
            )));
        }
        let core = ModelCore::new(d, device);
        let scale = DataScale::new(data.kind)?;
        let dequantizer = match (cfg.dequantization, scale.levels) {
            (Dequantization::Variational, Some(_)) => Some(VariationalDequantizer::new(
                &mut ParamInit::new(&core.varmap, rng, device).push("dequantizer"),
                scale,
                d,
                cfg.hidden,
                cfg.depth,
                cfg.activation,
            )?),
            _ => None,
        };
        if let Some(shape) = cfg.image_shape(&data)? {
            let ms = {
                let mut p = ParamInit::new(&core.varmap, rng, device);
                build_multiscale(cfg, shape, &mut p)?
            };
            return Ok(Self {
                core,
                cfg: cfg.clone(),
                scale,
                net: Net::Image(ms, shape),
                dequantizer,
            });
        }
        let mut flow = Flow::new();
        {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            let (h, depth, act) = (cfg.hidden, cfg.depth, cfg.activation);
            for i in 0..cfg.layers {
                let mut q = p.push(&format!("layer.{i}"));
                match cfg.variant {
                    Variant::Nice | Variant::Realnvp => {
                        let kind = match cfg.variant {
                            Variant::Nice => CouplingKind::Additive,
                            _ => CouplingKind::Affine,
                        };
                        let mask = Mask::Parity(i % 2);
                        let c =
                            Coupling::new(&mut q.push("coupling"), kind, mask, d, h, depth, act)?;
                        flow.push(Box::new(c));
                        if cfg.variant == Variant::Realnvp {
                            flow.push(cfg.norm.layer(&mut q, d)?);
                        }
                    }
                    Variant::Glow => {
                        flow.push(Box::new(ActNorm::new(&mut q.push("actnorm"), d)?));
                        let draws: Vec<f64> = (0..d * d).map(|_| rng_normal(&mut q)).collect();
                        flow.push(Box::new(LuLinear::new(&mut q.push("linear"), d, &draws)?));
                        let mask = Mask::Half(i % 2 == 1);
                        let c = Coupling::new(
                            &mut q.push("coupling"),
                            CouplingKind::Affine,
                            mask,
                            d,
                            h,
                            depth,
                            act,
                        )?;
                        flow.push(Box::new(c));
                    }
                }
            }
            if cfg.variant == Variant::Nice {
                flow.push(Box::new(Scaling::new(&mut p.push("scaling"), d)?));
            }
        }
        Ok(Self {
            core,
            cfg: cfg.clone(),
            scale,
            net: Net::Flat(flow),
            dequantizer,
        })
    }

    /// The batch of levels (or continuous values) in model space, dequantized, and under
    /// variational dequantization `log q(u | x)` per example, `[B]`.
    fn dequantize(&self, batch: &Tensor, rng: &mut Rng) -> Result<(Tensor, Option<Tensor>)> {
        match &self.dequantizer {
            Some(q) => {
                let (x, log_q) = q.dequantize(batch, rng)?;
                Ok((x, Some(log_q)))
            }
            None => Ok((self.scale.dequantize(batch, rng)?, None)),
        }
    }

    /// `-log p(x) + log q(u | x)` per example of a dequantized batch (the bound's terms but
    /// the bin width's Jacobian), `[B]`.
    fn dequantized_nll(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        let (x, log_q) = self.dequantize(batch, rng)?;
        let nll = self.nll(&x)?;
        Ok(match log_q {
            Some(lq) => (nll + lq)?,
            None => nll,
        })
    }

    /// The flat flow (layers, forward, inverse), `None` for the multi-scale image flow.
    pub fn flow(&self) -> Option<&Flow> {
        match &self.net {
            Net::Flat(f) => Some(f),
            Net::Image(..) => None,
        }
    }

    /// The multi-scale image flow, `None` for the flat one.
    pub fn multiscale(&self) -> Option<&MultiScale> {
        match &self.net {
            Net::Image(ms, _) => Some(ms),
            Net::Flat(_) => None,
        }
    }

    /// `-log p(x)` in nats per example, `[B]`, of model-space rows `x: [B, D]`.
    fn nll(&self, x: &Tensor) -> Result<Tensor> {
        match &self.net {
            Net::Flat(f) => f.nll(x),
            Net::Image(ms, shape) => ms.nll(&to_nhwc(x, *shape)?),
        }
    }
}

/// Rows `[B, C H W]` (channel-major) -> channels-last images `[B, H, W, C]`.
fn to_nhwc(x: &Tensor, (h, w, c): (usize, usize, usize)) -> Result<Tensor> {
    let b = x.dim(0)?;
    Ok(x.reshape((b, c, h, w))?
        .permute((0, 2, 3, 1))?
        .contiguous()?)
}

/// Channels-last images `[B, H, W, C]` -> rows `[B, C H W]`.
fn to_rows(x: &Tensor) -> Result<Tensor> {
    let b = x.dim(0)?;
    Ok(x.permute((0, 3, 1, 2))?.contiguous()?.reshape((b, ()))?)
}

/// The multi-scale flow of `cfg` on `(H, W, C)` images (see the module documentation).
/// Parameters under `level.{l}.step.{i}.*`, `level.{l}.scaling.*` and `level.{l}.split.*`.
fn build_multiscale(
    cfg: &Config,
    (mut h, mut w, mut c): (usize, usize, usize),
    p: &mut ParamInit,
) -> Result<MultiScale> {
    let mut ms = MultiScale::new();
    let (hidden, act) = (cfg.hidden, cfg.activation);
    for l in 0..cfg.levels {
        let mut q = p.push(&format!("level.{l}"));
        let mut flow = Flow::new();
        (h, w, c) = Squeeze::out_shape((h, w, c))?;
        flow.push(Box::new(Squeeze));
        let shape = (h, w, c);
        for i in 0..cfg.layers {
            let mut s = q.push(&format!("step.{i}"));
            // RealNVP: checkerboards in the first half of the steps, channel masks after (only
            // channel masks on a single pixel, where a checkerboard would keep all or nothing)
            let mask = if i < cfg.layers.div_ceil(2) && h * w > 1 {
                Mask::Parity(i % 2)
            } else {
                Mask::Half(i % 2 == 1)
            };
            let mut layer: Vec<Box<dyn Bijector>> = Vec::new();
            match cfg.variant {
                Variant::Nice => layer.push(Box::new(Coupling::conv(
                    &mut s.push("coupling"),
                    CouplingKind::Additive,
                    mask,
                    shape,
                    hidden,
                    act,
                )?)),
                Variant::Realnvp => {
                    layer.push(Box::new(Coupling::conv(
                        &mut s.push("coupling"),
                        CouplingKind::Affine,
                        mask,
                        shape,
                        hidden,
                        act,
                    )?));
                    layer.push(cfg.norm.layer(&mut s, c)?);
                }
                Variant::Glow => {
                    layer.push(Box::new(ActNorm::new(&mut s.push("actnorm"), c)?));
                    let draws: Vec<f64> = (0..c * c).map(|_| rng_normal(&mut s)).collect();
                    layer.push(Box::new(LuLinear::new(&mut s.push("linear"), c, &draws)?));
                    layer.push(Box::new(Coupling::conv(
                        &mut s.push("coupling"),
                        CouplingKind::Affine,
                        Mask::Half(i % 2 == 1),
                        shape,
                        hidden,
                        act,
                    )?));
                }
            }
            for b in layer {
                flow.push(b);
            }
        }
        if cfg.variant == Variant::Nice {
            flow.push(Box::new(Scaling::new(&mut q.push("scaling"), c)?));
        }
        let split = if l + 1 < cfg.levels {
            Some(Split::new(&mut q.push("split"), cfg.prior, c)?)
        } else {
            None
        };
        ms.push_level(flow, shape, split);
        if l + 1 < cfg.levels {
            c /= 2;
        }
    }
    Ok(ms)
}

/// One standard normal draw from the parameter factory's generator.
fn rng_normal(p: &mut ParamInit) -> f64 {
    p.rng().normal()
}

impl NormalizingFlow {
    fn set_training(&self, on: bool) {
        match &self.net {
            Net::Flat(f) => f.set_training(on),
            Net::Image(ms, _) => ms.set_training(on),
        }
    }
}

impl GenerativeModel for NormalizingFlow {
    fn family(&self) -> &'static str {
        "normalizing-flow"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// The NLL in nats per dimension of a dequantized batch.
    /// In training mode: batch normalisation uses (and tracks) the batch's statistics.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "normalizing-flow")?;
        self.set_training(true);
        let nll = self.dequantized_nll(batch, rng);
        self.set_training(false);
        Ok((nll?.mean_all()? / self.core.dim as f64)?)
    }

    /// ActNorm's data-dependent initialisation on the first (dequantized) batch.
    fn init_from_data(&mut self, batch: &Tensor, rng: &mut Rng) -> Result<()> {
        check_batch(batch, self.core.dim, "normalizing-flow")?;
        let x = self.dequantize(batch, rng)?.0.detach();
        match &mut self.net {
            Net::Flat(f) => f.init_from_data(&x),
            Net::Image(ms, shape) => ms.init_from_data(&to_nhwc(&x, *shape)?),
        }
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        match &self.net {
            Net::Flat(f) => f.state(),
            Net::Image(ms, _) => ms.state(),
        }
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        match &mut self.net {
            Net::Flat(f) => f.load_state(t),
            Net::Image(ms, _) => ms.load_state(t),
        }
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, _opts: &SampleOptions) -> String {
        format!(
            "exact inversion of the {} flow from z ~ N(0, {}² I)",
            self.cfg.variant.name(),
            self.cfg.temperature
        )
    }

    fn sample(&self, n: usize, _opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let (t, dev) = (self.cfg.temperature, &self.core.device);
        let x = match &self.net {
            Net::Flat(f) => f.inverse(&(rng.normal_tensor(&[n, self.core.dim], dev)? * t)?)?,
            Net::Image(ms, _) => to_rows(&ms.sample(n, t, dev, rng)?)?,
        }; // [n, D]
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "normalizing-flow", Config::LIKELIHOODS)?;
        check_batch(batch, self.core.dim, "normalizing-flow")?;
        let off = self.scale.log_jacobian(self.core.dim);
        let v: Vec<f32> = self.dequantized_nll(batch, rng)?.detach().to_vec1()?;
        Ok(Nll {
            nats: v.into_iter().map(|l| f64::from(l) - off).collect(),
            dims: self.core.dim,
            kind: match self.scale.levels {
                None => NllKind::Exact,
                Some(_) => NllKind::Bound,
            },
        })
    }

    fn likelihood_method(&self, _opts: &EvalOptions) -> String {
        let arch = match &self.net {
            Net::Flat(_) => format!("{} layers", self.cfg.layers),
            Net::Image(..) => format!(
                "multi-scale: {} scales of {} steps, convolutional couplings, {} prior at each \
                 split",
                self.cfg.levels,
                self.cfg.layers,
                match self.cfg.prior {
                    SplitPrior::Learned => "learned Gaussian",
                    SplitPrior::Standard => "standard normal",
                }
            ),
        };
        format!(
            "exact change of variables through the {} flow ({arch}, log-determinants in \
             closed form){}",
            self.cfg.variant.name(),
            match self.dequantizer {
                Some(_) => self.scale.variational_note(),
                None => self.scale.dequantization_note(),
            }
        )
    }
}
