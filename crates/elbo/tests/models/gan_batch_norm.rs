//! Batch normalisation in the DCGAN generator: the per-channel statistics against a two-pass
//! sum, the normalised output's zero mean and unit variance, standing statistics making a
//! sample independent of the batch it is drawn in, and every parameter (the norms' scales and
//! shifts included) receiving a gradient.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use elbo::config::Config;
use elbo::data::{self, DataConfig};
use elbo::model::DataInfo;
use elbo::nn::batch_norm::{batch_stats, BatchNorm, StatsMode};
use elbo::nn::dcgan::{GenNorm, Generator, Shape};
use elbo::nn::ParamInit;
use elbo::train::optim::named_vars;
use elbo::Rng;

const CPU: Device = Device::Cpu;

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn channel_statistics_match_a_two_pass_sum_and_normalise_to_zero_mean_unit_variance() {
    let (b, c, h, w) = (5, 3, 4, 2);
    let x =
        ((Rng::new(3).normal_tensor(&[b, c, h, w], &CPU).unwrap() * 2.0).unwrap() + 0.7).unwrap();
    let xs = vals(&x);
    let s = batch_stats(&x).unwrap();
    assert_eq!(s.mean.dims(), &[1, c, 1, 1]);
    let (mean, var) = (vals(&s.mean), vals(&s.var));
    let at = |i: usize, k: usize, j: usize| xs[((i * c + k) * h) * w + j];
    for k in 0..c {
        let all: Vec<f64> = (0..b)
            .flat_map(|i| (0..h * w).map(move |j| (i, j)))
            .map(|(i, j)| at(i, k, j))
            .collect();
        let m = all.iter().sum::<f64>() / all.len() as f64;
        let v = all.iter().map(|x| (x - m).powi(2)).sum::<f64>() / all.len() as f64;
        assert!((mean[k] - m).abs() < 1e-5, "mean {k}: {} vs {m}", mean[k]);
        assert!((var[k] - v).abs() < 1e-4, "var {k}: {} vs {v}", var[k]);
    }
    let varmap = VarMap::new();
    let mut rng = Rng::new(0);
    let bn = BatchNorm::new(&mut ParamInit::new(&varmap, &mut rng, &CPU), c, 0).unwrap();
    let y = bn
        .forward(&x, &mut StatsMode::Batch(&mut Vec::new()))
        .unwrap();
    let t = batch_stats(&y).unwrap();
    for (m, v) in vals(&t.mean).into_iter().zip(vals(&t.var)) {
        assert!(
            m.abs() < 1e-5 && (v - 1.0).abs() < 1e-3,
            "mean {m}, var {v}"
        );
    }
}

#[test]
fn standing_statistics_make_a_sample_independent_of_its_batch() {
    let varmap = VarMap::new();
    let mut rng = Rng::new(0);
    let shape = Shape::Conv {
        channels: 1,
        height: 8,
        width: 8,
        base: 4,
    };
    let mut p = ParamInit::new(&varmap, &mut rng, &CPU);
    let gen = Generator::with_norm(&mut p, shape, 6, true, GenNorm::Batch).unwrap();
    assert!(gen.batch_norm());
    let z_ref = Rng::new(1).normal_tensor(&[64, 6], &CPU).unwrap();
    let stats = gen.standing_stats(&z_ref).unwrap();
    assert_eq!(stats.len(), 3);
    // the reference batch through its own statistics is the training-mode output
    let train = gen.forward(&z_ref).unwrap();
    let fixed = gen
        .forward_with(&z_ref, &mut StatsMode::Fixed(&stats))
        .unwrap();
    let d = (train - &fixed).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    // one latent alone gives the row it gives inside the batch; batch statistics would not
    let one = z_ref.narrow(0, 5, 1).unwrap();
    let alone = gen
        .forward_with(&one, &mut StatsMode::Fixed(&stats))
        .unwrap();
    let row = fixed.narrow(0, 5, 1).unwrap();
    let d = (&alone - &row).unwrap().abs().unwrap().max_all().unwrap();
    assert!(d.to_scalar::<f32>().unwrap() < 1e-5);
    let pair = z_ref.narrow(0, 5, 2).unwrap();
    let batch_mode = gen.forward(&pair).unwrap().narrow(0, 0, 1).unwrap();
    let d = (&batch_mode - &row)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(
        d.to_scalar::<f32>().unwrap() > 1e-3,
        "batch statistics of two agreed"
    );
}

#[test]
fn every_parameter_of_a_batch_normalised_gan_gets_a_gradient() {
    for (dataset, obj) in [("digits", "non-saturating"), ("8gaussians", "wgan-gp")] {
        let mut cfg = Config::default();
        for kv in [
            "model.name=gan".to_string(),
            format!("model.objective=\"{obj}\""),
            format!("data.name={dataset}"),
            "model.gen_norm=\"batch\"".into(),
            "model.hidden=16".into(),
            "model.depth=2".into(),
            "model.latent=4".into(),
            "model.channels=4".into(),
            "model.critic_channels=2".into(),
        ] {
            cfg.set(&kv).unwrap_or_else(|e| panic!("{kv}: {e}"));
        }
        let mut src = data::open(dataset, &DataConfig::default()).unwrap();
        let info = DataInfo::of(src.as_ref());
        let model = cfg.model.build(&info, &CPU, &mut Rng::new(0)).unwrap();
        let batch = src.train_batch(8, &mut Rng::new(1), &CPU).unwrap();
        let loss = model.loss(&batch, &mut Rng::new(2)).unwrap();
        let grads = loss.backward().unwrap();
        let params = named_vars(model.varmap()).unwrap();
        let norms = params.iter().filter(|(n, _)| n.contains(".bn")).count();
        assert_eq!(norms, if dataset == "digits" { 6 } else { 4 }, "{dataset}");
        for (name, var) in &params {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{dataset}: no gradient for {name}"));
            let n: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(n > 0.0 && n.is_finite(), "{dataset} {name}: {n}");
        }
        let x = model
            .sample(5, &Default::default(), &mut Rng::new(4))
            .unwrap();
        assert_eq!(x.dims(), &[5, info.dim]);
    }
}
