//! Cooperative time budgets: a caller sets a deadline for the work it runs on this thread, and
//! long loops deep inside (the adaptive ODE solver's steps, the batches of a likelihood
//! evaluation) call [`check`] and stop with [`Error::Budget`] once it has passed. Nothing is
//! interrupted from outside, so no state is left half-updated.

use std::cell::Cell;
use std::time::Instant;

use crate::{Error, Result};

thread_local! {
    static DEADLINE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Run `work` with `deadline` in force on this thread (`None`: no limit), restoring the
/// deadline that was in force before.
pub fn within<T>(deadline: Option<Instant>, work: impl FnOnce() -> Result<T>) -> Result<T> {
    let before = DEADLINE.with(|d| d.replace(deadline));
    let out = work();
    DEADLINE.with(|d| d.set(before));
    out
}

/// `Err(Error::Budget)` naming `what` was being done once this thread's deadline has passed.
pub fn check(what: impl FnOnce() -> String) -> Result<()> {
    match DEADLINE.with(Cell::get) {
        Some(d) if Instant::now() > d => Err(Error::Budget(what())),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_passed_deadline_stops_work_and_is_restored_afterwards() {
        assert!(check(|| "x".into()).is_ok());
        let past = Instant::now() - Duration::from_millis(1);
        let r: Result<()> = within(Some(past), || {
            check(|| "integrating".into())?;
            unreachable!("the check must fail")
        });
        assert!(r.unwrap_err().to_string().contains("integrating"));
        let far = Instant::now() + Duration::from_secs(3600);
        within(Some(far), || check(|| "x".into())).unwrap();
        assert!(
            check(|| "x".into()).is_ok(),
            "deadline leaked out of `within`"
        );
    }
}
