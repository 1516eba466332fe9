//! The cancellation watch: a second way, besides SIGTERM, to learn that
//! the controller cancelled the container.
//!
//! The dispatcher stops a cancelled container by cancelling its batch job,
//! whose signal reaches the supervisor. The signal may be lost, because
//! the dispatcher is down or the batch system never delivers it. The
//! watch still stops the container then. Every `cancel_check_interval` it
//! reads the container's record with the container's own token, and it
//! requests a stop when the record's `priority` is 0 or its state is
//! `Cancelled`. Two
//! 401 responses in a row count as a cancellation too, because the
//! controller revokes the token once the container leaves `Locked` and
//! `Running`. Any other failure is logged and never stops the container.

use std::time::Duration;

use berth_client::{Client, ClientError};
use berth_core::{Container, ContainerState};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::logs::SupervisorLog;
use crate::stop::StopHandle;

/// Number of 401 responses in a row that count as a revoked token.
const REVOKED_AFTER: u32 = 2;

/// Returns the reason to stop for a record that the controller cancelled.
pub fn cancellation_reason(container: &Container) -> Option<String> {
    if container.state == ContainerState::Cancelled {
        return Some("cancelled by the controller: the container's state is Cancelled".into());
    }
    if container.priority == 0 {
        return Some("cancelled by the controller: the container's priority is 0".into());
    }
    None
}

/// Starts the watch of container `uuid`. Abort the task to end it.
pub fn spawn_cancel_watch(
    client: Client,
    uuid: String,
    interval: Duration,
    stop: StopHandle,
    log: SupervisorLog,
) -> JoinHandle<()> {
    tokio::spawn(
        async move {
            let mut failures = 0u32;
            let mut unauthorized = 0u32;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(interval) => {}
                    () = stop.stopped() => return,
                }
                let error = match client.get_container(&uuid).await {
                    Ok(container) => {
                        if failures > 0 {
                            log.info(format!(
                                "cancellation check: reading the container works again after {failures} failures"
                            ));
                        }
                        failures = 0;
                        unauthorized = 0;
                        if let Some(reason) = cancellation_reason(&container) {
                            log.warn(format!("{reason}; stopping the container"));
                            stop.stop(reason);
                            return;
                        }
                        continue;
                    }
                    Err(error) => error,
                };
                failures += 1;
                if is_unauthorized(&error) {
                    unauthorized += 1;
                    if unauthorized >= REVOKED_AFTER {
                        let reason = "cancelled by the controller: it revoked the container's token, which it does once the container is no longer Locked or Running";
                        log.warn(format!("{reason} ({error}); stopping the container"));
                        stop.stop(reason);
                        return;
                    }
                } else {
                    unauthorized = 0;
                }
                // The first failure and then every tenth are logged, so a
                // long outage does not fill the log.
                if failures == 1 || failures.is_multiple_of(10) {
                    log.warn(format!(
                        "cancellation check: failed to read the container ({failures} failures in a row), the container keeps running: {error}"
                    ));
                }
            }
        }
        .in_current_span(),
    )
}

fn is_unauthorized(error: &ClientError) -> bool {
    error.status().map(|status| status.as_u16()) == Some(401)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(state: &str, priority: i64) -> Container {
        serde_json::from_value(json!({
            "uuid": "zzzzz-dz642-000000000000001",
            "owner_uuid": "zzzzz-tpzed-000000000000001",
            "created_at": "2024-01-01T00:00:00.000000000Z",
            "modified_at": "2024-01-01T00:00:00.000000000Z",
            "modified_by_user_uuid": null,
            "state": state,
            "environment": {},
            "cwd": ".",
            "command": ["true"],
            "output_path": "/out",
            "mounts": {},
            "runtime_constraints": {"ram": 1 << 20, "vcpus": 1},
            "runtime_status": {},
            "container_image": "busybox",
            "priority": priority,
            "exit_code": null,
            "lock_count": 1,
        }))
        .unwrap()
    }

    #[test]
    fn priority_zero_and_cancelled_stop_the_run() {
        assert!(cancellation_reason(&record("Running", 1)).is_none());
        assert!(cancellation_reason(&record("Locked", 500)).is_none());
        let zero = cancellation_reason(&record("Running", 0)).unwrap();
        assert!(zero.contains("priority is 0"), "{zero}");
        let cancelled = cancellation_reason(&record("Cancelled", 1)).unwrap();
        assert!(cancelled.contains("Cancelled"), "{cancelled}");
    }
}
