//! Retrying transient failures with exponential backoff and jitter.
//!
//! A caller classifies each failure. A transient one (no response, a
//! timeout, a busy or failing server) is tried again after a growing,
//! randomised delay until a time budget runs out. Any other failure is
//! returned at once, because repeating a rejected request cannot change
//! the response.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

/// Delays between attempts: the cap doubles from `initial` up to `max`,
/// and each delay is drawn at random below the cap, as `jitter` sets, so
/// retries from many supervisors spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub jitter: Jitter,
}

/// The range below the backoff's cap that a delay is drawn from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// From the upper half of the cap ("equal jitter"), so every delay is
    /// at least half the cap and delays still grow.
    Equal,
    /// From zero to the cap ("full jitter"). It spreads the retries of many
    /// clients the most, so hundreds of supervisors that lost the
    /// controller at once do not all retry at the same moments.
    Full,
}

/// Backoff for calls to the controller.
pub const API_BACKOFF: Backoff = Backoff {
    initial: Duration::from_millis(200),
    max: Duration::from_secs(15),
    jitter: Jitter::Equal,
};

impl Backoff {
    /// Returns the backoff of the final phase: full jitter, starting at
    /// 1 s and capped at `max`.
    pub fn final_phase(max: Duration) -> Backoff {
        Backoff {
            initial: Duration::from_secs(1).min(max),
            max,
            jitter: Jitter::Full,
        }
    }

    /// Returns the delay before retry number `attempt` (0 for the first).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(31));
        let cap = self.initial.saturating_mul(factor).min(self.max);
        let floor = match self.jitter {
            Jitter::Equal => cap / 2,
            Jitter::Full => Duration::ZERO,
        };
        let spread = (cap - floor).as_micros().min(u64::MAX as u128) as u64;
        floor + Duration::from_micros(rand::thread_rng().gen_range(0..=spread))
    }
}

/// A failure that may carry the server's own wait before another try.
pub trait RetryHint {
    /// Returns the wait the server requested (`Retry-After`), if any.
    fn retry_after(&self) -> Option<Duration>;
}

impl RetryHint for berth_client::ClientError {
    fn retry_after(&self) -> Option<Duration> {
        berth_client::ClientError::retry_after(self)
    }
}

impl RetryHint for String {
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

/// Runs `operation` until it succeeds, fails with an error that
/// `is_transient` rejects, or the next delay would end past `budget`
/// (measured from the first attempt). Returns the last error then. A
/// failure that carries the server's `Retry-After` waits at least that
/// long, so a busy controller is not called again before the time it gave.
pub async fn retry<T, E, F, Fut>(
    what: &str,
    budget: Duration,
    backoff: Backoff,
    is_transient: impl Fn(&E) -> bool,
    mut operation: F,
) -> Result<T, E>
where
    E: std::fmt::Display + RetryHint,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        let error = match operation().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if !is_transient(&error) {
            return Err(error);
        }
        let delay = backoff
            .delay(attempt)
            .max(error.retry_after().unwrap_or_default());
        if started.elapsed() + delay > budget {
            tracing::warn!(attempts = attempt + 1, error = %error, "{what} failed; giving up after {:?}", started.elapsed());
            return Err(error);
        }
        tracing::warn!(attempt = attempt + 1, retry_in = ?delay, error = %error, "{what} failed; retrying");
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const FAST: Backoff = Backoff {
        initial: Duration::from_millis(1),
        max: Duration::from_millis(4),
        jitter: Jitter::Equal,
    };

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: Jitter::Equal,
        };
        for _ in 0..50 {
            let first = backoff.delay(0);
            assert!(first >= Duration::from_millis(50), "{first:?}");
            assert!(first <= Duration::from_millis(100), "{first:?}");
            let late = backoff.delay(30);
            assert!(late >= Duration::from_millis(500), "{late:?}");
            assert!(late <= Duration::from_secs(1), "{late:?}");
        }
    }

    #[test]
    fn full_jitter_spreads_from_zero_to_the_cap() {
        let backoff = Backoff::final_phase(Duration::from_secs(8));
        let delays: Vec<Duration> = (0..200).map(|_| backoff.delay(30)).collect();
        assert!(delays.iter().all(|delay| *delay <= Duration::from_secs(8)));
        let below_half = delays
            .iter()
            .filter(|delay| **delay < Duration::from_secs(4))
            .count();
        // Equal jitter never goes below half the cap; full jitter does about
        // half of the time.
        assert!(below_half > 40, "only {below_half} of 200 below half");
        assert!(backoff.delay(0) <= Duration::from_secs(1));
    }

    #[tokio::test]
    async fn transient_failures_are_retried_until_success() {
        let calls = Cell::new(0);
        let result: Result<u32, String> = retry(
            "test call",
            Duration::from_secs(5),
            FAST,
            |_| true,
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 3 {
                        Err(format!("failure {n}"))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(result, Ok(3));
        assert_eq!(calls.get(), 3);
    }

    #[tokio::test]
    async fn permanent_failure_is_returned_at_once() {
        let calls = Cell::new(0);
        let result: Result<(), String> = retry(
            "test call",
            Duration::from_secs(5),
            FAST,
            |_| false,
            || {
                calls.set(calls.get() + 1);
                async { Err("rejected".to_string()) }
            },
        )
        .await;
        assert_eq!(result, Err("rejected".to_string()));
        assert_eq!(calls.get(), 1);
    }

    #[tokio::test]
    async fn retries_stop_when_the_budget_is_spent() {
        let calls = Cell::new(0);
        let result: Result<(), String> = retry(
            "test call",
            Duration::from_millis(30),
            FAST,
            |_| true,
            || {
                calls.set(calls.get() + 1);
                async { Err("unavailable".to_string()) }
            },
        )
        .await;
        assert!(result.is_err());
        assert!(calls.get() > 1, "only {} calls", calls.get());
    }

    /// A failure whose server asked for a wait.
    #[derive(Debug, PartialEq)]
    struct Busy(Duration);

    impl std::fmt::Display for Busy {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "busy for {:?}", self.0)
        }
    }

    impl RetryHint for Busy {
        fn retry_after(&self) -> Option<Duration> {
            Some(self.0)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_waited_in_full() {
        let calls = Cell::new(0);
        let started = Instant::now();
        let result: Result<u32, Busy> = retry(
            "test call",
            Duration::from_secs(60),
            FAST,
            |_| true,
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 2 {
                        Err(Busy(Duration::from_secs(5)))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(result, Ok(2));
        // The backoff alone would wait at most 4 ms.
        assert!(
            started.elapsed() >= Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
