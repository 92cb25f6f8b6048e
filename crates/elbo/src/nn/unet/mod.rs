//! A small time-conditioned U-Net for images `[B, C, H, W]` (Ronneberger et al. 2015), in the
//! form of the DDPM backbone (Ho et al. 2020, appendix B) and its improved-DDPM variant
//! (Nichol & Dhariwal 2021): a 3x3 stem, `num_res_blocks` residual blocks per resolution with
//! the time embedding added inside each, 3x3 stride-2 downsampling, self-attention at chosen
//! resolutions and in the middle (lowest resolution), nearest-neighbour upsampling followed by a
//! 3x3 convolution, skip connections concatenated on the way up, and a GroupNorm + SiLU + 3x3
//! convolution head.
//!
//! The time `t: [B]` is embedded as `MLP(sinusoidal(time_scale * t))` (Vaswani et al. 2017,
//! sec. 3.5). Every op records gradients: convolutions and group norm are custom ops with their
//! own backward (checked against candle's `conv2d` and a composition of candle ops), softmax is
//! the differentiable composition of `nn::transformer`, upsampling a copy op whose backward sums
//! each 2x2 block. Inputs whose
//! height or width is not a multiple of `2^(levels - 1)` are zero-padded at the bottom and right,
//! and the output is cropped back.
//!
//! Internally the feature maps are channels-last `[B, H, W, C]`: a 3x3 convolution is then a
//! tiled im2col + GEMM ([`crate::nn::conv::Conv2dOp`]), a 1x1 convolution a plain linear map,
//! and group norm + SiLU one fused op ([`crate::nn::group_norm::GroupNormOp`]); all three carry
//! their own backward. The public API takes and returns channels-first `[B, C, H, W]` (for one
//! channel the two layouts coincide and no copy is made).

mod blocks;
mod upsample;

pub use blocks::{dropout, AttnBlock, Downsample, ResBlock, Upsample};
pub use upsample::{upsample_nearest2, upsample_nearest2_nhwc, Upsample2Nhwc};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::conv::Conv2d;
use crate::nn::group_norm::GroupNorm;
use crate::nn::{sinusoidal_embedding, Linear, ParamInit};
use crate::{Error, Result, Rng};
use blocks::SAME3;

/// Shapes and options of a [`UNet`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    /// Channels of the input image.
    pub in_channels: usize,
    /// Channels of the output (e.g. `in_channels` for an eps / x0 / v prediction).
    pub out_channels: usize,
    /// Channels at the first resolution.
    pub base_channels: usize,
    /// Channel multiplier per resolution; the resolution halves between consecutive levels.
    pub channel_mults: Vec<usize>,
    /// Residual blocks per resolution on the way down (one more on the way up).
    pub num_res_blocks: usize,
    /// Levels (0 = the input resolution, `l` = downsampled `2^l` times) whose res blocks are
    /// followed by self-attention, e.g. `[1]` for attention at 4x4 on 8x8 inputs.
    pub attn_levels: Vec<usize>,
    /// Self-attention between the two middle res blocks (at the lowest resolution).
    pub mid_attn: bool,
    /// Attention heads (must divide the channels of every attention block).
    pub attn_heads: usize,
    /// Dropout probability inside the res blocks (used by [`UNet::forward_train`] only).
    pub dropout: f64,
    /// Width of the time embedding.
    pub time_embed_dim: usize,
    /// `t` is multiplied by this before the sinusoidal embedding: 1000 for `t` in [0, 1],
    /// 1 for integer DDPM steps 0..T-1.
    pub time_scale: f64,
    /// Groups of every group norm (must divide every channel count).
    pub groups: usize,
    /// Start the last convolution of every res block, the attention output projections and the
    /// head at zero (improved DDPM): the network then outputs 0 at initialisation.
    pub zero_init: bool,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self::digits()
    }
}

impl UNetConfig {
    /// For 8x8 single-channel images (digits): 32 channels, levels 8x8 and 4x4 (x1, x2),
    /// one res block per level, attention at 4x4 and in the middle.
    pub fn digits() -> Self {
        Self {
            in_channels: 1,
            out_channels: 1,
            base_channels: 32,
            channel_mults: vec![1, 2],
            num_res_blocks: 1,
            attn_levels: vec![1],
            mid_attn: true,
            attn_heads: 1,
            dropout: 0.0,
            time_embed_dim: 128,
            time_scale: 1000.0,
            groups: 8,
            zero_init: true,
        }
    }

    /// [`UNetConfig::digits`] with 16 base channels (0.2 M parameters, about 2.5x cheaper).
    pub fn digits_small() -> Self {
        Self {
            base_channels: 16,
            time_embed_dim: 64,
            ..Self::digits()
        }
    }

    /// For 28x28 single-channel images (MNIST): 32 channels, levels 28, 14 and 7 (x1, x2, x2),
    /// one res block per level, attention only in the middle (7x7).
    pub fn mnist() -> Self {
        Self {
            channel_mults: vec![1, 2, 2],
            attn_levels: vec![],
            ..Self::digits()
        }
    }

    /// [`UNetConfig::mnist`] with 16 base channels (0.3 M parameters, about 2.5x cheaper).
    pub fn mnist_small() -> Self {
        Self {
            base_channels: 16,
            time_embed_dim: 64,
            ..Self::mnist()
        }
    }

    /// Check the shapes fit together.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(format!("unet: {m}")));
        if self.in_channels == 0 || self.out_channels == 0 || self.base_channels == 0 {
            return bad("in_channels, out_channels and base_channels must be at least 1".into());
        }
        if self.channel_mults.is_empty() || self.channel_mults.contains(&0) {
            return bad(format!(
                "channel_mults must be non-empty and positive, got {:?}",
                self.channel_mults
            ));
        }
        if self.time_embed_dim == 0 || !self.time_scale.is_finite() {
            return bad("time_embed_dim must be at least 1 and time_scale finite".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        for m in &self.channel_mults {
            let c = m * self.base_channels;
            if self.groups == 0 || !c.is_multiple_of(self.groups) {
                return bad(format!("groups ({}) must divide {c} channels", self.groups));
            }
            if self.attn_heads == 0 || !c.is_multiple_of(self.attn_heads) {
                return bad(format!(
                    "attn_heads ({}) must divide {c} channels",
                    self.attn_heads
                ));
            }
        }
        Ok(())
    }

    /// The factor height and width are padded to: `2^(levels - 1)`.
    pub fn size_multiple(&self) -> usize {
        1 << (self.channel_mults.len().saturating_sub(1))
    }
}

/// One block of the down or up path.
#[derive(Clone, Debug)]
enum Layer {
    Res(ResBlock),
    Attn(AttnBlock),
    Down(Downsample),
    Up(Upsample),
}

/// The U-Net of the module documentation. Parameter names: `temb.{0,1}.*`, `stem.*`,
/// `down.{i}.*`, `mid.{0,1,2}.*`, `up.{i}.*`, `out_norm.*`, `out_conv.*`.
#[derive(Clone, Debug)]
pub struct UNet {
    cfg: UNetConfig,
    temb0: Linear,
    temb1: Linear,
    stem: Conv2d,
    /// Down path; after each `Res` / `Attn`-ended group and each `Down`, a skip is saved.
    down: Vec<Vec<Layer>>,
    mid: Vec<Layer>,
    /// Up path; each group starts with a `Res` that takes one skip.
    up: Vec<Vec<Layer>>,
    out_norm: GroupNorm,
    out_conv: Conv2d,
}

impl UNet {
    /// Create the parameters under `p`.
    pub fn new(p: &mut ParamInit, cfg: UNetConfig) -> Result<Self> {
        cfg.validate()?;
        let (base, e, g, z) = (
            cfg.base_channels,
            cfg.time_embed_dim,
            cfg.groups,
            cfg.zero_init,
        );
        let temb0 = Linear::new(&mut p.push("temb.0"), base, e, true)?;
        let temb1 = Linear::new(&mut p.push("temb.1"), e, e, true)?;
        let stem = Conv2d::new(&mut p.push("stem"), cfg.in_channels, base, SAME3)?;
        let levels = cfg.channel_mults.len();
        let mut ch = base;
        let mut skips = vec![ch];
        let mut down = Vec::new();
        for (lvl, &m) in cfg.channel_mults.iter().enumerate() {
            for _ in 0..cfg.num_res_blocks {
                let mut pp = p.push(&format!("down.{}", down.len()));
                let mut group = vec![Layer::Res(ResBlock::new(
                    &mut pp.push("res"),
                    ch,
                    m * base,
                    e,
                    g,
                    z,
                )?)];
                ch = m * base;
                if cfg.attn_levels.contains(&lvl) {
                    group.push(Layer::Attn(AttnBlock::new(
                        &mut pp.push("attn"),
                        ch,
                        cfg.attn_heads,
                        g,
                        z,
                    )?));
                }
                down.push(group);
                skips.push(ch);
            }
            if lvl + 1 < levels {
                let mut pp = p.push(&format!("down.{}", down.len()));
                down.push(vec![Layer::Down(Downsample::new(
                    &mut pp.push("down"),
                    ch,
                )?)]);
                skips.push(ch);
            }
        }
        let mut mid = vec![Layer::Res(ResBlock::new(
            &mut p.push("mid.0"),
            ch,
            ch,
            e,
            g,
            z,
        )?)];
        if cfg.mid_attn {
            mid.push(Layer::Attn(AttnBlock::new(
                &mut p.push("mid.1"),
                ch,
                cfg.attn_heads,
                g,
                z,
            )?));
        }
        mid.push(Layer::Res(ResBlock::new(
            &mut p.push("mid.2"),
            ch,
            ch,
            e,
            g,
            z,
        )?));
        let mut up = Vec::new();
        for (lvl, &m) in cfg.channel_mults.iter().enumerate().rev() {
            for i in 0..=cfg.num_res_blocks {
                let mut pp = p.push(&format!("up.{}", up.len()));
                let skip = skips.pop().ok_or_else(|| {
                    Error::Config("unet: skip bookkeeping failed (internal)".into())
                })?;
                let mut group = vec![Layer::Res(ResBlock::new(
                    &mut pp.push("res"),
                    ch + skip,
                    m * base,
                    e,
                    g,
                    z,
                )?)];
                ch = m * base;
                if cfg.attn_levels.contains(&lvl) {
                    group.push(Layer::Attn(AttnBlock::new(
                        &mut pp.push("attn"),
                        ch,
                        cfg.attn_heads,
                        g,
                        z,
                    )?));
                }
                if lvl > 0 && i == cfg.num_res_blocks {
                    group.push(Layer::Up(Upsample::new(&mut pp.push("up"), ch)?));
                }
                up.push(group);
            }
        }
        let out_norm = GroupNorm::new(&mut p.push("out_norm"), g, ch)?;
        let out_conv = if z {
            Conv2d::zeros(&mut p.push("out_conv"), ch, cfg.out_channels, SAME3)?
        } else {
            Conv2d::new(&mut p.push("out_conv"), ch, cfg.out_channels, SAME3)?
        };
        Ok(Self {
            cfg,
            temb0,
            temb1,
            stem,
            down,
            mid,
            up,
            out_norm,
            out_conv,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// `x: [B, C_in, H, W]`, `t: [B]` -> `[B, C_out, H, W]` (no dropout).
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        self.run(x, t, None)
    }

    /// [`UNet::forward`] with dropout (probability `cfg.dropout`, masks drawn from `rng`):
    /// the training pass.
    pub fn forward_train(&self, x: &Tensor, t: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.run(x, t, Some(rng))
    }

    /// For flat data: `x: [B, C_in H W]` (channel-major, row-major pixels), `t: [B]`,
    /// `(h, w)` the image size -> `[B, C_out H W]`.
    pub fn forward_flat(&self, x: &Tensor, t: &Tensor, hw: (usize, usize)) -> Result<Tensor> {
        self.flat(x, t, hw, None)
    }

    /// [`UNet::forward_flat`] with dropout drawn from `rng`.
    pub fn forward_flat_train(
        &self,
        x: &Tensor,
        t: &Tensor,
        hw: (usize, usize),
        rng: &mut Rng,
    ) -> Result<Tensor> {
        self.flat(x, t, hw, Some(rng))
    }

    fn flat(
        &self,
        x: &Tensor,
        t: &Tensor,
        (h, w): (usize, usize),
        rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, d) = x.dims2().map_err(|_| {
            Error::Shape(format!(
                "unet: expected flat input [B, D], got {:?}",
                x.dims()
            ))
        })?;
        let c = self.cfg.in_channels;
        if d != c * h * w {
            return Err(Error::Shape(format!(
                "unet: {d} values per example do not make {c} x {h} x {w} images"
            )));
        }
        let y = self.run(&x.reshape((b, c, h, w))?, t, rng)?; // [B, C_out, H, W]
        Ok(y.reshape((b, ()))?)
    }

    /// The time embedding after its SiLU, `[B, E]`.
    fn time_embedding(&self, t: &Tensor) -> Result<Tensor> {
        let t = (t.to_dtype(DType::F32)? * self.cfg.time_scale)?;
        let s = sinusoidal_embedding(&t, self.cfg.base_channels, 10000.0)?; // [B, base]
        self.temb1
            .forward(&self.temb0.forward_silu(&s)?)?
            .silu()
            .map_err(Into::into)
    }

    fn run(&self, x: &Tensor, t: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4().map_err(|_| {
            Error::Shape(format!("unet: expected [B, C, H, W], got {:?}", x.dims()))
        })?;
        if c != self.cfg.in_channels {
            return Err(Error::Shape(format!(
                "unet: input has {c} channels, the network expects {}",
                self.cfg.in_channels
            )));
        }
        if t.dims() != [b] {
            return Err(Error::Shape(format!(
                "unet: t must be [B] = [{b}], got {:?}",
                t.dims()
            )));
        }
        let m = self.cfg.size_multiple();
        let (ph, pw) = ((m - h % m) % m, (m - w % m) % m);
        let x = x.to_dtype(DType::F32)?;
        // channels last (free for one channel), zero-padded to a multiple of 2^(levels - 1)
        let x = if c == 1 {
            x.reshape((b, h, w, 1))?
        } else {
            x.permute((0, 2, 3, 1))?.contiguous()?
        }; // [B, H, W, C]
        let x = if ph + pw > 0 {
            x.pad_with_zeros(1, 0, ph)?.pad_with_zeros(2, 0, pw)? // [B, H+ph, W+pw, C]
        } else {
            x
        };
        let temb = self.time_embedding(t)?; // [B, E]
        let p = self.cfg.dropout;
        let mut apply = |l: &Layer, h: &Tensor| -> Result<Tensor> {
            match l {
                Layer::Res(r) => r.forward(h, &temb, rng.as_deref_mut().map(|g| (p, g))),
                Layer::Attn(a) => a.forward(h),
                Layer::Down(d) => d.forward(h),
                Layer::Up(u) => u.forward(h),
            }
        };
        let mut hcur = self.stem.forward_nhwc(&x, false)?; // [B, H, W, base]
        let mut skips = vec![hcur.clone()];
        for group in &self.down {
            for l in group {
                hcur = apply(l, &hcur)?;
            }
            skips.push(hcur.clone());
        }
        for l in &self.mid {
            hcur = apply(l, &hcur)?;
        }
        for group in &self.up {
            let s = skips
                .pop()
                .ok_or_else(|| Error::Shape("unet: skip bookkeeping failed (internal)".into()))?;
            hcur = Tensor::cat(&[&hcur, &s], 3)?; // [B, h, w, ch + skip]
            for l in group {
                hcur = apply(l, &hcur)?;
            }
        }
        let y = self
            .out_conv
            .forward_nhwc(&self.out_norm.forward_nhwc(&hcur, true)?, false)?; // [B, H+ph, W+pw, C_out]
        let y = if ph + pw > 0 {
            y.narrow(1, 0, h)?.narrow(2, 0, w)?
        } else {
            y
        };
        let co = self.cfg.out_channels;
        Ok(if co == 1 {
            y.contiguous()?.reshape((b, 1, h, w))?
        } else {
            y.permute((0, 3, 1, 2))?.contiguous()?
        }) // [B, C_out, H, W]
    }
}
