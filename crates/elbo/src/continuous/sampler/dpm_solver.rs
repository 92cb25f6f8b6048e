//! DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2): a second-order multistep solver of
//! the probability-flow ODE in the data-prediction form.
//!
//! With lambda = -log sigma (EDM sigma; the VP log-SNR / 2) and h_i = lambda_{i+1} - lambda_i, the
//! exact solution x_{i+1} = (sigma_{i+1} / sigma_i) x_i + sigma_{i+1} int e^lambda D dlambda is
//! approximated with D linear in lambda through the last two denoiser outputs:
//! D~ = (1 + 1 / (2 r)) D_i - 1 / (2 r) D_{i-1}, r = h_{i-1} / h_i, and
//! x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h_i) D~.
//! The first step, and the last one when it goes to sigma = 0 (or, with `lower_order_final`, any
//! last step of a grid of fewer than 15 steps), are first order (DDIM) as in diffusers'
//! `DPMSolverMultistepScheduler`. This EDM-variable form equals diffusers' VP-variable one with
//! x_VP = x / sqrt(1 + sigma^2).

use candle_core::Tensor;

use super::{check_sigmas, lin, Denoiser};
use crate::Result;

/// DPM-Solver++(2M) over the decreasing grid `sigmas` (end with 0 for the denoised sample), from
/// `x` at sigmas[0]. One denoiser call per step.
pub fn dpmpp_2m(
    den: &dyn Denoiser,
    sigmas: &[f64],
    lower_order_final: bool,
    x: &Tensor,
) -> Result<Tensor> {
    check_sigmas(sigmas)?;
    let n = sigmas.len() - 1;
    let mut x = x.clone();
    let mut old: Option<Tensor> = None;
    for i in 0..n {
        let (s, s_next) = (sigmas[i], sigmas[i + 1]);
        let d = den.denoise(&x, s)?;
        if s_next == 0.0 {
            x = d.clone();
        } else {
            let h = s.ln() - s_next.ln();
            let last = i == n - 1 && lower_order_final && n < 15;
            let dd = match (&old, last) {
                (Some(prev), false) => {
                    let h_last = sigmas[i - 1].ln() - s.ln();
                    let r = h_last / h;
                    lin(&d, 1.0 + 0.5 / r, prev, -0.5 / r)?
                }
                _ => d.clone(),
            };
            x = lin(&x, s_next / s, &dd, -(-h).exp_m1())?;
        }
        old = Some(d);
    }
    Ok(x)
}
