//! The codebook of a vector-quantised autoencoder (van den Oord et al. 2017, "Neural Discrete
//! Representation Learning"): `K` vectors `e_1..e_K` of `D` dimensions, nearest-code
//! quantisation `z_q(x) = e_k`, `k = argmin_j ||z_e(x) - e_j||` (eq. 1-2), and the two ways of
//! learning it:
//!
//! - by the codebook term `||sg[z_e] - e||^2` of the loss (eq. 3), the codebook a parameter;
//! - by exponential moving averages (appendix A.1): with `n_i` the batch's encoder outputs
//!   assigned to code `i` and `s_i` their sum,
//!
//!   `N_i <- γ N_i + (1 - γ) n_i`,  `m_i <- γ m_i + (1 - γ) s_i`,  `e_i = m_i / N_i`  (eq. 6-8),
//!
//!   the codebook then state, not a parameter. `N_i` starts at 1 and `m_i` at `e_i`, so a code
//!   no batch uses keeps its vector (both decay by `γ`).
//!
//! Dead-code restarts (as in Dhariwal et al. 2020, Jukebox, sec. 3.1 / appendix: "random
//! restarts"): a code no batch has used for `dead_after` steps is moved to one of the current
//! batch's encoder outputs, drawn with the run's generator, and its averages restart there.
//!
//! The codebook lives on the host (`K x D` floats): the EMA update and the restarts are loops
//! over the batch's assignments, and the embedding is uploaded once per forward pass.

use candle_core::{DType, Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Rng};

/// How the codebook is learned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodebookUpdate {
    /// Exponential moving averages of the assigned encoder outputs (appendix A.1).
    Ema,
    /// Gradient descent on the codebook term `||sg[z_e] - e||^2` (eq. 3).
    Loss,
}

/// `K` code vectors of `D` dimensions with their EMA statistics and idle counters.
#[derive(Clone, Debug)]
pub struct Codebook {
    k: usize,
    d: usize,
    /// `e`, `[K, D]` row-major (the EMA codebook; a copy of the parameter otherwise).
    embedding: Vec<f32>,
    /// `N`, `[K]`.
    ema_count: Vec<f32>,
    /// `m`, `[K, D]`.
    ema_sum: Vec<f32>,
    /// Steps since each code was last assigned, `[K]`.
    idle: Vec<f32>,
    /// The parameter holding `e` when the codebook is learned by the loss.
    param: Option<Var>,
}

/// What one batch did with the codebook.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    /// Fraction of the `K` codes the batch assigned at least once.
    pub used: f64,
    /// `exp(H)` of the batch's code frequencies: the effective number of codes in use.
    pub perplexity: f64,
}

impl Codebook {
    /// A codebook with the given initial vectors (`[K, D]` row-major); `param` is the
    /// parameter holding them when the codebook is learned by the loss.
    pub fn new(k: usize, d: usize, init: Vec<f32>, param: Option<Var>) -> Result<Self> {
        if k == 0 || d == 0 || init.len() != k * d {
            return Err(Error::Shape(format!(
                "a codebook of {k} codes of {d} dimensions needs {} initial values, got {}",
                k * d,
                init.len()
            )));
        }
        Ok(Self {
            k,
            d,
            ema_sum: init.clone(),
            embedding: init,
            ema_count: vec![1.0; k],
            idle: vec![0.0; k],
            param,
        })
    }

    /// Codes `K`.
    pub fn size(&self) -> usize {
        self.k
    }

    /// Dimensions `D` of a code vector.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// The code vectors `[K, D]` on `device`: the parameter itself (recording gradients) when
    /// the codebook is learned by the loss, a constant otherwise.
    pub fn embedding(&self, device: &Device) -> Result<Tensor> {
        match &self.param {
            Some(p) => Ok(p.as_tensor().clone()),
            None => Ok(Tensor::from_vec(
                self.embedding.clone(),
                (self.k, self.d),
                device,
            )?),
        }
    }

    /// The code vectors on the host, `[K, D]` row-major.
    pub fn vectors(&self) -> &[f32] {
        &self.embedding
    }

    /// The EMA counts `N`, `[K]`.
    pub fn ema_count(&self) -> &[f32] {
        &self.ema_count
    }

    /// Steps since each code was last used.
    pub fn idle(&self) -> &[f32] {
        &self.idle
    }

    /// The index of the nearest code of each row of `z: [N, D]`, `[N]` u32 (eq. 2), with
    /// `||z - e||^2 = ||z||^2 - 2 z·e + ||e||^2`.
    pub fn nearest(&self, z: &Tensor) -> Result<Tensor> {
        let e = self.embedding(z.device())?.detach();
        let z = z.detach();
        let cross = z.matmul(&e.t()?)?; // [N, K]
        let e2 = e.sqr()?.sum(1)?; // [K]
        let dist = (e2.broadcast_sub(&(cross * 2.0)?)?).broadcast_add(&z.sqr()?.sum_keepdim(1)?)?;
        Ok(dist.argmin(1)?.to_dtype(DType::U32)?) // [N]
    }

    /// The code vectors of `codes: [N]`, `[N, D]`.
    pub fn lookup(&self, codes: &Tensor, device: &Device) -> Result<Tensor> {
        Ok(self
            .embedding(device)?
            .index_select(&codes.to_dtype(DType::U32)?, 0)?)
    }

    /// One EMA step (appendix A.1, eq. 6-8) from the batch's encoder outputs `z: [N, D]`
    /// (row-major, host) and their codes, with decay `gamma`. Codes with `N_i` underflowed to
    /// zero keep their vectors.
    pub fn ema_update(&mut self, z: &[f32], codes: &[u32], gamma: f64) -> Result<()> {
        let (n_i, s_i) = self.assigned(z, codes)?;
        let (g, d) = (gamma, self.d);
        for i in 0..self.k {
            let c = g * f64::from(self.ema_count[i]) + (1.0 - g) * n_i[i];
            self.ema_count[i] = c as f32;
            for j in 0..d {
                let m = g * f64::from(self.ema_sum[i * d + j]) + (1.0 - g) * s_i[i * d + j];
                self.ema_sum[i * d + j] = m as f32;
                if c > 0.0 {
                    self.embedding[i * d + j] = (m / c) as f32;
                }
            }
        }
        Ok(())
    }

    /// Count the steps each code has gone unused, and move every code unused for `dead_after`
    /// steps (0: never) to a row of `z` drawn uniformly with `rng`, its EMA restarting there
    /// (`N_i = 1`, `m_i = e_i`). Returns the number restarted.
    pub fn restart_dead(
        &mut self,
        z: &[f32],
        codes: &[u32],
        dead_after: usize,
        rng: &mut Rng,
    ) -> Result<usize> {
        let (n_i, _) = self.assigned(z, codes)?;
        for (idle, n) in self.idle.iter_mut().zip(&n_i) {
            *idle = if *n > 0.0 { 0.0 } else { *idle + 1.0 };
        }
        if dead_after == 0 {
            return Ok(0);
        }
        let rows = codes.len();
        let d = self.d;
        let mut restarted = 0;
        for i in 0..self.k {
            if self.idle[i] < dead_after as f32 {
                continue;
            }
            let r = rng.below(rows);
            let v = &z[r * d..(r + 1) * d];
            self.embedding[i * d..(i + 1) * d].copy_from_slice(v);
            self.ema_sum[i * d..(i + 1) * d].copy_from_slice(v);
            self.ema_count[i] = 1.0;
            self.idle[i] = 0.0;
            restarted += 1;
        }
        if restarted > 0 {
            self.sync_param()?;
        }
        Ok(restarted)
    }

    /// Set every code vector to a row of `z: [N, D]` (host) drawn uniformly with `rng` (a
    /// data-dependent initialisation), restarting the averages there.
    pub fn init_from(&mut self, z: &[f32], rng: &mut Rng) -> Result<()> {
        let d = self.d;
        let rows = z.len() / d;
        if rows == 0 || z.len() != rows * d {
            return Err(Error::Shape(format!(
                "codebook initialisation needs rows of {d} values, got {} values",
                z.len()
            )));
        }
        for i in 0..self.k {
            let r = rng.below(rows);
            self.embedding[i * d..(i + 1) * d].copy_from_slice(&z[r * d..(r + 1) * d]);
        }
        self.ema_sum.copy_from_slice(&self.embedding);
        self.ema_count.fill(1.0);
        self.idle.fill(0.0);
        self.sync_param()
    }

    /// After a gradient step on the parameter, copy it to the host vectors.
    pub fn pull_param(&mut self) -> Result<()> {
        if let Some(p) = &self.param {
            self.embedding = p.as_tensor().flatten_all()?.to_vec1()?;
        }
        Ok(())
    }

    fn sync_param(&self) -> Result<()> {
        if let Some(p) = &self.param {
            let t = Tensor::from_vec(self.embedding.clone(), (self.k, self.d), p.device())?;
            p.set(&t)?;
        }
        Ok(())
    }

    /// `n_i` and `s_i` of the batch (f64).
    fn assigned(&self, z: &[f32], codes: &[u32]) -> Result<(Vec<f64>, Vec<f64>)> {
        let d = self.d;
        if z.len() != codes.len() * d {
            return Err(Error::Shape(format!(
                "{} codes need {} encoder values of {d} dimensions, got {}",
                codes.len(),
                codes.len() * d,
                z.len()
            )));
        }
        let mut n = vec![0f64; self.k];
        let mut s = vec![0f64; self.k * d];
        for (r, &c) in codes.iter().enumerate() {
            let c = c as usize;
            if c >= self.k {
                return Err(Error::Shape(format!(
                    "code {c} is outside a codebook of {}",
                    self.k
                )));
            }
            n[c] += 1.0;
            for j in 0..d {
                s[c * d + j] += f64::from(z[r * d + j]);
            }
        }
        Ok((n, s))
    }

    /// The state to checkpoint, by name under `prefix`.
    pub fn state(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let (k, d) = (self.k, self.d);
        Ok(vec![
            (
                format!("{prefix}embedding"),
                Tensor::from_vec(self.embedding.clone(), (k, d), &dev)?,
            ),
            (
                format!("{prefix}ema_count"),
                Tensor::from_vec(self.ema_count.clone(), k, &dev)?,
            ),
            (
                format!("{prefix}ema_sum"),
                Tensor::from_vec(self.ema_sum.clone(), (k, d), &dev)?,
            ),
            (
                format!("{prefix}idle"),
                Tensor::from_vec(self.idle.clone(), k, &dev)?,
            ),
        ])
    }

    /// Restore [`Codebook::state`] from `get(name)`.
    pub fn load_state(&mut self, prefix: &str, get: impl Fn(&str) -> Option<Tensor>) -> Result<()> {
        let read = |name: &str, len: usize| -> Result<Vec<f32>> {
            let full = format!("{prefix}{name}");
            let t = get(&full).ok_or_else(|| {
                Error::Config(format!(
                    "the checkpoint holds no codebook state '{full}' (was it written by a \
                     vq-vae run with the same settings?)"
                ))
            })?;
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            if v.len() != len {
                return Err(Error::Config(format!(
                    "codebook state '{full}' has {} values, this codebook needs {len} (check \
                     model.codebook_size and model.code_dim)",
                    v.len()
                )));
            }
            Ok(v)
        };
        let (k, d) = (self.k, self.d);
        self.embedding = read("embedding", k * d)?;
        self.ema_count = read("ema_count", k)?;
        self.ema_sum = read("ema_sum", k * d)?;
        self.idle = read("idle", k)?;
        // the parameter (if any) is restored with the weights; keep the host copy in step
        self.pull_param()
    }
}

/// The fraction of `k` codes that `codes` uses and the perplexity `exp(-Σ p_i log p_i)` of
/// their frequencies.
pub fn usage(codes: &[u32], k: usize) -> Usage {
    let mut n = vec![0usize; k];
    for &c in codes {
        if let Some(x) = n.get_mut(c as usize) {
            *x += 1;
        }
    }
    let total = codes.len().max(1) as f64;
    let h: f64 = n
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total;
            -p * p.ln()
        })
        .sum();
    Usage {
        used: n.iter().filter(|&&c| c > 0).count() as f64 / k.max(1) as f64,
        perplexity: h.exp(),
    }
}
