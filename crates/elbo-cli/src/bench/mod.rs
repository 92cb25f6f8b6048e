//! `elbo bench`: the PyTorch reference workloads that scripts/bench_compare.sh runs side by
//! side, reproduced exactly (model shapes, batch, loss, AdamW settings, warm-up and timed steps,
//! median), each printing
//! one JSON line per figure with the same keys as the PyTorch script, plus `"framework": "elbo"`
//! and `"peak_rss_mb"` (the process's VmHWM at the end).
//!
//! - `gemm`: fp32 matmul GFLOP/s at 1024^3 and 2048^3.
//! - `w1`, `w2`, `s1`, `s2`: the MLP workloads ([`mlp`]).
//! - `w3`, `w4`: the character transformer workloads ([`lm`]).
//! - `unet`: training steps of the U-Net presets ([`unet`]), W5.
//! - `s3_ar`, `s3_mdlm`, `s3_bd3lm`: language-model sampling throughput ([`sample_lm`]).
//!
//! Beside each median, the workload lines carry an efficiency column ([`add_efficiency`]): the
//! analytic FLOPs of a step ([`flops`]), the rate they were done at, and its fraction of the
//! machine's fp32 GEMM rate (`--gemm-gflops`, or the `gemm` probe at 2048^3 run once).

mod flops;
mod lm;
mod mlp;
mod sample_lm;
mod unet;

use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;
use elbo::train::optim::{AdamW, AdamWConfig};
use elbo::Rng;
use serde_json::{json, Map, Value};

use crate::BenchArgs;

/// The workloads, in the order of torch_bench.py.
const WORKLOADS: &str = "gemm, w1, w2, w3, w4, s1, s2, unet, s3_ar, s3_mdlm, s3_bd3lm";

/// The GEMM rate (GFLOP/s) the efficiency column divides by: `--gemm-gflops`, or measured once.
static GEMM_GFLOPS: OnceLock<f64> = OnceLock::new();

pub fn run(a: BenchArgs) -> Result<()> {
    // torch_bench.py: training workloads take `args.warmup or N` (so 0 means the default),
    // sampling workloads `args.warmup if args.warmup is not None else 1`; iters is `or N`.
    let train = |w: usize, i: usize| (a.warmup.filter(|&x| x > 0).unwrap_or(w), nz(a.iters, i));
    let sample = || (a.warmup.unwrap_or(1), nz(a.iters, 3));
    if let Some(g) = a.gemm_gflops {
        if !(g.is_finite() && g > 0.0) {
            bail!("--gemm-gflops must be a positive rate, got {g}");
        }
        GEMM_GFLOPS.get_or_init(|| g);
    }
    match a.workload.as_str() {
        "gemm" => gemm(),
        "w1" => mlp::w1(train(5, 30)),
        "w2" => mlp::w2(train(5, 50)),
        "w3" => lm::run(false, train(3, 10), a.corpus.as_deref()),
        "w4" => lm::run(true, train(3, 10), a.corpus.as_deref()),
        "s1" => mlp::s1(sample()),
        "s2" => mlp::s2(sample()),
        "unet" => unet::run(train(1, 5), &a.preset, a.export.as_deref()),
        "s3_ar" => sample_lm::run(sample_lm::Sampler::Ar, sample()),
        "s3_mdlm" => sample_lm::run(
            sample_lm::Sampler::Mdlm,
            (a.warmup.unwrap_or(0), nz(a.iters, 1)),
        ),
        "s3_bd3lm" => sample_lm::run(sample_lm::Sampler::Bd3lm, sample()),
        other => bail!("unknown workload '{other}'; available: {WORKLOADS}"),
    }
}

/// `args.iters or default`.
fn nz(v: Option<usize>, default: usize) -> usize {
    v.filter(|&x| x > 0).unwrap_or(default)
}

/// PyTorch's AdamW settings of every training workload.
fn adamw() -> AdamW {
    AdamW::new(AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    })
}

/// The device of the training workloads and `gemm`: `ELBO_DEVICE` as for `elbo train` (the CPU
/// by default in a CPU build; s1 and s2 time the packed CPU sampling path, always on the CPU).
fn device() -> Result<Device> {
    let dev = crate::commands::device()?;
    let _ = TIMED_DEVICE.set(dev.clone());
    Ok(dev)
}

/// The device [`time_steps`] waits for after each step (GPU work is queued asynchronously).
static TIMED_DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Runs `step` `warmup` times untimed, then `iters` times timed; returns the seconds per step
/// (each ends when the device has finished the step's work).
fn time_steps(
    (warmup, iters): (usize, usize),
    mut step: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    let sync = || match TIMED_DEVICE.get() {
        Some(d) => d.synchronize(),
        None => Ok(()),
    };
    for _ in 0..warmup {
        step()?;
    }
    sync()?;
    let mut ts = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        step()?;
        sync()?;
        ts.push(t0.elapsed().as_secs_f64());
    }
    Ok(ts)
}

/// The median of a non-empty sample (mean of the middle two for even sizes, as
/// `statistics.median`).
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// torch_bench.summarize: median, mean, min and p90 (`times[min(n-1, int(0.9 n))]`) in ms.
fn summarize(mut ts: Vec<f64>) -> Result<Map<String, Value>> {
    if ts.is_empty() {
        bail!("no timed steps");
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    let n = ts.len();
    let mean = ts.iter().sum::<f64>() / n as f64;
    let p90 = ts[(n - 1).min((0.9 * n as f64) as usize)];
    let mut m = Map::new();
    m.insert("median_ms".into(), json!(1e3 * median(&ts)));
    m.insert("mean_ms".into(), json!(1e3 * mean));
    m.insert("min_ms".into(), json!(1e3 * ts[0]));
    m.insert("p90_ms".into(), json!(1e3 * p90));
    m.insert("n".into(), json!(n));
    Ok(m)
}

/// Peak resident set size of this process in MB (VmHWM from /proc/self/status), if known.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Prints one JSON line: `fields` plus the framework, thread count and peak RSS (unless
/// already recorded, by [`add_efficiency`]).
fn emit(mut fields: Map<String, Value>) {
    fields.insert("framework".into(), json!("elbo"));
    fields.insert(
        "threads".into(),
        json!(candle_core::utils::get_num_threads()),
    );
    if !fields.contains_key("peak_rss_mb") {
        fields.insert("peak_rss_mb".into(), json!(peak_rss_mb()));
    }
    println!("{}", Value::Object(fields));
}

/// The efficiency column of a summary `s` of steps that each do `flop` FLOPs: adds `gflop` (per
/// step), `achieved_gflops`, `gemm_gflops` and `gemm_fraction` (achieved / GEMM rate) and prints
/// them beside the median on stderr. The peak RSS is recorded first, so a GEMM probe run here
/// does not count in it.
fn add_efficiency(s: &mut Map<String, Value>, name: &str, flop: f64) -> Result<()> {
    s.insert("peak_rss_mb".into(), json!(peak_rss_mb()));
    let med = median_ms(s);
    let gemm = gemm_rate()?;
    let rate = flop / (med / 1e3) / 1e9;
    extend(
        s,
        vec![
            ("gflop", json!(flop / 1e9)),
            ("achieved_gflops", json!(rate)),
            ("gemm_gflops", json!(gemm)),
            ("gemm_fraction", json!(rate / gemm)),
        ],
    );
    eprintln!(
        "{name}: median {med:.1} ms, {:.3} GFLOP -> {rate:.1} GFLOP/s = {:.1}% of the GEMM rate \
         ({gemm:.1} GFLOP/s)",
        flop / 1e9,
        100.0 * rate / gemm
    );
    Ok(())
}

/// The GEMM rate: `--gemm-gflops`, or the median of [`gemm_probe`] at 2048^3, measured once.
fn gemm_rate() -> Result<f64> {
    if let Some(&g) = GEMM_GFLOPS.get() {
        return Ok(g);
    }
    let n = 2048;
    let ts = gemm_probe(n, 10)?;
    let g = 2.0 * (n as f64).powi(3) / median(&ts) / 1e9;
    Ok(*GEMM_GFLOPS.get_or_init(|| g))
}

/// `elbo bench gemm`'s probe: C = A B for standard normal n x n matrices A, B, 3 warm-up
/// products, then `iters` timed ones; the sorted seconds.
fn gemm_probe(n: usize, iters: usize) -> Result<Vec<f64>> {
    let dev = device()?;
    let mut rng = Rng::new(0);
    let a = rng.normal_tensor(&[n, n], &dev)?;
    let b = rng.normal_tensor(&[n, n], &dev)?;
    let mut ts = time_steps((3, iters), || {
        let c = a.matmul(&b)?; // [n, n]
        std::hint::black_box(c);
        Ok(())
    })?;
    ts.sort_by(|x, y| x.total_cmp(y));
    Ok(ts)
}

/// Adds `pairs` to `m`.
fn extend(m: &mut Map<String, Value>, pairs: Vec<(&str, Value)>) {
    for (k, v) in pairs {
        m.insert(k.to_string(), v);
    }
}

/// The `median_ms` of a summary.
fn median_ms(s: &Map<String, Value>) -> f64 {
    s.get("median_ms")
        .and_then(Value::as_f64)
        .unwrap_or(f64::NAN)
}

/// torch_bench.cmd_gemm: C = A B for standard normal A, B of size n x n; 3 warm-up products,
/// then 30 (n = 1024) or 10 (n = 2048) timed ones. The flags --warmup/--iters do not apply.
fn gemm() -> Result<()> {
    for n in [1024usize, 2048] {
        let ts = gemm_probe(n, if n == 1024 { 30 } else { 10 })?;
        let med = median(&ts);
        let flop = 2.0 * (n as f64).powi(3);
        let mut m = Map::new();
        extend(
            &mut m,
            vec![
                ("bench", json!("gemm")),
                ("n", json!(n)),
                ("median_ms", json!(1e3 * med)),
                ("gflops", json!(flop / med / 1e9)),
                ("best_gflops", json!(flop / ts[0] / 1e9)),
            ],
        );
        emit(m);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_follows_torch_bench() {
        // statistics.median of an even sample is the mean of the middle two;
        // p90 = times[min(n - 1, int(0.9 n))]
        let s = summarize(vec![0.004, 0.001, 0.003, 0.002]).unwrap();
        assert!((median_ms(&s) - 2.5).abs() < 1e-9);
        assert!((s["p90_ms"].as_f64().unwrap() - 4.0).abs() < 1e-9);
        assert!((s["min_ms"].as_f64().unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(s["n"], json!(4));
        let s = summarize((1..=10).map(|i| i as f64 / 1e3).collect()).unwrap();
        assert!((s["p90_ms"].as_f64().unwrap() - 10.0).abs() < 1e-9);
        assert!(summarize(vec![]).is_err());
    }

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_mb().is_some_and(|mb| mb > 0.0));
        }
    }
}
