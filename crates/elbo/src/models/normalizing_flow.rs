//! Normalizing flows, one family with a choice of architecture: NICE (additive couplings and a
//! diagonal scaling; Dinh et al. 2015), RealNVP (affine couplings with alternating masks and
//! ActNorm in place of batch normalisation; Dinh et al. 2017) and Glow (steps of ActNorm, an
//! invertible LU-decomposed linear map and an affine coupling; Kingma & Dhariwal 2018), each
//! with MLP conditioners on the flat data vector.
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
use crate::continuous::diffusion::net::{check_batch, DataScale};
use crate::flows::{ActNorm, Coupling, CouplingKind, Flow, LuLinear, Mask, Scaling};
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
    /// Coupling layers (NICE, RealNVP) or flow steps (Glow).
    pub layers: usize,
    /// Units of each hidden layer of a coupling's conditioner.
    pub hidden: usize,
    /// Hidden layers per conditioner.
    pub depth: usize,
    /// The conditioners' activation.
    pub activation: Activation,
    /// Sampling temperature `T`: `z ~ N(0, T² I)` (1 draws from the model itself).
    pub temperature: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            variant: Variant::Realnvp,
            layers: 8,
            hidden: 128,
            depth: 2,
            activation: Activation::Silu,
            temperature: 1.0,
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

    /// The exact parameter count on `d` dimensions.
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
        let width = self.hidden.max(2 * d);
        MemoryEstimate {
            params: self.param_count(d) as u64,
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
        Ok(Box::new(NormalizingFlow::new(self, *data, device, rng)?))
    }
}

/// A normalizing flow on flat data.
pub struct NormalizingFlow {
    core: ModelCore,
    cfg: Config,
    scale: DataScale,
    flow: Flow,
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
                            flow.push(Box::new(ActNorm::new(&mut q.push("actnorm"), d)?));
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
            scale: DataScale::new(data.kind)?,
            flow,
        })
    }

    /// The flow itself (layers, forward, inverse).
    pub fn flow(&self) -> &Flow {
        &self.flow
    }
}

/// One standard normal draw from the parameter factory's generator.
fn rng_normal(p: &mut ParamInit) -> f64 {
    p.rng().normal()
}

impl GenerativeModel for NormalizingFlow {
    fn family(&self) -> &'static str {
        "normalizing-flow"
    }

    fn core(&self) -> &ModelCore {
        &self.core
    }

    /// The NLL in nats per dimension of a dequantized batch.
    fn loss(&self, batch: &Tensor, rng: &mut Rng) -> Result<Tensor> {
        check_batch(batch, self.core.dim, "normalizing-flow")?;
        let x = self.scale.dequantize(batch, rng)?;
        Ok((self.flow.nll(&x)?.mean_all()? / self.core.dim as f64)?)
    }

    /// ActNorm's data-dependent initialisation on the first (dequantized) batch.
    fn init_from_data(&mut self, batch: &Tensor, rng: &mut Rng) -> Result<()> {
        check_batch(batch, self.core.dim, "normalizing-flow")?;
        let x = self.scale.dequantize(batch, rng)?;
        self.flow.init_from_data(&x)
    }

    fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        self.flow.state()
    }

    fn load_state_tensors(&mut self, t: &HashMap<String, Tensor>) -> Result<()> {
        self.flow.load_state(t)
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
        let z =
            (rng.normal_tensor(&[n, self.core.dim], &self.core.device)? * self.cfg.temperature)?; // [n, D]
        let x = self.flow.inverse(&z)?;
        self.scale.to_data(&x)
    }

    fn log_likelihood(&self, batch: &Tensor, opts: &EvalOptions, rng: &mut Rng) -> Result<Nll> {
        likelihood_choice(opts, "normalizing-flow", Config::LIKELIHOODS)?;
        check_batch(batch, self.core.dim, "normalizing-flow")?;
        let x = self.scale.dequantize(batch, rng)?;
        let off = self.scale.log_jacobian(self.core.dim);
        let v: Vec<f32> = self.flow.nll(&x)?.detach().to_vec1()?;
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
        format!(
            "exact change of variables through the {} flow ({} layers, log-determinants in \
             closed form){}",
            self.cfg.variant.name(),
            self.cfg.layers,
            self.scale.dequantization_note()
        )
    }
}
