//! Turning one row of logits into a sampling distribution: temperature, top-k and top-p
//! (nucleus, Holtzman et al. 2020) filtering, then a categorical draw from our [`Rng`].

use crate::{Error, Result, Rng};

/// How to turn logits into a sampling distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenFilter {
    /// Divide logits by this (> 0); 1 leaves the model's distribution.
    pub temperature: f64,
    /// Keep only the `top_k` largest probabilities (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose mass reaches `top_p` (1: all).
    pub top_p: f64,
}

impl Default for TokenFilter {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
        }
    }
}

/// The `[model.sampling]` table of the autoregressive language models: how each token is drawn.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TokenSampling {
    /// Softmax temperature (1: the model's distribution).
    pub temperature: f64,
    /// Keep only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of tokens with mass >= `top_p` (1: all).
    pub top_p: f64,
}

impl Default for TokenSampling {
    fn default() -> Self {
        let f = TokenFilter::default();
        Self {
            temperature: f.temperature,
            top_k: f.top_k,
            top_p: f.top_p,
        }
    }
}

impl TokenSampling {
    /// The filter, range-checked.
    pub fn filter(&self) -> Result<TokenFilter> {
        TokenFilter::new(self.temperature, self.top_k, self.top_p)
    }
}

impl TokenFilter {
    /// A filter with checked ranges.
    pub fn new(temperature: f64, top_k: usize, top_p: f64) -> Result<Self> {
        let f = Self {
            temperature,
            top_k,
            top_p,
        };
        f.validate()?;
        Ok(f)
    }

    /// Check the ranges.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return Err(Error::Config(format!(
                "temperature must be > 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!(
                "top_p must be in (0, 1], got {}",
                self.top_p
            )));
        }
        Ok(())
    }

    /// The filtered, renormalised probabilities of one row of `logits`: softmax(logits / T),
    /// then zero outside the top k, then zero outside the nucleus (the most likely tokens whose
    /// cumulative mass first reaches `top_p`; ties broken by lower id).
    pub fn probs(&self, logits: &[f32]) -> Vec<f64> {
        let v = logits.len();
        let max = logits
            .iter()
            .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
        let mut p: Vec<f64> = logits
            .iter()
            .map(|&x| ((f64::from(x) - max) / self.temperature).exp())
            .collect();
        let mut order: Vec<usize> = (0..v).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let z: f64 = p.iter().sum();
        let mut keep = vec![false; v];
        let k = if self.top_k == 0 {
            v
        } else {
            self.top_k.min(v)
        };
        let mut mass = 0.0;
        for &i in order.iter().take(k) {
            keep[i] = true;
            mass += p[i] / z;
            if mass >= self.top_p {
                break;
            }
        }
        for (pi, k) in p.iter_mut().zip(&keep) {
            if !k {
                *pi = 0.0;
            }
        }
        let z: f64 = p.iter().sum();
        p.iter_mut().for_each(|x| *x /= z);
        p
    }

    /// Draw a token id from one row of logits.
    pub fn sample(&self, logits: &[f32], rng: &mut Rng) -> u32 {
        sample_categorical(&self.probs(logits), rng)
    }
}

/// A draw from a categorical distribution with probabilities `p` (summing to 1).
pub fn sample_categorical(p: &[f64], rng: &mut Rng) -> u32 {
    let u = rng.uniform();
    let mut c = 0.0;
    let mut last = 0;
    for (i, &pi) in p.iter().enumerate() {
        if pi > 0.0 {
            last = i;
            c += pi;
            if u < c {
                return i as u32;
            }
        }
    }
    last as u32
}
