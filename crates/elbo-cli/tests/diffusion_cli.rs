//! The diffusion families through the `elbo` binary: train DDPM on digits for a few steps,
//! sample under five samplers (PNG grids), evaluate the VLB and the PF-ODE estimate in one
//! report; the flow family under an SDE sampler; clear errors for bad sampler names.

mod common;
use common::{elbo, stderr};

const TINY_DDPM: &str = r#"
[model]
name = "ddpm"
timesteps = 40
[model.net]
hidden = 32
layers = 2
[data]
name = "digits"
[train]
steps = 5
batch_size = 32
eval_every = 0
eval_examples = 10
[eval]
solver = "heun"
steps = 5
"#;

#[test]
fn ddpm_train_sample_five_samplers_eval_vlb_and_pf_ode() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tiny.toml"), TINY_DDPM).unwrap();
    let o = elbo(
        &[
            "train",
            "--config",
            "tiny.toml",
            "--out",
            "run",
            "--quiet",
            "--sampler",
            "ddim",
            "--eta",
            "0.3",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = std::fs::read_to_string(d.path().join("run/config.json")).unwrap();
    assert!(
        cfg.contains("\"sampler\": \"ddim\"") && cfg.contains("\"eta\": 0.3"),
        "{cfg}"
    );
    for s in ["ddpm", "ddim", "heun", "dpm++2m", "pc"] {
        let out = format!("run/s_{s}.npy");
        let o = elbo(
            &[
                "sample",
                "--run",
                "run",
                "-n",
                "16",
                "--sampler",
                s,
                "--sample-steps",
                "5",
                "--churn",
                "0.5",
                "--out",
                &out,
            ],
            d.path(),
        );
        assert!(o.status.success(), "{s}: {}", stderr(&o));
        assert!(d.path().join(&out).exists());
        assert!(
            d.path().join(format!("run/s_{s}.png")).exists(),
            "{s}: no PNG grid"
        );
    }
    let o = elbo(
        &[
            "eval",
            "--run",
            "run",
            "--examples",
            "8",
            "--likelihood",
            "vlb,pf-ode",
            "--divergence",
            "hutchinson",
            "--probes",
            "2",
        ],
        d.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("bound") && out.contains("estimate"), "{out}");
    let report = std::fs::read_to_string(d.path().join("run/report.json")).unwrap();
    assert!(
        report.contains("DDPM VLB") && report.contains("probability-flow"),
        "{report}"
    );
    let o = elbo(&["sample", "--run", "run", "--sampler", "nope"], d.path());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("nope") && stderr(&o).contains("dpm++2m"),
        "{}",
        stderr(&o)
    );
}

const TINY_MOONS: &str = r#"
[model.net]
hidden = 32
layers = 2
[data]
name = "moons"
test_size = 50
[train]
steps = 3
batch_size = 32
eval_every = 0
eval_examples = 50
[eval]
solver = "heun"
steps = 10
"#;

#[test]
fn sde_edm_and_flow_under_diffusion_samplers() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("moons.toml"), TINY_MOONS).unwrap();
    for (model, sampler) in [
        ("sde", "pc"),
        ("edm", "edm"),
        ("flow", "em"),
        ("ddpm", "ddim"),
    ] {
        let out = format!("run-{model}");
        let o = elbo(
            &[
                "train",
                "-c",
                "moons.toml",
                "--model",
                model,
                "--out",
                &out,
                "--quiet",
            ],
            d.path(),
        );
        assert!(o.status.success(), "{model}: {}", stderr(&o));
        let o = elbo(
            &[
                "sample",
                "--run",
                &out,
                "-n",
                "20",
                "--sampler",
                sampler,
                "--sample-steps",
                "4",
            ],
            d.path(),
        );
        assert!(o.status.success(), "{model}/{sampler}: {}", stderr(&o));
        assert!(d.path().join(&out).join("samples.png").exists());
    }
    // DDIM is a sampler, not a family: the error says so
    let o = elbo(&["train", "-c", "moons.toml", "--model", "ddim"], d.path());
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--sampler ddim"), "{}", stderr(&o));
    // the network settings of the config file carry over to the family chosen by --model
    let cfg = std::fs::read_to_string(d.path().join("run-sde/config.json")).unwrap();
    assert!(cfg.contains("\"hidden\": 32"), "{cfg}");
}
