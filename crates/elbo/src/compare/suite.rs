//! Suites: one TOML file naming the runs `elbo compare` trains and scores side by side.
//!
//! ```toml
//! [suite]
//! name = "digits"
//! data = "digits"          # shared data set: every entry without its own [data] name
//! quick_steps = 100        # train.steps of every entry under --quick
//! quick_examples = 100     # held-out examples scored under --quick
//!
//! [[entry]]
//! name = "ddpm"
//! config = "../digits-ddpm.toml"       # relative to this file, or an inline [entry.config]
//! likelihoods = ["vlb", "pf-ode"]      # default: the family's default likelihood
//! metrics = ["energy-distance"]        # sample metrics against the same held-out data
//! set = ["train.lr=1e-3"]              # --set overrides applied after the config
//! ```
//!
//! An entry's config has the layout of a run config (`[model]`, `[data]`, `[train]`,
//! `[sample]`, `[eval]`), so `[entry.config.model]`, `[entry.config.train]`, ... inline.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Config, EvalOptions};
use crate::{Error, Result};

/// The suites shipped in `configs/suites/`, embedded so `elbo compare --suite NAME` works from
/// any directory: (name, TOML text).
pub const BUILTIN: &[(&str, &str)] = &[
    (
        "toy2d",
        include_str!("../../../../configs/suites/toy2d.toml"),
    ),
    (
        "digits",
        include_str!("../../../../configs/suites/digits.toml"),
    ),
    (
        "shakespeare",
        include_str!("../../../../configs/suites/shakespeare.toml"),
    ),
    (
        "mnist",
        include_str!("../../../../configs/suites/mnist.toml"),
    ),
];

/// The config files the built-in suites name, embedded for the same reason (path relative to
/// `configs/suites/`, TOML text).
const BUILTIN_CONFIGS: &[(&str, &str)] = &[
    (
        "../8gaussians-gan.toml",
        include_str!("../../../../configs/8gaussians-gan.toml"),
    ),
    (
        "../8gaussians-wgan.toml",
        include_str!("../../../../configs/8gaussians-wgan.toml"),
    ),
    (
        "../8gaussians-wgan-gp.toml",
        include_str!("../../../../configs/8gaussians-wgan-gp.toml"),
    ),
    (
        "../25gaussians-gan.toml",
        include_str!("../../../../configs/25gaussians-gan.toml"),
    ),
    (
        "../25gaussians-wgan.toml",
        include_str!("../../../../configs/25gaussians-wgan.toml"),
    ),
    (
        "../25gaussians-wgan-gp.toml",
        include_str!("../../../../configs/25gaussians-wgan-gp.toml"),
    ),
    (
        "../digits-gan.toml",
        include_str!("../../../../configs/digits-gan.toml"),
    ),
    (
        "../digits-wgan-gp.toml",
        include_str!("../../../../configs/digits-wgan-gp.toml"),
    ),
    (
        "../digits-ar.toml",
        include_str!("../../../../configs/digits-ar.toml"),
    ),
    (
        "../digits-mdlm.toml",
        include_str!("../../../../configs/digits-mdlm.toml"),
    ),
    (
        "../digits-ddpm.toml",
        include_str!("../../../../configs/digits-ddpm.toml"),
    ),
    (
        "../shakespeare-ar.toml",
        include_str!("../../../../configs/shakespeare-ar.toml"),
    ),
    (
        "../shakespeare-ao-ar.toml",
        include_str!("../../../../configs/shakespeare-ao-ar.toml"),
    ),
    (
        "../shakespeare-mdlm.toml",
        include_str!("../../../../configs/shakespeare-mdlm.toml"),
    ),
    (
        "../shakespeare-bd3lm-4.toml",
        include_str!("../../../../configs/shakespeare-bd3lm-4.toml"),
    ),
    (
        "../shakespeare-bd3lm-16.toml",
        include_str!("../../../../configs/shakespeare-bd3lm-16.toml"),
    ),
    (
        "../shakespeare-sedd.toml",
        include_str!("../../../../configs/shakespeare-sedd.toml"),
    ),
    (
        "../digits-bd3lm-4.toml",
        include_str!("../../../../configs/digits-bd3lm-4.toml"),
    ),
    (
        "../digits-sedd.toml",
        include_str!("../../../../configs/digits-sedd.toml"),
    ),
    (
        "../shakespeare-d3pm-absorb.toml",
        include_str!("../../../../configs/shakespeare-d3pm-absorb.toml"),
    ),
    (
        "../shakespeare-d3pm-uniform.toml",
        include_str!("../../../../configs/shakespeare-d3pm-uniform.toml"),
    ),
    (
        "../digits-d3pm-absorb.toml",
        include_str!("../../../../configs/digits-d3pm-absorb.toml"),
    ),
    (
        "../digits-glow.toml",
        include_str!("../../../../configs/digits-glow.toml"),
    ),
    (
        "../digits-realnvp.toml",
        include_str!("../../../../configs/digits-realnvp.toml"),
    ),
    (
        "../digits-realnvp-vardeq.toml",
        include_str!("../../../../configs/digits-realnvp-vardeq.toml"),
    ),
    (
        "../8gaussians-ebm.toml",
        include_str!("../../../../configs/8gaussians-ebm.toml"),
    ),
    (
        "../checkerboard-ebm.toml",
        include_str!("../../../../configs/checkerboard-ebm.toml"),
    ),
    (
        "../8gaussians-nce.toml",
        include_str!("../../../../configs/8gaussians-nce.toml"),
    ),
    (
        "../checkerboard-nce.toml",
        include_str!("../../../../configs/checkerboard-nce.toml"),
    ),
    (
        "../8gaussians-glow.toml",
        include_str!("../../../../configs/8gaussians-glow.toml"),
    ),
    (
        "../8gaussians-realnvp.toml",
        include_str!("../../../../configs/8gaussians-realnvp.toml"),
    ),
    (
        "../checkerboard-glow.toml",
        include_str!("../../../../configs/checkerboard-glow.toml"),
    ),
    (
        "../checkerboard-realnvp.toml",
        include_str!("../../../../configs/checkerboard-realnvp.toml"),
    ),
    (
        "../digits-vae.toml",
        include_str!("../../../../configs/digits-vae.toml"),
    ),
    (
        "../mnist-binary-vae.toml",
        include_str!("../../../../configs/mnist-binary-vae.toml"),
    ),
    (
        "../mnist-vqvae.toml",
        include_str!("../../../../configs/mnist-vqvae.toml"),
    ),
    (
        "../mnist-vqvae-ar.toml",
        include_str!("../../../../configs/mnist-vqvae-ar.toml"),
    ),
    (
        "../mnist-realnvp.toml",
        include_str!("../../../../configs/mnist-realnvp.toml"),
    ),
    (
        "../mnist-glow.toml",
        include_str!("../../../../configs/mnist-glow.toml"),
    ),
    (
        "../mnist-gan.toml",
        include_str!("../../../../configs/mnist-gan.toml"),
    ),
    (
        "../mnist-wgan-gp.toml",
        include_str!("../../../../configs/mnist-wgan-gp.toml"),
    ),
    (
        "../digits-vqvae.toml",
        include_str!("../../../../configs/digits-vqvae.toml"),
    ),
    (
        "../digits-vqvae-ar.toml",
        include_str!("../../../../configs/digits-vqvae-ar.toml"),
    ),
    (
        "../digits-vqgan.toml",
        include_str!("../../../../configs/digits-vqgan.toml"),
    ),
];

/// The file as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SuiteFile {
    suite: SuiteHeader,
    #[serde(default)]
    entry: Vec<EntrySpec>,
}

/// `[suite]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SuiteHeader {
    /// The suite's name, shown in reports.
    pub name: String,
    /// A data set every entry uses unless its config names another.
    #[serde(default)]
    pub data: Option<String>,
    /// `train.steps` of every entry under `--quick` (at least 1).
    #[serde(default = "default_quick_steps")]
    pub quick_steps: usize,
    /// Held-out examples scored (and `train.eval_examples`) under `--quick` (at least 1).
    #[serde(default = "default_quick_examples")]
    pub quick_examples: usize,
}

fn default_quick_steps() -> usize {
    200
}

fn default_quick_examples() -> usize {
    200
}

/// Where an entry's run config comes from.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum ConfigSource {
    /// A TOML file, relative to the suite file.
    Path(String),
    /// An inline `[entry.config]` table.
    Inline(toml::Table),
}

/// `[[entry]]` as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EntrySpec {
    name: String,
    #[serde(default)]
    config: Option<ConfigSource>,
    #[serde(default)]
    likelihoods: Vec<String>,
    #[serde(default)]
    metrics: Vec<String>,
    #[serde(default)]
    set: Vec<String>,
}

/// One entry, resolved: its run config, or why it has none (reported as a failed entry, so
/// the other entries still run).
#[derive(Clone, Debug)]
pub struct Entry {
    /// The entry's name (its run directory is `OUT/runs/NAME`).
    pub name: String,
    /// The run config, or the error that prevented building it.
    pub config: std::result::Result<Config, String>,
    /// Likelihoods to report (`auto` when the suite named none).
    pub likelihoods: Vec<String>,
    /// Sample metrics to report.
    pub metrics: Vec<String>,
}

/// A parsed suite.
#[derive(Clone, Debug)]
pub struct Suite {
    /// `[suite]`.
    pub header: SuiteHeader,
    /// The entries, in file order.
    pub entries: Vec<Entry>,
    /// Where the suite came from (a path, or `builtin:NAME`).
    pub source: String,
}

impl Suite {
    /// A suite by file path, or by the name of a built-in suite (`toy2d`, `digits`,
    /// `shakespeare`, `mnist`): `configs/suites/NAME.toml` under the working directory when there is
    /// one (a checkout of the repository, edits included), else the copy built into elbo. A
    /// path that exists wins over a name.
    pub fn resolve(file_or_name: &str) -> Result<Self> {
        let mut path = PathBuf::from(file_or_name);
        let is_name = BUILTIN.iter().any(|(n, _)| *n == file_or_name);
        if !path.is_file() && is_name {
            path = Path::new("configs/suites").join(format!("{file_or_name}.toml"));
        }
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
            return Self::parse(&text, &path.display().to_string(), Some(&base));
        }
        if !is_name {
            let names: Vec<&str> = BUILTIN.iter().map(|(n, _)| *n).collect();
            return Err(Error::Config(format!(
                "no suite file '{file_or_name}' and no built-in suite of that name; give a path \
                 to a suite TOML or one of {}",
                names.join(", ")
            )));
        }
        let text = BUILTIN
            .iter()
            .find(|(n, _)| *n == file_or_name)
            .map_or("", |(_, t)| t);
        Self::parse(text, &format!("builtin:{file_or_name}"), None)
    }

    /// Parse a suite's TOML. `base` is the directory config paths are relative to (`None`:
    /// the built-in configs). Structural errors (unknown keys, duplicate or unusable names)
    /// fail the whole suite; an entry whose config is invalid is kept with its error.
    pub fn parse(text: &str, source: &str, base: Option<&Path>) -> Result<Self> {
        let file: SuiteFile = toml::from_str(text)
            .map_err(|e| Error::Config(format!("suite {source}: {}", e.to_string().trim())))?;
        let h = &file.suite;
        if h.quick_steps == 0 || h.quick_examples == 0 {
            return Err(Error::Config(format!(
                "suite {source}: quick_steps and quick_examples must be at least 1"
            )));
        }
        if file.entry.is_empty() {
            return Err(Error::Config(format!(
                "suite {source} has no [[entry]]; add at least one"
            )));
        }
        let mut seen = std::collections::HashSet::new();
        let mut entries = Vec::new();
        for spec in file.entry {
            check_entry_name(&spec.name, source)?;
            if !seen.insert(spec.name.clone()) {
                return Err(Error::Config(format!(
                    "suite {source}: two entries are named '{}'; names must be unique (each is \
                     a run directory)",
                    spec.name
                )));
            }
            let config = entry_config(&spec, h.data.as_deref(), base)
                .map_err(|e| format!("suite {source}, entry '{}': {e}", spec.name));
            let likelihoods = if spec.likelihoods.is_empty() {
                vec!["auto".to_string()]
            } else {
                spec.likelihoods.clone()
            };
            entries.push(Entry {
                name: spec.name,
                config,
                likelihoods,
                metrics: spec.metrics,
            });
        }
        Ok(Suite {
            header: file.suite,
            entries: order_by_codes(entries),
            source: source.to_string(),
        })
    }

    /// The entry whose run the entry `i` reads through `codes:ENTRY` (a prior over a VQ-VAE
    /// entry's codes), as an index into [`Suite::entries`].
    pub fn dependency(&self, i: usize) -> Option<usize> {
        let name = codes_entry(&self.entries[i])?;
        self.entries.iter().position(|e| e.name == name)
    }

    /// Point every `codes:ENTRY` data set naming an entry of this suite at that entry's run
    /// directory, `runs_dir/ENTRY` (made absolute, so the run reads the same codes from any
    /// working directory).
    pub fn bind_codes(&mut self, runs_dir: &Path) -> Result<()> {
        let names: Vec<String> = self.entries.iter().map(|e| e.name.clone()).collect();
        let abs = std::path::absolute(runs_dir).map_err(|e| Error::io(runs_dir, e))?;
        for e in &mut self.entries {
            let Some(dep) = codes_entry(e) else { continue };
            if !names.contains(&dep) {
                continue;
            }
            if let Ok(cfg) = &mut e.config {
                cfg.data.name =
                    format!("{}{}", crate::data::codes::PREFIX, abs.join(&dep).display());
            }
        }
        Ok(())
    }

    /// Scale every entry down for a smoke test: `train.steps` to at most `quick_steps`,
    /// warm-up, evaluation and checkpoint cadence clamped to it, `train.eval_examples` to at
    /// most `quick_examples`.
    pub fn make_quick(&mut self) {
        let (steps, examples) = (self.header.quick_steps, self.header.quick_examples);
        for e in &mut self.entries {
            if let Ok(cfg) = &mut e.config {
                quick_config(cfg, steps, examples);
            }
        }
    }
}

/// The `ENTRY` of an entry whose data set is `codes:ENTRY` (a bare name, not a path).
fn codes_entry(e: &Entry) -> Option<String> {
    let cfg = e.config.as_ref().ok()?;
    let dep = cfg.data.name.strip_prefix(crate::data::codes::PREFIX)?;
    check_entry_name(dep, "").ok()?;
    Some(dep.to_string())
}

/// The entries in file order, except that an entry reading `codes:ENTRY` comes after ENTRY
/// (it trains on that run's codes).
fn order_by_codes(entries: Vec<Entry>) -> Vec<Entry> {
    let mut left = entries;
    let mut out: Vec<Entry> = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let ready = left
            .iter()
            .position(|e| {
                codes_entry(e).is_none_or(|dep| {
                    out.iter().any(|o| o.name == dep) || !left.iter().any(|l| l.name == dep)
                })
            })
            // a cycle: keep file order, the dependent entry fails on its missing run
            .unwrap_or(0);
        out.push(left.remove(ready));
    }
    out
}

/// [`Suite::make_quick`] for one config.
pub fn quick_config(cfg: &mut Config, steps: usize, examples: usize) {
    let t = &mut cfg.train;
    t.steps = t.steps.min(steps);
    t.warmup_steps = t.warmup_steps.min(t.steps / 10);
    t.eval_every = t.eval_every.min(t.steps);
    t.checkpoint_every = t.checkpoint_every.min(t.steps);
    t.log_every = t.log_every.clamp(1, t.steps.max(1));
    t.eval_examples = t.eval_examples.min(examples);
}

/// An entry name is a directory name: letters, digits, `-`, `_`, `.`, not starting with `.`.
fn check_entry_name(name: &str, source: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "suite {source}: entry name '{name}' must be letters, digits, '-', '_' or '.' (it \
             names the entry's run directory)"
        )))
    }
}

/// The entry's run config: its file or inline table, the suite's data set where the entry
/// names none, then its `set` overrides; validated, with each likelihood checked against the
/// family.
fn entry_config(spec: &EntrySpec, data: Option<&str>, base: Option<&Path>) -> Result<Config> {
    let (mut table, source) = match &spec.config {
        None => (toml::Table::new(), "inline config".to_string()),
        Some(ConfigSource::Inline(t)) => (t.clone(), "inline [entry.config]".to_string()),
        Some(ConfigSource::Path(p)) => {
            let (text, shown) = read_config(p, base)?;
            let t: toml::Table = toml::from_str(&text)
                .map_err(|e| Error::Config(format!("{shown}: {}", e.to_string().trim())))?;
            (t, shown)
        }
    };
    if let Some(d) = data {
        let dt = table
            .entry("data")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(dt) = dt {
            dt.entry("name")
                .or_insert_with(|| toml::Value::String(d.to_string()));
        }
    }
    let text = toml::to_string(&table)
        .map_err(|e| Error::Config(format!("{source}: cannot re-serialise: {e}")))?;
    let mut cfg = Config::from_toml_str(&text, &source)?;
    cfg.set_all(&spec.set)?;
    cfg.validate()?;
    for l in &spec.likelihoods {
        let o = EvalOptions {
            likelihood: l.clone(),
            ..cfg.eval.clone()
        };
        o.validate_likelihood(cfg.model.name())?;
    }
    for m in &spec.metrics {
        crate::eval::sample_metric::metric_by_name(m)?;
    }
    Ok(cfg)
}

/// A config file's text and the name to show for it: relative to `base`, or (built-in suites)
/// the embedded copy.
fn read_config(p: &str, base: Option<&Path>) -> Result<(String, String)> {
    match base {
        Some(b) => {
            let path: PathBuf = b.join(p);
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            Ok((text, path.display().to_string()))
        }
        None => BUILTIN_CONFIGS
            .iter()
            .find(|(n, _)| *n == p)
            .map(|(n, t)| (t.to_string(), format!("configs/suites/{n}")))
            .ok_or_else(|| {
                Error::Config(format!(
                    "the built-in suites embed no config '{p}' (a built-in suite names only \
                     configs shipped in configs/)"
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_suites_parse_and_every_entry_is_valid() {
        for (name, _) in BUILTIN {
            let s = Suite::resolve(name).unwrap();
            assert_eq!(&s.header.name, name);
            assert!(!s.entries.is_empty());
            for e in &s.entries {
                assert!(e.config.is_ok(), "{name}/{}: {:?}", e.name, e.config);
            }
        }
    }

    #[test]
    fn builtin_copies_are_the_repository_files() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/suites");
        for (name, text) in BUILTIN {
            let file = std::fs::read_to_string(root.join(format!("{name}.toml"))).unwrap();
            assert_eq!(&file, text, "{name}");
        }
    }

    #[test]
    fn a_prior_over_codes_trains_after_its_vq_entry_and_reads_its_run() {
        let text = "[suite]\nname = \"s\"\n\
                    [[entry]]\nname = \"prior\"\n[entry.config.model]\nname = \"ar\"\n\
                    [entry.config.data]\nname = \"codes:vq\"\n\
                    [[entry]]\nname = \"other\"\n\
                    [[entry]]\nname = \"vq\"\n[entry.config.model]\nname = \"vq-vae\"\n\
                    [entry.config.data]\nname = \"digits\"\n";
        let mut s = Suite::parse(text, "t", None).unwrap();
        let names: Vec<&str> = s.entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["other", "vq", "prior"]);
        assert_eq!(s.dependency(2), Some(1));
        assert_eq!(s.dependency(0), None);
        s.bind_codes(Path::new("/tmp/out/runs")).unwrap();
        let cfg = s.entries[2].config.as_ref().unwrap();
        assert_eq!(cfg.data.name, "codes:/tmp/out/runs/vq");
        // a dependency that is not an entry stays a path
        let text = text.replace("codes:vq", "codes:elsewhere");
        let mut s = Suite::parse(&text, "t", None).unwrap();
        s.bind_codes(Path::new("/tmp/out/runs")).unwrap();
        let prior = s.entries.iter().find(|e| e.name == "prior").unwrap();
        assert_eq!(prior.config.as_ref().unwrap().data.name, "codes:elsewhere");
    }

    #[test]
    fn quick_clamps_steps_and_cadence() {
        let mut s = Suite::resolve("digits").unwrap();
        s.make_quick();
        for e in &s.entries {
            let t = &e.config.as_ref().unwrap().train;
            assert!(t.steps <= s.header.quick_steps, "{}", e.name);
            assert!(t.eval_every <= t.steps && t.checkpoint_every <= t.steps);
            assert!(t.eval_examples <= s.header.quick_examples);
        }
    }

    #[test]
    fn errors_name_the_suite_and_the_entry() {
        let text = "[suite]\nname = \"s\"\ndata = \"moons\"\n[[entry]]\nname = \"a\"\n\
                    likelihoods = [\"vlb\"]\n[entry.config.model]\nname = \"flow-matching\"\n";
        let s = Suite::parse(text, "s.toml", None).unwrap();
        let e = s.entries[0].config.as_ref().unwrap_err();
        assert!(
            e.contains("s.toml") && e.contains("'a'") && e.contains("vlb"),
            "{e}"
        );
        let e = Suite::parse("[suite]\nname = \"s\"\nnmae = 1\n", "s.toml", None).unwrap_err();
        assert!(e.to_string().contains("nmae"), "{e}");
        let dup = "[suite]\nname = \"s\"\n[[entry]]\nname = \"a\"\n[[entry]]\nname = \"a\"\n";
        assert!(Suite::parse(dup, "s.toml", None).is_err());
        let bad = "[suite]\nname = \"s\"\n[[entry]]\nname = \"../x\"\n";
        assert!(Suite::parse(bad, "s.toml", None).is_err());
    }

    #[test]
    fn the_suite_data_set_fills_in_but_does_not_override() {
        let text = "[suite]\nname = \"s\"\ndata = \"moons\"\n[[entry]]\nname = \"a\"\n\
                    [[entry]]\nname = \"b\"\n[entry.config.data]\nname = \"circles\"\n";
        let s = Suite::parse(text, "s.toml", None).unwrap();
        assert_eq!(s.entries[0].config.as_ref().unwrap().data.name, "moons");
        assert_eq!(s.entries[1].config.as_ref().unwrap().data.name, "circles");
    }
}
