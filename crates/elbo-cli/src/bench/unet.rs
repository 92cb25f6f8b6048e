//! `elbo bench unet`: training-step timings of the U-Net presets (`elbo::nn::UNetConfig`'s
//! `digits`, `digits_small`, `mnist`, `mnist_small`), one JSON line per preset. A step is a
//! forward pass with dropout on a fixed batch of standard normal images, the mean squared error
//! against the input, the backward pass and one AdamW update (default settings, lr 1e-4); the
//! median of the timed steps is reported beside the median of plain forward passes (as in
//! sampling, no autograd graph kept). scripts/bench_compare.sh times it (W5, `--preset NAME`)
//! beside the PyTorch port of the same network, bench/torch_unet_bench.py.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use elbo::nn::{ParamInit, UNet, UNetConfig};
use elbo::train::optim::{named_vars, AdamW, AdamWConfig};
use elbo::Rng;
use serde_json::json;

use super::{add_efficiency, emit, extend, flops, median_ms, summarize, time_steps};

/// The presets: name, config, batch, image side.
fn presets() -> Vec<(&'static str, UNetConfig, usize, usize)> {
    vec![
        ("digits", UNetConfig::digits(), 128, 8),
        ("digits_small", UNetConfig::digits_small(), 128, 8),
        ("mnist", UNetConfig::mnist(), 64, 28),
        ("mnist_small", UNetConfig::mnist_small(), 64, 28),
    ]
}

/// Parameter counts of the presets, asserted by bench/torch_unet_bench.py (`EXPECTED_PARAMS`)
/// for its PyTorch port and checked here against the networks built.
#[cfg(test)]
const PARAMS: [(&str, usize); 4] = [
    ("digits", 701_345),
    ("digits_small", 176_849),
    ("mnist", 1_062_497),
    ("mnist_small", 267_313),
];

/// Times `preset` (a name of [`presets`], or "all"): `steps` = (warm-up, timed) training steps,
/// and as many forward passes; with `export`, writes the networks for the port's check instead
/// ([`export_preset`]).
pub fn run(steps: (usize, usize), preset: &str, export: Option<&Path>) -> Result<()> {
    let dev = super::device()?;
    let chosen: Vec<_> = presets()
        .into_iter()
        .filter(|(name, ..)| preset == "all" || *name == preset)
        .collect();
    if chosen.is_empty() {
        let names: Vec<_> = presets().iter().map(|p| p.0).collect();
        bail!(
            "unknown U-Net preset '{preset}'; one of {} or all",
            names.join(", ")
        );
    }
    for (name, cfg, b, hw) in chosen {
        let flop = flops::train(flops::unet(&cfg, b, hw, hw));
        let vm = VarMap::new();
        let net = {
            let mut rng = Rng::new(40);
            let mut p = ParamInit::new(&vm, &mut rng, &dev);
            UNet::new(&mut p, cfg)?
        };
        let params = named_vars(&vm)?;
        let nparams: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
        let mut opt = AdamW::new(AdamWConfig::default());
        let mut rng = Rng::new(41);
        let x = rng.normal_tensor(&[b, 1, hw, hw], &dev)?; // [B, 1, H, W]
        let t = rng.uniform_tensor(&[b], &dev)?; // [B]
        if let Some(dir) = export {
            export_preset(dir, name, &net, &params, &x, &t, &mut rng)?;
            continue;
        }
        let fwd = time_steps(steps, || {
            std::hint::black_box(net.forward(&x, &t)?);
            Ok(())
        })?;
        let mut loss_last = f64::NAN;
        let ts = time_steps(steps, || {
            let loss = (net.forward_train(&x, &t, &mut rng)? - &x)?
                .sqr()?
                .mean_all()?;
            let grads = loss.backward()?;
            opt.step(&params, &grads, 1e-4)?;
            loss_last = loss.to_scalar::<f32>()? as f64;
            Ok(())
        })?;
        let mut s = summarize(ts)?;
        let fwd_median = median_ms(&summarize(fwd)?);
        extend(
            &mut s,
            vec![
                ("bench", json!("unet_train")),
                ("preset", json!(name)),
                ("params", json!(nparams)),
                ("batch", json!(b)),
                ("image", json!([1, hw, hw])),
                ("forward_median_ms", json!(fwd_median)),
                ("loss_last", json!(loss_last)),
            ],
        );
        add_efficiency(&mut s, &format!("unet {name}"), flop)?;
        emit(s);
    }
    Ok(())
}

/// Sets every parameter of `net` to N(0, 0.2^2) draws (the zero-initialised output layers
/// would otherwise make the output 0 whatever the rest computes) and writes the parameters
/// (elbo's names and layouts), the batch `x`, `t` and the output `y = net(x, t)` to
/// `dir/unet_{name}.safetensors`.
fn export_preset(
    dir: &Path,
    name: &str,
    net: &UNet,
    params: &[(String, Var)],
    x: &Tensor,
    t: &Tensor,
    rng: &mut Rng,
) -> Result<()> {
    let mut map = HashMap::new();
    for (pname, v) in params {
        let w = (rng.normal_tensor(v.dims(), v.device())? * 0.2)?;
        v.set(&w)?;
        map.insert(format!("param.{pname}"), w);
    }
    let y = net.forward(x, t)?; // [B, 1, H, W]
    map.insert("x".into(), x.clone());
    map.insert("t".into(), t.clone());
    map.insert("y".into(), y);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("unet_{name}.safetensors"));
    candle_core::safetensors::save(&map, &path)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn param_counts_match_the_torch_port() {
        for ((name, cfg, ..), (pname, n)) in presets().into_iter().zip(PARAMS) {
            let vm = VarMap::new();
            let mut rng = Rng::new(0);
            UNet::new(&mut ParamInit::new(&vm, &mut rng, &Device::Cpu), cfg).unwrap();
            let count: usize = named_vars(&vm)
                .unwrap()
                .iter()
                .map(|(_, v)| v.elem_count())
                .sum();
            assert_eq!((name, count), (pname, n));
        }
        assert!(run((0, 1), "nonesuch", None).is_err());
    }

    #[test]
    fn presets_build_and_take_a_step() {
        // the smallest preset on a batch of 2: one training step gives a finite loss
        let (_, cfg, _, hw) = presets().swap_remove(1);
        let vm = VarMap::new();
        let mut rng = Rng::new(0);
        let net = UNet::new(&mut ParamInit::new(&vm, &mut rng, &Device::Cpu), cfg).unwrap();
        let x = rng.normal_tensor(&[2, 1, hw, hw], &Device::Cpu).unwrap();
        let t = Tensor::new(&[0.3f32, 0.7], &Device::Cpu).unwrap();
        let y = net.forward_train(&x, &t, &mut rng).unwrap();
        assert_eq!(y.dims(), x.dims());
        let loss = (y - &x).unwrap().sqr().unwrap().mean_all().unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
    }
}
