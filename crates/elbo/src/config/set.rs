//! `--set key=value`: override any config key by its dotted path (`train.lr=3e-4`,
//! `model.net.hidden=512`, `model.sampling.sampler=ddim`), typed and validated the way a
//! config file is: the value is read as a TOML value (a bare word that is not one is taken as a
//! string), written into the serialised config, and the whole config is parsed again, so an
//! unknown key or a value of the wrong type is an error that names the valid keys.
//!
//! Setting `model.name` to another family keeps the settings the two families share (the
//! same key with a value of the right type, e.g. `[model.net]` between the continuous families)
//! and takes the new family's defaults for the rest; later `--set model.*` keys apply on top.

use serde_json::Value;

use super::Config;
use crate::models::family;
use crate::{Error, Result};

impl Config {
    /// Apply one `key=value` override.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, raw) = assignment.split_once('=').ok_or_else(|| {
            Error::Config(format!(
                "--set '{assignment}': expected key=value, e.g. train.lr=3e-4"
            ))
        })?;
        let key = key.trim();
        let raw = raw.trim();
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(Error::Config(format!(
                "--set '{assignment}': empty key part"
            )));
        }
        if key == "model.name" {
            let wanted = family(raw.trim_matches('"'))?.name;
            self.model = self.model.switch_to(wanted)?;
            return Ok(());
        }
        let mut tree = serde_json::to_value(&*self)
            .map_err(|e| Error::Config(format!("cannot serialise the config: {e}")))?;
        let mut node = &mut tree;
        for part in &path[..path.len() - 1] {
            let Value::Object(map) = node else {
                return Err(Error::Config(format!(
                    "--set {key}: '{part}' is inside a value, not a table"
                )));
            };
            node = map
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Default::default()));
        }
        let Value::Object(map) = node else {
            return Err(Error::Config(format!(
                "--set {key}: the parent of the last part is not a table"
            )));
        };
        map.insert(path[path.len() - 1].to_string(), parse_value(raw));
        let next: Config = serde_json::from_value(tree)
            .map_err(|e| Error::Config(format!("--set {key}={raw}: {e}")))?;
        next.validate()
            .map_err(|e| Error::Config(format!("--set {key}={raw}: {e}")))?;
        *self = next;
        Ok(())
    }

    /// Apply overrides in order.
    pub fn set_all<S: AsRef<str>>(&mut self, assignments: &[S]) -> Result<()> {
        for a in assignments {
            self.set(a.as_ref())?;
        }
        Ok(())
    }

    /// The config with one override applied (for building configs in code and tests).
    pub fn with(mut self, assignment: &str) -> Result<Self> {
        self.set(assignment)?;
        Ok(self)
    }
}

/// A TOML literal (`3`, `2e-3`, `true`, `"x"`, `[1, 2]`) as JSON; anything else is a string.
fn parse_value(raw: &str) -> Value {
    match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => match t.remove("v") {
            Some(v) => toml_to_json(v),
            None => Value::String(raw.to_string()),
        },
        Err(_) => Value::String(raw.to_string()),
    }
}

fn toml_to_json(v: toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => {
            Value::Object(t.into_iter().map(|(k, v)| (k, toml_to_json(v))).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_overrides_and_errors() {
        let mut c = Config::default();
        c.set("train.lr=3e-4").unwrap();
        assert_eq!(c.train.lr, 3e-4);
        c.set("model.net.hidden = 64").unwrap();
        match &c.model {
            crate::models::ModelConfig::FlowMatching(f) => assert_eq!(f.net.hidden, 64),
            other => panic!("{other:?}"),
        }
        let e = c.set("train.lrr=1").unwrap_err().to_string();
        assert!(e.contains("lrr") && e.contains("`lr`"), "{e}");
        let e = c.set("train.steps=many").unwrap_err().to_string();
        assert!(e.contains("train.steps"), "{e}");
        let e = c.set("train.steps=0").unwrap_err().to_string();
        assert!(e.contains("at least 1"), "{e}");
        c.set("model.name=ddpm").unwrap();
        assert_eq!(c.model.name(), "ddpm");
        // the network settings carry over to the new family
        match &c.model {
            crate::models::ModelConfig::Ddpm(f) => assert_eq!(f.net.hidden, 64),
            other => panic!("{other:?}"),
        }
        c.set("model.sampling.sampler=ddim").unwrap();
        let e = c
            .set("model.sampling.sampler=dddim")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dpm++2m"), "{e}");
        let e = c.set("model.name=glow-worm").unwrap_err().to_string();
        assert!(e.contains("flow-matching"), "{e}");
        let e = c.set("nonsense").unwrap_err().to_string();
        assert!(e.contains("key=value"), "{e}");
    }
}
