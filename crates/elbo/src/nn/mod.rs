//! Backbones that know nothing about generative modelling: seeded parameter creation, linear
//! layers, MLPs and time embeddings. Every op here records gradients (no fused no-grad kernels).

pub mod embedding;
pub mod fused;
pub mod init;
pub mod linear;
pub mod mlp;
pub mod transformer;

pub use embedding::sinusoidal_embedding;
pub use init::ParamInit;
pub use linear::Linear;
pub use mlp::{Activation, Mlp};
