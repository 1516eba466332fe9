//! Leader leases of dispatchers, as both backends store them.
//!
//! A lease is one row of `dispatch_leases`, changed only by single
//! conditional statements, so each change is an atomic compare-and-set:
//!
//! - *acquire* takes the lease when it is free (never held, released, or
//!   expired) or already held by the same holder. Taking it from another
//!   holder, or after a release, increments the epoch; extending one's own
//!   lease keeps it.
//! - *renew* extends the expiry only when the same holder still holds it at
//!   the same epoch. An expired lease that nobody took since is renewed,
//!   because an unchanged epoch proves that no other dispatcher acted.
//! - *release* frees the lease at once when the same holder holds it at
//!   the same epoch, so a standby takes it at its next attempt.
//!
//! A container write may carry a [`LeaseFence`]: the store applies it only
//! if the named lease is still held, unexpired, at the fence's epoch, read
//! in the write's transaction. A dispatcher that lost its lease therefore
//! cannot lock a container after a standby took over.
//!
//! Times are milliseconds since the Unix epoch, by the caller's clock (the
//! controller's).

/// Statement of an acquire. Parameters: name, holder, expiry, and the
/// current time. The row changes only when the lease is free, expired or
/// already the holder's.
pub(super) const ACQUIRE: &str =
    "INSERT INTO dispatch_leases (name, holder, epoch, expires_at_ms) \
     VALUES (?, ?, 1, ?) \
     ON CONFLICT (name) DO UPDATE SET \
       epoch = CASE WHEN dispatch_leases.holder = excluded.holder \
               THEN dispatch_leases.epoch ELSE dispatch_leases.epoch + 1 END, \
       holder = excluded.holder, \
       expires_at_ms = excluded.expires_at_ms \
     WHERE dispatch_leases.holder = excluded.holder \
        OR dispatch_leases.holder IS NULL \
        OR dispatch_leases.expires_at_ms <= ?";

/// Statement of a renewal. Parameters: expiry, name, holder, epoch.
pub(super) const RENEW: &str = "UPDATE dispatch_leases SET expires_at_ms = ? \
     WHERE name = ? AND holder = ? AND epoch = ?";

/// Statement of a release. Parameters: name, holder, epoch.
pub(super) const RELEASE: &str = "UPDATE dispatch_leases SET holder = NULL, expires_at_ms = 0 \
     WHERE name = ? AND holder = ? AND epoch = ?";

/// Query of one lease. Parameter: name.
pub(super) const SELECT: &str =
    "SELECT name, holder, epoch, expires_at_ms FROM dispatch_leases WHERE name = ?";

/// A dispatcher's leader lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DispatchLease {
    pub name: String,
    /// The id of the dispatcher process holding the lease; `None` after a
    /// release.
    pub holder: Option<String>,
    /// The number of times the lease changed holder (1 for its first).
    pub epoch: i64,
    /// Expiry in milliseconds since the Unix epoch (0 after a release).
    pub expires_at_ms: i64,
}

impl DispatchLease {
    /// True when `holder` holds the lease and it has not expired at
    /// `now_ms`.
    pub fn is_held_by(&self, holder: &str, now_ms: i64) -> bool {
        self.holder.as_deref() == Some(holder) && self.expires_at_ms > now_ms
    }

    /// True when some holder holds the lease at `epoch`, unexpired at
    /// `now_ms`: the condition of a [`LeaseFence`].
    pub fn is_current(&self, epoch: i64, now_ms: i64) -> bool {
        self.holder.is_some() && self.epoch == epoch && self.expires_at_ms > now_ms
    }
}

/// The condition of a fenced container write: the lease `name` must be
/// held at `epoch` and unexpired at `now_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseFence {
    pub name: String,
    pub epoch: i64,
    pub now_ms: i64,
}

impl LeaseFence {
    /// Checks the fence against the lease as the write's transaction reads
    /// it.
    pub(super) fn check(&self, lease: Option<&DispatchLease>) -> super::Result<()> {
        match lease {
            Some(lease) if lease.is_current(self.epoch, self.now_ms) => Ok(()),
            _ => Err(super::StoreError::StaleLease {
                name: self.name.clone(),
                epoch: self.epoch,
                current_epoch: lease.map(|lease| lease.epoch),
            }),
        }
    }
}
