//! `elbo bench`: the reference workloads of bench-ref/torch_bench.py, reproduced exactly
//! (model shapes, batch, loss, AdamW settings, warm-up and timed steps, median), printing one
//! JSON line with the same keys as the PyTorch script.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use elbo::config::ModelConfig;
use elbo::continuous::flow_matching::VelocityMlp;
use elbo::continuous::VelocityField;
use elbo::nn::ParamInit;
use elbo::train::optim::{named_vars, AdamW, AdamWConfig};
use elbo::Rng;
use serde_json::json;

use crate::BenchArgs;

pub fn run(a: BenchArgs) -> Result<()> {
    match a.workload.as_str() {
        "w1" => w1(a.warmup.unwrap_or(5), a.iters.unwrap_or(30)),
        "s2" => s2(a.warmup.unwrap_or(1), a.iters.unwrap_or(3)),
        other => bail!("unknown workload '{other}'; available: w1, s2 (the rest arrive with the performance work)"),
    }
}

/// W1's velocity network: concat(x[2], sinusoidal(1000 t)[32]) -> 4 x (Linear 512 + SiLU) -> Linear 2.
fn w1_model(dev: &Device) -> Result<(VarMap, VelocityMlp)> {
    let cfg = ModelConfig {
        hidden: 512,
        layers: 4,
        time_embed_dim: 32,
        time_scale: 1000.0,
        ..ModelConfig::default()
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

fn summarize(mut ts: Vec<f64>) -> serde_json::Value {
    ts.sort_by(|a, b| a.total_cmp(b));
    let n = ts.len();
    let median = if n % 2 == 1 {
        ts[n / 2]
    } else {
        0.5 * (ts[n / 2 - 1] + ts[n / 2])
    };
    let mean = ts.iter().sum::<f64>() / n as f64;
    json!({"median_ms": 1e3 * median, "mean_ms": 1e3 * mean, "min_ms": 1e3 * ts[0],
           "p90_ms": 1e3 * ts[(n - 1).min((0.9 * n as f64) as usize)], "n": n})
}

fn w1(warmup: usize, iters: usize) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let dev = Device::Cpu;
    let (vm, net) = w1_model(&dev)?;
    let params = named_vars(&vm)?;
    let nparams: usize = params.iter().map(|(_, v)| v.elem_count()).sum();
    let mut opt = AdamW::new(AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    });
    let mut rng = Rng::new(1);
    let b = 4096;
    let mut losses = Vec::new();
    let mut step = |rng: &mut Rng| -> Result<()> {
        let x1 = sample_2d_target(b, rng, &dev)?;
        let x0 = rng.normal_tensor(&[b, 2], &dev)?;
        let t = rng.uniform_tensor(&[b], &dev)?;
        let tc = t.reshape((b, 1))?;
        let xt = (x0.broadcast_mul(&(1.0 - &tc)?)? + x1.broadcast_mul(&tc)?)?;
        let loss = (net.forward(&xt, &t)? - (x1 - x0)?)?.sqr()?.mean_all()?;
        let grads = loss.backward()?;
        opt.step(&params, &grads, 1e-3)?;
        losses.push(loss.to_scalar::<f32>()? as f64);
        Ok(())
    };
    for _ in 0..warmup {
        step(&mut rng)?;
    }
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        step(&mut rng)?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    let mut s = summarize(ts);
    let med = s["median_ms"].as_f64().unwrap_or(f64::NAN);
    s["bench"] = json!("w1_flow_mlp_train");
    s["framework"] = json!("elbo");
    s["params"] = json!(nparams);
    s["batch"] = json!(b);
    s["samples_per_s"] = json!(b as f64 / (med / 1e3));
    s["loss_first"] = json!(losses.first());
    s["loss_last"] = json!(losses.last());
    println!("{s}");
    Ok(())
}

fn s2(warmup: usize, iters: usize) -> Result<()> {
    if iters == 0 {
        bail!("--iters must be at least 1");
    }
    let dev = Device::Cpu;
    let (_vm, net) = w1_model(&dev)?;
    let mut rng = Rng::new(2);
    let (n_steps, b) = (100usize, 10000usize);
    let run = |rng: &mut Rng| -> Result<Tensor> {
        let mut x = rng.normal_tensor(&[b, 2], &dev)?;
        let dt = 1.0 / n_steps as f64;
        for i in 0..n_steps {
            let v = net.velocity(&x, i as f64 * dt)?;
            x = (x + (v * dt)?)?.detach();
        }
        Ok(x)
    };
    for _ in 0..warmup {
        run(&mut rng)?;
    }
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        run(&mut rng)?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    let mut s = summarize(ts);
    let med = s["median_ms"].as_f64().unwrap_or(f64::NAN);
    s["bench"] = json!("s2_flow_euler_100");
    s["framework"] = json!("elbo");
    s["batch"] = json!(b);
    s["steps"] = json!(n_steps);
    s["samples_per_s"] = json!(b as f64 / (med / 1e3));
    s["ms_per_model_call"] = json!(med / n_steps as f64);
    println!("{s}");
    Ok(())
}
