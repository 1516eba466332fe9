//! Reconnect delays for the dial side, by the kind of failure.
//!
//! - A transient failure (network, timeout, a lost tunnel, a 5xx without
//!   `Retry-After`) waits with exponential backoff and full jitter: the
//!   n-th in a row waits a uniformly random time in
//!   `[0, min(max, initial * 2^n)]`, so that supervisors cut off
//!   together do not come back together.
//! - A `503` with `Retry-After: S` waits S seconds (at most
//!   `max_retry_after`) plus a random extra of up to a quarter of that.
//! - A rejection of the credentials or the address (401, 403, 404) or a
//!   TLS failure waits between half the maximum and the maximum: retrying
//!   fast cannot fix it, but an operator may.
//! - 409, 410 and 422 (the container is not Locked or Running) and an
//!   invalid setting are final.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::BackoffConfig;
use crate::error::TunnelError;

/// How the dial side treats a failure to open or keep a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    Transient,
    RetryAfter(Duration),
    Slow,
    Final,
}

impl FailureClass {
    pub fn of(error: &TunnelError) -> FailureClass {
        match error {
            TunnelError::InvalidConfig { .. } => FailureClass::Final,
            TunnelError::Rejected {
                status: 409 | 410 | 422,
                ..
            } => FailureClass::Final,
            TunnelError::Rejected {
                status: 401 | 403 | 404,
                ..
            } => FailureClass::Slow,
            TunnelError::Tls { .. } => FailureClass::Slow,
            TunnelError::Rejected {
                status: 503,
                retry_after: Some(delay),
                ..
            } => FailureClass::RetryAfter(*delay),
            _ => FailureClass::Transient,
        }
    }
}

/// The delay state of one reconnect loop.
#[derive(Debug)]
pub struct Backoff {
    config: BackoffConfig,
    /// Transient failures in a row since the last reset.
    attempt: u32,
    rng: StdRng,
}

impl Backoff {
    pub fn new(config: BackoffConfig) -> Backoff {
        Backoff::with_rng(config, StdRng::from_entropy())
    }

    /// Makes a backoff with a given random source, for tests.
    pub fn with_rng(config: BackoffConfig, rng: StdRng) -> Backoff {
        Backoff {
            config,
            attempt: 0,
            rng,
        }
    }

    /// Starts again from the initial delay, after a tunnel stayed up.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The upper bound of the next transient delay.
    pub fn current_cap(&self) -> Duration {
        let factor = 1_u32.checked_shl(self.attempt).unwrap_or(u32::MAX);
        self.config
            .initial
            .saturating_mul(factor)
            .min(self.config.max)
    }

    /// Returns the delay before the next attempt after a failure of
    /// `class`. `None` for a final failure.
    pub fn next_delay(&mut self, class: FailureClass) -> Option<Duration> {
        let delay = match class {
            FailureClass::Final => return None,
            FailureClass::Transient => {
                let cap = self.current_cap();
                self.attempt = self.attempt.saturating_add(1).min(31);
                self.uniform(Duration::ZERO, cap)
            }
            FailureClass::RetryAfter(requested) => {
                let base = requested.min(self.config.max_retry_after);
                base + self.uniform(Duration::ZERO, base / 4)
            }
            FailureClass::Slow => self.uniform(self.config.max / 2, self.config.max),
        };
        Some(delay)
    }

    /// The settings this backoff was made with.
    pub fn config(&self) -> BackoffConfig {
        self.config
    }

    fn uniform(&mut self, low: Duration, high: Duration) -> Duration {
        let low_ns = u64::try_from(low.as_nanos()).unwrap_or(u64::MAX);
        let high_ns = u64::try_from(high.as_nanos())
            .unwrap_or(u64::MAX)
            .max(low_ns);
        Duration::from_nanos(self.rng.gen_range(low_ns..=high_ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BackoffConfig {
        BackoffConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
            max_retry_after: Duration::from_secs(300),
        }
    }

    #[test]
    fn transient_delays_are_jittered_within_growing_bounds() {
        let mut backoff = Backoff::with_rng(config(), StdRng::seed_from_u64(7));
        let expected_caps_ms = [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000];
        let mut means = Vec::new();
        for cap_ms in expected_caps_ms {
            let mut sum = Duration::ZERO;
            let samples = 2000;
            for _ in 0..samples {
                let mut trial = Backoff::with_rng(config(), StdRng::seed_from_u64(rand::random()));
                trial.attempt = backoff.attempt;
                let delay = trial.next_delay(FailureClass::Transient).unwrap();
                assert!(
                    delay <= Duration::from_millis(cap_ms),
                    "delay {delay:?} above cap {cap_ms} ms"
                );
                sum += delay;
            }
            assert_eq!(backoff.current_cap(), Duration::from_millis(cap_ms));
            backoff.next_delay(FailureClass::Transient);
            let mean = sum / samples;
            // Full jitter: the mean is half the cap, give or take 10 %.
            let half = Duration::from_millis(cap_ms / 2);
            assert!(
                mean > half.mul_f64(0.9) && mean < half.mul_f64(1.1),
                "mean {mean:?} for cap {cap_ms} ms"
            );
            means.push(mean);
        }
        assert!(
            means.windows(2).take(6).all(|pair| pair[1] > pair[0]),
            "means do not grow: {means:?}"
        );
    }

    #[test]
    fn reset_starts_from_initial() {
        let mut backoff = Backoff::with_rng(config(), StdRng::seed_from_u64(1));
        for _ in 0..10 {
            backoff.next_delay(FailureClass::Transient);
        }
        assert_eq!(backoff.current_cap(), Duration::from_secs(30));
        backoff.reset();
        assert_eq!(backoff.current_cap(), Duration::from_millis(500));
    }

    #[test]
    fn retry_after_is_a_minimum() {
        let mut backoff = Backoff::with_rng(config(), StdRng::seed_from_u64(3));
        for _ in 0..1000 {
            let delay = backoff
                .next_delay(FailureClass::RetryAfter(Duration::from_secs(8)))
                .unwrap();
            assert!(
                delay >= Duration::from_secs(8) && delay <= Duration::from_secs(10),
                "{delay:?}"
            );
        }
        let capped = backoff
            .next_delay(FailureClass::RetryAfter(Duration::from_secs(86400)))
            .unwrap();
        assert!(capped <= Duration::from_secs(375), "{capped:?}");
    }

    #[test]
    fn slow_failures_wait_near_the_maximum() {
        let mut backoff = Backoff::with_rng(config(), StdRng::seed_from_u64(5));
        for _ in 0..1000 {
            let delay = backoff.next_delay(FailureClass::Slow).unwrap();
            assert!(
                delay >= Duration::from_secs(15) && delay <= Duration::from_secs(30),
                "{delay:?}"
            );
        }
    }

    #[test]
    fn classes_by_status() {
        let rejected = |status, retry_after| TunnelError::Rejected {
            url: "http://c/".into(),
            status,
            retry_after,
            message: String::new(),
        };
        assert_eq!(FailureClass::of(&rejected(409, None)), FailureClass::Final);
        assert_eq!(FailureClass::of(&rejected(410, None)), FailureClass::Final);
        assert_eq!(FailureClass::of(&rejected(422, None)), FailureClass::Final);
        assert_eq!(FailureClass::of(&rejected(401, None)), FailureClass::Slow);
        assert_eq!(FailureClass::of(&rejected(403, None)), FailureClass::Slow);
        assert_eq!(
            FailureClass::of(&rejected(503, Some(Duration::from_secs(4)))),
            FailureClass::RetryAfter(Duration::from_secs(4))
        );
        assert_eq!(
            FailureClass::of(&rejected(503, None)),
            FailureClass::Transient
        );
        assert_eq!(
            FailureClass::of(&rejected(502, None)),
            FailureClass::Transient
        );
        assert_eq!(
            FailureClass::of(&TunnelError::Closed),
            FailureClass::Transient
        );
    }
}
