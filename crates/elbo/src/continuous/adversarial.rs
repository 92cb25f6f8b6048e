//! The adversarial objectives of the GAN family, as free functions of critic scores, and the
//! WGAN-GP gradient penalty over any critic given as a function.
//!
//! - The original GAN (Goodfellow et al. 2014, eq. 1): the discriminator `D = sigmoid(d)` maximises
//!   `E log D(x) + E log(1 - D(G(z)))`, i.e. minimises `E softplus(-d(x)) + E softplus(d(G(z)))`;
//!   the generator minimises `E log(1 - D(G(z))) = -E softplus(d(G(z)))` (minimax) or, in the
//!   non-saturating form the same paper recommends (sec. 3), `-E log D(G(z)) = E
//!   softplus(-d(G(z)))`.
//! - The Wasserstein GAN (Arjovsky et al. 2017, algorithm 1): the critic maximises the
//!   Kantorovich-Rubinstein dual `E f(x) - E f(G(z))` over (clipped, hence Lipschitz) `f`; the
//!   generator minimises `-E f(G(z))`.
//! - The hinge loss (Lim & Ye 2017, eq. 8-9; Miyato et al. 2018): the discriminator minimises
//!   `E relu(1 - d(x)) + E relu(1 + d(G(z)))`, the generator `-E d(G(z))` (the Wasserstein
//!   generator's loss); VQGAN's default (Esser et al. 2021).
//! - WGAN-GP (Gulrajani et al. 2017, algorithm 1, line 7): the Lipschitz constraint as the
//!   penalty `lambda E (|grad f(x_hat)|_2 - 1)^2` on interpolates `x_hat = eps x + (1 - eps)
//!   G(z)`, `eps ~ U[0, 1]` per example. Its gradient with respect to the critic's weights is a
//!   second derivative: the input gradient is taken with `backward_create_graph`, so the critic
//!   must be built from plain candle compositions ([`crate::nn::plain`]).

use candle_core::{Tensor, Var};

use crate::nn::plain::softplus;
use crate::{Error, Result};

/// The discriminator's loss `E softplus(-d(x)) + E softplus(d(G(z)))` for logits `[B]`.
pub fn discriminator_loss(d_real: &Tensor, d_fake: &Tensor) -> Result<Tensor> {
    Ok((softplus(&d_real.neg()?)?.mean_all()? + softplus(d_fake)?.mean_all()?)?)
}

/// The minimax generator loss `E log(1 - sigmoid(d(G(z)))) = -E softplus(d(G(z)))`.
pub fn minimax_generator_loss(d_fake: &Tensor) -> Result<Tensor> {
    Ok(softplus(d_fake)?.mean_all()?.neg()?)
}

/// The non-saturating generator loss `-E log sigmoid(d(G(z))) = E softplus(-d(G(z)))`.
pub fn non_saturating_generator_loss(d_fake: &Tensor) -> Result<Tensor> {
    Ok(softplus(&d_fake.neg()?)?.mean_all()?)
}

/// The hinge discriminator loss `E relu(1 - d(x)) + E relu(1 + d(G(z)))` for logits of any
/// shape (means over every element); the generator's counterpart is
/// [`wasserstein_generator_loss`].
pub fn hinge_discriminator_loss(d_real: &Tensor, d_fake: &Tensor) -> Result<Tensor> {
    let real = d_real.affine(-1.0, 1.0)?.relu()?.mean_all()?;
    let fake = d_fake.affine(1.0, 1.0)?.relu()?.mean_all()?;
    Ok((real + fake)?)
}

/// The Wasserstein critic's loss, the negated dual `E f(G(z)) - E f(x)`.
pub fn wasserstein_critic_loss(f_real: &Tensor, f_fake: &Tensor) -> Result<Tensor> {
    Ok((f_fake.mean_all()? - f_real.mean_all()?)?)
}

/// The Wasserstein generator's loss `-E f(G(z))`.
pub fn wasserstein_generator_loss(f_fake: &Tensor) -> Result<Tensor> {
    Ok(f_fake.mean_all()?.neg()?)
}

/// The gradient penalty `E (|grad_x f(x_hat)|_2 - 1)^2` (without its `lambda`) on the
/// interpolates `x_hat = eps real + (1 - eps) fake` of `real, fake: [B, D]` with `eps: [B, 1]`.
/// `fake` is detached; the result is a scalar whose gradient with respect to the critic's
/// parameters is exact when `critic` is a composition of candle ops (not a fused layer).
pub fn gradient_penalty(
    critic: impl Fn(&Tensor) -> Result<Tensor>,
    real: &Tensor,
    fake: &Tensor,
    eps: &Tensor,
) -> Result<Tensor> {
    if real.dims() != fake.dims() || eps.dims() != [real.dim(0)?, 1] {
        return Err(Error::Shape(format!(
            "gradient penalty: real {:?}, fake {:?} and eps {:?} must be [B, D], [B, D], [B, 1]",
            real.dims(),
            fake.dims(),
            eps.dims()
        )));
    }
    let one_minus = eps.affine(-1.0, 1.0)?; // [B, 1]
    let x_hat = (real.broadcast_mul(eps)? + fake.detach().broadcast_mul(&one_minus)?)?; // [B, D]
    let x_hat = Var::from_tensor(&x_hat)?;
    let scores = critic(x_hat.as_tensor())?; // [B]
    let grads = scores.sum_all()?.backward_create_graph()?;
    let gx = grads.get(x_hat.as_tensor()).ok_or_else(|| {
        Error::Config("gradient penalty: the critic's score does not depend on its input".into())
    })?; // [B, D]
         // the norm with a tiny floor under the root, whose derivative is infinite at 0
    let norm = (gx.sqr()?.sum(1)? + 1e-12)?.sqrt()?; // [B]
    Ok((norm - 1.0)?.sqr()?.mean_all()?)
}
