//! Seeded parameter creation.
//!
//! candle-nn's `VarBuilder` initialises new variables with candle's global RNG, which cannot be
//! seeded on the CPU. [`ParamInit`] draws every initial value from our own [`Rng`] and inserts
//! the variable into the model's `VarMap` under its full name, so two runs with the same seed
//! start from bit-identical weights.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::{Error, Result, Rng};

/// Creates named, seeded parameters in a `VarMap`.
pub struct ParamInit<'a> {
    varmap: &'a VarMap,
    rng: &'a mut Rng,
    device: Device,
    prefix: String,
}

impl<'a> ParamInit<'a> {
    /// A parameter factory writing into `varmap`, drawing from `rng`.
    pub fn new(varmap: &'a VarMap, rng: &'a mut Rng, device: &Device) -> Self {
        Self {
            varmap,
            rng,
            device: device.clone(),
            prefix: String::new(),
        }
    }

    /// A factory whose names are prefixed with `name.` (for sub-modules).
    pub fn push(&mut self, name: &str) -> ParamInit<'_> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        ParamInit {
            varmap: self.varmap,
            rng: self.rng,
            device: self.device.clone(),
            prefix,
        }
    }

    /// The generator initial values are drawn from (for initialisations computed outside the
    /// factory, such as a random rotation).
    pub fn rng(&mut self) -> &mut Rng {
        self.rng
    }

    /// The device parameters are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Insert a parameter with the given initial value; returns its variable.
    pub fn insert(&mut self, name: &str, value: Tensor) -> Result<Var> {
        let full = self.full_name(name);
        let var = Var::from_tensor(&value.to_dtype(DType::F32)?)?;
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| Error::Config("parameter map lock poisoned".into()))?;
        if data.contains_key(&full) {
            return Err(Error::Config(format!("parameter '{full}' defined twice")));
        }
        data.insert(full, var.clone());
        Ok(var)
    }

    /// A parameter drawn uniformly from [-bound, bound].
    pub fn uniform(&mut self, name: &str, shape: &[usize], bound: f64) -> Result<Var> {
        let u = self.rng.uniform_tensor(shape, &self.device)?; // [shape] in [0, 1)
        let value = ((u * (2.0 * bound))? - bound)?;
        self.insert(name, value)
    }

    /// A parameter drawn from N(0, std^2).
    pub fn normal(&mut self, name: &str, shape: &[usize], std: f64) -> Result<Var> {
        let value = (self.rng.normal_tensor(shape, &self.device)? * std)?;
        self.insert(name, value)
    }

    /// A parameter filled with a constant.
    pub fn constant(&mut self, name: &str, shape: &[usize], value: f64) -> Result<Var> {
        let t = (Tensor::ones(shape, DType::F32, &self.device)? * value)?;
        self.insert(name, t)
    }
}
