//! The character-transformer workloads of torch_bench.py (`lm_bench`): W3, masked diffusion
//! (MDLM, Sahoo et al. 2024) and W4, autoregressive next-token prediction, both on the pre-LN
//! transformer of `elbo::nn::transformer` (B = 32, L = 256, d = 256, 4 layers, 4 heads).

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use candle_nn::VarMap;
use elbo::nn::transformer::{
    cross_entropy_rows, cross_entropy_weighted, Positions, Transformer, TransformerConfig,
};
use elbo::nn::ParamInit;
use elbo::train::optim::named_vars;
use elbo::Rng;
use serde_json::json;

use super::{adamw, add_efficiency, emit, extend, flops, median_ms, summarize, time_steps};

/// Symbols of the character vocabulary: '\n' and printable ASCII 32..126.
const V: usize = 96;
/// The mask token of W3 (input vocabulary V + 1).
const MASK: u32 = 96;
/// Symbols of the synthetic corpus used when no corpus file is given.
const SYNTHETIC_SYMBOLS: usize = 2_000_000;

/// torch_bench.encode: '\n' -> 0, ASCII 32..126 -> 1..95; other bytes are dropped (as
/// make_corpus does before encoding).
pub fn encode(bytes: &[u8]) -> Vec<u32> {
    bytes
        .iter()
        .filter_map(|&c| match c {
            10 => Some(0),
            32..=126 => Some(u32::from(c) - 31),
            _ => None,
        })
        .collect()
}

/// The corpus as symbol ids and a description: the file at `path` (e.g. the corpus.txt written
/// by `torch_bench.py prep --out DIR`), or 2,000,000 uniform symbols from a fixed seed.
fn load_corpus(path: Option<&Path>) -> Result<(Vec<u32>, String)> {
    match path {
        Some(p) => {
            let bytes =
                std::fs::read(p).with_context(|| format!("reading corpus {}", p.display()))?;
            Ok((encode(&bytes), p.display().to_string()))
        }
        None => {
            let mut rng = Rng::new(3);
            let ids = (0..SYNTHETIC_SYMBOLS)
                .map(|_| rng.below(V) as u32)
                .collect();
            Ok((ids, "synthetic-uniform".into()))
        }
    }
}

/// W3 (`causal = false`) or W4 (`causal = true`).
pub fn run(causal: bool, steps: (usize, usize), corpus: Option<&Path>) -> Result<()> {
    let dev = super::device()?;
    let (ids, corpus_name) = load_corpus(corpus)?;
    let (b, l) = (32usize, 256usize);
    if ids.len() < l + 2 {
        bail!(
            "the corpus has {} symbols; at least {} are needed",
            ids.len(),
            l + 2
        );
    }
    let cfg = TransformerConfig {
        vocab_in: if causal { V } else { V + 1 },
        vocab_out: V,
        max_len: l,
        d_model: 256,
        n_layers: 4,
        n_heads: 4,
        mask: causal.into(),
        positions: Positions::Learned,
    };
    let vm = VarMap::new();
    let net = {
        let mut rng = Rng::new(0);
        let mut p = ParamInit::new(&vm, &mut rng, &dev);
        Transformer::new(&mut p, cfg.clone())?
    };
    let params = named_vars(&vm)?;
    let nparams: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = adamw();
    let mut rng = Rng::new(1);
    let mut losses = Vec::new();
    let ts = time_steps(steps, || {
        // chunk = ids[start + 0..=L] for B random starts in [0, N - L - 1)
        let starts: Vec<usize> = (0..b).map(|_| rng.below(ids.len() - l - 1)).collect();
        let chunk = |s: usize, off: usize| &ids[s + off..s + off + l];
        let loss = if causal {
            let x: Vec<u32> = starts.iter().flat_map(|&s| chunk(s, 0)).copied().collect();
            let y: Vec<u32> = starts.iter().flat_map(|&s| chunk(s, 1)).copied().collect();
            let logits = net.forward(&Tensor::from_vec(x, (b, l), &dev)?)?; // [B, L, V]
            let y = Tensor::from_vec(y, b * l, &dev)?; // [B L]
            cross_entropy_rows(&logits.reshape((b * l, V))?, &y)?.mean_all()?
        } else {
            let x0: Vec<u32> = starts.iter().flat_map(|&s| chunk(s, 0)).copied().collect();
            // t ~ U(1e-3, 1); mask each token w.p. t; weight masked positions by 1 / t
            let t: Vec<f32> = rng
                .uniform_vec(b)
                .into_iter()
                .map(|u| u * (1.0 - 1e-3) + 1e-3)
                .collect();
            let u = rng.uniform_vec(b * l);
            let mut xt = x0.clone();
            let mut w = vec![0f32; b * l];
            for (k, (xk, wk)) in xt.iter_mut().zip(w.iter_mut()).enumerate() {
                let tb = t[k / l];
                if u[k] < tb {
                    *xk = MASK;
                    *wk = 1.0 / tb;
                }
            }
            let logits = net.forward(&Tensor::from_vec(xt, (b, l), &dev)?)?; // [B, L, V]
            let x0 = Tensor::from_vec(x0, b * l, &dev)?; // [B L]
            let w = Tensor::from_vec(w, b * l, &dev)?; // [B L]
                                                       // w_i CE_i in one fused op (weight 0 on unmasked positions: no loss, no gradient)
            let ce = cross_entropy_weighted(&logits.reshape((b * l, V))?, &x0, Some(&w))?; // [B L]
            ce.sum_all()?.affine(1.0 / (b * l) as f64, 0.0)?
        };
        let grads = loss.backward()?;
        opt.step(&params, &grads, 1e-3)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        Ok(())
    })?;
    let mut s = summarize(ts)?;
    let med = median_ms(&s);
    let name = if causal {
        "w4_ar_charlm_train"
    } else {
        "w3_mdlm_charlm_train"
    };
    extend(
        &mut s,
        vec![
            ("bench", json!(name)),
            ("params", json!(nparams)),
            ("params_formula", json!(cfg.num_params())),
            ("batch", json!(b)),
            ("seq", json!(l)),
            ("tokens_per_s", json!((b * l) as f64 / (med / 1e3))),
            ("loss_first", json!(losses.first())),
            ("loss_last", json!(losses.last())),
            ("sdpa", json!(false)),
            ("fused_adamw", json!(false)),
            ("corpus", json!(corpus_name)),
            ("corpus_symbols", json!(ids.len())),
        ],
    );
    let shape = flops::TransformerShape {
        d: cfg.d_model,
        layers: cfg.n_layers,
        heads: cfg.n_heads,
        vocab_out: V,
    };
    add_efficiency(
        &mut s,
        name,
        flops::train(flops::transformer(shape, b, l, l)),
    )?;
    emit(s);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_matches_torch_bench() {
        // '\n' -> 0, ' ' -> 1, '~' -> 95; tabs and non-ASCII are dropped
        assert_eq!(encode(b"\n ~\tA\xc3"), vec![0, 1, 95, 34]);
        let (ids, name) = load_corpus(None).unwrap();
        assert_eq!((ids.len(), name.as_str()), (2_000_000, "synthetic-uniform"));
        assert!(ids.iter().all(|&i| (i as usize) < V));
    }
}
