//! Analytic FLOP counts of the benchmark workloads, from their shapes: only matrix products
//! (linear maps, convolutions, the two products of attention) are counted, a multiply-add as 2
//! FLOPs; norms, activations, softmax and the optimizer are left out. A training step counts
//! 3 forward passes (the backward of a product is two products of the same size; the input
//! gradient of the first layer, which no one needs, is counted too). Attention under a causal
//! mask counts the full `L x L` products, as an explicit-attention implementation computes them.

use elbo::nn::UNetConfig;

/// `[rows, d_in] x [d_in, d_out]`.
pub fn linear(rows: usize, d_in: usize, d_out: usize) -> f64 {
    2.0 * rows as f64 * d_in as f64 * d_out as f64
}

/// A `k x k` convolution of `b` images with `c_in` channels to `c_out` channels at an output
/// size `h_out x w_out`.
pub fn conv(b: usize, c_in: usize, c_out: usize, h_out: usize, w_out: usize, k: usize) -> f64 {
    2.0 * (b * c_out * h_out * w_out) as f64 * (c_in * k * k) as f64
}

/// `Q K^T` and `A V` for `b` examples, `heads` heads of width `dh`, `lq` queries and `lk` keys.
pub fn attention(b: usize, heads: usize, lq: usize, lk: usize, dh: usize) -> f64 {
    2.0 * 2.0 * (b * heads) as f64 * lq as f64 * lk as f64 * dh as f64
}

/// A training step of a network whose forward pass takes `forward` FLOPs.
pub fn train(forward: f64) -> f64 {
    3.0 * forward
}

/// An MLP with layer widths `dims` (input, hidden..., output) on `rows` rows.
pub fn mlp(rows: usize, dims: &[usize]) -> f64 {
    dims.windows(2).map(|w| linear(rows, w[0], w[1])).sum()
}

/// The shape of the pre-LN transformer of W3/W4 (learned positions, MLP 4x, untied head).
#[derive(Clone, Copy, Debug)]
pub struct TransformerShape {
    /// Width.
    pub d: usize,
    /// Blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Output vocabulary (the head's width).
    pub vocab_out: usize,
}

/// One forward pass of `b` rows of `t` new tokens, each attending to `ctx` keys (`t` for a
/// plain pass; the cached tokens plus `t` with a KV cache).
pub fn transformer(s: TransformerShape, b: usize, t: usize, ctx: usize) -> f64 {
    let (rows, d) = (b * t, s.d);
    let block = linear(rows, d, 3 * d)
        + linear(rows, d, d)
        + linear(rows, d, 4 * d)
        + linear(rows, 4 * d, d)
        + attention(b, s.heads, t, ctx, d / s.heads);
    s.layers as f64 * block + linear(rows, d, s.vocab_out)
}

/// One forward pass of `cfg`'s U-Net on `b` images of `h x w` (zero-padded to multiples of
/// `2^(levels - 1)`, as the network does).
pub fn unet(cfg: &UNetConfig, b: usize, h: usize, w: usize) -> f64 {
    let m = cfg.size_multiple();
    let (h, w) = (h.div_ceil(m) * m, w.div_ceil(m) * m);
    let (base, e) = (cfg.base_channels, cfg.time_embed_dim);
    let res = |c_in: usize, c_out: usize, (h, w): (usize, usize)| {
        conv(b, c_in, c_out, h, w, 3)
            + linear(b, e, c_out)
            + conv(b, c_out, c_out, h, w, 3)
            + if c_in != c_out {
                conv(b, c_in, c_out, h, w, 1)
            } else {
                0.0
            }
    };
    let attn = |c: usize, (h, w): (usize, usize)| {
        let heads = cfg.attn_heads.max(1);
        conv(b, c, 3 * c, h, w, 1)
            + attention(b, heads, h * w, h * w, c / heads)
            + conv(b, c, c, h, w, 1)
    };
    let size = |lvl: usize| (h >> lvl, w >> lvl);
    let levels = cfg.channel_mults.len();
    let mut f = linear(b, base, e) + linear(b, e, e) + conv(b, cfg.in_channels, base, h, w, 3);
    let mut ch = base;
    let mut skips = vec![ch];
    for (lvl, &mult) in cfg.channel_mults.iter().enumerate() {
        for _ in 0..cfg.num_res_blocks {
            f += res(ch, mult * base, size(lvl));
            ch = mult * base;
            if cfg.attn_levels.contains(&lvl) {
                f += attn(ch, size(lvl));
            }
            skips.push(ch);
        }
        if lvl + 1 < levels {
            let (ho, wo) = size(lvl + 1);
            f += conv(b, ch, ch, ho, wo, 3);
            skips.push(ch);
        }
    }
    let low = size(levels - 1);
    f += 2.0 * res(ch, ch, low) + if cfg.mid_attn { attn(ch, low) } else { 0.0 };
    for (lvl, &mult) in cfg.channel_mults.iter().enumerate().rev() {
        for i in 0..=cfg.num_res_blocks {
            let skip = skips.pop().unwrap_or(0);
            f += res(ch + skip, mult * base, size(lvl));
            ch = mult * base;
            if cfg.attn_levels.contains(&lvl) {
                f += attn(ch, size(lvl));
            }
            if lvl > 0 && i == cfg.num_res_blocks {
                f += conv(b, ch, ch, h >> (lvl - 1), w >> (lvl - 1), 3);
            }
        }
    }
    f + conv(b, ch, cfg.out_channels, h, w, 3)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primitives() {
        assert_eq!(linear(3, 4, 5), 120.0);
        assert_eq!(conv(2, 3, 4, 5, 6, 3), 2.0 * 2.0 * 4.0 * 30.0 * 27.0);
        assert_eq!(attention(1, 2, 3, 4, 5), 4.0 * 2.0 * 60.0);
        assert_eq!(mlp(1, &[2, 3, 1]), 12.0 + 6.0);
        // W1 (README: 19.8 GFLOP a step)
        assert!((train(mlp(4096, &[34, 512, 512, 512, 512, 2])) / 1e9 - 19.78).abs() < 0.01);
    }

    #[test]
    fn transformer_by_hand() {
        // d 8, 1 layer, 2 heads, vocab 5; 2 rows of 3 tokens, plain pass (ctx 3):
        // qkv 2*6*8*24 = 2304, proj 2*6*8*8 = 768, fc1 2*6*8*32 = 3072, fc2 3072,
        // attention 4 * 2 rows * 2 heads * 3 * 3 * 4 = 576, head 2*6*8*5 = 480
        let s = TransformerShape {
            d: 8,
            layers: 1,
            heads: 2,
            vocab_out: 5,
        };
        assert_eq!(transformer(s, 2, 3, 3), 9792.0 + 480.0);
        // one cached token against 4 keys: attention 4 * 2 * 2 * 1 * 4 * 4 = 256, the rest /3
        assert_eq!(
            transformer(s, 2, 1, 4),
            (2304.0 + 768.0 + 6144.0 + 480.0) / 3.0 + 256.0
        );
    }

    #[test]
    fn unet_by_hand() {
        // base 2, mults [1, 2], 1 res block, attention at level 1 and in the middle, 1 head,
        // time embedding 4, on one 4x4 image (levels 4x4 and 2x2), 1 channel in and out.
        let cfg = UNetConfig {
            base_channels: 2,
            time_embed_dim: 4,
            groups: 1,
            ..UNetConfig::digits()
        };
        // conv(c_in, c_out, side, k) = 2 c_out side^2 c_in k^2; res(a, b, s) = conv(a,b,s,3)
        // + 2*4*b (time) + conv(b,b,s,3) + [a != b] conv(a,b,s,1); attn(c, s) = conv(c,3c,s,1)
        // + 4 s^4 c + conv(c,c,s,1)
        let conv = |ci: f64, co: f64, s: f64, k: f64| 2.0 * co * s * s * ci * k * k;
        let res = |a: f64, b: f64, s: f64| {
            conv(a, b, s, 3.0)
                + 8.0 * b
                + conv(b, b, s, 3.0)
                + if a != b { conv(a, b, s, 1.0) } else { 0.0 }
        };
        let attn =
            |c: f64, s: f64| conv(c, 3.0 * c, s, 1.0) + 4.0 * s.powi(4) * c + conv(c, c, s, 1.0);
        let temb = 2.0 * 2.0 * 4.0 + 2.0 * 4.0 * 4.0; // 16 + 32
        let stem = conv(1.0, 2.0, 4.0, 3.0); // 576
                                             // down: res 2->2 @4, res 2->4 @2 + attn 4 @2, downsample 2->2 to 2x2 between
        let down =
            res(2.0, 2.0, 4.0) + conv(2.0, 2.0, 2.0, 3.0) + res(2.0, 4.0, 2.0) + attn(4.0, 2.0);
        let mid = 2.0 * res(4.0, 4.0, 2.0) + attn(4.0, 2.0);
        // up at level 1: skips 4 (res), 2 (down): res(4+4, 4) + attn, res(4+2, 4) + attn + up conv
        // 4->4 at 4x4; level 0: skips 2 (res), 2 (stem): res(4+2, 2), res(2+2, 2)
        let up = res(8.0, 4.0, 2.0)
            + attn(4.0, 2.0)
            + res(6.0, 4.0, 2.0)
            + attn(4.0, 2.0)
            + conv(4.0, 4.0, 4.0, 3.0)
            + res(6.0, 2.0, 4.0)
            + res(4.0, 2.0, 4.0);
        let head = conv(2.0, 1.0, 4.0, 3.0);
        let want = temb + stem + down + mid + up + head;
        assert_eq!(unet(&cfg, 1, 4, 4), want);
        // a batch scales every term; odd sizes are padded (3x3 -> 4x4)
        assert_eq!(unet(&cfg, 3, 4, 4), 3.0 * want);
        assert_eq!(unet(&cfg, 1, 3, 3), want);
        // the sum worked out by hand: res(2, 2, 4) = 1152 + 16 + 1152 = 2320, attn(4, 2) =
        // 384 + 256 + 128 = 768, ..., 33,568 in all
        assert_eq!(
            (res(2.0, 2.0, 4.0), attn(4.0, 2.0), want),
            (2320.0, 768.0, 33568.0)
        );
    }
}
