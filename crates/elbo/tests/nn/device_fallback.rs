//! On a GPU, every entry point with a fused CPU kernel takes its composition of candle ops
//! (`nn::fused::fused_at`), and gives what the fused kernel gives on the CPU: values and
//! gradients of linear + SiLU, layer norm, softmax, log-softmax, weighted cross-entropy,
//! attention (split and packed heads), group norm, rotary embedding, an AdamW and EMA update, and
//! a few training steps of a whole run (deferred host reads included).
//!
//! Runs when `ELBO_DEVICE=cuda` (or `cuda:N`) in a `--features cuda` build on a machine with a
//! GPU (`scripts/gpu_check.sh`); elsewhere each test says it was skipped and passes.

use candle_core::{DType, Device, Tensor, Var};
use elbo::config::Config;
use elbo::nn::fused::{linear_act, FusedAct, IGNORE_INDEX};
use elbo::nn::group_norm::group_norm_nhwc;
use elbo::nn::rotary::{Rotary, RotaryAt};
use elbo::nn::transformer::{
    attention, attention_qkv, cross_entropy_weighted, layer_norm, log_softmax_last_dim,
    softmax_last_dim,
};
use elbo::train::ema::Ema;
use elbo::train::optim::{AdamW, AdamWConfig};
use elbo::train::Trainer;
use elbo::Rng;

/// The GPU named by `ELBO_DEVICE`, or `None` (the test is skipped).
fn gpu() -> Option<Device> {
    let want = std::env::var("ELBO_DEVICE").unwrap_or_default();
    let Some(rest) = want.strip_prefix("cuda") else {
        eprintln!("skipped: set ELBO_DEVICE=cuda (a --features cuda build with a GPU)");
        return None;
    };
    let ordinal = rest.strip_prefix(':').map_or(0, |n| n.parse().unwrap());
    Some(Device::new_cuda(ordinal).expect("ELBO_DEVICE asks for a GPU that cannot be opened"))
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b| (at least 1e-2).
fn scaled_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-2);
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

type Op<'a> = &'a dyn Fn(&[Tensor], &Device) -> Tensor;

/// Values of `f(inputs)` on `dev` and the gradients of `sum(f(inputs) * r)` for every input.
fn run(dev: &Device, inputs: &[Tensor], f: Op, seed: u64) -> (Vec<f64>, Vec<Vec<f64>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&t.to_device(dev).unwrap()).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts, dev);
    let r = Rng::new(seed)
        .normal_tensor(y.dims(), &Device::Cpu)
        .unwrap()
        .to_device(dev)
        .unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads = vars
        .iter()
        .map(|v| match g.get(v.as_tensor()) {
            Some(t) => vals(t),
            None => vec![0.0; v.elem_count()],
        })
        .collect();
    (vals(&y), grads)
}

/// `f` on the CPU (fused) and on the GPU (composed) agree in values and gradients.
fn agree(what: &str, gpu: &Device, shapes: &[&[usize]], f: Op, tol: f64) {
    let mut rng = Rng::new(7);
    let inputs: Vec<Tensor> = shapes
        .iter()
        .map(|s| rng.normal_tensor(s, &Device::Cpu).unwrap())
        .collect();
    let (y_cpu, g_cpu) = run(&Device::Cpu, &inputs, f, 3);
    let (y_gpu, g_gpu) = run(gpu, &inputs, f, 3);
    let e = scaled_err(&y_gpu, &y_cpu);
    assert!(e < tol, "{what}: values differ by {e:.2e}");
    for (i, (a, b)) in g_gpu.iter().zip(&g_cpu).enumerate() {
        let e = scaled_err(a, b);
        assert!(e < tol, "{what}: gradient of input {i} differs by {e:.2e}");
    }
}

#[test]
fn fused_ops_and_their_gpu_compositions_agree() {
    let Some(g) = gpu() else { return };
    let tol = 1e-4;
    agree(
        "linear + SiLU",
        &g,
        &[&[37, 19], &[23, 19], &[23]],
        &|t, _| linear_act(&t[0], &t[1], &t[2], FusedAct::Silu).unwrap(),
        tol,
    );
    agree(
        "layer norm",
        &g,
        &[&[4, 7, 16], &[16], &[16]],
        &|t, _| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
        tol,
    );
    agree(
        "softmax",
        &g,
        &[&[5, 33]],
        &|t, _| softmax_last_dim(&t[0]).unwrap(),
        tol,
    );
    agree(
        "log-softmax",
        &g,
        &[&[5, 33]],
        &|t, _| log_softmax_last_dim(&t[0]).unwrap(),
        tol,
    );
    agree(
        "weighted cross-entropy",
        &g,
        &[&[9, 11], &[9]],
        &|t, dev| {
            let targets: Vec<u32> = (0..9)
                .map(|i| if i == 4 { IGNORE_INDEX } else { (i * 5) % 11 })
                .collect();
            let targets = Tensor::new(targets.as_slice(), dev).unwrap();
            cross_entropy_weighted(&t[0], &targets, Some(&t[1].abs().unwrap())).unwrap()
        },
        tol,
    );
    agree(
        "causal attention",
        &g,
        &[&[2, 3, 9, 8], &[2, 3, 9, 8], &[2, 3, 9, 8]],
        &|t, _| attention(&t[0], &t[1], &t[2], true).unwrap(),
        tol,
    );
    agree(
        "packed attention",
        &g,
        &[&[2, 9, 48]],
        &|t, _| attention_qkv(&t[0], 4, false).unwrap(),
        tol,
    );
    agree(
        "group norm + SiLU",
        &g,
        &[&[2, 4, 4, 8], &[8], &[8]],
        &|t, _| group_norm_nhwc(&t[0], 4, &t[1], &t[2], 1e-5, true).unwrap(),
        tol,
    );
    agree(
        "rotary",
        &g,
        &[&[2, 9, 48]],
        &|t, dev| {
            let rot = Rotary::new(16, 16, 4, dev).unwrap();
            rot.apply_qkv(&t[0], RotaryAt::From(3)).unwrap()
        },
        tol,
    );
}

#[test]
fn adamw_and_ema_updates_agree_on_the_gpu() {
    let Some(g) = gpu() else { return };
    let run = |dev: &Device| {
        let mut rng = Rng::new(5);
        let p0 = rng.normal_tensor(&[300], &Device::Cpu).unwrap();
        let c = rng.normal_tensor(&[300], &Device::Cpu).unwrap();
        let p = Var::from_tensor(&p0.to_device(dev).unwrap()).unwrap();
        let c = c.to_device(dev).unwrap();
        let params = vec![("p".to_string(), p.clone())];
        let mut opt = AdamW::new(AdamWConfig {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        });
        let mut ema = Ema::new(&params, 0.9).unwrap();
        for _ in 0..3 {
            let loss = (p.as_tensor().sqr().unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&params, &grads, 1e-2).unwrap();
            ema.update(&params).unwrap();
        }
        (vals(p.as_tensor()), vals(&ema.tensors()["p"]))
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&g));
    assert!(scaled_err(&gpu.0, &cpu.0) < 1e-5, "AdamW");
    assert!(scaled_err(&gpu.1, &cpu.1) < 1e-5, "EMA");
}

#[test]
fn a_short_training_run_matches_the_cpu() {
    let Some(g) = gpu() else { return };
    let run = |dev: &Device| {
        let mut c = Config::default();
        c.data.name = "8gaussians".into();
        c.data.test_size = 200;
        c.data.val_size = 100;
        c.set("model.net.hidden=32").unwrap();
        c.set("model.net.layers=2").unwrap();
        c.train.steps = 10;
        c.train.batch_size = 64;
        c.train.eval_every = 0;
        c.train.eval_examples = 50;
        c.train.log_every = 4;
        c.set("eval.solver=\"heun\"").unwrap();
        c.eval.steps = 4;
        let d = tempfile::tempdir().unwrap();
        let out = Trainer::create(c, d.path(), dev)
            .unwrap()
            .run(false)
            .unwrap();
        out.losses.iter().map(|l| l.1).collect::<Vec<f64>>()
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&g));
    assert_eq!(cpu.len(), 10);
    let e = scaled_err(&gpu, &cpu);
    assert!(e < 1e-3, "losses differ by {e:.2e}: {gpu:?} vs {cpu:?}");
}
