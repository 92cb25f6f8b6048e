//! Noise schedules: discrete DDPM betas with diffusers' conventions, continuous alpha(t) /
//! sigma(t) schedules (VP, sub-VP, VE, EDM, CondOT) behind one trait, and sigma grids.

pub mod continuous;
pub mod discrete;
pub mod grid;
pub mod spacing;

pub use continuous::{CondOt, DiscreteVp, Edm, Interpolation, NoiseSchedule, SubVp, Ve, Vp};
pub use discrete::{BetaSchedule, DiscreteSchedule, Precision, Transition};
pub use grid::{
    diffusers_sigmas, flow_match_sigmas, init_noise_sigma, karras_sigmas, shift_sigma,
    uniform_t_sigmas, uniform_times, with_final_zero,
};
pub use spacing::{ddim_timesteps, dpm_solver_timesteps, euler_timesteps, TimestepSpacing};
