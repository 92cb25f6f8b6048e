//! Latent-variable machinery shared by the VAE and VQ-VAE families and the two-stage models:
//! observation models `p(x | z)` ([`observation`]), the VQ-VAE's codebook ([`codebook`]), the
//! composition of a prior over codes with its autoencoder ([`two_stage`]), the
//! diagonal-Gaussian posterior's reparameterised draw and its closed-form KL to the standard normal prior (Kingma & Welling
//! 2014, appendix B), and the importance-weighted bound of Burda et al. (2016, eq. 8).
//!
//! The IWAE bound `L_k = E[log (1/k) Σ_i p(x, z_i) / q(z_i | x)]`, `z_i ~ q(z | x)`, satisfies
//! `L_1 = ELBO <= L_k <= L_{k+1} <= log p(x)` in expectation and `L_k -> log p(x)` as
//! `k -> ∞` (Burda et al. 2016, theorem 1).

pub mod codebook;
pub mod decoder;
pub mod observation;
pub mod two_stage;
pub mod vqgan;

pub use decoder::LatentDecoder;
pub use observation::{Observation, ObservationModel};

use candle_core::Tensor;

use crate::{Result, Rng};

const HALF_LOG_2PI: f64 = 0.918_938_533_204_672_8;

/// `z = μ + e^{logvar/2} ε`, `ε ~ N(0, I)`: `[N, Z]` (Kingma & Welling 2014, eq. 10).
pub fn reparameterise(mu: &Tensor, logvar: &Tensor, rng: &mut Rng) -> Result<Tensor> {
    let eps = rng.normal_tensor(mu.dims(), mu.device())?;
    Ok((mu + (logvar * 0.5)?.exp()?.mul(&eps)?)?)
}

/// `KL(N(μ, diag e^{logvar}) || N(0, I))` per latent dimension, `[N, Z]`:
/// `(μ² + e^{logvar} - 1 - logvar) / 2`.
pub fn kl_std_normal(mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    Ok((((mu.sqr()? + logvar.exp()?)? - 1.0)? - logvar)?.affine(0.5, 0.0)?)
}

/// `log N(z; μ, diag e^{logvar})` per row, `[N]`.
pub fn diag_normal_log_density(z: &Tensor, mu: &Tensor, logvar: &Tensor) -> Result<Tensor> {
    let d = z.dim(candle_core::D::Minus1)? as f64;
    let e = (z - mu)?.sqr()?.mul(&logvar.neg()?.exp()?)?; // [N, Z]
    Ok((((e + logvar)?.sum(candle_core::D::Minus1)? * -0.5)? - d * HALF_LOG_2PI)?)
}

/// `log N(z; 0, I)` per row, `[N]`.
pub fn std_normal_log_density(z: &Tensor) -> Result<Tensor> {
    let d = z.dim(candle_core::D::Minus1)? as f64;
    Ok(((z.sqr()?.sum(candle_core::D::Minus1)? * -0.5)? - d * HALF_LOG_2PI)?)
}
