//! Request limits: every request takes a slot in one of four pools before
//! its handler runs, so no kind of traffic can starve another.
//!
//! - `api`: ordinary requests. At most `max_concurrent_requests` run at
//!   once; up to `max_queued_requests` more wait in a queue, each at most
//!   `queue_timeout_seconds`. The dispatcher's lock and unlock calls are
//!   served from the queue before every other request, so a busy API does
//!   not stall dispatching. When the queue is full, a new request of higher
//!   priority takes the place of the newest queued request of the lowest
//!   priority, which fails.
//! - `wait`: reads that may wait for a change (`wait` greater than 0 on the
//!   change feed or a log read). They sit idle for up to 30 s, so they
//!   have a pool of their own without a queue.
//! - `tunnel`: supervisors' gateway tunnels, held for a container's whole
//!   run.
//! - `shell`: users' shell and port-forward connections, held for the
//!   session.
//!
//! The `wait`, `tunnel` and `shell` pools have no queue: a request finds a
//! free slot or fails at once. A request that fails for a limit gets 503
//! with `Retry-After`. The health check and `/metrics` take no slot.
//!
//! A slot is held until the response is returned, or, for a connection
//! that upgrades (a tunnel or a shell), for as long as the upgraded
//! connection lives: the handler moves the request's [`HeldSlot`] into the
//! connection's task.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::oneshot;

/// Default values of the `controller.limits` keys.
pub mod defaults {
    /// Ordinary requests that run at once.
    pub const MAX_CONCURRENT_REQUESTS: usize = 64;
    /// Ordinary requests that may wait for a slot.
    pub const MAX_QUEUED_REQUESTS: usize = 128;
    /// Seconds an ordinary request may wait for a slot.
    pub const QUEUE_TIMEOUT_SECONDS: u64 = 10;
    /// Reads that wait for a change, at once.
    pub const MAX_WAITING_REQUESTS: usize = 1024;
    /// Gateway tunnels held at once.
    pub const MAX_TUNNELS: usize = 10_000;
    /// Shell and port-forward connections held at once.
    pub const MAX_SHELL_SESSIONS: usize = 1000;
    /// Seconds a client that got 503 should wait before it tries again.
    pub const RETRY_AFTER_SECONDS: u64 = 2;

    pub(super) fn max_concurrent_requests() -> usize {
        MAX_CONCURRENT_REQUESTS
    }
    pub(super) fn max_queued_requests() -> usize {
        MAX_QUEUED_REQUESTS
    }
    pub(super) fn queue_timeout_seconds() -> u64 {
        QUEUE_TIMEOUT_SECONDS
    }
    pub(super) fn max_waiting_requests() -> usize {
        MAX_WAITING_REQUESTS
    }
    pub(super) fn max_tunnels() -> usize {
        MAX_TUNNELS
    }
    pub(super) fn max_shell_sessions() -> usize {
        MAX_SHELL_SESSIONS
    }
    pub(super) fn retry_after_seconds() -> u64 {
        RETRY_AFTER_SECONDS
    }
}

/// The `controller.limits` section. `max_tunnels` or `max_shell_sessions`
/// set to 0 turns tunnels or shells off: every such request fails with
/// 503.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Ordinary API requests that run at once, at least 1. Default 64.
    #[serde(default = "defaults::max_concurrent_requests")]
    pub max_concurrent_requests: usize,
    /// Ordinary API requests that may wait for a slot; one more fails with
    /// 503. Default 128.
    #[serde(default = "defaults::max_queued_requests")]
    pub max_queued_requests: usize,
    /// Seconds an ordinary request may wait for a slot before it fails
    /// with 503, at least 1. Default 10.
    #[serde(default = "defaults::queue_timeout_seconds")]
    pub queue_timeout_seconds: u64,
    /// Change-feed and log reads with a `wait` that run at once, at least
    /// 1. Default 1024.
    #[serde(default = "defaults::max_waiting_requests")]
    pub max_waiting_requests: usize,
    /// Supervisors' gateway tunnels held at once: one per running
    /// container that uses this controller. Default 10000.
    #[serde(default = "defaults::max_tunnels")]
    pub max_tunnels: usize,
    /// Users' shell and port-forward connections held at once. Default
    /// 1000.
    #[serde(default = "defaults::max_shell_sessions")]
    pub max_shell_sessions: usize,
    /// Seconds sent in the `Retry-After` header of a 503 for a limit.
    /// Default 2.
    #[serde(default = "defaults::retry_after_seconds")]
    pub retry_after_seconds: u64,
}

impl Default for LimitsConfig {
    fn default() -> LimitsConfig {
        LimitsConfig {
            max_concurrent_requests: defaults::MAX_CONCURRENT_REQUESTS,
            max_queued_requests: defaults::MAX_QUEUED_REQUESTS,
            queue_timeout_seconds: defaults::QUEUE_TIMEOUT_SECONDS,
            max_waiting_requests: defaults::MAX_WAITING_REQUESTS,
            max_tunnels: defaults::MAX_TUNNELS,
            max_shell_sessions: defaults::MAX_SHELL_SESSIONS,
            retry_after_seconds: defaults::RETRY_AFTER_SECONDS,
        }
    }
}

/// The pool a request takes its slot from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Pool {
    Api,
    Wait,
    Tunnel,
    Shell,
}

impl Pool {
    const ALL: [Pool; 4] = [Pool::Api, Pool::Wait, Pool::Tunnel, Pool::Shell];

    pub fn label(self) -> &'static str {
        match self {
            Pool::Api => "api",
            Pool::Wait => "wait",
            Pool::Tunnel => "tunnel",
            Pool::Shell => "shell",
        }
    }
}

/// The order in which queued ordinary requests get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Normal,
    /// The dispatcher's lock and unlock calls.
    Dispatch,
}

impl Priority {
    fn label(self) -> &'static str {
        match self {
            Priority::Normal => "normal",
            Priority::Dispatch => "dispatch",
        }
    }
}

/// Where a request goes: a pool with a priority, or past every limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Pool(Pool, Priority),
    Unlimited,
}

/// Sorts a request into its pool by method, path and query alone, before
/// any authentication, so the check costs no database read.
pub fn classify(method: &Method, path: &str, query: Option<&str>) -> Admission {
    if path == "/_health/ping" || path == "/metrics" {
        return Admission::Unlimited;
    }
    let normal = Admission::Pool(Pool::Api, Priority::Normal);
    let Some(rest) = path.strip_prefix("/arvados/v1/") else {
        return normal;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        ["connect", _, "gateway_tunnel"] => Admission::Pool(Pool::Tunnel, Priority::Normal),
        ["connect", _, "ssh"] => Admission::Pool(Pool::Shell, Priority::Normal),
        ["containers", _, "lock" | "unlock"] if method == Method::POST => {
            Admission::Pool(Pool::Api, Priority::Dispatch)
        }
        ["containers", "changes"] | ["containers", _, "log", _]
            if method == Method::GET && waits(query) =>
        {
            Admission::Pool(Pool::Wait, Priority::Normal)
        }
        _ => normal,
    }
}

/// True when the query has a `wait` other than 0. A value that does not
/// parse counts as a wait: the handler rejects it anyway.
fn waits(query: Option<&str>) -> bool {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|pair| pair.strip_prefix("wait="))
        .any(|value| !value.trim_start_matches('0').is_empty())
}

/// Why a request got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rejection {
    /// Every slot of a pool without a queue was taken.
    PoolFull,
    /// The queue was full, or a request of higher priority took the place.
    QueueFull,
    /// The request waited `queue_timeout_seconds` without a slot.
    QueueTimeout,
}

impl Rejection {
    fn label(self) -> &'static str {
        match self {
            Rejection::PoolFull => "pool_full",
            Rejection::QueueFull => "queue_full",
            Rejection::QueueTimeout => "queue_timeout",
        }
    }
}

/// A slot of a pool, given back when the last clone is dropped.
///
/// Inserted into each limited request's extensions, so a handler that
/// upgrades the connection can keep the slot for the connection's life.
#[derive(Clone)]
pub struct HeldSlot(#[allow(dead_code)] Arc<Slot>);

impl fmt::Debug for HeldSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HeldSlot").field(&self.0.pool()).finish()
    }
}

enum Slot {
    Api(Arc<ApiQueue>),
    Counted(Arc<CountedPool>),
}

impl Slot {
    fn pool(&self) -> Pool {
        match self {
            Slot::Api(_) => Pool::Api,
            Slot::Counted(pool) => pool.pool,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        match self {
            Slot::Api(queue) => queue.release(),
            Slot::Counted(pool) => {
                pool.in_use.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

/// A pool without a queue: a counter and its maximum.
#[derive(Debug)]
struct CountedPool {
    pool: Pool,
    max: usize,
    in_use: AtomicUsize,
}

impl CountedPool {
    fn new(pool: Pool, max: usize) -> CountedPool {
        CountedPool {
            pool,
            max,
            in_use: AtomicUsize::new(0),
        }
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.in_use
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.max).then_some(used + 1)
            })
            .ok()
            .map(|_| Slot::Counted(self.clone()))
    }
}

/// The ordinary requests' pool and its priority queue.
#[derive(Debug)]
struct ApiQueue {
    max_concurrent: usize,
    max_queued: usize,
    timeout: Duration,
    state: Mutex<QueueState>,
    /// Requests that waited in the queue, and their total wait.
    waited: AtomicU64,
    waited_micros: AtomicU64,
}

#[derive(Debug, Default)]
struct QueueState {
    running: usize,
    next_ticket: u64,
    /// Waiting requests by priority and ticket: the last entry is served
    /// first, and the first entry is evicted first.
    waiting: BTreeMap<(Priority, Ticket), oneshot::Sender<()>>,
}

/// A queued request's place: an earlier ticket sorts higher, so that the
/// greatest key of the map is the oldest request of the highest priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ticket(u64);

impl PartialOrd for Ticket {
    fn partial_cmp(&self, other: &Ticket) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ticket {
    fn cmp(&self, other: &Ticket) -> std::cmp::Ordering {
        other.0.cmp(&self.0)
    }
}

impl ApiQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn acquire(self: &Arc<Self>, priority: Priority) -> Result<Slot, Rejection> {
        let mut waiter = {
            let mut state = self.lock();
            if state.running < self.max_concurrent && state.waiting.is_empty() {
                state.running += 1;
                return Ok(Slot::Api(self.clone()));
            }
            if state.waiting.len() >= self.max_queued {
                // The newest request of the lowest priority leaves the queue
                // for a request of higher priority; otherwise the new one
                // fails.
                match state.waiting.keys().next().copied() {
                    // Dropping its sender fails the evicted request.
                    Some(lowest) if lowest.0 < priority => {
                        state.waiting.remove(&lowest);
                    }
                    _ => return Err(Rejection::QueueFull),
                }
            }
            let ticket = Ticket(state.next_ticket);
            state.next_ticket += 1;
            let (sender, receiver) = oneshot::channel();
            state.waiting.insert((priority, ticket), sender);
            Waiter {
                queue: self.clone(),
                key: (priority, ticket),
                receiver,
                settled: false,
            }
        };

        let queued_at = Instant::now();
        let outcome = tokio::time::timeout(self.timeout, &mut waiter.receiver).await;
        self.waited.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(queued_at.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.waited_micros.fetch_add(micros, Ordering::Relaxed);
        waiter.settled = true;
        match outcome {
            // The releasing request handed its slot over: `running` already
            // counts this one.
            Ok(Ok(())) => Ok(Slot::Api(self.clone())),
            Ok(Err(_)) => Err(Rejection::QueueFull),
            Err(_) => {
                if waiter.leave() {
                    Ok(Slot::Api(self.clone()))
                } else {
                    Err(Rejection::QueueTimeout)
                }
            }
        }
    }

    /// Hands a finished request's slot to the first waiting request that
    /// is still there, or frees it.
    fn release(&self) {
        let mut state = self.lock();
        while let Some((_, sender)) = state.waiting.pop_last() {
            if sender.send(()).is_ok() {
                return;
            }
        }
        state.running = state.running.saturating_sub(1);
    }

    fn snapshot(&self) -> (usize, BTreeMap<Priority, usize>) {
        let state = self.lock();
        let mut queued = BTreeMap::new();
        for (priority, _) in state.waiting.keys() {
            *queued.entry(*priority).or_insert(0) += 1;
        }
        (state.running, queued)
    }
}

/// A request in the queue. Dropped before it settles (its client went
/// away), it leaves the queue, and gives back a slot handed to it in the
/// meantime.
struct Waiter {
    queue: Arc<ApiQueue>,
    key: (Priority, Ticket),
    receiver: oneshot::Receiver<()>,
    settled: bool,
}

impl Waiter {
    /// Leaves the queue. Returns true when a slot was handed over first.
    fn leave(&mut self) -> bool {
        // `release` sends while it holds the lock, so once this lock is
        // taken, an entry gone from the map has its slot in the receiver.
        let removed = self.queue.lock().waiting.remove(&self.key).is_some();
        !removed && self.receiver.try_recv().is_ok()
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if !self.settled && self.leave() {
            self.queue.release();
        }
    }
}

/// The controller's four pools, and counts of what they rejected.
#[derive(Debug)]
pub struct RequestLimits {
    api: Arc<ApiQueue>,
    wait: Arc<CountedPool>,
    tunnel: Arc<CountedPool>,
    shell: Arc<CountedPool>,
    retry_after: HeaderValue,
    rejected: Mutex<BTreeMap<(Pool, Rejection), u64>>,
}

impl RequestLimits {
    pub fn new(config: &LimitsConfig) -> RequestLimits {
        RequestLimits {
            api: Arc::new(ApiQueue {
                max_concurrent: config.max_concurrent_requests,
                max_queued: config.max_queued_requests,
                timeout: Duration::from_secs(config.queue_timeout_seconds),
                state: Mutex::new(QueueState::default()),
                waited: AtomicU64::new(0),
                waited_micros: AtomicU64::new(0),
            }),
            wait: Arc::new(CountedPool::new(Pool::Wait, config.max_waiting_requests)),
            tunnel: Arc::new(CountedPool::new(Pool::Tunnel, config.max_tunnels)),
            shell: Arc::new(CountedPool::new(Pool::Shell, config.max_shell_sessions)),
            retry_after: HeaderValue::from(config.retry_after_seconds),
            rejected: Mutex::new(BTreeMap::new()),
        }
    }

    /// Takes a slot of `pool`, waiting in the queue for an ordinary
    /// request.
    pub async fn acquire(&self, pool: Pool, priority: Priority) -> Result<HeldSlot, Rejection> {
        let slot = match pool {
            Pool::Api => self.api.acquire(priority).await,
            Pool::Wait => self.wait.try_acquire().ok_or(Rejection::PoolFull),
            Pool::Tunnel => self.tunnel.try_acquire().ok_or(Rejection::PoolFull),
            Pool::Shell => self.shell.try_acquire().ok_or(Rejection::PoolFull),
        };
        match slot {
            Ok(slot) => Ok(HeldSlot(Arc::new(slot))),
            Err(rejection) => {
                *self
                    .rejected
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .entry((pool, rejection))
                    .or_insert(0) += 1;
                Err(rejection)
            }
        }
    }

    /// Returns the slots in use in a pool.
    pub fn in_use(&self, pool: Pool) -> usize {
        match pool {
            Pool::Api => self.api.snapshot().0,
            Pool::Wait => self.wait.in_use.load(Ordering::Acquire),
            Pool::Tunnel => self.tunnel.in_use.load(Ordering::Acquire),
            Pool::Shell => self.shell.in_use.load(Ordering::Acquire),
        }
    }

    fn max(&self, pool: Pool) -> usize {
        match pool {
            Pool::Api => self.api.max_concurrent,
            Pool::Wait => self.wait.max,
            Pool::Tunnel => self.tunnel.max,
            Pool::Shell => self.shell.max,
        }
    }

    /// Writes the limits and their use in Prometheus's text format.
    pub fn render_metrics(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP berth_requests_in_use Requests holding a slot, by pool."
        );
        let _ = writeln!(out, "# TYPE berth_requests_in_use gauge");
        for pool in Pool::ALL {
            let _ = writeln!(
                out,
                "berth_requests_in_use{{pool=\"{}\"}} {}",
                pool.label(),
                self.in_use(pool)
            );
        }
        let _ = writeln!(
            out,
            "# HELP berth_requests_max_in_use The slots of each pool."
        );
        let _ = writeln!(out, "# TYPE berth_requests_max_in_use gauge");
        for pool in Pool::ALL {
            let _ = writeln!(
                out,
                "berth_requests_max_in_use{{pool=\"{}\"}} {}",
                pool.label(),
                self.max(pool)
            );
        }

        let (_, queued) = self.api.snapshot();
        let _ = writeln!(
            out,
            "# HELP berth_requests_queued Ordinary requests waiting for a slot, by priority."
        );
        let _ = writeln!(out, "# TYPE berth_requests_queued gauge");
        for priority in [Priority::Normal, Priority::Dispatch] {
            let _ = writeln!(
                out,
                "berth_requests_queued{{pool=\"api\",priority=\"{}\"}} {}",
                priority.label(),
                queued.get(&priority).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP berth_requests_max_queued Ordinary requests that may wait for a slot."
        );
        let _ = writeln!(out, "# TYPE berth_requests_max_queued gauge");
        let _ = writeln!(
            out,
            "berth_requests_max_queued{{pool=\"api\"}} {}",
            self.api.max_queued
        );
        let _ = writeln!(
            out,
            "# HELP berth_requests_queue_wait_seconds Time ordinary requests spent in the queue."
        );
        let _ = writeln!(out, "# TYPE berth_requests_queue_wait_seconds summary");
        let micros = self.api.waited_micros.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "berth_requests_queue_wait_seconds_sum{{pool=\"api\"}} {}",
            micros as f64 / 1e6
        );
        let _ = writeln!(
            out,
            "berth_requests_queue_wait_seconds_count{{pool=\"api\"}} {}",
            self.api.waited.load(Ordering::Relaxed)
        );

        let _ = writeln!(
            out,
            "# HELP berth_requests_rejected_total Requests that failed with 503 for a limit."
        );
        let _ = writeln!(out, "# TYPE berth_requests_rejected_total counter");
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for ((pool, reason), count) in rejected {
            let _ = writeln!(
                out,
                "berth_requests_rejected_total{{pool=\"{}\",reason=\"{}\"}} {count}",
                pool.label(),
                reason.label()
            );
        }
    }

    fn rejection_response(&self, pool: Pool, rejection: Rejection) -> Response {
        let message = match rejection {
            Rejection::PoolFull => format!(
                "the controller is at its limit of {} {} connections; try again later",
                self.max(pool),
                pool.label()
            ),
            Rejection::QueueFull => {
                "the controller is busy and its request queue is full; try again later".to_string()
            }
            Rejection::QueueTimeout => {
                "the controller is busy: the request waited too long for a slot; try again later"
                    .to_string()
            }
        };
        let mut response = (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "errors": [message] })),
        )
            .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, self.retry_after.clone());
        response
    }
}

/// Middleware: takes the request's slot before the rest of the stack runs,
/// or answers 503 with `Retry-After`.
pub async fn admit(
    State(limits): State<Arc<RequestLimits>>,
    mut request: Request<Body>,
    next: Next,
) -> Response {
    let admission = classify(
        request.method(),
        request.uri().path(),
        request.uri().query(),
    );
    let Admission::Pool(pool, priority) = admission else {
        return next.run(request).await;
    };
    match limits.acquire(pool, priority).await {
        Ok(slot) => {
            request.extensions_mut().insert(slot.clone());
            let response = next.run(request).await;
            drop(slot);
            response
        }
        Err(rejection) => {
            tracing::warn!(
                pool = pool.label(),
                reason = rejection.label(),
                "request rejected for a limit"
            );
            limits.rejection_response(pool, rejection)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_concurrent: usize, max_queued: usize) -> LimitsConfig {
        LimitsConfig {
            max_concurrent_requests: max_concurrent,
            max_queued_requests: max_queued,
            queue_timeout_seconds: 5,
            max_waiting_requests: 2,
            max_tunnels: 3,
            max_shell_sessions: 1,
            retry_after_seconds: 2,
        }
    }

    #[test]
    fn classify_sorts_requests_into_pools() {
        let cases = [
            (Method::GET, "/_health/ping", None, Admission::Unlimited),
            (Method::GET, "/metrics", None, Admission::Unlimited),
            (
                Method::POST,
                "/arvados/v1/connect/zzzzz-dz642-000000000000001/gateway_tunnel",
                None,
                Admission::Pool(Pool::Tunnel, Priority::Normal),
            ),
            (
                Method::GET,
                "/arvados/v1/connect/zzzzz-dz642-000000000000001/ssh",
                None,
                Admission::Pool(Pool::Shell, Priority::Normal),
            ),
            (
                Method::POST,
                "/arvados/v1/containers/zzzzz-dz642-000000000000001/lock",
                None,
                Admission::Pool(Pool::Api, Priority::Dispatch),
            ),
            (
                Method::POST,
                "/arvados/v1/containers/zzzzz-dz642-000000000000001/unlock",
                None,
                Admission::Pool(Pool::Api, Priority::Dispatch),
            ),
            (
                Method::GET,
                "/arvados/v1/containers/zzzzz-dz642-000000000000001/lock",
                None,
                Admission::Pool(Pool::Api, Priority::Normal),
            ),
            (
                Method::GET,
                "/arvados/v1/containers/changes",
                Some("after=3&wait=30"),
                Admission::Pool(Pool::Wait, Priority::Normal),
            ),
            (
                Method::GET,
                "/arvados/v1/containers/changes",
                Some("after=3&wait=0"),
                Admission::Pool(Pool::Api, Priority::Normal),
            ),
            (
                Method::GET,
                "/arvados/v1/containers/zzzzz-dz642-000000000000001/log/stdout",
                Some("offset=0&wait=10"),
                Admission::Pool(Pool::Wait, Priority::Normal),
            ),
            (
                Method::POST,
                "/arvados/v1/containers/zzzzz-dz642-000000000000001/log/stdout",
                Some("wait=10"),
                Admission::Pool(Pool::Api, Priority::Normal),
            ),
            (
                Method::GET,
                "/arvados/v1/container_requests",
                None,
                Admission::Pool(Pool::Api, Priority::Normal),
            ),
        ];
        for (method, path, query, expected) in cases {
            assert_eq!(
                classify(&method, path, query),
                expected,
                "{method} {path}?{query:?}"
            );
        }
    }

    #[tokio::test]
    async fn counted_pool_rejects_at_its_maximum() {
        let limits = RequestLimits::new(&config(1, 1));
        let first = limits.acquire(Pool::Tunnel, Priority::Normal).await;
        let second = limits.acquire(Pool::Tunnel, Priority::Normal).await;
        let third = limits.acquire(Pool::Tunnel, Priority::Normal).await;
        let fourth = limits.acquire(Pool::Tunnel, Priority::Normal).await;
        assert!(first.is_ok());
        assert!(second.is_ok());
        assert!(third.is_ok());
        assert_eq!(fourth.unwrap_err(), Rejection::PoolFull);
        assert_eq!(limits.in_use(Pool::Tunnel), 3);

        drop(first);
        assert_eq!(limits.in_use(Pool::Tunnel), 2);
        assert!(limits.acquire(Pool::Tunnel, Priority::Normal).await.is_ok());
    }

    #[tokio::test]
    async fn tunnels_take_no_api_slot() {
        let limits = RequestLimits::new(&config(1, 0));
        let _tunnels = [
            limits
                .acquire(Pool::Tunnel, Priority::Normal)
                .await
                .unwrap(),
            limits
                .acquire(Pool::Tunnel, Priority::Normal)
                .await
                .unwrap(),
        ];
        let _shell = limits.acquire(Pool::Shell, Priority::Normal).await.unwrap();
        assert!(limits.acquire(Pool::Api, Priority::Normal).await.is_ok());
    }

    #[tokio::test]
    async fn held_slot_clone_keeps_the_slot() {
        let limits = RequestLimits::new(&config(1, 1));
        let slot = limits.acquire(Pool::Shell, Priority::Normal).await.unwrap();
        let kept = slot.clone();
        drop(slot);
        assert_eq!(limits.in_use(Pool::Shell), 1);
        drop(kept);
        assert_eq!(limits.in_use(Pool::Shell), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_gets_the_freed_slot() {
        let limits = Arc::new(RequestLimits::new(&config(1, 4)));
        let running = limits.acquire(Pool::Api, Priority::Normal).await.unwrap();
        let waiting = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(Pool::Api, Priority::Normal).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(limits.api.snapshot().1.get(&Priority::Normal), Some(&1));

        drop(running);
        let slot = waiting.await.unwrap();
        assert!(slot.is_ok());
        assert_eq!(limits.in_use(Pool::Api), 1);
        drop(slot);
        assert_eq!(limits.in_use(Pool::Api), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dispatch_calls_go_first() {
        let limits = Arc::new(RequestLimits::new(&config(1, 4)));
        let running = limits.acquire(Pool::Api, Priority::Normal).await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, priority) in [
            ("normal-1", Priority::Normal),
            ("normal-2", Priority::Normal),
            ("lock", Priority::Dispatch),
        ] {
            let limits = limits.clone();
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let slot = limits.acquire(Pool::Api, priority).await.unwrap();
                order.lock().unwrap().push(name);
                tokio::task::yield_now().await;
                drop(slot);
            }));
            tokio::task::yield_now().await;
        }

        drop(running);
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec!["lock", "normal-1", "normal-2"]);
    }

    #[tokio::test(start_paused = true)]
    async fn full_queue_rejects_or_evicts_by_priority() {
        let limits = Arc::new(RequestLimits::new(&config(1, 1)));
        let _running = limits.acquire(Pool::Api, Priority::Normal).await.unwrap();
        let queued = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(Pool::Api, Priority::Normal).await })
        };
        tokio::task::yield_now().await;

        let same_priority = limits.acquire(Pool::Api, Priority::Normal).await;
        assert_eq!(same_priority.unwrap_err(), Rejection::QueueFull);

        let lock = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(Pool::Api, Priority::Dispatch).await })
        };
        tokio::task::yield_now().await;
        let evicted = queued.await.unwrap();
        assert_eq!(evicted.unwrap_err(), Rejection::QueueFull);
        assert_eq!(limits.api.snapshot().1.get(&Priority::Dispatch), Some(&1));
        lock.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn queued_request_times_out() {
        let limits = Arc::new(RequestLimits::new(&config(1, 4)));
        let _running = limits.acquire(Pool::Api, Priority::Normal).await.unwrap();
        let started = tokio::time::Instant::now();
        let waited = limits.acquire(Pool::Api, Priority::Normal).await;
        assert_eq!(waited.unwrap_err(), Rejection::QueueTimeout);
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert!(limits.api.snapshot().1.is_empty());
        assert_eq!(limits.in_use(Pool::Api), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn abandoned_waiter_does_not_leak_the_slot() {
        let limits = Arc::new(RequestLimits::new(&config(1, 4)));
        let running = limits.acquire(Pool::Api, Priority::Normal).await.unwrap();
        let abandoned = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.acquire(Pool::Api, Priority::Normal).await })
        };
        tokio::task::yield_now().await;
        // A client that disconnects drops its request's future.
        abandoned.abort();
        let _ = abandoned.await;

        drop(running);
        assert_eq!(limits.in_use(Pool::Api), 0);
        assert!(limits.acquire(Pool::Api, Priority::Normal).await.is_ok());
    }

    #[tokio::test]
    async fn zero_limit_turns_a_pool_off() {
        let mut settings = config(0, 0);
        settings.max_tunnels = 0;
        let limits = RequestLimits::new(&settings);
        let tunnel = limits.acquire(Pool::Tunnel, Priority::Normal).await;
        assert_eq!(tunnel.unwrap_err(), Rejection::PoolFull);
        let api = limits.acquire(Pool::Api, Priority::Normal).await;
        assert_eq!(api.unwrap_err(), Rejection::QueueFull);
    }

    #[tokio::test]
    async fn metrics_show_use_and_rejections() {
        let limits = RequestLimits::new(&config(2, 1));
        let _slot = limits
            .acquire(Pool::Tunnel, Priority::Normal)
            .await
            .unwrap();
        let _shell = limits.acquire(Pool::Shell, Priority::Normal).await.unwrap();
        let _ = limits.acquire(Pool::Shell, Priority::Normal).await;

        let mut text = String::new();
        limits.render_metrics(&mut text);
        assert!(text.contains("berth_requests_in_use{pool=\"tunnel\"} 1\n"));
        assert!(text.contains("berth_requests_max_in_use{pool=\"tunnel\"} 3\n"));
        assert!(text.contains("berth_requests_max_in_use{pool=\"api\"} 2\n"));
        assert!(text.contains("berth_requests_max_queued{pool=\"api\"} 1\n"));
        assert!(
            text.contains("berth_requests_rejected_total{pool=\"shell\",reason=\"pool_full\"} 1\n")
        );
    }
}
