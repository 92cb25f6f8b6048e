//! Backbones that know nothing about generative modelling: seeded parameter creation, linear
//! layers, MLPs, time embeddings and a transformer. Every training path records gradients: the
//! fused CPU kernels in [`fused`] carry their own backward, and the layer norm / softmax of the
//! transformer are differentiable compositions (candle's fused versions record none).

pub mod attention_mask;
pub mod batch_norm;
pub mod conv;
pub mod conv_net;
pub mod dcgan;
pub mod embedding;
pub mod fused;
pub mod group_norm;
pub mod init;
pub mod linear;
pub mod mlp;
pub mod packed_mlp;
pub mod patch_gan;
pub mod plain;
pub mod plain_mlp;
pub mod rotary;
pub mod transformer;
pub mod unet;

pub use embedding::sinusoidal_embedding;
pub use init::ParamInit;
pub use linear::Linear;
pub use mlp::{Activation, Mlp};
pub use packed_mlp::{sinusoidal_row, PackedMlp};
pub use plain_mlp::PlainMlp;
pub use unet::{UNet, UNetConfig};
