//! Replays diffusers 0.42.1 reference numbers (tests/fixtures/diffusers, or the directory named by
//! ELBO_FIXTURES_DIR): every `schedule_*.json` (betas, alphas_cumprod, fixed_small posterior
//! variance; rel. tol 1e-6) and every `loop_*.json` (a whole sampling loop driven by the analytic
//! model 0.5 x cos(0.001 t) + 0.1 sin(0.01 t); rel. tol 1e-4 on x_final). A file that cannot be
//! replayed (unknown kind, unsupported config) fails the test just like a mismatch.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use elbo::continuous::parameterization::Parameterization;
use elbo::continuous::sampler::{
    ddim, dpmpp_2m, euler, flow_euler, heun, Churn, Denoiser, ScheduledDenoiser,
};
use elbo::continuous::schedule::{
    ddim_timesteps, diffusers_sigmas, dpm_solver_timesteps, euler_timesteps, flow_match_sigmas,
    init_noise_sigma, karras_sigmas, with_final_zero, BetaSchedule, DiscreteSchedule, DiscreteVp,
    Interpolation, NoiseSchedule, Precision, TimestepSpacing,
};
use elbo::Rng;
use serde_json::Value;

type R<T> = std::result::Result<T, String>;

fn fixtures_dir() -> PathBuf {
    match std::env::var_os("ELBO_FIXTURES_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/diffusers"),
    }
}

fn e<E: std::fmt::Display>(err: E) -> String {
    err.to_string()
}

fn f64s(v: &Value, key: &str) -> R<Vec<f64>> {
    v.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| format!("missing array '{key}'"))?
        .iter()
        .map(|x| x.as_f64().ok_or_else(|| format!("non-number in '{key}'")))
        .collect()
}

fn num(v: &Value, key: &str) -> R<f64> {
    v.get(key)
        .and_then(Value::as_f64)
        .ok_or_else(|| format!("missing number '{key}'"))
}

fn string<'a>(v: &'a Value, key: &str) -> R<&'a str> {
    v.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing string '{key}'"))
}

/// Max relative error of `got` against `want`, requiring equal lengths.
fn check_close(what: &str, got: &[f64], want: &[f64], rtol: f64) -> R<()> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: length {} vs reference {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if (g - w).abs() > rtol * w.abs() + 1e-30 {
            return Err(format!(
                "{what}[{i}]: {g} vs reference {w} (rel. err {:.3e} > {rtol:e})",
                (g - w).abs() / w.abs()
            ));
        }
    }
    Ok(())
}

fn replay_schedule(v: &Value, name: &str) -> R<()> {
    let kind_name = name
        .strip_prefix("schedule_")
        .and_then(|s| s.strip_suffix(".json"))
        .ok_or("bad schedule file name")?;
    let kind = BetaSchedule::parse(kind_name).map_err(e)?;
    let betas = f64s(v, "betas")?;
    let sched = DiscreteSchedule::new(
        kind,
        betas.len(),
        num(v, "beta_start")?,
        num(v, "beta_end")?,
        Precision::F32,
    )
    .map_err(e)?;
    check_close("betas", sched.betas(), &betas, 1e-6)?;
    check_close(
        "alphas_cumprod",
        sched.alphas_cumprod(),
        &f64s(v, "alphas_cumprod")?,
        1e-6,
    )?;
    let pv: Vec<f64> = (0..sched.len())
        .map(|t| sched.posterior_variance(t))
        .collect::<elbo::Result<_>>()
        .map_err(e)?;
    check_close(
        "posterior_variance_fixed_small",
        &pv,
        &f64s(v, "posterior_variance_fixed_small")?,
        1e-6,
    )
}

/// Refuses configs whose options this replay does not implement.
fn check_supported(cfg: &Value) -> R<()> {
    let map = cfg.as_object().ok_or("scheduler_config is not an object")?;
    for (k, val) in map {
        let ok = match k.as_str() {
            "thresholding"
            | "clip_sample"
            | "rescale_betas_zero_snr"
            | "use_exponential_sigmas"
            | "use_beta_sigmas"
            | "use_lu_lambdas"
            | "use_flow_sigmas"
            | "use_dynamic_shifting"
            | "invert_sigmas"
            | "stochastic_sampling"
            | "euler_at_final" => val.as_bool() == Some(false),
            "trained_betas" | "sigma_min" | "sigma_max" | "shift_terminal" | "variance_type" => {
                val.is_null()
            }
            "timestep_type" => val.as_str() == Some("discrete"),
            "interpolation_type" => val.as_str() == Some("linear"),
            "final_sigmas_type" => val.as_str() == Some("zero"),
            "algorithm_type" => val.as_str() == Some("dpmsolver++"),
            "solver_order" => val.as_u64() == Some(2),
            "solver_type" => val.as_str() == Some("midpoint"),
            "lambda_min_clipped" => val.as_str() == Some("-Infinity"),
            _ => true,
        };
        if !ok {
            return Err(format!("unsupported scheduler option {k} = {val}"));
        }
    }
    Ok(())
}

fn discrete_schedule(cfg: &Value) -> R<DiscreteSchedule> {
    let n = num(cfg, "num_train_timesteps")? as usize;
    DiscreteSchedule::new(
        BetaSchedule::parse(string(cfg, "beta_schedule")?).map_err(e)?,
        n,
        num(cfg, "beta_start")?,
        num(cfg, "beta_end")?,
        Precision::F32,
    )
    .map_err(e)
}

/// The fixtures' analytic stand-in for a network: 0.5 x cos(0.001 t) + 0.1 sin(0.01 t).
fn model(x: &Tensor, t: f64) -> elbo::Result<Tensor> {
    Ok(x.affine(0.5 * (0.001 * t).cos(), 0.1 * (0.01 * t).sin())?)
}

fn replay_loop(v: &Value) -> R<()> {
    let kind = string(v, "kind")?;
    let cfg = v
        .get("scheduler_config")
        .ok_or("missing scheduler_config")?;
    check_supported(cfg)?;
    let shape: Vec<usize> = f64s(v, "shape")?.iter().map(|&d| d as usize).collect();
    let x_init = Tensor::from_vec(f64s(v, "x_init")?, shape.as_slice(), &Device::Cpu).map_err(e)?;
    let want = f64s(v, "x_final")?;
    let want_ts = f64s(v, "timesteps")?;
    let n = num(v, "num_inference_steps")? as usize;
    let n_train = num(cfg, "num_train_timesteps")? as usize;
    let offset = cfg.get("steps_offset").and_then(Value::as_u64).unwrap_or(0) as usize;
    let param =
        Parameterization::parse(string(cfg, "prediction_type").unwrap_or("flow")).map_err(e)?;
    let mut rng = Rng::new(0);
    let x_final = match kind {
        "ddim" => {
            let sched = discrete_schedule(cfg)?;
            let spacing = TimestepSpacing::parse(string(cfg, "timestep_spacing")?).map_err(e)?;
            let ts = ddim_timesteps(spacing, n_train, n, offset).map_err(e)?;
            let ts_f: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
            check_close("timesteps", &ts_f, &want_ts, 0.0)?;
            let set_one = cfg
                .get("set_alpha_to_one")
                .and_then(Value::as_bool)
                .ok_or("missing set_alpha_to_one")?;
            let tr = sched.diffusers_transitions(&ts, set_one).map_err(e)?;
            let dvp = DiscreteVp::new(&sched, Interpolation::Linear);
            let den = ScheduledDenoiser::new(&model, &dvp, param, 1.0);
            ddim(&den, &tr, num(v, "eta")?, &x_init, &mut rng).map_err(e)?
        }
        "euler" | "euler_karras" | "heun" | "dpmpp2m" => {
            let sched = discrete_schedule(cfg)?;
            let spacing = TimestepSpacing::parse(string(cfg, "timestep_spacing")?).map_err(e)?;
            let karras = cfg.get("use_karras_sigmas").and_then(Value::as_bool) == Some(true);
            if karras != (kind == "euler_karras") {
                return Err(format!("use_karras_sigmas = {karras} with kind {kind}"));
            }
            let linear = DiscreteVp::new(&sched, Interpolation::Linear);
            let (sigmas, ts, dvp) = if kind == "dpmpp2m" {
                let ts: Vec<f64> = dpm_solver_timesteps(spacing, n_train, n, offset)
                    .map_err(e)?
                    .into_iter()
                    .map(|t| t as f64)
                    .collect();
                (diffusers_sigmas(&linear, &ts), ts, linear)
            } else {
                let ts = euler_timesteps(spacing, n_train, n, offset).map_err(e)?;
                if karras {
                    // Karras et al. 2022 eq. 5 between the end sigmas of the spaced grid; the
                    // model times come from log-sigma interpolation (diffusers `_sigma_to_t`).
                    let base = diffusers_sigmas(&linear, &ts);
                    let s = karras_sigmas(base[n - 1], base[0], n, 7.0).map_err(e)?;
                    let log = DiscreteVp::new(&sched, Interpolation::LogLinear);
                    let ts = s
                        .iter()
                        .map(|&x| log.t_of_edm_sigma(x))
                        .collect::<elbo::Result<Vec<f64>>>()
                        .map_err(e)?;
                    (with_final_zero(s), ts, log)
                } else {
                    (diffusers_sigmas(&linear, &ts), ts, linear)
                }
            };
            if kind == "heun" {
                // diffusers lists each inner sigma twice (predictor + corrector)
                let mut ref_s = f64s(v, "sigmas")?;
                ref_s.dedup();
                check_close("sigmas", &sigmas, &ref_s, 1e-5)?;
                let mut ref_t = want_ts.clone();
                ref_t.dedup();
                check_close("timesteps", &ts, &ref_t, 1e-5)?;
            } else {
                check_close("sigmas", &sigmas, &f64s(v, "sigmas")?, 1e-5)?;
                check_close("timesteps", &ts, &want_ts, 1e-5)?;
            }
            let den = ScheduledDenoiser::new(&model, &dvp, param, 1.0);
            let den: &dyn Denoiser = &den;
            if kind == "dpmpp2m" {
                // diffusers' DPM-Solver runs on VP-scaled samples (init_noise_sigma 1): the EDM
                // variable is x_VP sqrt(1 + sigma_0^2); at sigma = 0 both coincide.
                check_close(
                    "init_noise_sigma",
                    &[1.0],
                    &[num(v, "init_noise_sigma")?],
                    0.0,
                )?;
                let x = x_init
                    .affine((1.0 + sigmas[0] * sigmas[0]).sqrt(), 0.0)
                    .map_err(e)?;
                let lof = cfg.get("lower_order_final").and_then(Value::as_bool) == Some(true);
                dpmpp_2m(den, &sigmas, lof, &x).map_err(e)?
            } else {
                let init = init_noise_sigma(sigmas[0], spacing);
                check_close(
                    "init_noise_sigma",
                    &[init],
                    &[num(v, "init_noise_sigma")?],
                    1e-5,
                )?;
                let x = x_init.affine(init, 0.0).map_err(e)?;
                let churn = Churn::default();
                if kind == "heun" {
                    heun(den, &sigmas, &churn, &x, &mut rng).map_err(e)?
                } else {
                    euler(den, &sigmas, &churn, &x, &mut rng).map_err(e)?
                }
            }
        }
        "flow_euler" => {
            let shift = num(cfg, "shift")?;
            let sigmas = flow_match_sigmas(n, shift, n_train).map_err(e)?;
            check_close("sigmas", &sigmas, &f64s(v, "sigmas")?, 1e-5)?;
            let ts: Vec<f64> = sigmas[..n].iter().map(|s| s * n_train as f64).collect();
            check_close("timesteps", &ts, &want_ts, 1e-5)?;
            let scale = n_train as f64;
            let flow = move |x: &Tensor, s: f64| model(x, scale * s);
            flow_euler(&flow, &sigmas, &x_init).map_err(e)?
        }
        other => return Err(format!("unknown loop kind '{other}'")),
    };
    let got = x_final
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(e)?;
    check_close("x_final", &got, &want, 1e-4)
}

#[test]
fn diffusers_fixtures() {
    let dir = fixtures_dir();
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read fixture directory {}: {err}", dir.display()))
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|n| (n.starts_with("schedule_") || n.starts_with("loop_")) && n.ends_with(".json"))
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no schedule_*.json / loop_*.json in {}",
        dir.display()
    );
    let mut failures = Vec::new();
    for name in &names {
        let result = std::fs::read_to_string(dir.join(name))
            .map_err(e)
            // Python's json writes -inf as the non-standard token -Infinity
            .map(|text| text.replace("-Infinity", "\"-Infinity\""))
            .and_then(|text| serde_json::from_str::<Value>(&text).map_err(e))
            .and_then(|v| {
                if name.starts_with("schedule_") {
                    replay_schedule(&v, name)
                } else {
                    replay_loop(&v)
                }
            });
        match result {
            Ok(()) => println!("{name}: ok"),
            Err(msg) => failures.push(format!("{name}: {msg}")),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixture files failed:\n{}",
        failures.len(),
        names.len(),
        failures.join("\n")
    );
}
