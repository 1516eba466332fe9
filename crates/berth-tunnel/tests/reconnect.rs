//! The reconnect loop's delays, with tokio's clock paused and a scripted
//! connector in place of the network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use berth_tunnel::{maintain_with, Backoff, BackoffConfig, Connector, TunnelError, TunnelServer};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::time::Instant;

struct Scripted {
    results: Mutex<VecDeque<TunnelError>>,
    attempts: Mutex<Vec<Instant>>,
}

impl Connector for Scripted {
    async fn connect(&self) -> Result<TunnelServer, TunnelError> {
        self.attempts.lock().unwrap().push(Instant::now());
        Err(self
            .results
            .lock()
            .unwrap()
            .pop_front()
            .expect("more attempts than scripted"))
    }
}

fn rejected(status: u16, retry_after: Option<Duration>) -> TunnelError {
    TunnelError::Rejected {
        url: "http://controller/".into(),
        status,
        retry_after,
        message: "scripted".into(),
    }
}

fn refused() -> TunnelError {
    TunnelError::Connect {
        url: "http://controller/".into(),
        source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
    }
}

#[tokio::test(start_paused = true)]
async fn reconnect_delays_follow_failure_kind() {
    let script = vec![
        refused(),
        refused(),
        refused(),
        rejected(503, Some(Duration::from_secs(7))),
        rejected(401, None),
        rejected(401, None),
        rejected(410, None),
    ];
    let connector = Scripted {
        results: Mutex::new(script.into()),
        attempts: Mutex::new(Vec::new()),
    };
    let config = BackoffConfig {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
        reset_after: Duration::from_secs(60),
        max_retry_after: Duration::from_secs(300),
    };
    let backoff = Backoff::with_rng(config, StdRng::seed_from_u64(11));
    let end = maintain_with(
        &connector,
        backoff,
        Duration::from_secs(10),
        |_stream| async {},
    )
    .await;
    assert_eq!(end.status(), Some(410), "{end}");

    let attempts = connector.attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 7);
    let delays: Vec<Duration> = attempts.windows(2).map(|pair| pair[1] - pair[0]).collect();
    let bounds = [
        (Duration::ZERO, Duration::from_millis(500)),
        (Duration::ZERO, Duration::from_secs(1)),
        (Duration::ZERO, Duration::from_secs(2)),
        (Duration::from_secs(7), Duration::from_millis(8750)),
        (Duration::from_secs(15), Duration::from_secs(30)),
        (Duration::from_secs(15), Duration::from_secs(30)),
    ];
    for (i, (delay, (low, high))) in delays.iter().zip(bounds).enumerate() {
        assert!(
            *delay >= low && *delay <= high,
            "delay {i} is {delay:?}, expected {low:?}..={high:?}"
        );
    }
}
