//! Range checks of the numeric flags, so a zero, negative or NaN value is an error that names
//! the flag (the config keys they set are checked again, by name, with the whole config).

use anyhow::{bail, Result};

use crate::{DiffusionSampleArgs, EvalArgs, SampleArgs, TrainArgs};

/// `flag` must be at least 1.
fn at_least_one(flag: &str, v: Option<usize>) -> Result<()> {
    if v == Some(0) {
        bail!("{flag} 0: must be at least 1");
    }
    Ok(())
}

/// `flag` must be a finite number in `[lo, hi]`, above `lo` when `open_lo`.
fn number(flag: &str, v: Option<f64>, lo: f64, hi: f64, open_lo: bool) -> Result<()> {
    let Some(x) = v else { return Ok(()) };
    let ok = x.is_finite() && x <= hi && (x > lo || (!open_lo && x == lo));
    if !ok {
        let range = match (open_lo, hi.is_finite()) {
            (true, true) => format!("in ({lo}, {hi}]"),
            (false, true) => format!("in [{lo}, {hi}]"),
            (true, false) => format!("greater than {lo}"),
            (false, false) => format!("at least {lo}"),
        };
        bail!("{flag} {x}: must be a finite number {range}");
    }
    Ok(())
}

fn check_sampler(a: &DiffusionSampleArgs) -> Result<()> {
    at_least_one("--sample-steps", a.sample_steps)?;
    number("--eta", a.eta, 0.0, 1.0, false)?;
    number("--churn", a.churn, 0.0, f64::INFINITY, false)
}

/// `elbo train`'s flags.
pub fn check_train(a: &TrainArgs) -> Result<()> {
    at_least_one("--steps", a.steps)?;
    at_least_one("--batch-size", a.batch_size)?;
    number("--lr", a.lr, 0.0, f64::INFINITY, true)?;
    check_sampler(&a.diffusion)
}

/// `elbo sample`'s flags.
pub fn check_sample(a: &SampleArgs) -> Result<()> {
    at_least_one("-n", a.n)?;
    at_least_one("--steps", a.steps)?;
    number("--temperature", a.temperature, 0.0, f64::INFINITY, true)?;
    number("--top-p", a.top_p, 0.0, 1.0, true)?;
    check_sampler(&a.diffusion)
}

/// `elbo eval`'s flags.
pub fn check_eval(a: &EvalArgs) -> Result<()> {
    at_least_one("--probes", a.probes)?;
    at_least_one("--ode-steps", a.ode_steps)?;
    at_least_one("--lm-samples", a.lm_samples)?;
    at_least_one("--importance-samples", a.importance_samples)?;
    at_least_one("--ais-chains", a.ais_chains)?;
    at_least_one("--ais-steps", a.ais_steps)?;
    at_least_one("--ais-leapfrog", a.ais_leapfrog)?;
    at_least_one("--examples", a.examples)?;
    at_least_one("--metric-samples", a.metric_samples)?;
    number("--rtol", a.rtol, 0.0, f64::INFINITY, false)?;
    number("--atol", a.atol, 0.0, f64::INFINITY, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_and_nan_flags_are_named() {
        let e = at_least_one("--probes", Some(0)).unwrap_err().to_string();
        assert!(e.contains("--probes"), "{e}");
        assert!(at_least_one("--probes", Some(1)).is_ok());
        let e = number("--eta", Some(f64::NAN), 0.0, 1.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--eta") && e.contains("[0, 1]"), "{e}");
        assert!(number("--eta", Some(0.0), 0.0, 1.0, false).is_ok());
        assert!(number("--lr", Some(0.0), 0.0, f64::INFINITY, true).is_err());
        assert!(number("--lr", Some(f64::INFINITY), 0.0, f64::INFINITY, true).is_err());
    }
}
