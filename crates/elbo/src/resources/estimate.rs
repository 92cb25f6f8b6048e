//! Memory estimates of the backbones, from their settings and the data's shape alone (nothing
//! is allocated): the exact parameter count, and a rough upper-ish count of the activations a
//! training batch keeps for its backward pass (forward values and their gradients). The
//! activation factors count the tensors an autograd graph holds per layer (Griewank & Walther
//! 2008, ch. 12: reverse mode stores every intermediate of the forward sweep); they aim to
//! over- rather than under-estimate.
//!
//! All arithmetic saturates, so an absurd size gives `u64::MAX` rather than an overflow.

use crate::config::EvalOptions;
use crate::continuous::diffusion::net::{BackboneKind, NetConfig};
use crate::discrete::TransformerSettings;
use crate::model::DataInfo;
use crate::nn::transformer::Positions;
use crate::nn::unet::UNetConfig;

use super::MemoryEstimate;

/// Bytes of one `f32`.
pub const F32: u64 = 4;

/// Floats kept per hidden unit of an MLP layer in training: the pre-activation, the
/// activation and the activation's intermediate (SiLU's sigmoid), and the gradient of each.
const MLP_UNIT: u64 = 6;

/// Floats kept per feature-map value of a U-Net res block in training: two group norms, two
/// activations, two convolutions, the time-embedding sum and the residual sum, and a gradient
/// (set a little above the peak resident memory of a training step).
const UNET_MAP: u64 = 9;

/// Floats kept per position and model width by one transformer block in training: two layer
/// norms, q/k/v, the attention output and projection, two residual sums, the MLP's two 4d-wide
/// tensors, and the gradients of the largest (set a little above the peak resident memory of
/// a training step).
const BLOCK_WIDTH: u64 = 28;

/// Floats per example of the loss around the network (noise, x_t, targets, differences).
const LOSS_PER_DIM: u64 = 16;

/// The saturating product of `xs`.
pub fn prod(xs: &[usize]) -> u64 {
    xs.iter().fold(1u64, |acc, &x| acc.saturating_mul(x as u64))
}

/// The saturating sum of `xs`.
pub fn sum(xs: &[u64]) -> u64 {
    xs.iter().fold(0u64, |acc, &x| acc.saturating_add(x))
}

/// Parameters of [`crate::nn::Mlp`]: `layers` hidden layers of `width` (weights and biases)
/// and the read-out to `d_out`.
pub fn mlp_params(d_in: usize, width: usize, layers: usize, d_out: usize) -> u64 {
    if layers == 0 {
        return prod(&[d_in.saturating_add(1), d_out]);
    }
    sum(&[
        prod(&[d_in.saturating_add(1), width]),
        prod(&[layers - 1, width.saturating_add(1), width]),
        prod(&[width.saturating_add(1), d_out]),
    ])
}

/// Training activations of the MLP on `rows` examples (bytes).
pub fn mlp_activations(d_in: usize, width: usize, layers: usize, d_out: usize, rows: usize) -> u64 {
    let units = sum(&[
        (d_in as u64).saturating_mul(2),
        prod(&[layers, width]).saturating_mul(MLP_UNIT),
        (d_out as u64).saturating_mul(2),
    ]);
    units.saturating_mul(rows as u64).saturating_mul(F32)
}

/// Parameters of [`crate::nn::unet::UNet`] with `cfg` (mirrors its constructor).
pub fn unet_params(cfg: &UNetConfig) -> u64 {
    let (base, e) = (cfg.base_channels, cfg.time_embed_dim);
    let conv = |ci: usize, co: usize, k: usize| prod(&[ci, co, k, k]).saturating_add(co as u64);
    let norm = |c: usize| 2 * c as u64;
    let res = |ci: usize, co: usize| {
        let skip = if ci == co { 0 } else { conv(ci, co, 1) };
        sum(&[
            norm(ci),
            conv(ci, co, 3),
            prod(&[e + 1, co]),
            norm(co),
            conv(co, co, 3),
            skip,
        ])
    };
    let attn = |c: usize| sum(&[norm(c), conv(c, 3 * c, 1), conv(c, c, 1)]);
    let mut total = sum(&[
        prod(&[base + 1, e]),
        prod(&[e + 1, e]),
        conv(cfg.in_channels, base, 3),
    ]);
    let levels = cfg.channel_mults.len();
    let mut ch = base;
    let mut skips = vec![ch];
    for (lvl, &m) in cfg.channel_mults.iter().enumerate() {
        for _ in 0..cfg.num_res_blocks {
            total = sum(&[total, res(ch, m * base)]);
            ch = m * base;
            if cfg.attn_levels.contains(&lvl) {
                total = sum(&[total, attn(ch)]);
            }
            skips.push(ch);
        }
        if lvl + 1 < levels {
            total = sum(&[total, conv(ch, ch, 3)]);
            skips.push(ch);
        }
    }
    total = sum(&[total, res(ch, ch), res(ch, ch)]);
    if cfg.mid_attn {
        total = sum(&[total, attn(ch)]);
    }
    for (lvl, &m) in cfg.channel_mults.iter().enumerate().rev() {
        for i in 0..=cfg.num_res_blocks {
            let skip = skips.pop().unwrap_or(0);
            total = sum(&[total, res(ch + skip, m * base)]);
            ch = m * base;
            if cfg.attn_levels.contains(&lvl) {
                total = sum(&[total, attn(ch)]);
            }
            if lvl > 0 && i == cfg.num_res_blocks {
                total = sum(&[total, conv(ch, ch, 3)]);
            }
        }
    }
    sum(&[total, norm(ch), conv(ch, cfg.out_channels, 3)])
}

/// Training activations of the U-Net on `rows` images of `side x side` (bytes): per level, the
/// res blocks' feature maps (down, up with the concatenated skips, and the middle) and the
/// attention matrices (heads x positions^2, with softmax and gradient).
pub fn unet_activations(cfg: &UNetConfig, side: usize, rows: usize) -> u64 {
    let m = cfg.size_multiple().max(1);
    let padded = side.div_ceil(m) * m;
    let mut floats = 0u64;
    let levels = cfg.channel_mults.len();
    for (lvl, &mult) in cfg.channel_mults.iter().enumerate() {
        let r = padded >> lvl;
        let c = mult * cfg.base_channels;
        // down blocks, up blocks (one more, at up to twice the channels with the skip)
        let blocks = 3 * cfg.num_res_blocks + 2;
        floats = sum(&[floats, prod(&[blocks, c, r, r]).saturating_mul(UNET_MAP)]);
        let attn = cfg.attn_levels.contains(&lvl) as usize * (2 * cfg.num_res_blocks + 1)
            + (cfg.mid_attn && lvl + 1 == levels) as usize;
        floats = sum(&[
            floats,
            prod(&[attn, cfg.attn_heads, r * r, r * r]).saturating_mul(3),
        ]);
        if lvl + 1 == levels {
            floats = sum(&[floats, prod(&[2, c, r, r]).saturating_mul(UNET_MAP)]);
        }
    }
    floats = sum(&[
        floats,
        prod(&[cfg.in_channels + cfg.out_channels, padded, padded]),
    ]);
    floats.saturating_mul(rows as u64).saturating_mul(F32)
}

/// The U-Net [`crate::continuous::diffusion::DenoiserNet`] builds on `side x side` images.
pub fn denoiser_unet(net: &NetConfig, side: usize, out_per_dim: usize) -> UNetConfig {
    let base = if side >= 16 {
        UNetConfig::mnist()
    } else {
        UNetConfig::digits()
    };
    UNetConfig {
        in_channels: 1,
        out_channels: out_per_dim,
        time_embed_dim: net.time_embed_dim,
        time_scale: net.time_scale,
        ..base
    }
}

/// The denoiser network of the continuous families (`[model.net]`, an MLP or a U-Net) with
/// `out_per_dim` outputs per dimension, trained on `rows` examples, and the loss around it.
pub fn denoiser(
    net: &NetConfig,
    data: &DataInfo,
    out_per_dim: usize,
    rows: usize,
) -> MemoryEstimate {
    let d = data.dim;
    let loss = prod(&[rows, d, out_per_dim]).saturating_mul(LOSS_PER_DIM * F32);
    match BackboneKind::resolve(net.backbone, data) {
        Ok(BackboneKind::UNet { side }) => {
            let cfg = denoiser_unet(net, side, out_per_dim);
            MemoryEstimate {
                params: unet_params(&cfg),
                activations: sum(&[unet_activations(&cfg, side, rows), loss]),
                fixed: 0,
            }
        }
        // an unusable backbone fails when the model is built, with its own message
        _ => {
            let d_in = d.saturating_add(net.time_embed_dim);
            let d_out = d.saturating_mul(out_per_dim);
            MemoryEstimate {
                params: mlp_params(d_in, net.hidden, net.layers, d_out),
                activations: sum(&[
                    mlp_activations(d_in, net.hidden, net.layers, d_out, rows),
                    loss,
                ]),
                fixed: 0,
            }
        }
    }
}

/// Memory of one continuous-time likelihood batch (bytes): the MLP pushes 1 + K tangents
/// forward at once (K = D for the exact divergence, the probes for Hutchinson's), without a
/// graph; the U-Net runs reverse mode, one graph of the batch at a time; the ODE solver keeps
/// about 16 states of `[B, D + K]` (Dormand-Prince's seven stages and the error estimate).
pub fn denoiser_eval(
    net: &NetConfig,
    data: &DataInfo,
    out_per_dim: usize,
    eval: &EvalOptions,
) -> u64 {
    let d = data.dim;
    let k = if eval.divergence.is_exact(d, eval.exact_max_dim) {
        d
    } else {
        eval.probes
    };
    let rows = eval.batch_size;
    let solver = prod(&[rows, d.saturating_add(k), 16]).saturating_mul(F32);
    let graph = match BackboneKind::resolve(net.backbone, data) {
        Ok(BackboneKind::UNet { .. }) => denoiser(net, data, out_per_dim, rows).activations,
        _ => {
            // forward values and tangents: about a third of a training graph per row
            let tangents = rows.saturating_mul(k.saturating_add(1));
            denoiser(net, data, out_per_dim, tangents).activations / 3
        }
    };
    sum(&[graph, solver])
}

/// A transformer of [`TransformerSettings`] over sequences of `len` tokens (`vocab_in` input
/// ids, `vocab_out` outputs), with `extra_params` parameters besides it, trained on `rows`
/// sequences: per block the activations of [`BLOCK_WIDTH`] and the attention matrices
/// (heads x len^2, with softmax and gradient), and the logits with their log-softmax and
/// gradient.
pub fn transformer(
    t: &TransformerSettings,
    vocab_in: usize,
    vocab_out: usize,
    len: usize,
    extra_params: u64,
    rows: usize,
) -> MemoryEstimate {
    // TransformerConfig::num_params's formula, saturating
    let d = t.d_model;
    let table = match t.positions {
        Positions::Learned => len,
        Positions::Rotary => 0,
    };
    let block = sum(&[prod(&[12, d, d]), prod(&[13, d])]);
    let params = sum(&[
        prod(&[vocab_in.saturating_add(table), d]),
        block.saturating_mul(t.n_layers as u64),
        prod(&[2, d]),
        prod(&[d.saturating_add(1), vocab_out]),
    ]);
    let per_seq = sum(&[
        prod(&[t.n_layers, len, t.d_model]).saturating_mul(BLOCK_WIDTH),
        prod(&[t.n_layers, t.n_heads, len, len]).saturating_mul(3),
        prod(&[len, vocab_out]).saturating_mul(3),
        prod(&[len, t.d_model]).saturating_mul(4),
    ]);
    MemoryEstimate {
        params: params.saturating_add(extra_params),
        activations: per_seq.saturating_mul(rows as u64).saturating_mul(F32),
        fixed: 0,
    }
}
