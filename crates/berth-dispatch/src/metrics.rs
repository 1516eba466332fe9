//! The dispatcher's Prometheus metrics, and the HTTP server that exposes
//! them at `GET /metrics` in the text exposition format 0.0.4.
//!
//! Every metric name starts with `berth_dispatch_`. The metrics carry
//! counts, states, durations and the names of the batch system's programs
//! (such as `sbatch`), and never a container UUID, a job id, a token or a
//! path, so scraping them reveals no user's work.
//!
//! The server has no authentication of its own unless
//! `dispatch.metrics_token_file` is set, so it belongs on a loopback or
//! private address.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use subtle::ConstantTimeEq;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bounds, in seconds, of the buckets of the call duration
/// histogram: from a fast `squeue` on an idle cluster (10 ms) to a command
/// near the default 60 s timeout.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The content type of the text exposition format.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The class of a failed call or submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FailureClass {
    /// Another try may succeed: a timeout, an unreachable or busy
    /// controller.
    Transient,
    /// Another try fails the same way: a rejected job, or a call that
    /// failed for a reason the dispatcher does not know to be transient.
    Permanent,
}

impl FailureClass {
    fn label(self) -> &'static str {
        match self {
            FailureClass::Transient => "transient",
            FailureClass::Permanent => "permanent",
        }
    }
}

/// Observations of one kind of call, such as every `sbatch`.
#[derive(Debug, Clone, Default)]
struct CallStats {
    /// Count per bucket of [`DURATION_BUCKETS`], not cumulative.
    buckets: Vec<u64>,
    count: u64,
    sum_seconds: f64,
    failures: BTreeMap<FailureClass, u64>,
}

#[derive(Debug, Default)]
struct MetricsState {
    /// Containers the dispatcher tracks or may lock, by state name.
    containers: BTreeMap<&'static str, u64>,
    /// The dispatcher's jobs in the latest snapshot, by job state.
    jobs: BTreeMap<String, u64>,
    submissions: u64,
    submit_failures: BTreeMap<FailureClass, u64>,
    /// Containers waiting out their own backoff before another submission.
    submit_backoffs: u64,
    calls: BTreeMap<String, CallStats>,
    /// The current global backoff delay; zero when calls flow.
    backoff: Duration,
}

/// The dispatcher's metrics, shared by the dispatch loop, the call
/// limiter and the metrics server.
#[derive(Debug, Default)]
pub struct Metrics {
    state: Mutex<MetricsState>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Arc::new(Metrics::default())
    }

    fn state(&self) -> MutexGuard<'_, MetricsState> {
        // A panic while holding the lock leaves plain numbers behind, which
        // are still fit to report.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sets the number of containers the dispatcher tracks or may lock, by
    /// state.
    pub fn set_containers(&self, queued: u64, locked: u64, running: u64) {
        let mut state = self.state();
        state.containers =
            BTreeMap::from([("Queued", queued), ("Locked", locked), ("Running", running)]);
    }

    /// Sets the number of the dispatcher's jobs in the latest snapshot of
    /// the batch system, by job state.
    pub fn set_jobs(&self, jobs: BTreeMap<String, u64>) {
        self.state().jobs = jobs;
    }

    /// Counts a successful submission.
    pub fn submitted(&self) {
        self.state().submissions += 1;
    }

    /// Counts a failed submission.
    pub fn submit_failed(&self, class: FailureClass) {
        *self.state().submit_failures.entry(class).or_default() += 1;
    }

    /// Sets the number of containers waiting out their own backoff.
    pub fn set_submit_backoffs(&self, containers: u64) {
        self.state().submit_backoffs = containers;
    }

    /// Records one call to the batch system: its program's name, such as
    /// `sbatch`, its duration, and its failure class if it failed.
    pub fn observe_call(&self, call: &str, duration: Duration, failure: Option<FailureClass>) {
        let mut state = self.state();
        let stats = state.calls.entry(call.to_string()).or_default();
        if stats.buckets.is_empty() {
            stats.buckets = vec![0; DURATION_BUCKETS.len()];
        }
        let seconds = duration.as_secs_f64();
        if let Some(index) = DURATION_BUCKETS.iter().position(|bound| seconds <= *bound) {
            stats.buckets[index] += 1;
        }
        stats.count += 1;
        stats.sum_seconds += seconds;
        if let Some(class) = failure {
            *stats.failures.entry(class).or_default() += 1;
        }
    }

    /// Sets the current global backoff delay of calls to the batch system.
    pub fn set_backoff(&self, delay: Duration) {
        self.state().backoff = delay;
    }

    /// Renders every metric in the text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let state = self.state();
        let mut out = String::new();

        header_lines(
            &mut out,
            "berth_dispatch_containers",
            "gauge",
            "Containers the dispatcher knows, by state: Queued with priority above 0, and Locked or Running by this dispatcher.",
        );
        for (name, count) in &state.containers {
            sample(
                &mut out,
                "berth_dispatch_containers",
                &[("state", name)],
                *count as f64,
            );
        }

        header_lines(
            &mut out,
            "berth_dispatch_batch_jobs",
            "gauge",
            "The dispatcher's jobs in the latest snapshot of the batch system, by job state.",
        );
        for (job_state, count) in &state.jobs {
            sample(
                &mut out,
                "berth_dispatch_batch_jobs",
                &[("state", job_state)],
                *count as f64,
            );
        }

        header_lines(
            &mut out,
            "berth_dispatch_submissions_total",
            "counter",
            "Jobs submitted to the batch system.",
        );
        sample(
            &mut out,
            "berth_dispatch_submissions_total",
            &[],
            state.submissions as f64,
        );

        header_lines(
            &mut out,
            "berth_dispatch_submit_failures_total",
            "counter",
            "Failed job submissions, by class: transient ones are tried again, permanent ones cancel the container.",
        );
        for class in [FailureClass::Transient, FailureClass::Permanent] {
            let count = state.submit_failures.get(&class).copied().unwrap_or(0);
            sample(
                &mut out,
                "berth_dispatch_submit_failures_total",
                &[("class", class.label())],
                count as f64,
            );
        }

        header_lines(
            &mut out,
            "berth_dispatch_submit_backoff_containers",
            "gauge",
            "Containers waiting out their own backoff after a failed submission.",
        );
        sample(
            &mut out,
            "berth_dispatch_submit_backoff_containers",
            &[],
            state.submit_backoffs as f64,
        );

        header_lines(
            &mut out,
            "berth_dispatch_scheduler_call_failures_total",
            "counter",
            "Calls to the batch system's programs that exited non-zero, timed out or could not start, by program and class. Some are expected, such as scancel of a job that has just ended.",
        );
        for (call, stats) in &state.calls {
            for class in [FailureClass::Transient, FailureClass::Permanent] {
                let count = stats.failures.get(&class).copied().unwrap_or(0);
                sample(
                    &mut out,
                    "berth_dispatch_scheduler_call_failures_total",
                    &[("call", call), ("class", class.label())],
                    count as f64,
                );
            }
        }

        header_lines(
            &mut out,
            "berth_dispatch_scheduler_call_duration_seconds",
            "histogram",
            "Duration of calls to the batch system's programs, by program.",
        );
        for (call, stats) in &state.calls {
            let mut cumulative = 0;
            for (bound, count) in DURATION_BUCKETS.iter().zip(&stats.buckets) {
                cumulative += count;
                let le = bound.to_string();
                sample(
                    &mut out,
                    "berth_dispatch_scheduler_call_duration_seconds_bucket",
                    &[("call", call), ("le", &le)],
                    cumulative as f64,
                );
            }
            sample(
                &mut out,
                "berth_dispatch_scheduler_call_duration_seconds_bucket",
                &[("call", call), ("le", "+Inf")],
                stats.count as f64,
            );
            sample(
                &mut out,
                "berth_dispatch_scheduler_call_duration_seconds_sum",
                &[("call", call)],
                stats.sum_seconds,
            );
            sample(
                &mut out,
                "berth_dispatch_scheduler_call_duration_seconds_count",
                &[("call", call)],
                stats.count as f64,
            );
        }

        header_lines(
            &mut out,
            "berth_dispatch_scheduler_backoff_seconds",
            "gauge",
            "Current global backoff delay of calls to the batch system; 0 while calls flow.",
        );
        sample(
            &mut out,
            "berth_dispatch_scheduler_backoff_seconds",
            &[],
            state.backoff.as_secs_f64(),
        );
        out
    }
}

fn header_lines(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) {
    out.push_str(name);
    if !labels.is_empty() {
        out.push('{');
        for (index, (label, value)) in labels.iter().enumerate() {
            if index > 0 {
                out.push(',');
            }
            let _ = write!(out, "{label}=\"{}\"", escape_label(value));
        }
        out.push('}');
    }
    let _ = writeln!(out, " {value}");
}

/// Escapes a label value as the text format requires: backslash, double
/// quote and line feed.
fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Failure to start the metrics server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("failed to listen on {addr} (configuration key dispatch.metrics_listen): {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read the metrics token file {path} (configuration key dispatch.metrics_token_file): {source}")]
    TokenFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the metrics token file {path} (configuration key dispatch.metrics_token_file) is empty: write a token into it, or unset the key")]
    EmptyToken { path: String },
}

/// Reads the bearer token that scrapers must send, from a file that holds
/// it on its first line.
pub fn read_token_file(path: &Path) -> Result<String, ServeError> {
    let text = std::fs::read_to_string(path).map_err(|source| ServeError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.is_empty() {
        return Err(ServeError::EmptyToken {
            path: path.display().to_string(),
        });
    }
    Ok(token)
}

#[derive(Debug, Clone)]
struct ServerState {
    metrics: Arc<Metrics>,
    token: Option<Arc<str>>,
}

/// Listens on `addr` and serves `GET /metrics` until `shutdown` fires.
/// With `token`, a scrape must send `Authorization: Bearer <token>`.
/// Returns the bound address (useful with port 0) and the server task.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    token: Option<String>,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, JoinHandle<()>), ServeError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { addr, source })?;
    if token.is_none() && !bound.ip().is_loopback() {
        tracing::warn!(addr = %bound, "the metrics endpoint has no authentication and listens on a non-loopback address: keep it on a private network, or set dispatch.metrics_token_file");
    }
    let state = ServerState {
        metrics,
        token: token.map(Arc::from),
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(state);
    tracing::info!("metrics listening on {bound}");
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(err) = served {
            tracing::error!(error = %err, "the metrics server failed");
        }
    });
    Ok((bound, task))
}

async fn scrape(State(state): State<ServerState>, headers: HeaderMap) -> Response {
    if let Some(expected) = &state.token {
        if !bearer_matches(&headers, expected) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response();
        }
    }
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        state.metrics.render(),
    )
        .into_response()
}

/// True when the request's bearer token equals `expected`, compared in
/// constant time.
fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
    else {
        return false;
    };
    let Some(given) = value.strip_prefix("Bearer ") else {
        return false;
    };
    given.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_counts_and_histogram() {
        let metrics = Metrics::new();
        metrics.submitted();
        metrics.submit_failed(FailureClass::Transient);
        metrics.observe_call("sbatch", Duration::from_millis(30), None);
        metrics.observe_call(
            "sbatch",
            Duration::from_secs(3),
            Some(FailureClass::Transient),
        );
        metrics.set_backoff(Duration::from_secs(4));
        metrics.set_containers(3, 2, 1);
        let text = metrics.render();
        assert!(
            text.contains("berth_dispatch_submissions_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_dispatch_submit_failures_total{class=\"transient\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_dispatch_submit_failures_total{class=\"permanent\"} 0\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_dispatch_scheduler_call_duration_seconds_bucket{call=\"sbatch\",le=\"0.05\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_dispatch_scheduler_call_duration_seconds_bucket{call=\"sbatch\",le=\"5\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "berth_dispatch_scheduler_call_duration_seconds_count{call=\"sbatch\"} 2\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("berth_dispatch_scheduler_call_failures_total{call=\"sbatch\",class=\"transient\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_dispatch_scheduler_backoff_seconds 4\n"),
            "{text}"
        );
        assert!(
            text.contains("berth_dispatch_containers{state=\"Locked\"} 2\n"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[tokio::test]
    async fn token_checked_on_scrape() {
        let metrics = Metrics::new();
        let shutdown = CancellationToken::new();
        let (addr, task) = serve(
            "127.0.0.1:0".parse().unwrap(),
            Arc::clone(&metrics),
            Some("s3cret".into()),
            shutdown.clone(),
        )
        .await
        .unwrap();
        let url = format!("http://{addr}/metrics");
        let client = reqwest::Client::new();
        let anonymous = client.get(&url).send().await.unwrap();
        assert_eq!(anonymous.status(), 401);
        let wrong = client.get(&url).bearer_auth("s3creT").send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let right = client.get(&url).bearer_auth("s3cret").send().await.unwrap();
        assert_eq!(right.status(), 200);
        assert_eq!(right.headers()[header::CONTENT_TYPE.as_str()], CONTENT_TYPE);
        let body = right.text().await.unwrap();
        assert!(
            body.contains("berth_dispatch_submissions_total 0"),
            "{body}"
        );
        shutdown.cancel();
        task.await.unwrap();
    }

    #[test]
    fn token_file_first_line_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "  abc \nignored\n").unwrap();
        assert_eq!(read_token_file(&path).unwrap(), "abc");
        std::fs::write(&path, "\n").unwrap();
        let err = read_token_file(&path).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
    }
}
