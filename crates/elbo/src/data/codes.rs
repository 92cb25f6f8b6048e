//! `codes:RUN`: the code grids a finished VQ-VAE run assigns to its own images, as a discrete
//! data set of sequences, so that any discrete family (ar, mdlm, bd3lm, ...) trains a prior
//! over them unchanged (the second stage of van den Oord et al. 2017, sec. 4.2).
//!
//! The run's `best/` checkpoint (its `checkpoint/` when it has none) encodes the run's own
//! train, validation and test splits once, when the source opens; each image becomes its
//! `h x w` codes, row-major, with `K` levels (the codebook size). The splits stay the image
//! splits, so a prior is selected on the codes of the validation images and scored on those of
//! the test images. Loading a run trained on `codes:RUN` gives the two-stage model of the
//! images ([`crate::latent::two_stage`]).

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use super::{DataKind, DataSource, Layout};
use crate::train::{CheckpointChoice, LoadedRun};
use crate::{Error, Result, Rng};

/// The prefix naming a code data set.
pub const PREFIX: &str = "codes:";

/// Images encoded per batch.
const ENCODE_BATCH: usize = 500;

/// The run directory a `codes:RUN` name points at, or `None` for other names.
pub fn run_dir(name: &str) -> Option<PathBuf> {
    name.strip_prefix(PREFIX).map(PathBuf::from)
}

/// The checkpoint of a VQ-VAE run that `codes:RUN` encodes with: `best/` when the run has
/// one, else the latest.
pub fn checkpoint_of(dir: &Path) -> CheckpointChoice {
    if dir.join("best").join("state.json").is_file() {
        CheckpointChoice::Best
    } else {
        CheckpointChoice::Latest
    }
}

/// The VQ-VAE run of `dir` (live weights: the codebook follows them) with its image data.
pub fn open_autoencoder(dir: &Path, device: &Device) -> Result<LoadedRun> {
    let run = LoadedRun::open(dir, checkpoint_of(dir), false, device).map_err(|e| {
        Error::Config(format!(
            "codes:{}: cannot load the VQ-VAE run ({e}); train one first, e.g. elbo train \
             --config configs/mnist-vqvae.toml --out {}",
            dir.display(),
            dir.display()
        ))
    })?;
    if run.model.code_autoencoder().is_none() {
        return Err(Error::Config(format!(
            "codes:{}: the run is a {} run; codes come from a vq-vae run",
            dir.display(),
            run.model.family()
        )));
    }
    Ok(run)
}

/// The code sequences of a VQ-VAE run's images.
#[derive(Clone, Debug)]
pub struct CodesSource {
    name: String,
    levels: usize,
    len: usize,
    train: Vec<f32>,
    val: Vec<f32>,
    test: Vec<f32>,
}

impl CodesSource {
    /// Encode the splits of the VQ-VAE run in `dir` (see the module docs).
    pub fn open(name: &str, dir: &Path) -> Result<Self> {
        let dev = Device::Cpu;
        let run = open_autoencoder(dir, &dev)?;
        let ae = run
            .model
            .code_autoencoder()
            .ok_or_else(|| Error::Config(format!("{name}: not a vq-vae run")))?;
        let (h, w) = ae.code_grid();
        let train = run.data.train_set(&dev)?.ok_or_else(|| {
            Error::Config(format!(
                "{name}: the VQ-VAE's data set ({}) has no finite training set to encode",
                run.data.name()
            ))
        })?;
        let encode = |x: &Tensor| -> Result<Vec<f32>> {
            let n = x.dim(0)?;
            let mut out = Vec::with_capacity(n * h * w);
            let mut start = 0;
            while start < n {
                let m = ENCODE_BATCH.min(n - start);
                let c = ae.encode_codes(&x.narrow(0, start, m)?)?; // [m, h w]
                out.extend(c.flatten_all()?.to_vec1::<f32>()?);
                start += m;
            }
            Ok(out)
        };
        Ok(Self {
            name: name.to_string(),
            levels: ae.codebook_size(),
            len: h * w,
            train: encode(&train)?,
            val: encode(&run.data.val_set(&dev)?)?,
            test: encode(&run.data.test_set(&dev)?)?,
        })
    }

    fn tensor(&self, v: &[f32], device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            v.to_vec(),
            (v.len() / self.len, self.len),
            device,
        )?)
    }
}

impl DataSource for CodesSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.len
    }

    fn kind(&self) -> DataKind {
        DataKind::Discrete {
            levels: self.levels,
        }
    }

    fn layout(&self) -> Layout {
        Layout::Sequence { len: self.len }
    }

    fn train_batch(&mut self, batch_size: usize, rng: &mut Rng, device: &Device) -> Result<Tensor> {
        let v = super::registry::sample_rows(&self.train, self.len, batch_size, rng)?;
        Ok(Tensor::from_vec(v, (batch_size, self.len), device)?)
    }

    fn val_set(&self, device: &Device) -> Result<Tensor> {
        self.tensor(&self.val, device)
    }

    fn test_set(&self, device: &Device) -> Result<Tensor> {
        self.tensor(&self.test, device)
    }

    fn train_set(&self, device: &Device) -> Result<Option<Tensor>> {
        Ok(Some(self.tensor(&self.train, device)?))
    }
}
