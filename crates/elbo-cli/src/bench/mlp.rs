//! The MLP workloads of torch_bench.py: W1 (rectified-flow CFM train step), W2 (DDPM
//! eps-prediction train step, Ho et al. 2020), S1 (1000-step DDPM ancestral sampling with W2's
//! model) and S2 (100-step Euler sampling with W1's model).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use elbo::continuous::diffusion::net::NetConfig;
use elbo::models::flow_matching::VelocityMlp;
use elbo::nn::{sinusoidal_embedding, sinusoidal_row, Activation, Mlp, PackedMlp, ParamInit};
use elbo::train::optim::named_vars;
use elbo::Rng;
use serde_json::json;

use super::{adamw, add_efficiency, emit, extend, flops, median_ms, summarize, time_steps};

/// Layer widths of W1's network.
const W1_DIMS: [usize; 6] = [2 + 32, 512, 512, 512, 512, 2];
/// Layer widths of W2's network.
const W2_DIMS: [usize; 5] = [64 + TEMB, 1024, 1024, 1024, 64];

/// W1's velocity network: concat(x[2], sinusoidal(1000 t)[32]) -> 4 x (Linear 512 + SiLU) -> Linear 2.
fn w1_model(dev: &Device) -> Result<(VarMap, VelocityMlp)> {
    let cfg = NetConfig {
        hidden: 512,
        layers: 4,
        time_embed_dim: 32,
        time_scale: 1000.0,
        ..NetConfig::default()
    };
    let vm = VarMap::new();
    let mut rng = Rng::new(0);
    let net = {
        let mut p = ParamInit::new(&vm, &mut rng, dev);
        VelocityMlp::new(&mut p, 2, &cfg)?
    };
    Ok((vm, net))
}

/// torch_bench.sample_2d_target: 8 Gaussians on a circle of radius 4, std 0.5.
fn sample_2d_target(n: usize, rng: &mut Rng, dev: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(2 * n);
    for _ in 0..n {
        let ang = rng.below(8) as f64 * std::f64::consts::TAU / 8.0;
        v.push((4.0 * ang.cos() + 0.5 * rng.normal()) as f32);
        v.push((4.0 * ang.sin() + 0.5 * rng.normal()) as f32);
    }
    Ok(Tensor::from_vec(v, (n, 2), dev)?)
}

fn nparams(vm: &VarMap) -> Result<usize> {
    Ok(named_vars(vm)?.iter().map(|(_, v)| v.elem_count()).sum())
}

pub fn w1(steps: (usize, usize)) -> Result<()> {
    let dev = super::device()?;
    let (vm, net) = w1_model(&dev)?;
    let params = named_vars(&vm)?;
    let mut opt = adamw();
    let mut rng = Rng::new(1);
    let b = 4096;
    let mut losses = Vec::new();
    let ts = time_steps(steps, || {
        let x1 = sample_2d_target(b, &mut rng, &dev)?; // [B, 2]
        let x0 = rng.normal_tensor(&[b, 2], &dev)?; // [B, 2]
        let t = rng.uniform_tensor(&[b], &dev)?; // [B]
        let tc = t.reshape((b, 1))?;
        let xt = (x0.broadcast_mul(&(1.0 - &tc)?)? + x1.broadcast_mul(&tc)?)?;
        let loss = (net.forward(&xt, &t)? - (x1 - x0)?)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&params, &grads, 1e-3)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        Ok(())
    })?;
    let flop = flops::train(flops::mlp(b, &W1_DIMS));
    emit_train_step(
        ts,
        "w1_flow_mlp_train",
        nparams(&vm)?,
        b,
        &losses,
        flop,
        vec![],
    )
}

pub fn s2(steps: (usize, usize)) -> Result<()> {
    let dev = Device::Cpu;
    let (_vm, net) = w1_model(&dev)?;
    let mut rng = Rng::new(2);
    let (n_steps, b) = (100usize, 10000usize);
    let ts = time_steps(steps, || {
        let mut x = rng.normal_tensor(&[b, 2], &dev)?; // [B, 2]
        let dt = 1.0 / n_steps as f64;
        // the library's sampling path: weights packed once, no autograd graph, the time
        // embedding's share of the first layer computed once per step
        let packed = match net.packed()? {
            Some(p) => p,
            None => bail!("W1's network has no packed path"),
        };
        for i in 0..n_steps {
            let v = net.forward_packed(&packed, &x, i as f64 * dt)?; // [B, 2]
            x = (x + (v * dt)?)?;
        }
        std::hint::black_box(x);
        Ok(())
    })?;
    let mut s = summarize(ts)?;
    let med = median_ms(&s);
    extend(
        &mut s,
        vec![
            ("bench", json!("s2_flow_euler_100")),
            ("batch", json!(b)),
            ("steps", json!(n_steps)),
            ("samples_per_s", json!(b as f64 / (med / 1e3))),
            ("ms_per_model_call", json!(med / n_steps as f64)),
        ],
    );
    let flop = n_steps as f64 * flops::mlp(b, &W1_DIMS);
    add_efficiency(&mut s, "s2_flow_euler_100", flop)?;
    emit(s);
    Ok(())
}

/// DDPM's diffusion steps and the width of W2's time embedding.
const T: usize = 1000;
const TEMB: usize = 128;

/// torch_bench.ddpm_schedule: linear betas 1e-4..0.02 (linspace in f64), alphas = 1 - betas,
/// abar = cumprod(alphas), all cast to f32.
fn ddpm_schedule() -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b0, b1) = (1e-4f64, 0.02f64);
    let betas: Vec<f64> = (0..T)
        .map(|i| b0 + (b1 - b0) * i as f64 / (T - 1) as f64)
        .collect();
    let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
    let abar: Vec<f64> = alphas
        .iter()
        .scan(1.0f64, |acc, a| {
            *acc *= a;
            Some(*acc)
        })
        .collect();
    let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
    (f(&betas), f(&alphas), f(&abar))
}

/// W2's eps network (seed 0): concat(x[64], sinusoidal(t)[128]) -> 3 x (Linear 1024 + SiLU)
/// -> Linear 64; its parameters are `net.hidden.{i}.*` and `net.out.*`.
fn w2_model(dev: &Device) -> Result<(VarMap, Mlp)> {
    let vm = VarMap::new();
    let mut rng = Rng::new(0);
    let mlp = {
        let mut p = ParamInit::new(&vm, &mut rng, dev);
        Mlp::new(&mut p.push("net"), 64 + TEMB, 1024, 3, 64, Activation::Silu)?
    };
    Ok((vm, mlp))
}

/// concat(x, sinusoidal(t, 128)) for raw float timesteps `t: [B]`, as torch's DDPMMLP.
fn w2_input(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    let temb = sinusoidal_embedding(t, TEMB, 10000.0)?; // [B, 128]
    Ok(Tensor::cat(&[x, &temb], 1)?) // [B, 192]
}

pub fn w2(steps: (usize, usize)) -> Result<()> {
    let dev = super::device()?;
    // All 1797 digits scaled to [-1, 1] as x / 8 - 1 (the embedded file is sklearn's
    // load_digits data, row for row).
    let digits = elbo::data::digits::load()?;
    let data: Vec<f32> = digits
        .images
        .iter()
        .map(|&p| p as f32 / 8.0 - 1.0)
        .collect();
    let n_rows = digits.len();
    let (vm, net) = w2_model(&dev)?;
    let params = named_vars(&vm)?;
    let (_, _, abar) = ddpm_schedule();
    let mut opt = adamw();
    let mut rng = Rng::new(1);
    let b = 512;
    let mut losses = Vec::new();
    let ts = time_steps(steps, || {
        let idx: Vec<usize> = (0..b).map(|_| rng.below(n_rows)).collect();
        let t: Vec<usize> = (0..b).map(|_| rng.below(T)).collect();
        let eps = rng.normal_vec(b * 64);
        let mut xt = Vec::with_capacity(b * 64);
        for (r, (&i, &ti)) in idx.iter().zip(&t).enumerate() {
            let (sa, sb) = (abar[ti].sqrt(), (1.0 - abar[ti]).sqrt());
            let x0 = &data[i * 64..(i + 1) * 64];
            let e = &eps[r * 64..(r + 1) * 64];
            xt.extend(x0.iter().zip(e).map(|(x, e)| sa * x + sb * e));
        }
        let xt = Tensor::from_vec(xt, (b, 64), &dev)?; // [B, 64]
        let eps = Tensor::from_vec(eps, (b, 64), &dev)?; // [B, 64]
        let tf: Vec<f32> = t.iter().map(|&v| v as f32).collect();
        let tf = Tensor::from_vec(tf, b, &dev)?; // [B]
        let pred = net.forward(&w2_input(&xt, &tf)?)?; // [B, 64]
        let loss = (pred - eps)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&params, &grads, 1e-3)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        Ok(())
    })?;
    emit_train_step(
        ts,
        "w2_ddpm_mlp_train",
        nparams(&vm)?,
        b,
        &losses,
        flops::train(flops::mlp(b, &W2_DIMS)),
        vec![("data", json!("embedded-digits"))],
    )
}

/// Print one MLP training benchmark line with torch_bench.py's keys.
fn emit_train_step(
    ts: Vec<f64>,
    bench: &str,
    params: usize,
    batch: usize,
    losses: &[f64],
    flop: f64,
    extra: Vec<(&str, serde_json::Value)>,
) -> Result<()> {
    let mut s = summarize(ts)?;
    let med = median_ms(&s);
    let mut keys = vec![
        ("bench", json!(bench)),
        ("params", json!(params)),
        ("batch", json!(batch)),
        ("samples_per_s", json!(batch as f64 / (med / 1e3))),
        ("loss_first", json!(losses.first())),
        ("loss_last", json!(losses.last())),
        ("fused_adamw", json!(false)),
    ];
    keys.extend(extra);
    extend(&mut s, keys);
    add_efficiency(&mut s, bench, flop)?;
    emit(s);
    Ok(())
}

pub fn s1(steps: (usize, usize)) -> Result<()> {
    let dev = Device::Cpu;
    let (_vm, mlp) = w2_model(&dev)?;
    // the library's sampling path (see s2)
    let net = match PackedMlp::new(&mlp, TEMB)? {
        Some(p) => p,
        None => bail!("W2's network has no packed path"),
    };
    let (betas, alphas, abar) = ddpm_schedule();
    // In f32 as torch: coef1 = 1 / sqrt(alpha), coef2 = beta / sqrt(1 - abar), sigma = sqrt(beta).
    let coef1: Vec<f32> = alphas.iter().map(|a| 1.0 / a.sqrt()).collect();
    let coef2: Vec<f32> = betas
        .iter()
        .zip(&abar)
        .map(|(b, ab)| b / (1.0 - ab).sqrt())
        .collect();
    let sigma: Vec<f32> = betas.iter().map(|b| b.sqrt()).collect();
    let mut rng = Rng::new(2);
    let b = 256;
    let ts = time_steps(steps, || {
        let mut x = rng.normal_vec(b * 64); // [B, 64]
        for i in (0..T).rev() {
            let temb = sinusoidal_row(i as f64, TEMB, 10000.0)?;
            let eps = net.forward(&x, &temb)?; // [B, 64]
            let z = if i > 0 {
                rng.normal_vec(b * 64)
            } else {
                vec![0.0; b * 64]
            };
            let (c1, c2, s) = (coef1[i], coef2[i], sigma[i]);
            for ((xv, e), zv) in x.iter_mut().zip(&eps).zip(&z) {
                *xv = (*xv - e * c2) * c1 + s * zv;
            }
        }
        std::hint::black_box(x);
        Ok(())
    })?;
    let mut s = summarize(ts)?;
    let med = median_ms(&s);
    extend(
        &mut s,
        vec![
            ("bench", json!("s1_ddpm_sample_1000")),
            ("batch", json!(b)),
            ("steps", json!(T)),
            ("samples_per_s", json!(b as f64 / (med / 1e3))),
            ("ms_per_model_call", json!(med / T as f64)),
        ],
    );
    add_efficiency(
        &mut s,
        "s1_ddpm_sample_1000",
        T as f64 * flops::mlp(b, &W2_DIMS),
    )?;
    emit(s);
    Ok(())
}
