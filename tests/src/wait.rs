//! Bounded polling, so tests wait for a condition instead of sleeping a fixed time.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// Polls `condition` every `poll` until it returns true; fails once `timeout` has passed.
///
/// The error only says that time ran out; add what was awaited with `.context(..)`.
pub fn wait_until(
    timeout: Duration,
    poll: Duration,
    mut condition: impl FnMut() -> bool,
) -> Result<()> {
    wait_for(timeout, poll, || Ok(condition().then_some(())))
}

/// Polls `probe` every `poll` until it returns `Ok(Some(value))`, and returns that value.
///
/// `Ok(None)` and `Err(..)` both mean "not yet": a probe such as a CLI call may fail while the
/// system under test is still starting. On timeout the last error, if any, is part of the
/// returned error.
pub fn wait_for<T>(
    timeout: Duration,
    poll: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last_error = None;
    loop {
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(match last_error {
                Some(last) => {
                    anyhow!("condition not met within {timeout:?}; last attempt failed: {last:#}")
                }
                None => anyhow!("condition not met within {timeout:?}"),
            });
        }
        std::thread::sleep(poll.min(deadline - now));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_once_condition_holds() -> Result<()> {
        let mut calls = 0;
        wait_until(Duration::from_secs(5), Duration::from_millis(1), || {
            calls += 1;
            calls == 3
        })?;
        assert_eq!(calls, 3);
        Ok(())
    }

    #[test]
    fn times_out_with_last_error() {
        let result: Result<()> =
            wait_for(Duration::from_millis(20), Duration::from_millis(5), || {
                Err(anyhow!("still booting"))
            });
        let message = result.err().map(|err| format!("{err:#}")).unwrap_or_default();
        assert!(message.contains("still booting"), "{message}");
    }
}
