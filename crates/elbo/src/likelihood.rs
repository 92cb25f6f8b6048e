//! Negative log-likelihoods with an honest label, and their units.
//!
//! Every family reports `Nll { nats, dims, kind }` per example, where `kind` says whether the number
//! is exact, an upper bound on the NLL (ELBO / VLB), a Monte-Carlo estimate (carrying its standard
//! error and sample count), or absent (GANs have no likelihood). One place converts nats to
//! bits/dim, bits/char and perplexity.
//!
//! ```
//! use elbo::{Nll, NllKind};
//! // two 64-pixel images scored exactly, in nats per image
//! let nll = Nll { nats: vec![120.0, 130.0], dims: 64, kind: NllKind::Exact };
//! let s = nll.summary();
//! assert_eq!(s.nats, 125.0);
//! assert!((s.bits_per_dim - 125.0 / (64.0 * std::f64::consts::LN_2)).abs() < 1e-12);
//! assert_eq!(s.kind.label(), "exact");
//! ```

use serde::{Deserialize, Serialize};

/// What kind of number a likelihood is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NllKind {
    /// The exact negative log-likelihood (autoregressive models, normalizing flows, CNFs with the
    /// exact divergence up to ODE-solver tolerance).
    Exact,
    /// An upper bound on the NLL (negative ELBO / VLB, Jensen bounds).
    Bound,
    /// A Monte-Carlo estimate: `samples` draws per example (e.g. Hutchinson probes).
    Estimate {
        /// Monte-Carlo samples per example.
        samples: usize,
    },
    /// The family has no likelihood (GAN, WGAN).
    None,
}

impl NllKind {
    /// A short human label: "exact", "bound", "estimate", "none".
    pub fn label(&self) -> &'static str {
        match self {
            NllKind::Exact => "exact",
            NllKind::Bound => "bound",
            NllKind::Estimate { .. } => "estimate",
            NllKind::None => "none",
        }
    }
}

/// Per-example negative log-likelihoods of one batch or data set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Nll {
    /// NLL of each example in nats (empty when `kind` is `None`).
    pub nats: Vec<f64>,
    /// Number of dimensions of one example (pixels, characters, coordinates).
    pub dims: usize,
    /// Exact, bound, estimate or none.
    pub kind: NllKind,
}

/// Mean NLL with its standard error, in several units.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NllSummary {
    /// Exact / bound / estimate / none.
    pub kind: NllKind,
    /// Number of examples averaged.
    pub n: usize,
    /// Dimensions per example.
    pub dims: usize,
    /// Mean NLL per example, nats.
    pub nats: f64,
    /// Standard error of that mean over the examples (includes Monte-Carlo noise for estimates).
    pub stderr_nats: f64,
    /// Mean NLL in bits per dimension (= bits/char for text).
    pub bits_per_dim: f64,
    /// Standard error in bits per dimension.
    pub stderr_bits_per_dim: f64,
    /// exp(nats per dimension).
    pub perplexity: f64,
}

impl Nll {
    /// An NLL with no values for families without a likelihood.
    pub fn none(dims: usize) -> Self {
        Nll {
            nats: Vec::new(),
            dims,
            kind: NllKind::None,
        }
    }

    /// Concatenate per-example values of several batches of the same kind and dimension.
    pub fn concat(parts: Vec<Nll>) -> crate::Result<Nll> {
        let mut it = parts.into_iter();
        let Some(mut first) = it.next() else {
            return Err(crate::Error::Config(
                "no likelihood values to combine".into(),
            ));
        };
        for p in it {
            if p.dims != first.dims || p.kind != first.kind {
                return Err(crate::Error::Shape(format!(
                    "cannot combine likelihoods of {} dims ({}) and {} dims ({})",
                    first.dims,
                    first.kind.label(),
                    p.dims,
                    p.kind.label()
                )));
            }
            first.nats.extend(p.nats);
        }
        Ok(first)
    }

    /// Mean, standard error and unit conversions.
    pub fn summary(&self) -> NllSummary {
        let n = self.nats.len();
        let (mean, se) = mean_stderr(&self.nats);
        let d = self.dims.max(1) as f64;
        NllSummary {
            kind: self.kind.clone(),
            n,
            dims: self.dims,
            nats: mean,
            stderr_nats: se,
            bits_per_dim: nats_to_bits_per_dim(mean, self.dims),
            stderr_bits_per_dim: nats_to_bits_per_dim(se, self.dims),
            perplexity: (mean / d).exp(),
        }
    }
}

/// Mean and standard error of the mean (NaN for an empty slice, 0 error for one value).
pub fn mean_stderr(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, (var / n as f64).sqrt())
}

/// Nats per example to bits per dimension: nats / (dims ln 2).
pub fn nats_to_bits_per_dim(nats: f64, dims: usize) -> f64 {
    nats / (dims.max(1) as f64 * std::f64::consts::LN_2)
}

/// Bits per dimension to nats per example.
pub fn bits_per_dim_to_nats(bpd: f64, dims: usize) -> f64 {
    bpd * dims as f64 * std::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_conversions_round_trip() {
        let nats = 123.456;
        let bpd = nats_to_bits_per_dim(nats, 64);
        assert!((bits_per_dim_to_nats(bpd, 64) - nats).abs() < 1e-12);
        // one uniform byte per dimension is exactly 8 bits/dim
        let byte = 256f64.ln() * 10.0;
        assert!((nats_to_bits_per_dim(byte, 10) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn summary_mean_stderr_perplexity() {
        let nll = Nll {
            nats: vec![1.0, 2.0, 3.0, 4.0],
            dims: 2,
            kind: NllKind::Exact,
        };
        let s = nll.summary();
        assert_eq!(s.n, 4);
        assert!((s.nats - 2.5).abs() < 1e-12);
        // sample sd = sqrt(5/3), se = sd / 2
        assert!((s.stderr_nats - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert!((s.perplexity - (1.25f64).exp()).abs() < 1e-12);
    }

    #[test]
    fn concat_checks_kind_and_dims() {
        let a = Nll {
            nats: vec![1.0],
            dims: 2,
            kind: NllKind::Exact,
        };
        let b = Nll {
            nats: vec![2.0],
            dims: 2,
            kind: NllKind::Exact,
        };
        let c = Nll {
            nats: vec![2.0],
            dims: 3,
            kind: NllKind::Exact,
        };
        assert_eq!(
            Nll::concat(vec![a.clone(), b]).unwrap().nats,
            vec![1.0, 2.0]
        );
        assert!(Nll::concat(vec![a, c]).is_err());
    }
}
