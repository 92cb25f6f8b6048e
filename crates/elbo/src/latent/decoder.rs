//! The contract between latent-variable generators and likelihood estimators that need only the
//! joint density `log p(x, z) = log p(z) + log p(x | z)`: annealed importance sampling over `z`
//! (Neal 2001; Wu et al. 2017 evaluate GAN and VAE decoders this way) and the importance-weighted
//! bound. A VAE's decoder, a GAN's generator with a stated Gaussian observation model and a
//! two-stage model's decoder all implement it; the estimators never see the family.

use candle_core::{Device, Tensor};

use crate::Result;

/// A generator `x = g(z)` with a prior `p(z)` and an observation model `p(x | z)`, both with
/// densities that can be differentiated with respect to `z`.
pub trait LatentDecoder {
    /// Dimensions of the latent `z`.
    fn latent_dim(&self) -> usize;

    /// `log p(z)` per row, `[N]`, for `z: [N, Z]` (the standard normal unless stated).
    fn log_prior(&self, z: &Tensor) -> Result<Tensor> {
        super::std_normal_log_density(z)
    }

    /// `n` draws from the prior, `[n, Z]` (the standard normal unless stated; must match
    /// [`LatentDecoder::log_prior`]).
    fn sample_prior(&self, n: usize, device: &Device, rng: &mut crate::Rng) -> Result<Tensor> {
        rng.normal_tensor(&[n, self.latent_dim()], device)
    }

    /// `log p(x | z)` per row, `[N]`, for `z: [N, Z]` and `x: [N, D]` in the data's stored
    /// values (the same `x` the family's `log_likelihood` scores). Must be differentiable with
    /// respect to `z` through plain `backward` (a first derivative only).
    fn log_likelihood_given(&self, z: &Tensor, x: &Tensor) -> Result<Tensor>;

    /// One line for reports: the observation model and its parameters (for a GAN, the stated
    /// Gaussian `sigma` whose likelihood is then the one estimated).
    fn observation_label(&self) -> String;
}
