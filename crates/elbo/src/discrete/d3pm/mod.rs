//! Structured denoising diffusion in discrete state-spaces, D3PM (Austin et al. 2021): the
//! transition matrices and their closed-form products ([`transition`]), the discrete-time
//! variational bound with the x_0-parameterised reverse process ([`vlb`]) and ancestral
//! sampling ([`ancestral`]). The family built on them is [`crate::models::d3pm`].

pub mod ancestral;
pub mod transition;
pub mod vlb;
