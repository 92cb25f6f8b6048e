//! The small digit classifiers whose hidden features the Fréchet distance compares
//! ([`super::frechet`]): the role Inception-v3 plays in the FID of Heusel et al. (2017), at
//! the scale of the vendored digits (8x8) and MNIST (28x28) images.
//!
//! Each is an MLP `x / max_level -> 128 ReLU -> 64 ReLU -> 10 logits` trained once by
//! cross-entropy on its data set's training split (never the test split it later scores),
//! with the command
//!
//! ```text
//! cargo run --release -p elbo --example train_feature_net -- digits data/classifiers/digits.safetensors
//! cargo run --release -p elbo --example train_feature_net -- mnist data/classifiers/mnist.safetensors
//! ```
//!
//! The weights are vendored in `data/classifiers/` and embedded in the binary; on load their
//! FNV-1a hash is checked against the one recorded here, so a changed or corrupted file is an
//! error rather than silently different numbers. The features are the 64 activations of the
//! second hidden layer.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::data::{digits, mnist, split_train_val};
use crate::nn::plain::PlainLinear;
use crate::nn::ParamInit;
use crate::train::checkpoint::fnv1a64;
use crate::train::optim::{named_vars, AdamW, AdamWConfig};
use crate::{Error, Result, Rng};

/// Units of the first hidden layer.
pub const HIDDEN: usize = 128;
/// Units of the feature layer.
pub const FEATURES: usize = 64;
/// Classes.
pub const CLASSES: usize = 10;

/// The embedded weights of the digits classifier.
const DIGITS_NET: &[u8] = include_bytes!("../../../../data/classifiers/digits.safetensors");
/// The embedded weights of the MNIST classifier.
const MNIST_NET: &[u8] = include_bytes!("../../../../data/classifiers/mnist.safetensors");
/// FNV-1a hashes of the vendored files, as `train_feature_net` printed them.
const DIGITS_FNV: u64 = 0xf3f7_25cf_a23c_1778;
const MNIST_FNV: u64 = 0x1ece_075d_b5e4_a83b;

/// A trained classifier: weights as row-major `f32` matrices for a fast forward pass.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureNet {
    /// Input dimensions.
    pub dim: usize,
    /// The data's largest level (inputs are divided by it).
    pub max_level: f32,
    layers: Vec<(Vec<f32>, Vec<f32>, usize, usize)>, // (W [out, in], b [out], in, out)
}

/// The data set a classifier was trained on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FeatureData {
    /// 8x8 digits, 17 levels.
    Digits,
    /// 28x28 MNIST, 256 levels.
    Mnist,
}

impl FeatureData {
    /// By name (`digits`, `mnist`).
    pub fn from_name(name: &str) -> Result<Self> {
        match name {
            "digits" => Ok(Self::Digits),
            "mnist" => Ok(Self::Mnist),
            _ => Err(Error::Config(format!(
                "no feature classifier for '{name}': digits or mnist"
            ))),
        }
    }

    /// The data set for examples of `dim` values (64: digits, 784: MNIST).
    pub fn for_dim(dim: usize) -> Result<Self> {
        match dim {
            digits::PIXELS => Ok(Self::Digits),
            mnist::PIXELS => Ok(Self::Mnist),
            _ => Err(Error::Config(format!(
                "the Fréchet distance has feature classifiers for the 8x8 digits (64 values) and \
                 MNIST (784), not for {dim}-dimensional examples; use energy-distance, mmd or \
                 sliced-wasserstein"
            ))),
        }
    }

    /// (inputs, largest level, training images, their labels).
    fn training_set(&self) -> Result<(usize, f32, Vec<f32>, Vec<u8>)> {
        match self {
            Self::Digits => {
                let d = digits::load()?;
                let (train, _) = split_train_val(digits::N_TRAIN, 0.1, "digits")?;
                let x = train
                    .iter()
                    .flat_map(|&i| d.image(i).iter().map(|&p| f32::from(p)))
                    .collect();
                let y = train.iter().map(|&i| d.labels[i]).collect();
                Ok((digits::PIXELS, 16.0, x, y))
            }
            Self::Mnist => {
                let m = mnist::load()?;
                let rows: Vec<usize> = (0..m.len()).filter(|&i| !mnist::is_test(i)).collect();
                let x = rows
                    .iter()
                    .flat_map(|&i| m.image(i).iter().map(|&p| f32::from(p)))
                    .collect();
                let y = rows.iter().map(|&i| m.labels[i]).collect();
                Ok((mnist::PIXELS, 255.0, x, y))
            }
        }
    }
}

/// `log softmax(logits)[label]` averaged, negated: the cross-entropy of `logits: [B, 10]`.
fn cross_entropy(logits: &Tensor, labels: &[u8]) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach(); // [B, 1]
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?; // [B, 1]
    let logp = shifted.broadcast_sub(&lse)?; // [B, 10]
    let mut onehot = vec![0f32; labels.len() * CLASSES];
    for (i, &y) in labels.iter().enumerate() {
        onehot[i * CLASSES + y as usize] = 1.0;
    }
    let onehot = Tensor::from_vec(onehot, (labels.len(), CLASSES), logits.device())?;
    Ok(((logp * onehot)?.sum_all()?.neg()? / labels.len() as f64)?)
}

impl FeatureNet {
    /// Train the classifier of `data` from `seed`: AdamW(1e-3), batches of 128, `steps` steps.
    /// Returns the net and its training accuracy.
    pub fn train(data: FeatureData, steps: usize, seed: u64) -> Result<(Self, f64)> {
        let (dim, max_level, x, y) = data.training_set()?;
        let n = y.len();
        let dev = Device::Cpu;
        let varmap = candle_nn::VarMap::new();
        let mut rng = Rng::new(seed);
        let layers = {
            let mut p = ParamInit::new(&varmap, &mut rng, &dev);
            vec![
                PlainLinear::new(&mut p.push("l0"), dim, HIDDEN)?,
                PlainLinear::new(&mut p.push("l1"), HIDDEN, FEATURES)?,
                PlainLinear::new(&mut p.push("l2"), FEATURES, CLASSES)?,
            ]
        };
        let forward = |xb: &Tensor| -> Result<Tensor> {
            let h = layers[0].forward(xb)?.relu()?;
            let h = layers[1].forward(&h)?.relu()?;
            layers[2].forward(&h)
        };
        let params = named_vars(&varmap)?;
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-3,
            weight_decay: 1e-4,
            ..AdamWConfig::default()
        });
        let batch = 128.min(n);
        for _ in 0..steps {
            let rows: Vec<usize> = (0..batch).map(|_| rng.below(n)).collect();
            let xb: Vec<f32> = rows
                .iter()
                .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().map(|v| v / max_level))
                .collect();
            let yb: Vec<u8> = rows.iter().map(|&i| y[i]).collect();
            let xb = Tensor::from_vec(xb, (batch, dim), &dev)?;
            let loss = cross_entropy(&forward(&xb)?, &yb)?;
            opt.step(&params, &loss.backward()?, 1e-3)?;
        }
        let mut net = Self {
            dim,
            max_level,
            layers: Vec::new(),
        };
        for l in &layers {
            let (o, i) = l.weight().dims2()?;
            net.layers.push((
                l.weight().flatten_all()?.to_vec1()?,
                l.bias().to_vec1()?,
                i,
                o,
            ));
        }
        let correct = (0..n)
            .filter(|&i| net.predict(&x[i * dim..(i + 1) * dim], max_level) == y[i] as usize)
            .count();
        Ok((net, correct as f64 / n as f64))
    }

    /// The vendored classifier of `data`, its hash checked.
    pub fn vendored(data: FeatureData) -> Result<Self> {
        let (bytes, want, name) = match data {
            FeatureData::Digits => (DIGITS_NET, DIGITS_FNV, "digits"),
            FeatureData::Mnist => (MNIST_NET, MNIST_FNV, "mnist"),
        };
        Self::from_bytes(bytes, want, &format!("data/classifiers/{name}.safetensors"))
    }

    /// A classifier from safetensors `bytes` whose FNV-1a hash must be `want`.
    pub fn from_bytes(bytes: &[u8], want: u64, source: &str) -> Result<Self> {
        let got = fnv1a64(bytes);
        if got != want {
            return Err(Error::data(
                source,
                format!(
                    "the feature classifier's FNV-1a hash is {got:016x}, expected {want:016x}: the \
                     file changed or is missing; restore it from the repository or retrain it \
                     with the command in the elbo::eval::feature_net documentation"
                ),
            ));
        }
        let t = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)?;
        let get = |k: &str| -> Result<Vec<f32>> {
            let v = t
                .get(k)
                .ok_or_else(|| Error::data(source, format!("no tensor '{k}'")))?;
            Ok(v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let max_level = get("max_level")?.first().copied().unwrap_or(1.0);
        let mut layers = Vec::new();
        for l in 0..3 {
            let w = t
                .get(&format!("l{l}.weight"))
                .ok_or_else(|| Error::data(source, format!("no tensor 'l{l}.weight'")))?;
            let (o, i) = w.dims2()?;
            layers.push((
                get(&format!("l{l}.weight"))?,
                get(&format!("l{l}.bias"))?,
                i,
                o,
            ));
        }
        Ok(Self {
            dim: layers[0].2,
            max_level,
            layers,
        })
    }

    /// Write the weights to `path` as safetensors.
    pub fn save(&self, path: &std::path::Path) -> Result<()> {
        let dev = Device::Cpu;
        let mut map: HashMap<String, Tensor> = HashMap::new();
        map.insert(
            "max_level".into(),
            Tensor::from_vec(vec![self.max_level], 1, &dev)?,
        );
        for (l, (w, b, i, o)) in self.layers.iter().enumerate() {
            map.insert(
                format!("l{l}.weight"),
                Tensor::from_vec(w.clone(), (*o, *i), &dev)?,
            );
            map.insert(format!("l{l}.bias"), Tensor::from_vec(b.clone(), *o, &dev)?);
        }
        Ok(candle_core::safetensors::save(&map, path)?)
    }

    /// Activations of layers `0..upto` (ReLU after each) for one example `x` already scaled.
    fn run(&self, x: &[f32], upto: usize) -> Vec<f32> {
        let mut h = x.to_vec();
        for (k, (w, b, i, o)) in self.layers.iter().take(upto).enumerate() {
            let out: Vec<f32> = (0..*o)
                .map(|r| {
                    let row = &w[r * i..(r + 1) * i];
                    let s: f32 = row.iter().zip(&h).map(|(a, v)| a * v).sum::<f32>() + b[r];
                    if k + 1 < self.layers.len() {
                        s.max(0.0)
                    } else {
                        s
                    }
                })
                .collect();
            h = out;
        }
        h
    }

    /// The predicted class of one example in the data's units, divided by `scale`.
    pub fn predict(&self, x: &[f32], scale: f32) -> usize {
        let xs: Vec<f32> = x.iter().map(|v| v / scale).collect();
        let logits = self.run(&xs, 3);
        (0..logits.len())
            .max_by(|a, b| logits[*a].total_cmp(&logits[*b]))
            .unwrap_or(0)
    }

    /// The 64 features of every row of `x` (`[n, dim]` in the data's units, each divided by
    /// `scale`), as `f64`, row-major `[n, 64]`.
    pub fn features(&self, x: &[f32], scale: f32) -> Vec<f64> {
        use rayon::prelude::*;
        x.par_chunks(self.dim)
            .flat_map_iter(|row| {
                let xs: Vec<f32> = row.iter().map(|v| v / scale).collect();
                self.run(&xs, 2).into_iter().map(f64::from)
            })
            .collect()
    }
}
