//! Attention masks as a type: the flash-attention kernel (split and packed layouts) against the
//! composed scores-mask-softmax reference for every mask, values and gradients, on shapes that
//! are and are not multiples of the kernel's 64-wide tiles; block diffusion's two-copy mask
//! against its definition (Arriola et al. 2025, sec. 3.2); and the transformer's two-copy pass
//! against running each block separately after its clean prefix, cached or not.

use candle_core::{DType, Device, Tensor, Var};
use elbo::nn::transformer::{
    attention, attention_composed, attention_qkv, AttentionMask, Positions, Transformer,
    TransformerConfig,
};
use elbo::nn::ParamInit;
use elbo::Rng;

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max(|b|, 1e-2).
fn scaled_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-2);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn var(rng: &mut Rng, shape: &[usize]) -> Var {
    Var::from_tensor(&rng.normal_tensor(shape, &CPU).unwrap()).unwrap()
}

/// Values and the gradients of `sum(f * r)` for every input, `r` a fixed random cotangent.
fn run(inputs: &[&Var], f: &dyn Fn(&[Tensor]) -> Tensor) -> (Vec<f64>, Vec<Vec<f64>>) {
    let ts: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts);
    let r = Rng::new(99).normal_tensor(y.dims(), &CPU).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = inputs
        .iter()
        .map(|v| g.get(v.as_tensor()).map_or(vec![0.0; v.elem_count()], vals))
        .collect();
    (vals(&y), grads)
}

fn agree(
    what: &str,
    inputs: &[&Var],
    f: &dyn Fn(&[Tensor]) -> Tensor,
    r: &dyn Fn(&[Tensor]) -> Tensor,
) {
    let (y, g) = run(inputs, f);
    let (y_ref, g_ref) = run(inputs, r);
    let e = scaled_err(&y, &y_ref);
    assert!(e < 1e-5, "{what}: value error {e:e}");
    assert!(
        g_ref.iter().flatten().any(|x| *x != 0.0),
        "{what}: zero reference gradients"
    );
    for (i, (a, b)) in g.iter().zip(&g_ref).enumerate() {
        let e = scaled_err(a, b);
        assert!(e < 1e-4, "{what}: gradient of input {i}: error {e:e}");
    }
}

/// The masks for `l` queries and keys (the two-copy mask over `l = 2 len` when `l` is even).
fn masks(l: usize) -> Vec<AttentionMask> {
    let mut m = vec![
        AttentionMask::Full,
        AttentionMask::Causal,
        AttentionMask::BlockCausal { block: 1 },
        AttentionMask::BlockCausal { block: 4 },
        AttentionMask::BlockCausal { block: 16 },
    ];
    if l.is_multiple_of(2) {
        for block in [1, 4, 16] {
            m.push(AttentionMask::BlockDiffusion { block, len: l / 2 });
        }
    }
    m
}

#[test]
fn flash_attention_matches_composed_for_every_mask() {
    // L = 2 x 48 and 2 x 65: several 64-wide tiles, the last partial, for the two-copy mask
    for (n, (b, h, l, dh)) in [(2, 2, 8, 5), (1, 2, 22, 8), (1, 1, 96, 4), (1, 2, 130, 8)]
        .into_iter()
        .enumerate()
    {
        for mask in masks(l) {
            let mut rng = Rng::new(10 + n as u64);
            let (q, k, v) = (
                var(&mut rng, &[b, h, l, dh]),
                var(&mut rng, &[b, h, l, dh]),
                var(&mut rng, &[b, h, l, dh]),
            );
            agree(
                &format!("split {l} x {dh} {}", mask.name()),
                &[&q, &k, &v],
                &|t| attention(&t[0], &t[1], &t[2], mask).unwrap(),
                &|t| attention_composed(&t[0], &t[1], &t[2], mask).unwrap(),
            );
            let qkv = var(&mut rng, &[b, l, 3 * h * dh]);
            let reference = |t: &[Tensor]| {
                let x = t[0]
                    .reshape((b, l, 3, h, dh))
                    .unwrap()
                    .permute((2, 0, 3, 1, 4))
                    .unwrap();
                let p = |i: usize| x.get(i).unwrap().contiguous().unwrap();
                let y = attention_composed(&p(0), &p(1), &p(2), mask).unwrap();
                y.transpose(1, 2).unwrap().reshape((b, l, h * dh)).unwrap()
            };
            agree(
                &format!("packed {l} x {dh} {}", mask.name()),
                &[&qkv],
                &|t| attention_qkv(&t[0], h, mask).unwrap(),
                &reference,
            );
        }
    }
    // cached keys (Lq < Lk), aligned bottom-right
    let mut rng = Rng::new(5);
    for mask in [
        AttentionMask::Causal,
        AttentionMask::BlockCausal { block: 4 },
        AttentionMask::Full,
    ] {
        let q = var(&mut rng, &[1, 2, 8, 8]);
        let (k, v) = (var(&mut rng, &[1, 2, 75, 8]), var(&mut rng, &[1, 2, 75, 8]));
        agree(
            &format!("cached {}", mask.name()),
            &[&q, &k, &v],
            &|t| attention(&t[0], &t[1], &t[2], mask).unwrap(),
            &|t| attention_composed(&t[0], &t[1], &t[2], mask).unwrap(),
        );
    }
}

#[test]
fn two_copy_mask_is_the_definition() {
    for (block, len) in [(1, 5), (2, 6), (3, 9), (4, 8), (8, 8)] {
        let m = AttentionMask::BlockDiffusion { block, len };
        let add = m.additive(2 * len, 2 * len, &CPU).unwrap().unwrap();
        let add: Vec<Vec<f32>> = add.to_vec2().unwrap();
        for (i, add_i) in add.iter().enumerate() {
            for (j, &add_ij) in add_i.iter().enumerate() {
                // bd3lms `block_diff_mask`: block diagonal within x_t, offset block-causal from
                // x_t to x_0 (strictly earlier blocks), block-causal within x_0
                let (xi, xj) = (i >= len, j >= len);
                let (bi, bj) = ((i % len) / block, (j % len) / block);
                let want = match (xi, xj) {
                    (false, false) => bi == bj,
                    (false, true) => bj < bi,
                    (true, false) => false,
                    (true, true) => bj <= bi,
                };
                assert_eq!(
                    m.allows(i, j, 2 * len, 2 * len),
                    want,
                    "{block} {len} ({i}, {j})"
                );
                assert_eq!(add_ij == 0.0, want, "additive {block} {len} ({i}, {j})");
            }
        }
    }
    // block-causal = block diffusion's clean half; a bad shape is refused
    let bc = AttentionMask::BlockCausal { block: 3 };
    assert!(bc.allows(4, 5, 9, 9) && !bc.allows(4, 6, 9, 9));
    assert!(AttentionMask::BlockDiffusion { block: 2, len: 4 }
        .check(8, 9)
        .is_err());
    assert!(AttentionMask::Causal.check(5, 4).is_err());
}

fn tiny(positions: Positions, len: usize, block: usize) -> Transformer {
    let cfg = TransformerConfig {
        vocab_in: 6,
        vocab_out: 5,
        max_len: len,
        d_model: 16,
        n_layers: 2,
        n_heads: 2,
        mask: AttentionMask::BlockDiffusion { block, len },
        positions,
    };
    let map = candle_nn::VarMap::new();
    let mut rng = Rng::new(7);
    let mut p = ParamInit::new(&map, &mut rng, &CPU);
    Transformer::new(&mut p, cfg).unwrap()
}

#[test]
fn two_copy_pass_equals_blocks_run_separately_and_cached() {
    let (len, block, n) = (12, 4, 3);
    let mut rng = Rng::new(3);
    let x0: Vec<u32> = (0..n * len).map(|_| rng.below(5) as u32).collect();
    let xt: Vec<u32> = x0
        .iter()
        .map(|&t| if rng.uniform() < 0.5 { 5 } else { t })
        .collect();
    let x0 = Tensor::from_vec(x0, (n, len), &CPU).unwrap();
    let xt = Tensor::from_vec(xt, (n, len), &CPU).unwrap();
    for positions in [Positions::Rotary, Positions::Learned] {
        let net = tiny(positions, len, block);
        let ids = Tensor::cat(&[&xt, &x0], 1).unwrap();
        let pos: Vec<u32> = (0..2 * len).map(|i| (i % len) as u32).collect();
        let mask = AttentionMask::BlockDiffusion { block, len };
        let two = net.forward_masked(&ids, &pos, mask).unwrap(); // [n, 2L, V]
        let mut cache = net.new_cache();
        for s in (0..len).step_by(block) {
            // separately: [x0 prefix ; noisy block] under a block-causal mask
            let prefix = x0.narrow(1, 0, s).unwrap();
            let cur = xt.narrow(1, s, block).unwrap();
            let sep_ids = Tensor::cat(&[&prefix, &cur], 1).unwrap();
            let sep_pos: Vec<u32> = (0..(s + block) as u32).collect();
            let bc = AttentionMask::BlockCausal { block };
            let sep = net.forward_masked(&sep_ids, &sep_pos, bc).unwrap();
            let want = vals(&sep.narrow(1, s, block).unwrap());
            let got = vals(&two.narrow(1, s, block).unwrap());
            let e = scaled_err(&got, &want);
            assert!(
                e < 1e-5,
                "{positions:?} block at {s}: two-copy vs separate {e:e}"
            );
            // cached: the noisy block against the cache of the clean blocks before it
            let cached = net.forward_block_cached(&cur, &mut cache).unwrap();
            let e = scaled_err(&vals(&cached), &want);
            assert!(
                e < 1e-4,
                "{positions:?} block at {s}: cached vs uncached {e:e}"
            );
            // committing the clean block gives the x_0 rows of the two-copy pass
            let clean = net
                .commit_block(&x0.narrow(1, s, block).unwrap(), &mut cache)
                .unwrap();
            let want0 = vals(&two.narrow(1, len + s, block).unwrap());
            let e = scaled_err(&vals(&clean), &want0);
            assert!(
                e < 1e-4,
                "{positions:?} clean block at {s}: cached vs two-copy {e:e}"
            );
        }
        assert_eq!(cache.len(), len);
        // x_t outside a block does not change its rows (the mask hides it)
        let mut other = xt.to_vec2::<u32>().unwrap();
        other
            .iter_mut()
            .for_each(|r| r[len - 1] = (r[len - 1] + 1) % 6);
        let other = Tensor::new(other, &CPU).unwrap();
        let ids2 = Tensor::cat(&[&other, &x0], 1).unwrap();
        let two2 = net.forward_masked(&ids2, &pos, mask).unwrap();
        let keep = len - block;
        let e = scaled_err(
            &vals(&two2.narrow(1, 0, keep).unwrap()),
            &vals(&two.narrow(1, 0, keep).unwrap()),
        );
        assert!(
            e == 0.0,
            "{positions:?}: a later noisy block leaked into earlier rows ({e:e})"
        );
    }
}
