//! The reconnect loop's delays, with tokio's clock paused and a scripted
//! connector in place of the network.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use berth_tunnel::{
    maintain_with, serve, Backoff, BackoffConfig, Connector, SessionConfig, TunnelClient,
    TunnelError, TunnelServer,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::time::Instant;

/// One scripted attempt: a failure, or a tunnel over an in-memory pipe
/// whose accept side closes it after `hold`.
enum Outcome {
    Fail(TunnelError),
    Up { hold: Duration },
}

struct Scripted {
    outcomes: Mutex<VecDeque<Outcome>>,
    attempts: Mutex<Vec<Instant>>,
}

impl Connector for Scripted {
    async fn connect(&self) -> Result<TunnelServer, TunnelError> {
        self.attempts.lock().unwrap().push(Instant::now());
        let outcome = self
            .outcomes
            .lock()
            .unwrap()
            .pop_front()
            .expect("more attempts than scripted");
        let hold = match outcome {
            Outcome::Fail(error) => return Err(error),
            Outcome::Up { hold } => hold,
        };
        let (dial_end, accept_end) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let client = TunnelClient::handshake(accept_end, &SessionConfig::default())
                .await
                .unwrap();
            tokio::time::sleep(hold).await;
            drop(client);
        });
        serve(dial_end, &SessionConfig::default()).await
    }
}

/// Runs `maintain_with` over the outcomes until one is final; returns
/// the final error and the time of each attempt.
async fn run_script(outcomes: Vec<Outcome>, seed: u64) -> (TunnelError, Vec<Instant>) {
    let connector = Scripted {
        outcomes: Mutex::new(outcomes.into()),
        attempts: Mutex::new(Vec::new()),
    };
    let backoff = Backoff::with_rng(backoff_config(), StdRng::seed_from_u64(seed));
    let end = maintain_with(
        &connector,
        backoff,
        Duration::from_secs(10),
        |_stream| async {},
    )
    .await;
    let attempts = connector.attempts.lock().unwrap().clone();
    (end, attempts)
}

fn backoff_config() -> BackoffConfig {
    BackoffConfig {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(30),
        reset_after: Duration::from_secs(60),
        max_retry_after: Duration::from_secs(300),
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
    let (end, attempts) = run_script(script.into_iter().map(Outcome::Fail).collect(), 11).await;
    assert_eq!(end.status(), Some(410), "{end}");

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

#[tokio::test(start_paused = true)]
async fn backoff_resets_after_stable_tunnel() {
    // Eight failures raise the delay bound to its 30 s maximum. A tunnel
    // that stays up 61 s (reset_after is 60 s) brings it back to 0.5 s.
    let mut script: Vec<Outcome> = (0..8).map(|_| Outcome::Fail(refused())).collect();
    script.push(Outcome::Up {
        hold: Duration::from_secs(61),
    });
    script.push(Outcome::Fail(refused()));
    script.push(Outcome::Fail(rejected(422, None)));
    let (end, attempts) = run_script(script, 23).await;
    assert_eq!(end.status(), Some(422), "{end}");

    assert_eq!(attempts.len(), 11);
    let up_at = attempts[8];
    let after_close = attempts[9] - up_at - Duration::from_secs(61);
    assert!(
        after_close <= Duration::from_millis(500),
        "first delay after a stable tunnel: {after_close:?}"
    );
    let next = attempts[10] - attempts[9];
    assert!(
        next <= Duration::from_secs(1),
        "second delay after a stable tunnel: {next:?}"
    );
}
