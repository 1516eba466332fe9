//! Gateway tunnel leases, as both backends store them.
//!
//! A lease is one row of `tunnel_leases` per container, changed only by
//! single conditional statements:
//!
//! - *claim* records that a controller accepted the container's tunnel. It
//!   takes the row when there is none, when the same supervisor process
//!   dialled the earlier tunnel (it moved, or reconnected), or when the
//!   row's heartbeat is stale. Each claim that changes the row increments
//!   the epoch. A tunnel from another supervisor while the lease is live is
//!   left out, and the caller rejects it.
//! - *heartbeat* refreshes every lease of one controller in one statement.
//! - *release* deletes the row when it still has the epoch the releasing
//!   controller claimed, so a release after a move never deletes the new
//!   holder's lease.
//!
//! Times are milliseconds since the Unix epoch, by the caller's clock.

/// Statement of a claim. Parameters: container, controller URL, supervisor
/// id, heartbeat time, and the stale limit (a heartbeat at or before it is
/// stale).
pub(super) const CLAIM: &str =
    "INSERT INTO tunnel_leases (container_uuid, controller_url, supervisor_id, epoch, heartbeat_at_ms) \
     VALUES (?, ?, ?, 1, ?) \
     ON CONFLICT (container_uuid) DO UPDATE SET \
       epoch = tunnel_leases.epoch + 1, \
       controller_url = excluded.controller_url, \
       supervisor_id = excluded.supervisor_id, \
       heartbeat_at_ms = excluded.heartbeat_at_ms \
     WHERE tunnel_leases.supervisor_id = excluded.supervisor_id \
        OR tunnel_leases.heartbeat_at_ms <= ?";

/// Statement of a heartbeat. Parameters: heartbeat time, controller URL.
pub(super) const HEARTBEAT: &str =
    "UPDATE tunnel_leases SET heartbeat_at_ms = ? WHERE controller_url = ?";

/// Statement of a release. Parameters: container, epoch.
pub(super) const RELEASE: &str = "DELETE FROM tunnel_leases WHERE container_uuid = ? AND epoch = ?";

/// Statement that drops every lease of a controller. Parameter: controller
/// URL.
pub(super) const RELEASE_ALL: &str = "DELETE FROM tunnel_leases WHERE controller_url = ?";

/// Query of one lease. Parameter: container.
pub(super) const SELECT: &str =
    "SELECT container_uuid, controller_url, supervisor_id, epoch, heartbeat_at_ms \
     FROM tunnel_leases WHERE container_uuid = ?";

/// The lease of a container's gateway tunnel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelLease {
    pub container_uuid: String,
    /// The internal URL of the controller holding the tunnel.
    pub controller_url: String,
    /// The random id of the supervisor process that dialled the tunnel.
    pub supervisor_id: String,
    /// The number of times the lease changed (1 for its first claim).
    pub epoch: i64,
    /// The holder's last heartbeat, in milliseconds since the Unix epoch.
    pub heartbeat_at_ms: i64,
}

impl TunnelLease {
    /// True when the holder's heartbeat is later than `stale_before_ms`.
    pub fn is_live(&self, stale_before_ms: i64) -> bool {
        self.heartbeat_at_ms > stale_before_ms
    }
}
