//! Tests of the U-Net backbone: output shapes (8x8, 28x28, odd sizes and channel counts), bad
//! inputs, zero initialisation, gradients reaching every parameter, time conditioning, seeded
//! determinism (dropout from the rng) and a short training (step timings: `elbo bench unet`). The
//! layer-level tests (group norm, convolution, im2col, upsampling) are in `unet/ops.rs`.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use elbo::nn::unet::upsample_nearest2;
use elbo::nn::{ParamInit, UNet, UNetConfig};
use elbo::train::optim::{named_vars, AdamW, AdamWConfig};
use elbo::Rng;

/// As in the `elbo` binary: glibc's allocator returns large tensor buffers to the kernel, and
/// the page faults of re-allocating them would slow the short training below.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CPU: Device = Device::Cpu;

#[path = "unet/ops.rs"]
mod ops;

fn build(cfg: UNetConfig, seed: u64) -> (VarMap, UNet) {
    let vm = VarMap::new();
    let mut rng = Rng::new(seed);
    let net = {
        let mut p = ParamInit::new(&vm, &mut rng, &CPU);
        UNet::new(&mut p, cfg).unwrap()
    };
    (vm, net)
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn randn(rng: &mut Rng, shape: &[usize]) -> Tensor {
    rng.normal_tensor(shape, &CPU).unwrap()
}

/// A tiny config whose every parameter influences the output at initialisation.
fn tiny(in_c: usize, out_c: usize, mults: Vec<usize>) -> UNetConfig {
    UNetConfig {
        in_channels: in_c,
        out_channels: out_c,
        base_channels: 8,
        channel_mults: mults,
        num_res_blocks: 1,
        attn_levels: vec![1],
        mid_attn: true,
        attn_heads: 2,
        dropout: 0.0,
        time_embed_dim: 16,
        time_scale: 1000.0,
        groups: 4,
        zero_init: false,
    }
}

#[test]
fn output_shapes() {
    let mut rng = Rng::new(1);
    for (cfg, b, h, w) in [
        (UNetConfig::digits(), 3, 8, 8),
        (UNetConfig::digits_small(), 3, 8, 8),
        (UNetConfig::mnist(), 2, 28, 28),
        (UNetConfig::mnist_small(), 2, 28, 28),
        (tiny(3, 5, vec![1, 2]), 2, 8, 8),
        // odd sizes are padded to a multiple of 4 and cropped back
        (tiny(3, 5, vec![1, 2, 2]), 2, 7, 9),
        (tiny(1, 1, vec![1]), 1, 5, 3),
    ] {
        let (c_in, c_out) = (cfg.in_channels, cfg.out_channels);
        let (_vm, net) = build(cfg, 2);
        let x = randn(&mut rng, &[b, c_in, h, w]);
        let t = rng.uniform_tensor(&[b], &CPU).unwrap();
        let y = net.forward(&x, &t).unwrap();
        assert_eq!(y.dims(), [b, c_out, h, w]);
        assert!(vals(&y).iter().all(|v| v.is_finite()));
        let yf = net
            .forward_flat(&x.reshape((b, ())).unwrap(), &t, (h, w))
            .unwrap();
        assert_eq!(yf.dims(), [b, c_out * h * w]);
        let diff = (yf - y.reshape((b, ())).unwrap()).unwrap().abs().unwrap();
        assert_eq!(vals(&diff.max_all().unwrap())[0], 0.0);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let (_vm, net) = build(tiny(1, 1, vec![1, 2]), 1);
    let mut rng = Rng::new(1);
    let t = Tensor::zeros(2, DType::F32, &CPU).unwrap();
    assert!(net.forward(&randn(&mut rng, &[2, 3, 8, 8]), &t).is_err());
    assert!(net
        .forward(&randn(&mut rng, &[2, 1, 8, 8]), &t.narrow(0, 0, 1).unwrap())
        .is_err());
    assert!(net.forward(&randn(&mut rng, &[2, 64]), &t).is_err());
    assert!(net
        .forward_flat(&randn(&mut rng, &[2, 63]), &t, (8, 8))
        .is_err());
    let mut cfg = tiny(1, 1, vec![1, 2]);
    cfg.groups = 3;
    let vm = VarMap::new();
    let mut r = Rng::new(0);
    assert!(UNet::new(&mut ParamInit::new(&vm, &mut r, &CPU), cfg).is_err());
}

#[test]
fn zero_init_outputs_zero() {
    let mut cfg = tiny(1, 2, vec![1, 2]);
    cfg.zero_init = true;
    let (_vm, net) = build(cfg, 3);
    let mut rng = Rng::new(3);
    let y = net
        .forward(
            &randn(&mut rng, &[2, 1, 8, 8]),
            &Tensor::new(&[0.1f32, 0.9], &CPU).unwrap(),
        )
        .unwrap();
    assert!(vals(&y).iter().all(|&v| v == 0.0));
}

#[test]
fn every_parameter_gets_a_gradient() {
    let (vm, net) = build(tiny(2, 3, vec![1, 2]), 5);
    let mut rng = Rng::new(6);
    let x = randn(&mut rng, &[3, 2, 8, 8]);
    let t = Tensor::new(&[0.1f32, 0.5, 0.9], &CPU).unwrap();
    let r = randn(&mut rng, &[3, 3, 8, 8]);
    let loss = (net.forward(&x, &t).unwrap() * &r)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let params = named_vars(&vm).unwrap();
    assert!(params.len() > 40, "only {} parameters", params.len());
    for (name, v) in &params {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let norm = vals(&g.sqr().unwrap().sum_all().unwrap())[0];
        assert!(norm > 0.0 && norm.is_finite(), "gradient of {name}: {norm}");
    }
}

#[test]
fn time_conditioning_changes_the_output() {
    let (_vm, net) = build(tiny(1, 1, vec![1, 2]), 11);
    let mut rng = Rng::new(12);
    let x = randn(&mut rng, &[1, 1, 8, 8]).repeat((2, 1, 1, 1)).unwrap();
    let y = net
        .forward(&x, &Tensor::new(&[0.2f32, 0.7], &CPU).unwrap())
        .unwrap();
    let d = vals(
        &(y.get(0).unwrap() - y.get(1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap(),
    )[0];
    let scale = vals(&y.abs().unwrap().mean_all().unwrap())[0];
    assert!(
        d > 1e-3 * scale && d > 0.0,
        "time changes the output by {d} (scale {scale})"
    );
    // equal times give equal outputs (the batch rows do not interact)
    let y2 = net
        .forward(&x, &Tensor::new(&[0.2f32, 0.2], &CPU).unwrap())
        .unwrap();
    let d2 = vals(
        &(y2.get(0).unwrap() - y2.get(1).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap(),
    )[0];
    assert!(d2 < 1e-6, "{d2}");
}

#[test]
fn seeded_determinism() {
    let mut rng = Rng::new(13);
    let x = randn(&mut rng, &[2, 1, 8, 8]);
    let t = Tensor::new(&[0.3f32, 0.6], &CPU).unwrap();
    let mut cfg = tiny(1, 1, vec![1, 2]);
    cfg.dropout = 0.1;
    let (_a, na) = build(cfg.clone(), 21);
    let (_b, nb) = build(cfg.clone(), 21);
    let (_c, nc) = build(cfg, 22);
    let ya = vals(&na.forward_train(&x, &t, &mut Rng::new(5)).unwrap());
    let yb = vals(&nb.forward_train(&x, &t, &mut Rng::new(5)).unwrap());
    let yc = vals(&nc.forward_train(&x, &t, &mut Rng::new(5)).unwrap());
    let yd = vals(&na.forward_train(&x, &t, &mut Rng::new(6)).unwrap());
    assert_eq!(ya, yb);
    assert_ne!(ya, yc);
    assert_ne!(ya, yd, "dropout masks come from the rng");
    // without dropout the pass is deterministic and differs from a dropout pass
    let e1 = vals(&na.forward(&x, &t).unwrap());
    assert_eq!(e1, vals(&na.forward(&x, &t).unwrap()));
    assert_ne!(e1, ya);
}

/// A few AdamW steps on noise prediction must lower the loss (the network can learn).
#[test]
fn short_training_lowers_the_loss() {
    let cfg = UNetConfig {
        base_channels: 16,
        groups: 4,
        ..UNetConfig::digits()
    };
    let (vm, net) = build(cfg, 30);
    let params = named_vars(&vm).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default());
    let mut rng = Rng::new(31);
    // fixed smooth "images" and noise: the net must learn eps from x_t = 0.6 x0 + 0.8 eps
    let x0 = randn(&mut rng, &[16, 1, 4, 4]);
    let x0 = upsample_nearest2(&x0).unwrap();
    let eps = randn(&mut rng, &[16, 1, 8, 8]);
    let xt = ((&x0 * 0.6).unwrap() + (&eps * 0.8).unwrap()).unwrap();
    let t = Tensor::full(0.5f32, 16, &CPU).unwrap();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let loss = (net.forward(&xt, &t).unwrap() - &eps)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        let g = loss.backward().unwrap();
        opt.step(&params, &g, 2e-3).unwrap();
    }
    assert!((losses[0] - 1.0).abs() < 0.2, "{}", losses[0]);
    assert!(losses[29] < 0.6 * losses[0], "{losses:?}");
}
