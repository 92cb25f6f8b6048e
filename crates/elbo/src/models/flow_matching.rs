//! Flow matching with the conditional optimal-transport (rectified-flow) path.
//!
//! Path (Lipman et al. 2023, eq. 20-23; Liu et al. 2023): x_t = (1 - t) x_0 + t x_1 with
//! x_0 ~ N(0, I) and x_1 ~ data, so the conditional velocity is u_t = x_1 - x_0 and the CFM loss
//! is E_{t~U[0,1]} || v_theta(x_t, t) - (x_1 - x_0) ||^2. The learned field defines a continuous
//! normalizing flow whose exact log-likelihood follows from the instantaneous change of
//! variables (see [`super::cnf`]).
//!
//! Discrete data (levels 0..L-1) is modelled through uniform dequantization into the bins of
//! [`DataScale`] (shared with every family). Then log P(v) >= E_u[log p_y(v + u)] (Jensen; Theis
//! et al. 2016, Ho et al. 2019) and log p_y = log p_x + D log(bin width), so the reported number
//! is an upper bound on the discrete NLL (a Monte-Carlo estimate of it when the divergence is
//! estimated).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::{EvalOptions, SampleOptions};
use crate::continuous::cnf;
use crate::continuous::diffusion::net::{BackboneKind, Bins, DataScale, DenoiserNet, NetConfig};
use crate::continuous::diffusion::pf_ode;
use crate::continuous::diffusion::sampling::{self, DiffusionSampling, SamplerName};
use crate::continuous::ode::Solver;
use crate::continuous::VelocityField;
use crate::model::{DataInfo, GenerativeModel, ModelCore};
use crate::models::FamilyConfig;
use crate::nn::{sinusoidal_embedding, sinusoidal_row, Mlp, PackedMlp, ParamInit};
use crate::resources::{estimate, MemoryEstimate};
use crate::{Error, Nll, Result, Rng};

pub use crate::continuous::diffusion::pf_ode::solver_label;

/// The `[model]` table of `flow-matching`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The velocity network (`[model.net]`: the MLP, or the U-Net on images of at least 16x16
    /// with `backbone = "auto"` or `"unet"`).
    pub net: NetConfig,
    /// The sampler (`[model.sampling]`): "auto" integrates the ODE with `[sample] solver`; any
    /// diffusion sampler runs on the CondOT path.
    pub sampling: DiffusionSampling,
    /// Where discrete levels sit in model space: "centred" (every family's convention) or
    /// "tiled" (flow matching's before the conventions were merged; old runs load with it).
    pub bins: Bins,
}

impl FamilyConfig for Config {
    const ABOUT: &'static str =
        "flow matching / rectified flow (CondOT path); likelihood by the CNF change of variables";
    const LIKELIHOODS: &'static [&'static str] = &["pf-ode"];

    fn validate(&self) -> Result<()> {
        self.net.validate()?;
        self.sampling.validate()
    }

    fn memory_estimate(&self, data: &DataInfo, batch: usize) -> MemoryEstimate {
        estimate::denoiser(&self.net, data, 1, batch)
    }

    fn eval_memory(&self, data: &DataInfo, eval: &EvalOptions) -> u64 {
        estimate::denoiser_eval(&self.net, data, 1, eval)
    }

    fn build(
        &self,
        data: &DataInfo,
        device: &Device,
        rng: &mut Rng,
    ) -> Result<Box<dyn GenerativeModel>> {
        Ok(Box::new(FlowMatching::new(self, *data, device, rng)?))
    }
}

/// A time-conditioned MLP velocity field: `concat(x, sinusoidal(time_scale * t)) -> MLP -> D`.
#[derive(Clone, Debug)]
pub struct VelocityMlp {
    mlp: Mlp,
    time_embed_dim: usize,
    time_scale: f64,
}

impl VelocityMlp {
    /// Create the network's parameters under `p`.
    pub fn new(p: &mut ParamInit, dim: usize, cfg: &NetConfig) -> Result<Self> {
        let mlp = Mlp::new(
            &mut p.push("net"),
            dim + cfg.time_embed_dim,
            cfg.hidden,
            cfg.layers,
            dim,
            cfg.activation,
        )?;
        Ok(Self {
            mlp,
            time_embed_dim: cfg.time_embed_dim,
            time_scale: cfg.time_scale,
        })
    }

    /// v(x, t) for per-example times `t: [B]`.
    pub fn forward(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let t = (t.to_dtype(DType::F32)? * self.time_scale)?;
        let temb = sinusoidal_embedding(&t, self.time_embed_dim, 10000.0)?; // [B, E]
        let h = Tensor::cat(&[&x.to_dtype(DType::F32)?, &temb], 1)?; // [B, D + E]
        self.mlp.forward(&h)
    }

    /// [`VelocityMlp::forward`] without an autograd graph (weights treated as constants, nothing
    /// saved for a backward pass): the sampling path. Same values.
    pub fn forward_inference(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        let t = (t.to_dtype(DType::F32)?.detach() * self.time_scale)?;
        let temb = sinusoidal_embedding(&t, self.time_embed_dim, 10000.0)?; // [B, E]
        let h = Tensor::cat(&[&x.to_dtype(DType::F32)?.detach(), &temb], 1)?; // [B, D + E]
        self.mlp.forward_inference(&h)
    }
}

impl VelocityMlp {
    /// The network's weights packed for sampling ([`PackedMlp`]; the time embedding is the
    /// shared input), or `None` when the activation has no fused kernel.
    pub fn packed(&self) -> Result<Option<PackedMlp>> {
        PackedMlp::new(&self.mlp, self.time_embed_dim)
    }

    /// v(x, t) for one time `t` shared by every row of `x: [B, D]`, through `packed` (from
    /// [`VelocityMlp::packed`] on the current weights); a CPU `f32` `[B, D]`.
    pub fn forward_packed(&self, packed: &PackedMlp, x: &Tensor, t: f64) -> Result<Tensor> {
        let s = sinusoidal_row(t * self.time_scale, self.time_embed_dim, 10000.0)?;
        packed.forward_tensor(x, &s)
    }
}

impl VelocityField for VelocityMlp {
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let b = x.dim(0)?;
        let tt = Tensor::full(t as f32, b, x.device())?;
        self.forward(x, &tt)?
            .to_dtype(x.dtype())
            .map_err(Error::from)
    }
}

/// The velocity network: the MLP (with the packed sampling path) or the U-Net of the
/// diffusion families, which predicts the velocity as its one output per pixel.
enum Field {
    Mlp(VelocityMlp),
    UNet(DenoiserNet),
}

impl VelocityField for Field {
    fn velocity(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        match self {
            Field::Mlp(m) => m.velocity(x, t),
            Field::UNet(u) => {
                let tt = Tensor::full(t as f32, x.dim(0)?, x.device())?;
                Ok(u.forward(x, &tt, true)?.to_dtype(x.dtype())?)
            }
        }
    }

    fn jvp(&self, x: &Tensor, t: f64, tangents: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
        match self {
            Field::Mlp(m) => m.jvp(x, t, tangents),
            Field::UNet(_) => Ok(None),
        }
    }
}

/// Rectified-flow / CondOT flow matching with an MLP or U-Net velocity field.
pub struct FlowMatching {
    core: ModelCore,
    net: Field,
    sampling: DiffusionSampling,
    dim: usize,
    scale: DataScale,
    device: Device,
}

impl FlowMatching {
    /// A new model for data of the given shape, weights drawn from `rng`.
    pub fn new(cfg: &Config, data: DataInfo, device: &Device, rng: &mut Rng) -> Result<Self> {
        if data.dim == 0 {
            return Err(Error::Shape(
                "flow matching needs data with at least 1 dimension".into(),
            ));
        }
        let core = ModelCore::new(data.dim, device);
        let net = {
            let mut p = ParamInit::new(&core.varmap, rng, device);
            match BackboneKind::resolve(cfg.net.backbone, &data)? {
                BackboneKind::Mlp => Field::Mlp(VelocityMlp::new(&mut p, data.dim, &cfg.net)?),
                BackboneKind::UNet { .. } => {
                    Field::UNet(DenoiserNet::new(&mut p, &data, 1, &cfg.net)?)
                }
            }
        };
        let scale = DataScale::with_bins(data.kind, cfg.bins)?;
        Ok(Self {
            core,
            net,
            sampling: cfg.sampling.clone(),
            dim: data.dim,
            scale,
            device: device.clone(),
        })
    }

    /// The MLP velocity network (`None` on the U-Net backbone).
    pub fn net(&self) -> Option<&VelocityMlp> {
        match &self.net {
            Field::Mlp(m) => Some(m),
            Field::UNet(_) => None,
        }
    }

    /// Data units -> model space (dequantizing discrete levels with `rng`).
    fn to_model_space(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.scale.dequantize(batch, rng)
    }

    fn check_batch(&self, batch: &Tensor) -> Result<()> {
        match batch.dims() {
            [_, d] if *d == self.dim => Ok(()),
            dims => Err(Error::Shape(format!(
                "flow model expects batches of shape [B, {}], got {dims:?}",
                self.dim
            ))),
        }
    }
}

impl GenerativeModel for FlowMatching {
    fn family(&self) -> &'static str {
        "flow-matching"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn likelihoods(&self) -> &'static [&'static str] {
        Config::LIKELIHOODS
    }

    fn sampling(&self, opts: &SampleOptions) -> String {
        match self.sampling.sampler {
            SamplerName::Auto => {
                let solver = solver_label(opts.solver.as_str(), opts.steps, opts.rtol, opts.atol);
                format!("ODE {solver}")
            }
            s => format!(
                "{} sampler on the CondOT path, {} steps",
                s.name(),
                opts.steps
            ),
        }
    }

    /// CFM loss, Lipman et al. 2023 eq. 23 with the CondOT path (sigma_min = 0).
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        self.check_batch(batch)?;
        let x1 = self.to_model_space(batch, rng)?; // [B, D]
        let (b, d) = x1.dims2()?;
        let x0 = rng.normal_tensor(&[b, d], &self.device)?; // [B, D]
        let t = rng.uniform_tensor(&[b], &self.device)?; // [B]
        let tc = t.reshape((b, 1))?;
        let xt = (x0.broadcast_mul(&(1.0 - &tc)?)? + x1.broadcast_mul(&tc)?)?; // [B, D]
        let target = (&x1 - &x0)?;
        let v = match &self.net {
            Field::Mlp(m) => m.forward(&xt, &t)?,
            Field::UNet(u) => u.forward(&xt, &t, true)?,
        };
        Ok((v - target)?.sqr()?.mean_all()?)
    }

    fn sample(&self, n: usize, opts: &SampleOptions, rng: &mut Rng) -> Result<Tensor> {
        let x = if self.sampling.sampler == SamplerName::Auto {
            let solver = Solver::parse(opts.solver.as_str(), opts.steps, opts.rtol, opts.atol)?;
            let z0 = rng.normal_tensor(&[n, self.dim], &self.device)?;
            // The ODE runs on the inference path: no step records an autograd graph. On the
            // CPU the weights are packed once for the whole solve.
            let packed = match &self.net {
                Field::Mlp(m) if self.device.is_cpu() => m.packed()?,
                _ => None,
            };
            let field = |x: &Tensor, t: f64| -> Result<Tensor> {
                let tt = Tensor::full(t as f32, x.dim(0)?, x.device())?;
                match &self.net {
                    Field::Mlp(m) => {
                        if let Some(p) = &packed {
                            return Ok(m.forward_packed(p, x, t)?.to_dtype(x.dtype())?);
                        }
                        Ok(m.forward_inference(x, &tt)?.to_dtype(x.dtype())?)
                    }
                    Field::UNet(u) => Ok(u.forward(x, &tt, false)?.to_dtype(x.dtype())?),
                }
            };
            cnf::sample(&field, &z0, &solver)?.0
        } else {
            // any diffusion sampler (DDIM, Heun, Euler-Maruyama, PC, ...) on the CondOT path
            let fd = sampling::FlowAsDiffusion::new(&self.net, self.dim);
            sampling::sample(
                &fd,
                SamplerName::Ode,
                n,
                &self.sampling,
                opts,
                rng,
                &self.device,
            )?
        };
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        self.check_batch(batch)?;
        crate::model::likelihood_choice(opts, self.family(), Config::LIKELIHOODS)?;
        let co = pf_ode::cnf_options(opts, self.dim)?;
        let x = self.to_model_space(batch, rng)?;
        let ll = cnf::log_likelihood(&self.net, &x, &co, rng)?;
        // the dequantization's Jacobian: log p_y = log p_x + D log(bin width)
        let offset = self.scale.log_jacobian(self.dim);
        let nats = ll.logp.iter().map(|lp| -(lp + offset)).collect();
        Ok(Nll {
            nats,
            dims: self.dim,
            kind: pf_ode::kind(&co.divergence, self.scale.levels.is_some()),
        })
    }

    fn likelihood_method(&self, opts: &EvalOptions) -> String {
        let div = pf_ode::divergence_label(opts, self.dim);
        let solver = solver_label(opts.solver.as_str(), opts.steps, opts.rtol, opts.atol);
        let deq = self.scale.dequantization_note();
        format!("CNF instantaneous change of variables, {solver}, {div}{deq}")
    }
}
