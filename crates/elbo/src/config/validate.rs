//! The ranges serde cannot check, for the whole configuration, so that `elbo train` (and
//! `sample`, `eval`, `--resume`) refuses a bad value before any work starts rather than at the
//! first held-out evaluation mid-run. Every message names the key and the valid range.

use super::{Config, EvalOptions, SampleOptions, TrainConfig};
use crate::eval::sample_metric::metric_by_name;
use crate::model::likelihood_choice_among;
use crate::models::family;
use crate::{Error, Result};

fn bad<T>(m: String) -> Result<T> {
    Err(Error::Config(m))
}

/// `key` must be at least 1.
fn at_least_one(key: &str, v: usize) -> Result<()> {
    if v == 0 {
        return bad(format!("{key} must be at least 1, got 0"));
    }
    Ok(())
}

/// `key` must be a finite number in `[lo, hi)` (or `[lo, hi]` with `closed`).
fn in_range(key: &str, v: f64, lo: f64, hi: f64, closed: bool) -> Result<()> {
    let ok = v.is_finite() && v >= lo && (v < hi || (closed && v == hi));
    if !ok {
        let close = if closed { ']' } else { ')' };
        return bad(format!(
            "{key} must be a number in [{lo}, {hi}{close}, got {v}"
        ));
    }
    Ok(())
}

/// `key` must be a finite number >= 0.
fn non_negative(key: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        return bad(format!("{key} must be a finite number >= 0, got {v}"));
    }
    Ok(())
}

/// The tolerances of an adaptive solver: finite, >= 0, not both 0.
fn tolerances(table: &str, rtol: f64, atol: f64) -> Result<()> {
    non_negative(&format!("{table}.rtol"), rtol)?;
    non_negative(&format!("{table}.atol"), atol)?;
    if rtol == 0.0 && atol == 0.0 {
        return bad(format!(
            "{table}.rtol and {table}.atol cannot both be 0 (the adaptive solver would never \
             accept a step); e.g. 1e-5"
        ));
    }
    Ok(())
}

impl TrainConfig {
    /// Ranges of `[train]`.
    pub fn validate(&self) -> Result<()> {
        at_least_one("train.steps", self.steps)?;
        at_least_one("train.batch_size", self.batch_size)?;
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!(
                "train.lr must be a positive number, got {}",
                self.lr
            ));
        }
        non_negative("train.weight_decay", self.weight_decay)?;
        in_range("train.beta1", self.beta1, 0.0, 1.0, false)?;
        in_range("train.beta2", self.beta2, 0.0, 1.0, false)?;
        non_negative("train.grad_clip", self.grad_clip)?;
        in_range("train.ema_decay", self.ema_decay, 0.0, 1.0, false)?;
        in_range("train.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0, true)?;
        at_least_one("train.log_every", self.log_every)?;
        at_least_one("train.checkpoint_every", self.checkpoint_every)?;
        at_least_one("train.eval_examples", self.eval_examples)?;
        non_negative("train.eval_budget_s", self.eval_budget_s)?;
        if self.select_by != "nll" {
            metric_by_name(&self.select_by).map_err(|e| {
                Error::Config(format!(
                    "train.select_by: use \"nll\" or a sample metric; {e}"
                ))
            })?;
        }
        Ok(())
    }
}

impl SampleOptions {
    /// Ranges of `[sample]`.
    pub fn validate(&self) -> Result<()> {
        at_least_one("sample.steps", self.steps)?;
        at_least_one("sample.batch_size", self.batch_size)?;
        tolerances("sample", self.rtol, self.atol)
    }
}

impl EvalOptions {
    /// Ranges of `[eval]` that do not depend on the family (see [`Config::validate`] for the
    /// likelihood name). `elbo eval` calls it again after applying its flags.
    pub fn validate(&self) -> Result<()> {
        at_least_one("eval.steps", self.steps)?;
        tolerances("eval", self.rtol, self.atol)?;
        at_least_one("eval.probes", self.probes)?;
        at_least_one("eval.batch_size", self.batch_size)?;
        at_least_one("eval.lm_samples", self.lm_samples)?;
        at_least_one("eval.importance_samples", self.importance_samples)?;
        at_least_one("eval.ais_chains", self.ais_chains)?;
        at_least_one("eval.ais_steps", self.ais_steps)?;
        at_least_one("eval.ais_leapfrog", self.ais_leapfrog)?;
        at_least_one("eval.metric_samples", self.metric_samples)?;
        for m in &self.metrics {
            metric_by_name(m).map_err(|e| Error::Config(format!("eval.metrics: {e}")))?;
        }
        if self.likelihood.trim().is_empty() {
            return bad(
                "eval.likelihood is empty; use \"auto\" or a likelihood of the family".into(),
            );
        }
        Ok(())
    }

    /// Whether the family called `family_name` reports the likelihood `self.likelihood` names
    /// ("auto" always passes: a family without a likelihood is compared by sample metrics).
    pub fn validate_likelihood(&self, family_name: &str) -> Result<()> {
        let name = self.likelihood.trim();
        if name.eq_ignore_ascii_case("auto") {
            return Ok(());
        }
        let info = family(family_name)?;
        match likelihood_choice_among(self, info.name, info.likelihoods, info.opt_in_likelihoods) {
            Ok(_) => Ok(()),
            Err(Error::Config(m)) => bad(format!("eval.likelihood: {m}")),
            Err(e) => Err(e),
        }
    }
}

impl Config {
    /// Check every range serde cannot, of every table, before any work starts.
    pub fn validate(&self) -> Result<()> {
        self.train.validate()?;
        at_least_one("data.seq_len", self.data.seq_len)?;
        self.sample.validate()?;
        self.eval.validate()?;
        self.eval.validate_likelihood(self.model.name())?;
        self.model.validate()
    }
}
