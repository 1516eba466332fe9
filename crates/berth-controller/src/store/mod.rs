//! The store: the controller's durable state behind one trait, [`Store`].
//!
//! The store keeps users, API tokens, container requests, containers and
//! live log chunks. It does not deal with HTTP or permissions: the API layer
//! decides what a caller may do, builds the new record, and hands the store
//! one *write* ([`RequestWrite`], [`ContainerWrite`]) that it applies in one
//! transaction.
//!
//! Optimistic concurrency: every record carries a `version` that each write
//! increments. A write names the version it was built from, and the store
//! applies it only if the record still has that version; otherwise it
//! returns [`StoreError::Conflict`] and the caller reads again and rebuilds.
//! This is how two dispatchers locking the same container at once end with
//! exactly one lock.
//!
//! Secrets: `secret_mounts` and `runtime_token` of requests and containers
//! ([`Secrets`]) live in columns of their own, outside the column lists
//! and the record mapping, so no list, get or change feed can return them.
//! They are written in the same transaction as the record they belong to,
//! read only through [`Store::get_request_secrets`] and
//! [`Store::get_container_secrets`], and cleared when the record reaches a
//! final state.
//!
//! Change sequence: every insert or update of a container also sets the
//! row's `change_seq` (not a record field) to the next value of one
//! counter, in commit order, through triggers of the migrations. The
//! change feed reads the containers whose `change_seq` is above a cursor
//! ([`Store::container_changes`]).
//!
//! Everything SQL-dialect specific lives in the backend modules
//! ([`sqlite`], [`postgres`]). This module holds what every backend shares:
//! the trait, the column lists of the two record tables, and the
//! dialect-neutral list query ([`ListQuery`]); `mapping` converts records
//! to column values and back for both.

mod changes;
mod leases;
mod mapping;
pub mod postgres;
pub mod sqlite;
mod tunnels;

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

use async_trait::async_trait;
use berth_core::time::Timestamp;
use berth_core::{Collection, Container, ContainerRequest, Mount, Secret};

use crate::notify::{ChangeListener, Notifier};
use crate::retry::RetryPlan;

pub use leases::{DispatchLease, LeaseFence};
pub use tunnels::TunnelLease;

/// A failure of the store. Callers' mistakes never show up here: the API
/// layer checks input before it reaches the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("invalid database URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("failed to create the database directory {path}: {source}")]
    CreateDirectory {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to create the database file {path}: {source}")]
    CreateFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to open the database {url}: {source}")]
    Open {
        url: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to migrate the database {url}: {source}")]
    Migrate {
        url: String,
        #[source]
        source: sqlx::migrate::MigrateError,
    },
    #[error("failed to {operation}: {source}")]
    Query {
        operation: &'static str,
        #[source]
        source: sqlx::Error,
    },
    #[error("failed to decode {table} row {uuid}: {source}")]
    Decode {
        table: &'static str,
        uuid: String,
        #[source]
        source: serde_json::Error,
    },
    /// The stored secrets of a row are not what the store wrote. The
    /// message gives the position only, because serde's message may quote
    /// the secret.
    #[error(
        "failed to decode the secrets of {table} row {uuid}: invalid JSON at line {line}, column {column}"
    )]
    DecodeSecrets {
        table: &'static str,
        uuid: String,
        line: usize,
        column: usize,
    },
    #[error("failed to encode {table} record {uuid}: {reason}")]
    Encode {
        table: &'static str,
        uuid: String,
        reason: String,
    },
    /// The database failed the transaction because of a concurrent one
    /// (a deadlock or a serialization failure); run it again.
    #[error("failed to {operation}: a concurrent transaction got in the way")]
    Retry { operation: &'static str },
    /// The record changed since the writer read it; read again and retry.
    #[error("{table} record {uuid} changed while it was being updated")]
    Conflict { table: &'static str, uuid: String },
    /// A fenced write named a dispatch lease epoch that is no longer
    /// current: another dispatcher took the lease, or it expired.
    #[error("the dispatch lease {name:?} is no longer held at epoch {epoch} (current epoch: {})", current_epoch.map_or_else(|| "none".to_string(), |epoch| epoch.to_string()))]
    StaleLease {
        name: String,
        epoch: i64,
        current_epoch: Option<i64>,
    },
    #[error("a user named {username:?} already exists")]
    DuplicateUser { username: String },
    /// A text field or filter operand contains U+0000. PostgreSQL cannot
    /// store it in text, so both stores reject it and behave the same.
    #[error(
        "{field} contains a NUL character (U+0000), which the store does not accept: remove it"
    )]
    NulCharacter { field: String },
}

impl StoreError {
    /// True for a failure that a new read and another attempt cure.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. } | StoreError::Retry { .. })
    }

    /// Wraps a database error of `operation`. A deadlock or a
    /// serialization failure, which another attempt cures, becomes a
    /// [`StoreError::Conflict`], so the API layer tries again.
    pub(crate) fn query(operation: &'static str) -> impl Fn(sqlx::Error) -> StoreError + Copy {
        move |source| {
            let code = source
                .as_database_error()
                .and_then(|error| error.code().map(|code| code.into_owned()));
            match code.as_deref() {
                Some(DEADLOCK_DETECTED | SERIALIZATION_FAILURE) => StoreError::Retry { operation },
                _ => StoreError::Query { operation, source },
            }
        }
    }
}

/// PostgreSQL's error code for a deadlock the server broke by failing one
/// of the transactions.
const DEADLOCK_DETECTED: &str = "40P01";

/// PostgreSQL's error code for a transaction that could not be serialized
/// with a concurrent one.
const SERIALIZATION_FAILURE: &str = "40001";

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The write-only attributes of a request or a container: never part of
/// the record, never returned by a list or get (see the module
/// documentation). `Debug` shows the targets of the secret mounts and
/// whether a runtime token is set, never a value.
#[derive(Clone, Default)]
pub struct Secrets {
    /// `secret_mounts`: json and text mounts whose content is secret.
    pub secret_mounts: BTreeMap<String, Mount>,
    /// `runtime_token`: the user token (`v2/UUID/SECRET`) the container
    /// runs as.
    pub runtime_token: Option<Secret>,
}

impl Secrets {
    pub fn is_empty(&self) -> bool {
        self.secret_mounts.is_empty() && self.runtime_token.is_none()
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("secret_mount_targets", &self.secret_mounts.keys())
            .field("has_runtime_token", &self.runtime_token.is_some())
            .finish()
    }
}

/// A record with its version in the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub record: T,
    pub version: i64,
}

/// A user account.
#[derive(Debug, Clone, PartialEq)]
pub struct User {
    pub uuid: String,
    pub username: String,
    pub is_admin: bool,
    pub is_active: bool,
    pub created_at: Timestamp,
    pub modified_at: Timestamp,
}

/// An API token as stored: the SHA-256 of its secret, never the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiToken {
    pub uuid: String,
    /// The user the token acts as.
    pub owner_uuid: String,
    /// Lowercase hex SHA-256 of the token's secret part.
    pub secret_sha256: String,
    pub scopes: Vec<String>,
    /// Set for a container's own token: the one container it may reach.
    pub container_uuid: Option<String>,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
}

impl ApiToken {
    /// True unless the token was revoked or has expired by `now`.
    pub fn is_valid_at(&self, now: &Timestamp) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|expires| expires > *now)
    }
}

/// The rows a list may return, decided by the caller's identity.
#[derive(Debug, Clone, PartialEq)]
pub enum Visibility {
    /// Administrators and the system token: every row.
    All,
    /// A user: their own requests, and the containers of those requests.
    User(String),
    /// A container's own token: that container and no request.
    Container(String),
}

/// The storage type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Integer,
    Real,
    Bool,
    /// RFC 3339 UTC text with nine fractional digits.
    Timestamp,
    /// A structured field as JSON text; not filterable or sortable.
    Json,
}

/// One field of a record table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Column {
    pub name: &'static str,
    pub kind: ColumnKind,
}

impl Column {
    /// True when list filters and ordering may use the column.
    pub fn is_scalar(&self) -> bool {
        self.kind != ColumnKind::Json
    }
}

const fn column(name: &'static str, kind: ColumnKind) -> Column {
    Column { name, kind }
}

use ColumnKind::{Bool, Integer, Json, Real, Text, Timestamp as Ts};

/// The fields of a container request, in the order of the table.
pub const REQUEST_COLUMNS: &[Column] = &[
    column("uuid", Text),
    column("owner_uuid", Text),
    column("created_at", Ts),
    column("modified_at", Ts),
    column("modified_by_user_uuid", Text),
    column("name", Text),
    column("description", Text),
    column("properties", Json),
    column("state", Text),
    column("requesting_container_uuid", Text),
    column("container_uuid", Text),
    column("container_count", Integer),
    column("container_count_max", Integer),
    column("mounts", Json),
    column("runtime_constraints", Json),
    column("scheduling_parameters", Json),
    column("container_image", Text),
    column("environment", Json),
    column("cwd", Text),
    column("command", Json),
    column("output_path", Text),
    column("output_glob", Json),
    column("output_name", Text),
    column("output_ttl", Integer),
    column("priority", Integer),
    column("expires_at", Ts),
    column("use_existing", Bool),
    column("filters", Text),
    column("log_uuid", Text),
    column("output_uuid", Text),
    column("output_storage_classes", Json),
    column("output_properties", Json),
    column("cumulative_cost", Real),
    column("service", Bool),
    column("published_ports", Json),
];

/// The fields of a container, in the order of the table.
pub const CONTAINER_COLUMNS: &[Column] = &[
    column("uuid", Text),
    column("owner_uuid", Text),
    column("created_at", Ts),
    column("modified_at", Ts),
    column("modified_by_user_uuid", Text),
    column("state", Text),
    column("started_at", Ts),
    column("finished_at", Ts),
    column("log", Text),
    column("environment", Json),
    column("cwd", Text),
    column("command", Json),
    column("output_path", Text),
    column("output_glob", Json),
    column("mounts", Json),
    column("runtime_constraints", Json),
    column("runtime_status", Json),
    column("scheduling_parameters", Json),
    column("output", Text),
    column("container_image", Text),
    column("progress", Real),
    column("priority", Integer),
    column("exit_code", Integer),
    column("auth_uuid", Text),
    column("locked_by_uuid", Text),
    column("lock_count", Integer),
    column("runtime_user_uuid", Text),
    column("runtime_auth_scopes", Json),
    column("gateway_address", Text),
    column("gateway_host_key", Text),
    column("gateway_host_key_fingerprint", Text),
    column("interactive_session_started", Bool),
    column("output_storage_classes", Json),
    column("output_properties", Json),
    column("cost", Real),
    column("subrequests_cost", Real),
    column("service", Bool),
    column("published_ports", Json),
    column("scheduler_job_id", Text),
];

/// The fields of a collection, in the order of the table.
pub const COLLECTION_COLUMNS: &[Column] = &[
    column("uuid", Text),
    column("owner_uuid", Text),
    column("created_at", Ts),
    column("modified_at", Ts),
    column("modified_by_user_uuid", Text),
    column("name", Text),
    column("description", Text),
    column("properties", Json),
    column("portable_data_hash", Text),
    column("manifest_text", Text),
    column("replication_desired", Integer),
    column("storage_classes_desired", Json),
    column("file_count", Integer),
    column("file_size_total", Integer),
];

/// Finds a column by name in one of the column lists.
pub fn find_column(columns: &'static [Column], name: &str) -> Option<&'static Column> {
    columns.iter().find(|column| column.name == name)
}

/// Comparison of a list filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterOp {
    Eq,
    NotEq,
    Lt,
    Le,
    Gt,
    Ge,
    In,
    NotIn,
    /// SQL `LIKE` with `%` and `_`, case-sensitive.
    Like,
    /// `LIKE`, ignoring ASCII case.
    ILike,
    /// Whether a key is present in an object attribute (operand: a bool).
    Exists,
}

/// A scalar operand, already converted to the column's kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Text(String),
    Integer(i64),
    Real(f64),
    Bool(bool),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// `= null` and `!= null`: IS NULL and IS NOT NULL.
    Null,
    One(Scalar),
    /// The operand of `in` and `not in`; for `like` and `ilike`, patterns
    /// of which any may match.
    List(Vec<Scalar>),
}

/// One `[attribute, operator, operand]` condition, checked against the
/// column's kind.
#[derive(Debug, Clone, PartialEq)]
pub struct Filter {
    pub column: &'static Column,
    /// For an object column, the key whose value the filter tests
    /// (`properties.KEY`). The operand's type then picks the values that
    /// can match: a string matches strings, a number numbers, a bool
    /// bools.
    pub key: Option<String>,
    pub op: FilterOp,
    pub operand: Operand,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Order {
    pub column: &'static Column,
    pub descending: bool,
}

/// A list call: filters (all must hold), order, page, and whose rows the
/// caller may see.
#[derive(Debug, Clone, PartialEq)]
pub struct ListQuery {
    pub visibility: Visibility,
    pub filters: Vec<Filter>,
    /// Sort keys; the store appends `uuid` for a total order.
    pub order: Vec<Order>,
    pub limit: u64,
    pub offset: u64,
    /// Whether to count all matching rows (`items_available`).
    pub count: bool,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<Versioned<T>>,
    /// All rows matching the filters, when the query asked for a count.
    pub items_available: Option<u64>,
}

/// An existing container a request takes as it is committed (reuse), with
/// the version it was chosen at. The store checks the version in the
/// write's transaction, so a container that changed meanwhile (it may have
/// been cancelled) is a conflict and the caller chooses again.
#[derive(Debug, Clone, PartialEq)]
pub struct ReusedContainer {
    pub uuid: String,
    pub version: i64,
}

/// An update of a container request, built from the version it names.
#[derive(Debug, Clone)]
pub struct RequestWrite {
    pub record: ContainerRequest,
    pub expected_version: i64,
    /// A container created for this request as it is committed, inserted
    /// in the same transaction.
    pub new_container: Option<Container>,
    /// The existing container the request takes instead of a new one.
    pub reused_container: Option<ReusedContainer>,
    /// For a new container of a request that allows reuse: the reusable
    /// containers the caller saw and did not take. The store fails with a
    /// conflict when another has appeared since, so that the caller looks
    /// again and identical requests committed at once share a container.
    pub passed_over: Option<Vec<String>>,
    /// The request's secrets after the write, stored in place of the old
    /// ones. A new container gets the same.
    pub secrets: Secrets,
}

/// Secrets minted when a container is locked, as the store keeps them.
#[derive(Debug, Clone)]
pub struct MintedCredentials {
    pub token: ApiToken,
    pub gateway_secret_sha256: String,
}

/// The change a container write makes to the container's credentials.
#[derive(Debug, Clone)]
pub enum CredentialChange {
    Keep,
    /// Store a new container token and gateway secret (lock).
    Mint(MintedCredentials),
    /// Revoke the container token and forget the gateway secret (unlock,
    /// final state).
    Revoke {
        token_uuid: Option<String>,
    },
}

/// An update of a container, built from the version it names.
#[derive(Debug, Clone)]
pub struct ContainerWrite {
    pub record: Container,
    pub expected_version: i64,
    pub credentials: CredentialChange,
    /// Move every Committed request of this container to Final (the
    /// container has reached a final state).
    pub finalize_requests: bool,
    /// A new container for the requests that retry a cancelled one: it is
    /// inserted and the requests are moved onto it (each at the version it
    /// was read at) before the others are finalised.
    pub retry: Option<RetryPlan>,
    /// Clear the container's secrets (it has reached a final state).
    pub clear_secrets: bool,
    /// Apply the write only while this dispatch lease is current.
    pub lease_fence: Option<LeaseFence>,
}

/// A live log stream of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LogStream {
    Stdout,
    Stderr,
    /// Messages of the supervisor itself.
    Supervisor,
    /// The container's resource use (CPU, memory, I/O), a line per
    /// sample, written by the supervisor.
    Crunchstat,
}

impl LogStream {
    pub const ALL: [LogStream; 4] = [
        LogStream::Stdout,
        LogStream::Stderr,
        LogStream::Supervisor,
        LogStream::Crunchstat,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
            LogStream::Supervisor => "supervisor",
            LogStream::Crunchstat => "crunchstat",
        }
    }

    pub fn parse(name: &str) -> Option<LogStream> {
        LogStream::ALL
            .into_iter()
            .find(|stream| stream.as_str() == name)
    }
}

impl FromStr for LogStream {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, Self::Err> {
        LogStream::parse(name).ok_or_else(|| {
            format!(
                "invalid log stream {name:?}: expected stdout, stderr, supervisor or crunchstat"
            )
        })
    }
}

/// The result of appending to a log stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The stream now has `size` bytes; `added` of them are new (0 when
    /// the store already had every byte sent).
    Appended { size: u64, added: u64 },
    /// The offset is past the end of the stream, which has `size` bytes.
    Gap { size: u64 },
    /// Some sent bytes fall on offsets the stream already has and differ
    /// from the stored ones, first at byte `position` of the stream. Nothing
    /// was written; the stream has `size` bytes.
    Mismatch { size: u64, position: u64 },
}

impl AppendOutcome {
    /// Compares the stored bytes of an append's overlap with the bytes sent
    /// for it, both starting at byte `offset` of a stream of `size` bytes.
    /// Returns the mismatch, or `None` when they are the same. Stored bytes
    /// shorter than the sent ones differ at their end.
    pub(crate) fn compare_overlap(
        size: u64,
        offset: u64,
        stored: &[u8],
        sent: &[u8],
    ) -> Option<AppendOutcome> {
        let index = stored
            .iter()
            .zip(sent)
            .position(|(stored, sent)| stored != sent)
            .or((stored.len() < sent.len()).then_some(stored.len()))?;
        Some(AppendOutcome::Mismatch {
            size,
            position: offset + index as u64,
        })
    }
}

/// A container whose latest change is on a page of the change feed.
#[derive(Debug, Clone)]
pub struct ChangedContainer {
    /// The change sequence number of the container's latest change.
    pub change_seq: i64,
    pub container: Versioned<Container>,
}

/// One page of the container change feed, read in one snapshot.
#[derive(Debug, Clone)]
pub struct ChangePage {
    /// Containers in change order, each at its latest change.
    pub items: Vec<ChangedContainer>,
    /// True when more containers changed after the last item than the
    /// page's limit allowed.
    pub more: bool,
    /// The change sequence number of the latest change the snapshot
    /// contains, visible to the caller or not.
    pub latest_change_seq: i64,
}

/// The controller's durable state. See the module documentation for the
/// concurrency contract.
#[async_trait]
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Checks that the database responds.
    async fn ping(&self) -> Result<()>;

    /// Closes the connections, waiting for those in use.
    async fn close(&self);

    /// Inserts a user and the user's first token in one transaction.
    async fn insert_user(&self, user: &User, token: &ApiToken) -> Result<()>;

    async fn get_user(&self, uuid: &str) -> Result<Option<User>>;

    async fn get_token(&self, uuid: &str) -> Result<Option<ApiToken>>;

    /// Inserts a new request with its secrets, and the container created
    /// for it when it is created Committed (or checks the version of the
    /// container it reuses, or that no other reusable container appeared),
    /// in one transaction. The new container gets the request's secrets.
    async fn insert_request(
        &self,
        request: &ContainerRequest,
        secrets: &Secrets,
        container: Option<&Container>,
        reused: Option<&ReusedContainer>,
        passed_over: Option<&[String]>,
    ) -> Result<Versioned<ContainerRequest>>;

    async fn get_request(&self, uuid: &str) -> Result<Option<Versioned<ContainerRequest>>>;

    /// Reads a request's secrets, with the version of the row they were
    /// read from.
    async fn get_request_secrets(&self, uuid: &str) -> Result<Option<Versioned<Secrets>>>;

    async fn list_requests(&self, query: &ListQuery) -> Result<Page<ContainerRequest>>;

    /// Applies a request update with its secrets (and inserts the new
    /// container with the same secrets) and recomputes the priority of the
    /// request's container, in one transaction.
    async fn update_request(&self, write: &RequestWrite) -> Result<Versioned<ContainerRequest>>;

    /// Deletes a request written at `expected_version` and recomputes the
    /// priority of its container, in one transaction.
    async fn delete_request(&self, uuid: &str, expected_version: i64) -> Result<()>;

    async fn get_container(&self, uuid: &str) -> Result<Option<Versioned<Container>>>;

    /// Reads a container's secrets, with the version of the row they were
    /// read from.
    async fn get_container_secrets(&self, uuid: &str) -> Result<Option<Versioned<Secrets>>>;

    /// Returns the containers with this [reuse key](crate::reuse::reuse_key)
    /// that may still serve a request: every Queued, Locked or Running
    /// one, and the Complete one with exit code 0 that finished first.
    async fn reusable_containers(&self, reuse_key: &str) -> Result<Vec<Versioned<Container>>>;

    async fn list_containers(&self, query: &ListQuery) -> Result<Page<Container>>;

    /// True if a request owned by `user_uuid` names the container.
    async fn container_requested_by(&self, container_uuid: &str, user_uuid: &str) -> Result<bool>;

    /// Applies a container update with its credential change, request
    /// finalisation (which clears the requests' secrets) and retry, in one
    /// transaction.
    async fn update_container(&self, write: &ContainerWrite) -> Result<Versioned<Container>>;

    /// Returns the size in bytes of a log stream (0 when nothing was
    /// appended).
    async fn log_size(&self, container_uuid: &str, stream: LogStream) -> Result<u64>;

    /// Appends `data` at byte `offset`: bytes the store already has are
    /// skipped when they are the same, the rest is added at the end. Sent
    /// bytes that differ from stored ones write nothing
    /// ([`AppendOutcome::Mismatch`]).
    async fn append_log(
        &self,
        container_uuid: &str,
        stream: LogStream,
        offset: u64,
        data: &[u8],
    ) -> Result<AppendOutcome>;

    /// Reads at most `max_bytes` from `offset`; returns the bytes and the
    /// stream's size.
    async fn read_log(
        &self,
        container_uuid: &str,
        stream: LogStream,
        offset: u64,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, u64)>;

    /// Returns the change sequence number of the latest committed container
    /// change (0 before the first).
    async fn latest_change_seq(&self) -> Result<i64>;

    /// Reads the containers `visibility` shows whose latest change has a
    /// sequence number above `after`, at most `limit` of them, in change
    /// order.
    async fn container_changes(
        &self,
        after: i64,
        visibility: &Visibility,
        limit: u64,
    ) -> Result<ChangePage>;

    /// Takes the dispatch lease `name` for `holder` until `expires_at_ms`,
    /// if it is free, expired at `now_ms`, or already `holder`'s, in one
    /// atomic statement. Returns the lease as it is afterwards: held by
    /// `holder` on success, by its current holder otherwise.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<DispatchLease>;

    /// Extends the dispatch lease `name` to `expires_at_ms` if `holder`
    /// still holds it at `epoch`. Returns the lease as it is afterwards
    /// (`None` if it never existed).
    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
        expires_at_ms: i64,
    ) -> Result<Option<DispatchLease>>;

    /// Frees the dispatch lease `name` if `holder` holds it at `epoch`.
    /// Returns the lease as it is afterwards (`None` if it never existed).
    async fn release_lease(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
    ) -> Result<Option<DispatchLease>>;

    /// Claims the gateway tunnel lease of `container_uuid` for the
    /// controller at `controller_url`, if there is none, if it belongs to
    /// the same `supervisor_id`, or if its heartbeat is at or before
    /// `stale_before_ms`. Returns the lease as it is afterwards: the
    /// caller's claim when its URL and supervisor id are in it.
    async fn claim_tunnel(
        &self,
        container_uuid: &str,
        controller_url: &str,
        supervisor_id: &str,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<TunnelLease>;

    /// Sets the heartbeat of every tunnel lease `controller_url` holds to
    /// `now_ms`. Returns the number of leases.
    async fn heartbeat_tunnels(&self, controller_url: &str, now_ms: i64) -> Result<u64>;

    /// Deletes the tunnel lease of `container_uuid` if it still has
    /// `epoch`. Returns true when it did.
    async fn release_tunnel(&self, container_uuid: &str, epoch: i64) -> Result<bool>;

    /// Deletes every tunnel lease of `controller_url`: those left by an
    /// earlier run of that controller. Returns the number deleted.
    async fn release_controller_tunnels(&self, controller_url: &str) -> Result<u64>;

    async fn get_tunnel(&self, container_uuid: &str) -> Result<Option<TunnelLease>>;

    /// Returns the SHA-256 hash (lowercase hex) of a container's gateway
    /// secret: `None` when the container does not exist or has no secret
    /// (not locked yet, or in a final state).
    async fn get_gateway_secret_sha256(&self, container_uuid: &str) -> Result<Option<String>>;

    /// Starts a task that wakes `notifier`'s waiters whenever any process
    /// writes a container or a log, for a database that several
    /// controllers share. Returns `None` for a store only one controller
    /// uses (SQLite), whose waiters the API's own notifications reach, and
    /// when called outside a Tokio runtime.
    fn spawn_change_listener(&self, notifier: Arc<Notifier>) -> Option<ChangeListener>;

    async fn insert_collection(&self, collection: &Collection) -> Result<Versioned<Collection>>;

    async fn get_collection(&self, uuid: &str) -> Result<Option<Versioned<Collection>>>;

    /// Returns the most recently modified collection with this portable
    /// data hash among those `visibility` lets the caller read.
    async fn find_collection_by_pdh(
        &self,
        portable_data_hash: &str,
        visibility: &Visibility,
    ) -> Result<Option<Versioned<Collection>>>;

    async fn list_collections(&self, query: &ListQuery) -> Result<Page<Collection>>;

    /// Writes a collection over the row at `expected_version`, or returns a
    /// conflict when the row has another version.
    async fn update_collection(
        &self,
        collection: &Collection,
        expected_version: i64,
    ) -> Result<Versioned<Collection>>;

    /// Deletes a collection at `expected_version`, or returns a conflict.
    /// Its blocks stay in the block store.
    async fn delete_collection(&self, uuid: &str, expected_version: i64) -> Result<()>;
}

/// Opens the store a database URL names, creating and migrating the
/// database as needed: `sqlite://PATH` for a SQLite file,
/// `postgres://...` or `postgresql://...` for a PostgreSQL database (which
/// must exist; its tables are created).
pub async fn open(url: &str, max_connections: u32) -> Result<Arc<dyn Store>> {
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let store =
            sqlite::SqliteStore::open(url, std::path::Path::new(path), max_connections).await?;
        return Ok(Arc::new(store));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = postgres::PostgresStore::open(url, max_connections).await?;
        return Ok(Arc::new(store));
    }
    Err(StoreError::InvalidUrl {
        url: postgres::redact(url),
        reason: "expected sqlite://PATH (for example sqlite:///var/lib/berth/berth.db) \
                 or postgres://USER:PASSWORD@HOST:PORT/DATABASE"
            .to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn sample_request() -> ContainerRequest {
        serde_json::from_value(serde_json::json!({
            "uuid": "zzzzz-xvhdp-0123456789abcde",
            "owner_uuid": "zzzzz-tpzed-0123456789abcde",
            "created_at": "2024-01-01T00:00:00.000000000Z",
            "modified_at": "2024-01-01T00:00:00.000000000Z",
            "state": "Uncommitted",
        }))
        .unwrap()
    }

    fn sample_container() -> Container {
        serde_json::from_value(serde_json::json!({
            "uuid": "zzzzz-dz642-0123456789abcde",
            "owner_uuid": "zzzzz-tpzed-000000000000000",
            "created_at": "2024-01-01T00:00:00.000000000Z",
            "modified_at": "2024-01-01T00:00:00.000000000Z",
            "state": "Queued",
            "cwd": ".",
            "output_path": "/out",
            "container_image": "busybox",
        }))
        .unwrap()
    }

    fn keys(value: serde_json::Value) -> BTreeSet<String> {
        value.as_object().unwrap().keys().cloned().collect()
    }

    fn names(columns: &[Column]) -> BTreeSet<String> {
        columns.iter().map(|c| c.name.to_string()).collect()
    }

    /// A field added to the records without a column would be lost on
    /// write; a column without a field would never be filled.
    #[test]
    fn columns_match_record_fields() {
        let request = serde_json::to_value(sample_request()).unwrap();
        assert_eq!(keys(request), names(REQUEST_COLUMNS));
        let container = serde_json::to_value(sample_container()).unwrap();
        assert_eq!(keys(container), names(CONTAINER_COLUMNS));
    }

    #[test]
    fn unsupported_url_is_named() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let err = runtime
            .block_on(open("mysql://localhost/berth", 1))
            .unwrap_err();
        assert!(err.to_string().contains("mysql://localhost/berth"), "{err}");
        assert!(err.to_string().contains("postgres://"), "{err}");
    }

    #[test]
    fn overlap_mismatch_names_first_differing_byte() {
        assert_eq!(
            AppendOutcome::compare_overlap(11, 0, b"hello", b"hello"),
            None
        );
        assert_eq!(
            AppendOutcome::compare_overlap(11, 4, b"o world", b"o World"),
            Some(AppendOutcome::Mismatch {
                size: 11,
                position: 6
            })
        );
        assert_eq!(
            AppendOutcome::compare_overlap(11, 9, b"d", b"dd"),
            Some(AppendOutcome::Mismatch {
                size: 11,
                position: 10
            })
        );
    }
}
