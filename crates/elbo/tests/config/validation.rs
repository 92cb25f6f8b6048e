//! Every setting is checked before any work starts: a bad value of `[train]`, `[sample]`,
//! `[eval]` or the family's table is refused by `Config::validate` (so by `from_toml_str`,
//! `--set` and `Trainer::create`) with the key in the message, and `Trainer::create` leaves no
//! run directory behind.

use candle_core::Device;
use elbo::config::{Config, DivergenceChoice, SolverName};
use elbo::train::Trainer;

/// A tiny valid config on the 2-D moons.
fn tiny() -> Config {
    Config::from_toml_str(
        "[model.net]\nhidden = 8\nlayers = 1\n[data]\nname = \"moons\"\ntest_size = 50\n\
         [train]\nsteps = 2\nbatch_size = 16\neval_every = 0\neval_examples = 20\n",
        "tiny",
    )
    .unwrap()
}

/// `toml` (a fragment added to the tiny config's tables) is refused with `key` in the message.
fn refused(toml: &str, key: &str) {
    let base = "[model.net]\nhidden = 8\nlayers = 1\n";
    let text = format!("{base}{toml}\n");
    let e = Config::from_toml_str(&text, "cfg.toml")
        .expect_err(&format!("accepted {toml:?}"))
        .to_string();
    assert!(
        e.contains(key),
        "the error for {toml:?} does not name {key}: {e}"
    );
}

#[test]
fn evaluation_and_sampling_options_are_checked_at_load_time() {
    refused("[eval]\ndivergence = \"exactt\"", "exactt");
    refused("[eval]\nsolver = \"rk4\"", "rk4");
    refused("[sample]\nsolver = \"rk45\"", "rk45");
    refused("[eval]\nlikelihood = \"vlb\"", "eval.likelihood");
    refused("[eval]\nprobes = 0", "eval.probes");
    refused("[eval]\nsteps = 0", "eval.steps");
    refused("[eval]\nbatch_size = 0", "eval.batch_size");
    refused("[eval]\nlm_samples = 0", "eval.lm_samples");
    refused("[eval]\nmetric_samples = 0", "eval.metric_samples");
    refused("[eval]\nrtol = nan", "eval.rtol");
    refused("[eval]\natol = -1.0", "eval.atol");
    refused("[eval]\nrtol = 0.0\natol = 0.0", "eval.rtol");
    refused("[sample]\nsteps = 0", "sample.steps");
    refused("[sample]\nbatch_size = 0", "sample.batch_size");
    refused("[sample]\natol = inf", "sample.atol");
    refused("[data]\nseq_len = 0", "data.seq_len");
}

#[test]
fn every_float_of_train_is_finite_and_in_range() {
    for (key, bad) in [
        ("weight_decay", "nan"),
        ("weight_decay", "-0.1"),
        ("lr", "nan"),
        ("lr", "0.0"),
        ("beta1", "nan"),
        ("beta2", "1.0"),
        ("grad_clip", "inf"),
        ("ema_decay", "nan"),
        ("min_lr_ratio", "1.5"),
    ] {
        refused(&format!("[train]\n{key} = {bad}"), &format!("train.{key}"));
    }
    refused("[train]\neval_examples = 0", "train.eval_examples");
    // a NaN weight decay is named, not blamed on the learning rate
    let e = Config::from_toml_str("[train]\nweight_decay = nan\n", "x")
        .unwrap_err()
        .to_string();
    assert!(!e.contains("train.lr"), "{e}");
    // warm-up longer than the run is allowed
    Config::from_toml_str("[train]\nsteps = 10\nwarmup_steps = 100\n", "x").unwrap();
}

#[test]
fn family_floats_are_finite() {
    for (family, key) in [
        ("edm", "p_mean"),
        ("edm", "sigma_max"),
        ("sde", "beta_max"),
        ("sde", "ve_sigma_max"),
        ("ddpm", "ode_t_min"),
        ("gaussian", "jitter"),
    ] {
        for v in ["nan", "inf"] {
            let text = format!("[model]\nname = \"{family}\"\n{key} = {v}\n");
            let e = Config::from_toml_str(&text, "x")
                .expect_err(&format!("{family}: {key} = {v} accepted"))
                .to_string();
            assert!(e.contains(key), "{family} {key} = {v}: {e}");
        }
    }
}

#[test]
fn likelihoods_are_checked_against_the_family() {
    let ok = Config::from_toml_str(
        "[model]\nname = \"ddpm\"\n[eval]\nlikelihood = \"vlb\"\n",
        "x",
    )
    .unwrap();
    assert_eq!(ok.eval.likelihood, "vlb");
    let e = Config::from_toml_str(
        "[model]\nname = \"ar\"\n[eval]\nlikelihood = \"vlb\"\n",
        "x",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("eval.likelihood") && e.contains("exact"), "{e}");
    // --set validates after every override
    let mut c = tiny();
    let e = c.set("eval.likelihood=nelbo").unwrap_err().to_string();
    assert!(e.contains("eval.likelihood"), "{e}");
    let e = c.set("eval.divergence=exactt").unwrap_err().to_string();
    assert!(e.contains("exactt") && e.contains("hutchinson"), "{e}");
    c.set("eval.divergence=Hutchinson").unwrap();
    assert_eq!(c.eval.divergence, DivergenceChoice::Hutchinson);
}

#[test]
fn typed_choices_serialise_as_the_same_strings() {
    let mut c = tiny();
    c.set("sample.solver=heun").unwrap();
    assert_eq!(c.sample.solver, SolverName::Heun);
    let j = serde_json::to_value(&c).unwrap();
    assert_eq!(j["sample"]["solver"], "heun");
    assert_eq!(j["eval"]["solver"], "dopri5");
    assert_eq!(j["eval"]["divergence"], "auto");
    let back = Config::from_json_str(&j.to_string(), "config.json").unwrap();
    assert_eq!(back, c);
    // a config.json written before `sample.batch_size` existed still loads
    let mut old = j.clone();
    old["sample"].as_object_mut().unwrap().remove("batch_size");
    let back = Config::from_json_str(&old.to_string(), "config.json").unwrap();
    assert_eq!(back.sample.batch_size, Config::default().sample.batch_size);
}

#[test]
fn trainer_create_refuses_bad_settings_before_writing_anything() {
    let d = tempfile::tempdir().unwrap();
    let bad_sets = [
        "eval.probes=0",
        "eval.likelihood=\"llada\"",
        "train.eval_examples=0",
        "model.net.time_scale=0.0",
    ];
    for (i, set) in bad_sets.iter().enumerate() {
        // bypass `--set`'s own validation: build the bad config as a file would
        let mut j = serde_json::to_value(tiny()).unwrap();
        let (key, value) = set.split_once('=').unwrap();
        let mut node = &mut j;
        let parts: Vec<&str> = key.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            node = &mut node[*p];
        }
        let v: serde_json::Value = serde_json::from_str(value).unwrap();
        node[parts[parts.len() - 1]] = v;
        let cfg: Config = serde_json::from_value(j).unwrap();
        let dir = d.path().join(format!("run{i}"));
        let e = match Trainer::create(cfg, &dir, &Device::Cpu) {
            Ok(_) => panic!("{set} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains(key), "{set}: {e}");
        assert!(!dir.exists(), "{set}: {} was created", dir.display());
    }
}
