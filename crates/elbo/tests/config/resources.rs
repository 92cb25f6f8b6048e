//! The memory estimate made before a model is built: its parameter count is the built model's
//! exact count for every family and backbone, absurd sizes are refused with the estimate in the
//! message (and no run directory written), the shipped configurations fit, and chunked sampling
//! draws what one call would.

use candle_core::{Device, Tensor};
use elbo::config::{Config, SampleOptions, SolverName};
use elbo::data::{DataKind, Layout};
use elbo::model::{sample_chunked, DataInfo, GenerativeModel};
use elbo::models::{ModelConfig, FAMILIES};
use elbo::resources::{
    available_memory, check_resources_with, check_sampling_with, parse_meminfo, RunEstimate,
    PARAM_COPIES,
};
use elbo::train::Trainer;
use elbo::Rng;

const GIB: u64 = 1 << 30;

fn count(model: &dyn GenerativeModel) -> u64 {
    model
        .varmap()
        .all_vars()
        .iter()
        .map(|v| v.elem_count() as u64)
        .sum()
}

fn points() -> DataInfo {
    DataInfo::flat(2, DataKind::Continuous)
}

fn image(side: usize) -> DataInfo {
    DataInfo {
        dim: side * side,
        kind: DataKind::Discrete { levels: 4 },
        layout: Layout::Image {
            channels: 1,
            height: side,
            width: side,
        },
    }
}

fn tokens(len: usize, levels: usize) -> DataInfo {
    DataInfo {
        dim: len,
        kind: DataKind::Discrete { levels },
        layout: Layout::Sequence { len },
    }
}

/// The family `name` with `sets` applied.
fn family(name: &str, sets: &[&str]) -> Config {
    let mut c = Config::default();
    c.set(&format!("model.name={name}")).unwrap();
    c.set_all(sets).unwrap();
    c
}

#[test]
fn tiny_mlp_estimate_is_its_exact_parameter_count() {
    let c = family(
        "flow-matching",
        &["model.net.hidden=8", "model.net.layers=2"],
    );
    let est = c.model.memory_estimate(&points(), 16);
    // (2 + 32 + 1) x 8 + (8 + 1) x 8 + (8 + 1) x 2
    assert_eq!(est.params, 35 * 8 + 9 * 8 + 9 * 2);
    let model = c
        .model
        .build(&points(), &Device::Cpu, &mut Rng::new(0))
        .unwrap();
    assert_eq!(est.params, count(model.as_ref()));
    assert_eq!(est.param_bytes(), est.params * 4 * PARAM_COPIES);
}

#[test]
fn every_family_and_backbone_counts_its_parameters_exactly() {
    for f in FAMILIES {
        let (data, sets): (DataInfo, Vec<&str>) = match f.name {
            "ar" | "ao-ar" | "mdlm" | "d3pm" | "bd3lm" | "sedd" => (
                tokens(12, 7),
                vec![
                    "model.transformer.d_model=16",
                    "model.transformer.n_heads=2",
                ],
            ),
            "gaussian" => (points(), vec![]),
            "normalizing-flow" => (points(), vec!["model.hidden=16", "model.layers=3"]),
            "vae" => (image(4), vec!["model.hidden=16", "model.latent=3"]),
            "vq-vae" => (image(8), vec!["model.channels=8", "model.codebook_size=8"]),
            "gan" => (points(), vec!["model.hidden=16", "model.latent=3"]),
            "ebm" => (points(), vec!["model.hidden=16", "model.layers=2"]),
            "nce" => (points(), vec!["model.hidden=16", "model.layers=2"]),
            _ => (points(), vec!["model.net.hidden=16"]),
        };
        let mut c = family(f.name, &sets);
        let model = c
            .model
            .build(&data, &Device::Cpu, &mut Rng::new(1))
            .unwrap();
        let est = c.model.memory_estimate(&data, 8);
        assert_eq!(est.params, count(model.as_ref()), "{}", f.name);
        assert!(est.activations > 0, "{}", f.name);
        for variant in ["nice", "glow", "realnvp"]
            .into_iter()
            .filter(|_| f.name == "normalizing-flow")
        {
            c.set(&format!("model.variant=\"{variant}\"")).unwrap();
            let model = c
                .model
                .build(&data, &Device::Cpu, &mut Rng::new(1))
                .unwrap();
            let est = c.model.memory_estimate(&data, 8);
            assert_eq!(
                est.params,
                count(model.as_ref()),
                "normalizing flow, {variant}"
            );
            // the multi-scale convolutional flow on 8x8 images, with either split prior
            for prior in ["learned", "standard"] {
                c.set(&format!("model.prior=\"{prior}\"")).unwrap();
                let model = c
                    .model
                    .build(&image(8), &Device::Cpu, &mut Rng::new(1))
                    .unwrap();
                let est = c.model.memory_estimate(&image(8), 8);
                assert_eq!(
                    est.params,
                    count(model.as_ref()),
                    "normalizing flow on images, {variant}, {prior} prior"
                );
            }
        }
        if f.name == "vae" {
            // the Gaussian decoder's log-scale on continuous data
            c.set("model.observation=\"gaussian\"").unwrap();
            let model = c
                .model
                .build(&points(), &Device::Cpu, &mut Rng::new(1))
                .unwrap();
            let est = c.model.memory_estimate(&points(), 8);
            assert_eq!(est.params, count(model.as_ref()), "vae, Gaussian decoder");
        }
        if f.name == "ar" {
            c.set("model.transformer.positions=learned").unwrap();
            let model = c
                .model
                .build(&data, &Device::Cpu, &mut Rng::new(1))
                .unwrap();
            let est = c.model.memory_estimate(&data, 8);
            assert_eq!(est.params, count(model.as_ref()), "ar, learned positions");
        }
    }
    // the U-Net backbones: 8x8 (digits' levels), 16x16 (MNIST's), and the levels
    // parameterization with one output channel per level
    for (name, side, sets) in [
        ("flow-matching", 16, vec!["model.net.backbone=unet"]),
        (
            "ddpm",
            8,
            vec!["model.net.backbone=unet", "model.parameterization=levels"],
        ),
        ("edm", 16, vec![]),
    ] {
        let c = family(name, &sets);
        let model = c
            .model
            .build(&image(side), &Device::Cpu, &mut Rng::new(2))
            .unwrap();
        let est = c.model.memory_estimate(&image(side), 4);
        assert_eq!(
            est.params,
            count(model.as_ref()),
            "{name} U-Net on {side}x{side}"
        );
    }
}

#[test]
fn activations_grow_with_the_batch_and_the_evaluation_with_its_probes() {
    let c = family("flow-matching", &[]);
    let a = c.model.memory_estimate(&points(), 100);
    let b = c.model.memory_estimate(&points(), 200);
    assert_eq!(a.params, b.params);
    assert!(b.activations >= 2 * a.activations - 1, "{a:?} {b:?}");
    let mut e = c.eval.clone();
    e.divergence = elbo::config::DivergenceChoice::Hutchinson;
    let one = c.model.eval_memory(&points(), &e);
    e.probes = 64;
    assert!(c.model.eval_memory(&points(), &e) > 10 * one);
}

/// `set` on `name` (on `data`) is refused against `avail` bytes, naming the estimate.
fn refused(name: &str, data: &DataInfo, sets: &[&str], avail: u64, hint: &str) {
    let c = family(name, sets);
    let e = check_resources_with(&c, data, Some(avail))
        .expect_err(&format!("{name} {sets:?} was accepted"))
        .to_string();
    for needle in [
        "estimated",
        "available",
        "parameters",
        "per training batch",
        hint,
    ] {
        assert!(e.contains(needle), "{name} {sets:?}: no '{needle}' in: {e}");
    }
}

#[test]
fn absurd_sizes_are_refused_with_the_estimate() {
    let big = 1 << 50; // 1 PiB: more than any machine has
    refused(
        "flow-matching",
        &points(),
        &["model.net.hidden=10000000"],
        big,
        "model.net.hidden",
    );
    refused(
        "flow-matching",
        &points(),
        &["train.batch_size=1000000000"],
        16 * GIB,
        "train.batch_size",
    );
    refused(
        "ar",
        &tokens(128, 256),
        &["model.transformer.d_model=10000000"],
        big,
        "d_model",
    );
    refused("mdlm", &tokens(1_000_000, 256), &[], big, "data.seq_len");
    refused(
        "ddpm",
        &points(),
        &["model.timesteps=1000000000"],
        16 * GIB,
        "model.timesteps",
    );
    refused(
        "flow-matching",
        &points(),
        &["eval.probes=1000000000", "eval.divergence=hutchinson"],
        big,
        "eval.probes",
    );
    refused(
        "flow-matching",
        &points(),
        &["eval.batch_size=100000000000"],
        big,
        "eval.batch_size",
    );
    refused(
        "mdlm",
        &tokens(16, 8),
        &["eval.lm_samples=10000000000000"],
        big,
        "eval.lm_samples",
    );
    let metric = [
        "train.select_by=\"mmd\"",
        "train.eval_examples=100000000000",
    ];
    refused(
        "flow-matching",
        &points(),
        &metric,
        big,
        "train.eval_examples",
    );
    refused(
        "flow-matching",
        &points(),
        &["sample.steps=1000000000000000"],
        big,
        "sample.steps",
    );
    // the defaults fit in 1 GiB on the toys, and an unknown amount is not checked
    let c = Config::default();
    check_resources_with(&c, &points(), Some(GIB)).unwrap();
    check_resources_with(
        &family("ddpm", &["model.timesteps=1000000000"]),
        &points(),
        None,
    )
    .unwrap();
}

#[test]
fn shipped_configurations_fit_in_8_gib() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut seen = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue; // configs/suites/ holds suites, not run configs
        }
        let cfg = Config::from_toml_file(&path).unwrap();
        let data = if cfg.data.name == "digits" && matches!(cfg.model, ModelConfig::Ddpm(_)) {
            image(8)
        } else if cfg.data.name == "digits" {
            tokens(64, 17)
        } else {
            tokens(cfg.data.seq_len, 256)
        };
        let est = RunEstimate::of(&cfg, &data);
        assert!(est.total() < 8 * GIB, "{}: {est:?}", path.display());
        seen += 1;
    }
    assert!(seen >= 6, "{seen} configs");
    // MNIST on the default U-Net of flow matching, default batches (the held-out batch of
    // 2500 images, one graph each, is the largest part)
    let est = RunEstimate::of(&Config::default(), &image(28));
    assert!(est.total() < 24 * GIB, "MNIST: {est:?}");
    assert_eq!(est.peak_activations(), est.eval);
}

#[test]
fn trainer_create_refuses_an_absurd_network_before_writing_anything() {
    if available_memory().is_none() {
        return; // no /proc/meminfo: the check is skipped by design
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("run");
    let mut c = family("flow-matching", &["model.net.hidden=10000000"]);
    c.data.name = "moons".into();
    let e = match Trainer::create(c, &dir, &Device::Cpu) {
        Ok(_) => panic!("a 10^7-wide MLP was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("estimated") && e.contains("available"), "{e}");
    assert!(!dir.exists());
}

#[test]
fn meminfo_and_sampling_checks() {
    let text = "MemTotal:  32000000 kB\nMemFree: 100 kB\nMemAvailable:   2048 kB\n";
    assert_eq!(parse_meminfo(text), Some(2048 * 1024));
    assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    let c = Config::default();
    check_sampling_with(&c, &points(), 100_000, Some(GIB)).unwrap();
    // the output alone is too big: lower -n
    let e = check_sampling_with(&c, &image(28), 1 << 40, Some(GIB))
        .unwrap_err()
        .to_string();
    assert!(e.contains("-n") && e.contains("available"), "{e}");
    // one sampling batch is too big: lower sample.batch_size
    let wide = family(
        "flow-matching",
        &[
            "model.net.hidden=100000",
            "model.net.layers=1",
            "sample.batch_size=100000",
        ],
    );
    let e = check_sampling_with(&wide, &points(), 100_000, Some(GIB))
        .unwrap_err()
        .to_string();
    assert!(e.contains("sample.batch_size"), "{e}");
    // the batch is at most n: a few samples of the same run fit
    check_sampling_with(&wide, &points(), 4, Some(GIB)).unwrap();
}

fn tiny_flow() -> Box<dyn GenerativeModel> {
    family(
        "flow-matching",
        &["model.net.hidden=8", "model.net.layers=1"],
    )
    .model
    .build(&points(), &Device::Cpu, &mut Rng::new(3))
    .unwrap()
}

fn euler() -> SampleOptions {
    SampleOptions {
        solver: SolverName::Euler,
        steps: 3,
        ..SampleOptions::default()
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn chunked_sampling_equals_one_call_up_to_a_chunk_and_concatenates_beyond() {
    let m = tiny_flow();
    let o = euler();
    for n in [1, 7, 8] {
        let one = m.sample(n, &o, &mut Rng::new(9)).unwrap();
        let chunked = sample_chunked(m.as_ref(), n, &o, &mut Rng::new(9), 8, false).unwrap();
        assert_eq!(chunked.dims(), &[n, 2]);
        assert_eq!(values(&one), values(&chunked), "n = {n}");
    }
    // beyond one chunk: the chunks in order from the same generator
    let chunked = sample_chunked(m.as_ref(), 10, &o, &mut Rng::new(4), 4, false).unwrap();
    assert_eq!(chunked.dims(), &[10, 2]);
    let mut rng = Rng::new(4);
    let mut want = Vec::new();
    for k in [4, 4, 2] {
        want.extend(values(&m.sample(k, &o, &mut rng).unwrap()));
    }
    assert_eq!(values(&chunked), want);
    assert!(sample_chunked(m.as_ref(), 0, &o, &mut Rng::new(4), 4, false).is_err());
}
