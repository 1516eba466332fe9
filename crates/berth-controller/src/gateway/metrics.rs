//! Counters of the gateway, rendered in Prometheus's text format next to
//! the request limits on `GET /metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Tunnels, streams, forwards and failures since the controller started.
#[derive(Debug, Default)]
pub struct GatewayMetrics {
    tunnels_accepted: AtomicU64,
    tunnels_replaced: AtomicU64,
    streams_opened: AtomicU64,
    forwards: AtomicU64,
    spliced: AtomicU64,
    sessions_open: AtomicU64,
    failures: Mutex<BTreeMap<&'static str, u64>>,
}

impl GatewayMetrics {
    pub(crate) fn count_tunnel(&self) {
        self.tunnels_accepted.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_replaced(&self) {
        self.tunnels_replaced.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_stream(&self) {
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_forward(&self) {
        self.forwards.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_spliced(&self) {
        self.spliced.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn session_started(&self) {
        self.sessions_open.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn session_ended(&self) {
        self.sessions_open.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts a failure of kind `reason`, a fixed label such as
    /// `tunnel_auth` or `no_tunnel`.
    pub(crate) fn count_failure(&self, reason: &'static str) {
        *self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(reason)
            .or_insert(0) += 1;
    }

    /// Returns the number of registered tunnels that a newer tunnel of the
    /// same container replaced.
    pub fn replaced(&self) -> u64 {
        self.tunnels_replaced.load(Ordering::Relaxed)
    }

    /// Returns the number of forwarded shell sessions that splice(2)
    /// carried.
    pub fn spliced_sessions(&self) -> u64 {
        self.spliced.load(Ordering::Relaxed)
    }

    /// Returns the count of failures of kind `reason`.
    pub fn failures(&self, reason: &str) -> u64 {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(reason)
            .copied()
            .unwrap_or(0)
    }

    /// Writes the metrics; `tunnels` is the number registered now.
    pub fn render(&self, tunnels: usize, out: &mut String) {
        let series = [
            (
                "berth_gateway_tunnels",
                "gauge",
                "Gateway tunnels registered on this controller.",
                tunnels as u64,
            ),
            (
                "berth_gateway_shell_sessions",
                "gauge",
                "Shell sessions open through this controller.",
                self.sessions_open.load(Ordering::Relaxed),
            ),
            (
                "berth_gateway_tunnels_accepted_total",
                "counter",
                "Gateway tunnels accepted and registered.",
                self.tunnels_accepted.load(Ordering::Relaxed),
            ),
            (
                "berth_gateway_tunnels_replaced_total",
                "counter",
                "Registered tunnels replaced by a newer tunnel of the same container.",
                self.tunnels_replaced.load(Ordering::Relaxed),
            ),
            (
                "berth_gateway_streams_opened_total",
                "counter",
                "Streams opened through tunnels held here.",
                self.streams_opened.load(Ordering::Relaxed),
            ),
            (
                "berth_gateway_forwards_total",
                "counter",
                "Shell requests forwarded to the controller that holds the tunnel.",
                self.forwards.load(Ordering::Relaxed),
            ),
            (
                "berth_gateway_spliced_sessions_total",
                "counter",
                "Forwarded shell sessions whose bytes splice(2) moves between two plain TCP sockets.",
                self.spliced.load(Ordering::Relaxed),
            ),
        ];
        for (name, kind, help, value) in series {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            let _ = writeln!(out, "{name} {value}");
        }
        let _ = writeln!(
            out,
            "# HELP berth_gateway_failures_total Failed tunnels, streams and forwards, by reason."
        );
        let _ = writeln!(out, "# TYPE berth_gateway_failures_total counter");
        let failures = self
            .failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for (reason, count) in failures {
            let _ = writeln!(
                out,
                "berth_gateway_failures_total{{reason=\"{reason}\"}} {count}"
            );
        }
    }
}
