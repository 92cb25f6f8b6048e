//! Held-out evaluation during training: the validation NLL or a sample metric, the `best/`
//! checkpoint, early stopping, and what happens when an evaluation fails or runs out of time.

use std::io::Write;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use serde_json::json;

use super::*;

impl Trainer {
    /// The held-out evaluation of the current step (its checkpoint is already written), the
    /// choice of `best/` and early stopping. An evaluation that fails or runs out of time is
    /// reported and counts as no evaluation. The checkpoint is written again when the run
    /// ends here (last step or early stop) or when this step is due one anyway, so it holds
    /// the evaluation's outcome. Returns whether training stops early.
    pub(super) fn evaluate_and_select(
        &mut self,
        metrics: &mut std::fs::File,
        bar: &ProgressBar,
        smooth: f64,
        out: &mut TrainOutcome,
    ) -> Result<bool> {
        let tc = self.cfg.train.clone();
        match self.periodic_eval(metrics, bar, smooth) {
            Ok(nll) => out.evals.push((self.step, nll)),
            Err(e @ Error::Config(_)) => return Err(e),
            Err(e) => {
                self.eval_pending = false;
                let msg = format!(
                    "held-out evaluation at step {} failed: {e}; the checkpoint of step {} is                      saved and training continues",
                    self.step, self.step
                );
                bar.println(format!("warning: {msg}"));
                let line = json!({"step": self.step, "eval_error": e.to_string(), "split": "val"});
                writeln!(metrics, "{line}").map_err(|e| Error::io(&self.dir, e))?;
            }
        }
        let stop = tc.patience > 0 && self.evals_since_best >= tc.patience;
        if stop {
            self.stopped_early = true;
            out.stopped_early = true;
            bar.println(format!(
                "early stop: {} evaluations without improvement",
                tc.patience
            ));
        }
        if stop || self.step == tc.steps || self.step.is_multiple_of(tc.checkpoint_every) {
            self.save_latest(bar)?;
        }
        Ok(stop)
    }

    /// Evaluate, log, keep `best/` (by `train.select_by`) and count evaluations without
    /// improvement. Returns the validation NLL (NaN for a family without a likelihood).
    fn periodic_eval(
        &mut self,
        metrics: &mut std::fs::File,
        bar: &ProgressBar,
        smooth: f64,
    ) -> Result<f64> {
        let has_nll = !self.model.likelihoods().is_empty();
        let (nll, se, bpd) = if has_nll {
            self.evaluate()?
        } else {
            (f64::NAN, f64::NAN, f64::NAN)
        };
        let select_by = self.cfg.train.select_by.clone();
        let mut line = json!({"step": self.step, "eval_nll": nll, "eval_stderr": se,
            "eval_bits_per_dim": bpd, "examples": self.eval_examples(), "split": "val"});
        let mut msg = format!(
            "step {:>6}  loss {:.4}  validation NLL {:.4} ± {:.4} nats ({:.4} bits/dim)",
            self.step, smooth, nll, se, bpd
        );
        let score = if select_by == "nll" {
            if !has_nll {
                return Err(Error::Config(format!(
                    "the {} family has no likelihood: set train.select_by to a sample metric \
                     (energy-distance, mmd, sliced-wasserstein, modes, frechet-distance)",
                    self.model.family()
                )));
            }
            nll
        } else {
            let m = self.evaluate_metric(&select_by)?;
            line[format!("eval_{select_by}")] = json!(m.value);
            msg.push_str(&format!("  {select_by} {:.5}", m.value));
            // the best checkpoint has the lowest score: negate a higher-is-better metric
            match crate::eval::sample_metric::metric_by_name(&select_by)?.lower_is_better() {
                true => m.value,
                false => -m.value,
            }
        };
        writeln!(metrics, "{line}").map_err(|e| Error::io(&self.dir, e))?;
        bar.println(msg);
        // the evaluation is done: the state saved with best/ (and every later checkpoint)
        // says so
        self.eval_pending = false;
        if score.is_finite() && self.best.is_none_or(|b| score < b) {
            self.best = Some(score);
            self.evals_since_best = 0;
            self.save_checkpoint(&self.dir.join("best"))?;
        } else {
            self.evals_since_best += 1;
        }
        Ok(nll)
    }

    /// A sample metric of `eval_examples` samples (EMA weights) against as many validation
    /// examples.
    pub fn evaluate_metric(
        &mut self,
        name: &str,
    ) -> Result<crate::eval::sample_metric::MetricValue> {
        let metric = crate::eval::sample_metric::metric_by_name(name)?;
        let device = self.model.device().clone();
        let val = self.data.val_set(&device)?;
        let n = val.dim(0)?.min(self.cfg.train.eval_examples.max(2));
        let val: Vec<f32> = val.narrow(0, 0, n)?.flatten_all()?.to_vec1()?;
        let mut rng = Rng::new(self.cfg.train.seed)
            .fork(EVAL_STREAM)
            .fork(self.step as u64)
            .fork(1);
        self.swap_ema()?;
        let samples = self.model.sample(n, &self.cfg.sample, &mut rng);
        self.swap_ema()?;
        let samples: Vec<f32> = samples?.flatten_all()?.to_vec1()?;
        metric.compute(&samples, &val, self.model.dim(), &mut rng)
    }

    fn eval_examples(&self) -> usize {
        self.cfg.train.eval_examples
    }

    /// Validation NLL (mean, stderr, bits/dim) on the first `eval_examples` examples of the
    /// validation split, with the EMA weights when EMA is on. Past `train.eval_budget_s`
    /// seconds (checked between batches of `eval.batch_size` examples) it stops with
    /// [`Error::Budget`].
    pub fn evaluate(&mut self) -> Result<(f64, f64, f64)> {
        let device = self.model.device().clone();
        // model selection reads the validation split; only `elbo eval` reads the test split
        let val = self.data.val_set(&device)?;
        let n = val.dim(0)?.min(self.cfg.train.eval_examples.max(1));
        let val = val.narrow(0, 0, n)?;
        let mut rng = Rng::new(self.cfg.train.seed)
            .fork(EVAL_STREAM)
            .fork(self.step as u64);
        let budget = self.cfg.train.eval_budget_s;
        let deadline = (budget > 0.0).then(|| Instant::now() + Duration::from_secs_f64(budget));
        self.swap_ema()?;
        let res = dataset_nll_within(
            self.model.as_ref(),
            &val,
            &self.cfg.eval,
            &mut rng,
            deadline,
        );
        self.swap_ema()?;
        let s = res?.summary();
        Ok((s.nats, s.stderr_nats, s.bits_per_dim))
    }

    /// Exchange the live and the EMA weights of every group that keeps an EMA.
    pub(super) fn swap_ema(&mut self) -> Result<()> {
        for g in self.groups.iter_mut() {
            if let Some(ema) = g.ema.as_mut() {
                ema.swap(&g.params)?;
            }
        }
        Ok(())
    }
}
