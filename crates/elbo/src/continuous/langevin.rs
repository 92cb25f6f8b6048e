//! Langevin dynamics on an energy `E(x)`, `p(x) ∝ exp(-E(x))`: the unadjusted update
//!
//!   x' = x - (η²/2) ∇E(x) + η ξ,   ξ ~ N(0, I)                 (Roberts & Tweedie 1996, eq. 1.2)
//!
//! and, with the Metropolis adjustment (MALA, Roberts & Tweedie 1996, section 1.4.3), the
//! proposal accepted with probability
//! `min(1, exp(E(x) - E(x')) q(x | x') / q(x' | x))`, `q(x' | x) = N(x'; x - (η²/2) ∇E(x), η² I)`,
//! which makes `exp(-E)` exactly invariant. Energy-based models sample and train (short-run
//! persistent chains, Du & Mordatch 2019, algorithm 1) with it.

use candle_core::{Tensor, Var};

use crate::{Result, Rng};

/// Something with an energy per row that can be differentiated in `x` once.
pub trait Energy {
    /// `E(x)` per row, `[R]`, for `x: [R, D]`, recording the graph in `x`.
    fn energy(&self, x: &Tensor) -> Result<Tensor>;
}

/// `(E(x) [R], ∇E(x) [R, D])`, both detached.
pub fn energy_and_grad(e: &dyn Energy, x: &Tensor) -> Result<(Tensor, Tensor)> {
    let v = Var::from_tensor(&x.detach())?;
    let y = e.energy(v.as_tensor())?; // [R]
    let grads = y.sum_all()?.backward()?;
    let g = match grads.get(v.as_tensor()) {
        Some(g) => g.detach(),
        None => v.as_tensor().zeros_like()?,
    };
    Ok((y.detach(), g))
}

/// `steps` Langevin steps of size `eta` from `x0: [R, D]`; with `metropolis` each is a MALA
/// step. Returns the final positions and the mean acceptance (1 without the adjustment).
pub fn langevin(
    e: &dyn Energy,
    x0: &Tensor,
    eta: f64,
    steps: usize,
    metropolis: bool,
    rng: &mut Rng,
) -> Result<(Tensor, f64)> {
    let mut x = x0.detach();
    let (mut ex, mut gx) = energy_and_grad(e, &x)?;
    let half = eta * eta / 2.0;
    let (mut acc, mut n) = (0.0, 0usize);
    for _ in 0..steps {
        let xi = rng.normal_tensor(x.dims(), x.device())?; // [R, D]
        let prop = ((&x - (&gx * half)?)? + (xi * eta)?)?;
        let (ep, gp) = energy_and_grad(e, &prop)?;
        if !metropolis {
            (x, ex, gx) = (prop, ep, gp);
            acc += 1.0;
            n += 1;
            continue;
        }
        // log q(x | x') - log q(x' | x), each -|.|² / (2 η²)
        let fwd = ((&prop - &x)? + (&gx * half)?)?.sqr()?.sum(1)?; // [R]
        let bwd = ((&x - &prop)? + (&gp * half)?)?.sqr()?.sum(1)?; // [R]
        let log_a = ((&ex - &ep)? + ((fwd - bwd)? / (2.0 * eta * eta))?)?; // [R]
        let la: Vec<f32> = log_a.to_vec1()?;
        let keep: Vec<f32> = la
            .iter()
            .map(|a| {
                let u = rng.uniform().max(f64::MIN_POSITIVE).ln() as f32;
                if a.is_finite() && u < *a {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        acc += keep.iter().map(|k| f64::from(*k)).sum::<f64>() / keep.len().max(1) as f64;
        n += 1;
        let rows = keep.len();
        let mask = Tensor::from_vec(keep, rows, x.device())?.ne(0f32)?; // [R]
        let m2 = mask.unsqueeze(1)?.broadcast_as(x.shape())?;
        x = m2.where_cond(&prop, &x)?;
        gx = m2.where_cond(&gp, &gx)?;
        ex = mask.where_cond(&ep, &ex)?;
    }
    Ok((x, if n == 0 { 1.0 } else { acc / n as f64 }))
}
