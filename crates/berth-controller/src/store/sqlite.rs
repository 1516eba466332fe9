//! The SQLite backend of [`Store`]: one database file in WAL mode, opened
//! through an sqlx pool, with the migrations of `migrations/sqlite` run at
//! open.
//!
//! Every write runs in a `BEGIN IMMEDIATE` transaction, which takes
//! SQLite's write lock at the start. A deferred transaction that reads and
//! then writes fails with `SQLITE_BUSY` when another writer committed in
//! between, and the busy timeout does not help in that case. An immediate
//! transaction waits for the lock instead. The version check of each update (see
//! the parent module) then makes a read-check-write atomic.
//!
//! Records are mapped through their JSON form: a record is serialised to a
//! JSON object, and each column takes the value of the field of its name;
//! reading builds the object back from the columns and deserialises it.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use berth_core::priority::request_contribution;
use berth_core::time::{self, Timestamp};
use berth_core::{Collection, Container, ContainerRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::query::Query;
use sqlx::sqlite::{
    SqliteArguments, SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool,
    SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, Sqlite};

use super::mapping::{
    check_filter_text, decode_record, decode_secrets, encode_record, encode_secrets, key_condition,
    order_clause, to_i64, Bound, JsonSql,
};
use super::{changes, leases, tunnels, ChangePage, DispatchLease, LeaseFence, TunnelLease};
use super::{
    ApiToken, AppendOutcome, Column, ContainerWrite, CredentialChange, Filter, FilterOp, ListQuery,
    LogStream, Operand, Page, RequestWrite, Result, ReusedContainer, Scalar, Secrets, Store,
    StoreError, User, Versioned, Visibility, COLLECTION_COLUMNS, CONTAINER_COLUMNS,
    REQUEST_COLUMNS,
};
use crate::notify::{ChangeListener, Notifier};
use crate::reuse::reuse_key;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Mode of a database file the store creates: read and write for the
/// owner only.
const PRIVATE_FILE_MODE: u32 = 0o600;

/// Mode of a directory the store creates for its database.
const PRIVATE_DIRECTORY_MODE: u32 = 0o700;

/// How long a connection waits for another's write lock before it fails.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A record table and the statements that read and write it.
struct Table {
    name: &'static str,
    columns: &'static [Column],
    select: String,
    insert: String,
    update: String,
}

impl Table {
    fn new(name: &'static str, columns: &'static [Column]) -> Table {
        let names: Vec<&str> = columns.iter().map(|c| c.name).collect();
        let placeholders = vec!["?"; columns.len()].join(", ");
        let assignments: Vec<String> = names.iter().map(|n| format!("{n} = ?")).collect();
        Table {
            name,
            columns,
            select: format!("SELECT {}, version FROM {name}", names.join(", ")),
            insert: format!(
                "INSERT INTO {name} ({}, version) VALUES ({placeholders}, 1)",
                names.join(", ")
            ),
            update: format!(
                "UPDATE {name} SET {}, version = version + 1 WHERE uuid = ? AND version = ?",
                assignments.join(", ")
            ),
        }
    }
}

static REQUESTS: LazyLock<Table> =
    LazyLock::new(|| Table::new("container_requests", REQUEST_COLUMNS));
static CONTAINERS: LazyLock<Table> = LazyLock::new(|| Table::new("containers", CONTAINER_COLUMNS));
static COLLECTIONS: LazyLock<Table> =
    LazyLock::new(|| Table::new("collections", COLLECTION_COLUMNS));

type SqliteQuery<'q> = Query<'q, Sqlite, SqliteArguments<'q>>;

fn bind_all<'q>(mut query: SqliteQuery<'q>, values: &[Bound]) -> SqliteQuery<'q> {
    for value in values {
        query = match value.clone() {
            Bound::Text(value) => query.bind(value),
            Bound::Integer(value) => query.bind(value),
            Bound::Real(value) => query.bind(value),
            Bound::Bool(value) => query.bind(value),
        };
    }
    query
}

async fn insert_record<T: Serialize>(
    conn: &mut SqliteConnection,
    table: &Table,
    uuid: &str,
    record: &T,
) -> Result<()> {
    let values = encode_record(table.name, table.columns, uuid, record)?;
    bind_all(sqlx::query(&table.insert), &values)
        .execute(conn)
        .await
        .map_err(StoreError::query("insert a record"))?;
    Ok(())
}

/// Writes a record over the row at `expected_version`; returns the new
/// version, or a conflict when the row has another version.
async fn update_record<T: Serialize>(
    conn: &mut SqliteConnection,
    table: &Table,
    uuid: &str,
    record: &T,
    expected_version: i64,
) -> Result<i64> {
    let mut values = encode_record(table.name, table.columns, uuid, record)?;
    values.push(Bound::Text(Some(uuid.to_string())));
    values.push(Bound::Integer(Some(expected_version)));
    let result = bind_all(sqlx::query(&table.update), &values)
        .execute(conn)
        .await
        .map_err(StoreError::query("update a record"))?;
    if result.rows_affected() == 0 {
        return Err(StoreError::Conflict {
            table: table.name,
            uuid: uuid.to_string(),
        });
    }
    Ok(expected_version + 1)
}

async fn get_record<T: DeserializeOwned>(
    conn: &mut SqliteConnection,
    table: &Table,
    uuid: &str,
) -> Result<Option<Versioned<T>>> {
    let sql = format!("{} WHERE uuid = ?", table.select);
    let row = sqlx::query(&sql)
        .bind(uuid)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("read a record"))?;
    row.map(|row| decode_record(table.name, table.columns, &row))
        .transpose()
}

/// Records that a request has (had) a container, so that the request's
/// owner keeps reading it after a retry moves the request on.
async fn record_attempt(conn: &mut SqliteConnection, request: &ContainerRequest) -> Result<()> {
    let Some(container_uuid) = &request.container_uuid else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO request_attempts (request_uuid, container_uuid, owner_uuid) VALUES (?, ?, ?) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&request.uuid)
    .bind(container_uuid)
    .bind(&request.owner_uuid)
    .execute(conn)
    .await
    .map_err(StoreError::query("record a request's container"))?;
    Ok(())
}

/// Reads the containers with a reuse key that may serve a request (see
/// [`Store::reusable_containers`]).
async fn reusable_rows(
    conn: &mut SqliteConnection,
    key: &str,
) -> Result<Vec<Versioned<Container>>> {
    let sql = format!(
        "{select} WHERE reuse_key = ? AND state IN ('Queued', 'Locked', 'Running') \
         UNION ALL \
         SELECT * FROM ({select} WHERE reuse_key = ? AND state = 'Complete' AND exit_code = 0 \
         ORDER BY finished_at, uuid LIMIT 1)",
        select = CONTAINERS.select
    );
    let rows = sqlx::query(&sql)
        .bind(key)
        .bind(key)
        .fetch_all(conn)
        .await
        .map_err(StoreError::query("find reusable containers"))?;
    rows.iter()
        .map(|row| decode_record(CONTAINERS.name, CONTAINERS.columns, row))
        .collect()
}

/// Fails with a conflict when a container that a request allowing reuse
/// could take has appeared since the caller chose to create `container`,
/// passing over the reusable containers it saw. Writers run one at a time,
/// so identical requests committed at once end up sharing one container.
async fn check_passed_over(
    conn: &mut SqliteConnection,
    container: &Container,
    key: &str,
    passed_over: &[String],
) -> Result<()> {
    let rows = reusable_rows(conn, key).await?;
    if rows
        .iter()
        .any(|row| !passed_over.contains(&row.record.uuid))
    {
        return Err(StoreError::Conflict {
            table: "containers",
            uuid: container.uuid.clone(),
        });
    }
    Ok(())
}

/// Inserts a container with its secrets and its reuse key.
async fn insert_container(
    conn: &mut SqliteConnection,
    container: &Container,
    secrets: &Secrets,
    key: &str,
) -> Result<()> {
    insert_record(conn, &CONTAINERS, &container.uuid, container).await?;
    let [secret_mounts, runtime_token] = encode_secrets(CONTAINERS.name, &container.uuid, secrets)?;
    sqlx::query(
        "UPDATE containers SET reuse_key = ?, secret_mounts = ?, runtime_token = ? WHERE uuid = ?",
    )
    .bind(key)
    .bind(secret_mounts)
    .bind(runtime_token)
    .bind(&container.uuid)
    .execute(conn)
    .await
    .map_err(StoreError::query(
        "store a container's secrets and reuse key",
    ))?;
    Ok(())
}

/// Replaces the secrets of a request.
async fn write_request_secrets(
    conn: &mut SqliteConnection,
    uuid: &str,
    secrets: &Secrets,
) -> Result<()> {
    let [secret_mounts, runtime_token] = encode_secrets(REQUESTS.name, uuid, secrets)?;
    sqlx::query(
        "UPDATE container_requests SET secret_mounts = ?, runtime_token = ? WHERE uuid = ?",
    )
    .bind(secret_mounts)
    .bind(runtime_token)
    .bind(uuid)
    .execute(conn)
    .await
    .map_err(StoreError::query("store a container request's secrets"))?;
    Ok(())
}

/// Reads the secrets of a request or container row, with the row's
/// version.
async fn get_secrets(
    pool: &SqlitePool,
    table: &Table,
    uuid: &str,
) -> Result<Option<Versioned<Secrets>>> {
    let sql = format!(
        "SELECT secret_mounts, runtime_token, version FROM {} WHERE uuid = ?",
        table.name
    );
    let row = sqlx::query(&sql)
        .bind(uuid)
        .fetch_optional(pool)
        .await
        .map_err(StoreError::query("read secrets"))?;
    row.map(|row| decode_secrets(table.name, uuid, &row))
        .transpose()
}

/// Fails with a conflict unless the reused container still has the
/// version it was chosen at.
async fn check_reused(conn: &mut SqliteConnection, reused: &ReusedContainer) -> Result<()> {
    let version: Option<i64> = sqlx::query_scalar("SELECT version FROM containers WHERE uuid = ?")
        .bind(&reused.uuid)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("check a reused container"))?;
    if version == Some(reused.version) {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            table: "containers",
            uuid: reused.uuid.clone(),
        })
    }
}

/// Recomputes a live container's priority from its Committed requests.
async fn recompute_priority(conn: &mut SqliteConnection, container_uuid: &str) -> Result<()> {
    let rows = sqlx::query(
        "SELECT uuid, priority, created_at FROM container_requests \
         WHERE container_uuid = ? AND state = 'Committed' AND priority > 0",
    )
    .bind(container_uuid)
    .fetch_all(&mut *conn)
    .await
    .map_err(StoreError::query("read the requests of a container"))?;
    let mut priority = 0;
    for row in rows {
        let read_error = StoreError::query("read the requests of a container");
        let uuid: String = row.try_get("uuid").map_err(read_error)?;
        let request_priority: i64 = row.try_get("priority").map_err(read_error)?;
        let created_at: String = row.try_get("created_at").map_err(read_error)?;
        let created_at = time::parse(&created_at).map_err(|err| StoreError::Encode {
            table: "container_requests",
            uuid,
            reason: format!("created_at {created_at:?} is not a timestamp: {err}"),
        })?;
        priority = priority.max(request_contribution(request_priority, &created_at));
    }
    sqlx::query(
        "UPDATE containers SET priority = ?, modified_at = ?, version = version + 1 \
         WHERE uuid = ? AND priority != ? AND state IN ('Queued', 'Locked', 'Running')",
    )
    .bind(priority)
    .bind(time::format(&chrono::Utc::now()))
    .bind(container_uuid)
    .bind(priority)
    .execute(conn)
    .await
    .map_err(StoreError::query("update a container's priority"))?;
    Ok(())
}

/// Builds the SQL condition of a caller's visibility on a table.
fn visibility_condition(
    table: &Table,
    visibility: &Visibility,
    params: &mut Vec<Bound>,
) -> Option<String> {
    let is_containers = table.name == CONTAINERS.name;
    match visibility {
        Visibility::All => None,
        Visibility::User(user) => {
            params.push(Bound::Text(Some(user.clone())));
            Some(if is_containers {
                "uuid IN (SELECT container_uuid FROM request_attempts WHERE owner_uuid = ?)"
                    .to_string()
            } else {
                "owner_uuid = ?".to_string()
            })
        }
        Visibility::Container(container) => {
            if is_containers {
                params.push(Bound::Text(Some(container.clone())));
                Some("uuid = ?".to_string())
            } else {
                Some("0".to_string())
            }
        }
    }
}

/// SQLite's JSON functions for filters on keys of object columns. A key
/// becomes the path `$."KEY"`; the API rejects keys with `"` or `\`.
static JSON_SQL: JsonSql = JsonSql {
    exists: "json_type({col}, ?) IS NOT NULL",
    text: "(CASE WHEN json_type({col}, ?) = 'text' THEN json_extract({col}, ?) END)",
    number: "(CASE WHEN json_type({col}, ?) IN ('integer', 'real') \
             THEN json_extract({col}, ?) END)",
    boolean: "(CASE WHEN json_type({col}, ?) IN ('true', 'false') \
              THEN json_extract({col}, ?) END)",
    any: "json_extract({col}, ?)",
    like: "GLOB ?",
    like_param: like_to_glob,
    ilike: "LIKE ? ESCAPE '\\'",
    ilike_param: str::to_string,
    key_param: |key| format!("$.\"{key}\""),
    false_literal: "0",
};

fn filter_condition(filter: &Filter, params: &mut Vec<Bound>) -> String {
    if let Some(key) = &filter.key {
        return key_condition(&JSON_SQL, filter, key, params);
    }
    let name = filter.column.name;
    let comparison = |symbol: &str| format!("{name} {symbol} ?");
    match (&filter.op, &filter.operand) {
        (FilterOp::Eq, Operand::Null) => format!("{name} IS NULL"),
        (FilterOp::NotEq, Operand::Null) => format!("{name} IS NOT NULL"),
        (_, Operand::Null) => "0".to_string(),
        (FilterOp::Like, Operand::List(patterns)) if !patterns.is_empty() => {
            let alternatives: Vec<String> = patterns
                .iter()
                .map(|pattern| {
                    let Scalar::Text(pattern) = pattern else {
                        return "0".to_string();
                    };
                    params.push(Bound::Text(Some(like_to_glob(pattern))));
                    format!("{name} GLOB ?")
                })
                .collect();
            format!("({})", alternatives.join(" OR "))
        }
        (FilterOp::In | FilterOp::NotIn, Operand::List(items)) => {
            let negate = filter.op == FilterOp::NotIn;
            if items.is_empty() {
                return if negate { "1" } else { "0" }.to_string();
            }
            params.extend(items.iter().map(Bound::from));
            let placeholders = vec!["?"; items.len()].join(", ");
            if negate {
                format!("({name} IS NULL OR {name} NOT IN ({placeholders}))")
            } else {
                format!("{name} IN ({placeholders})")
            }
        }
        (_, Operand::List(_)) => "0".to_string(),
        (op, Operand::One(scalar)) => {
            let bound = match (op, scalar) {
                (FilterOp::Like, Scalar::Text(pattern)) => Bound::Text(Some(like_to_glob(pattern))),
                _ => Bound::from(scalar),
            };
            params.push(bound);
            match op {
                FilterOp::Eq | FilterOp::In => comparison("="),
                // Null-safe: a NULL field is "not equal" to any value.
                FilterOp::NotEq | FilterOp::NotIn => comparison("IS NOT"),
                FilterOp::Lt => comparison("<"),
                FilterOp::Le => comparison("<="),
                FilterOp::Gt => comparison(">"),
                FilterOp::Ge => comparison(">="),
                FilterOp::Like => comparison("GLOB"),
                FilterOp::ILike => format!("{name} LIKE ? ESCAPE '\\'"),
                FilterOp::Exists => "0".to_string(),
            }
        }
    }
}

/// Translates a case-sensitive SQL LIKE pattern (`%`, `_`, `\` escapes)
/// into the GLOB pattern SQLite matches case-sensitively; SQLite's own
/// LIKE ignores ASCII case.
fn like_to_glob(pattern: &str) -> String {
    fn push_literal(out: &mut String, c: char) {
        if matches!(c, '*' | '?' | '[') {
            out.push('[');
            out.push(c);
            out.push(']');
        } else {
            out.push(c);
        }
    }
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => push_literal(&mut out, chars.next().unwrap_or('\\')),
            '%' => out.push('*'),
            '_' => out.push('?'),
            other => push_literal(&mut out, other),
        }
    }
    out
}

/// Builds the WHERE clause (possibly empty) of a list query and its
/// parameters.
fn where_clause(table: &Table, query: &ListQuery) -> (String, Vec<Bound>) {
    let mut params = Vec::new();
    let mut conditions = Vec::new();
    if let Some(condition) = visibility_condition(table, &query.visibility, &mut params) {
        conditions.push(condition);
    }
    for filter in &query.filters {
        conditions.push(filter_condition(filter, &mut params));
    }
    if conditions.is_empty() {
        (String::new(), params)
    } else {
        (format!(" WHERE {}", conditions.join(" AND ")), params)
    }
}

async fn list_records<T: DeserializeOwned>(
    pool: &SqlitePool,
    table: &Table,
    query: &ListQuery,
) -> Result<Page<T>> {
    check_filter_text(&query.filters)?;
    let (condition, params) = where_clause(table, query);
    let mut conn = pool
        .begin()
        .await
        .map_err(StoreError::query("begin a read transaction"))?;
    let items_available = if query.count {
        let sql = format!("SELECT COUNT(*) FROM {}{condition}", table.name);
        let row = bind_all(sqlx::query(&sql), &params)
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::query("count records"))?;
        let count: i64 = row.try_get(0).map_err(StoreError::query("count records"))?;
        Some(u64::try_from(count).unwrap_or(0))
    } else {
        None
    };
    let sql = format!(
        "{}{condition}{} LIMIT ? OFFSET ?",
        table.select,
        order_clause(query)
    );
    let mut params = params;
    params.push(Bound::Integer(Some(
        i64::try_from(query.limit).unwrap_or(i64::MAX),
    )));
    params.push(Bound::Integer(Some(
        i64::try_from(query.offset).unwrap_or(i64::MAX),
    )));
    let rows = bind_all(sqlx::query(&sql), &params)
        .fetch_all(&mut *conn)
        .await
        .map_err(StoreError::query("list records"))?;
    conn.commit()
        .await
        .map_err(StoreError::query("end a read transaction"))?;
    let items = rows
        .iter()
        .map(|row| decode_record(table.name, table.columns, row))
        .collect::<Result<Vec<_>>>()?;
    Ok(Page {
        items,
        items_available,
    })
}

async fn stream_size(
    conn: &mut SqliteConnection,
    container_uuid: &str,
    stream: LogStream,
) -> Result<u64> {
    let end: Option<i64> = sqlx::query_scalar(
        "SELECT byte_offset + length(data) FROM container_logs \
         WHERE container_uuid = ? AND stream = ? ORDER BY byte_offset DESC LIMIT 1",
    )
    .bind(container_uuid)
    .bind(stream.as_str())
    .fetch_optional(conn)
    .await
    .map_err(StoreError::query("read a log's size"))?;
    Ok(end.and_then(|end| u64::try_from(end).ok()).unwrap_or(0))
}

fn decode_token(row: &SqliteRow) -> Result<ApiToken> {
    let read_error = StoreError::query("read a token");
    let uuid: String = row.try_get("uuid").map_err(read_error)?;
    let scopes: String = row.try_get("scopes").map_err(read_error)?;
    let scopes = serde_json::from_str(&scopes).map_err(|source| StoreError::Decode {
        table: "api_client_authorizations",
        uuid: uuid.clone(),
        source,
    })?;
    let timestamp = |column: &'static str| -> Result<Option<Timestamp>> {
        let text: Option<String> = row.try_get(column).map_err(read_error)?;
        text.map(|text| {
            time::parse(&text).map_err(|err| StoreError::Encode {
                table: "api_client_authorizations",
                uuid: uuid.clone(),
                reason: format!("{column} {text:?} is not a timestamp: {err}"),
            })
        })
        .transpose()
    };
    let created_at = timestamp("created_at")?.unwrap_or_default();
    let expires_at = timestamp("expires_at")?;
    let revoked_at = timestamp("revoked_at")?;
    Ok(ApiToken {
        owner_uuid: row.try_get("owner_uuid").map_err(read_error)?,
        secret_sha256: row.try_get("secret_sha256").map_err(read_error)?,
        container_uuid: row.try_get("container_uuid").map_err(read_error)?,
        scopes,
        created_at,
        expires_at,
        revoked_at,
        uuid,
    })
}

async fn insert_token(conn: &mut SqliteConnection, token: &ApiToken) -> Result<()> {
    let scopes = serde_json::to_string(&token.scopes).map_err(|err| StoreError::Encode {
        table: "api_client_authorizations",
        uuid: token.uuid.clone(),
        reason: err.to_string(),
    })?;
    sqlx::query(
        "INSERT INTO api_client_authorizations \
         (uuid, owner_uuid, secret_sha256, scopes, container_uuid, created_at, expires_at, revoked_at) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(&token.uuid)
    .bind(&token.owner_uuid)
    .bind(&token.secret_sha256)
    .bind(scopes)
    .bind(&token.container_uuid)
    .bind(time::format(&token.created_at))
    .bind(token.expires_at.as_ref().map(time::format))
    .bind(token.revoked_at.as_ref().map(time::format))
    .execute(conn)
    .await
    .map_err(StoreError::query("insert a token"))?;
    Ok(())
}

/// The SQLite store. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and runs the
    /// migrations. `url` is only used in messages.
    pub async fn open(url: &str, path: &Path, max_connections: u32) -> Result<SqliteStore> {
        let invalid = |reason: &str| StoreError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        if path.as_os_str().is_empty() {
            return Err(invalid("the path is empty: expected sqlite://PATH"));
        }
        if path
            .to_str()
            .is_some_and(|p| p.starts_with(":memory:") || p.contains('?'))
        {
            return Err(invalid(
                "only a plain file path is supported, without :memory: or query parameters",
            ));
        }
        prepare_database_file(path)?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                url: url.to_string(),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                url: url.to_string(),
                source,
            })?;
        tracing::info!(path = %path.display(), "opened the SQLite database");
        Ok(SqliteStore { pool })
    }

    /// Runs one statement that changes the dispatch lease `name`, and
    /// reads the lease back, in one transaction.
    async fn change_lease(
        &self,
        name: &str,
        operation: &'static str,
        statement: SqliteQuery<'_>,
    ) -> Result<Option<DispatchLease>> {
        let mut tx = self.begin_write().await?;
        statement
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query(operation))?;
        let lease = read_lease(&mut tx, name).await?;
        commit(tx).await?;
        Ok(lease)
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, Sqlite>> {
        self.pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::query("begin a write transaction"))
    }
}

/// Creates the database file with mode 0600, and its missing directories
/// with mode 0700, before SQLite opens it. SQLite gives the `-wal` and
/// `-shm` files the mode of the database file, so they stay private too.
/// The database contains users' commands, environments and logs.
///
/// An existing file keeps its mode; one that group or others may read is
/// logged as a warning.
fn prepare_database_file(path: &Path) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIRECTORY_MODE)
            .create(parent)
            .map_err(|source| StoreError::CreateDirectory {
                path: parent.to_path_buf(),
                source,
            })?;
    }
    let create_error = |source| StoreError::CreateFile {
        path: path.to_path_buf(),
        source,
    };
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path);
    match created {
        // The umask may have cleared bits of the mode, so set it exactly.
        Ok(file) => file
            .set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE_MODE))
            .map_err(create_error),
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            warn_if_readable_by_others(path);
            Ok(())
        }
        Err(err) => Err(create_error(err)),
    }
}

/// Logs a warning for the database file and its `-wal` and `-shm` files
/// when group or others may read them.
fn warn_if_readable_by_others(path: &Path) {
    let mut paths = vec![path.to_path_buf()];
    for suffix in ["-wal", "-shm"] {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        paths.push(name.into());
    }
    for path in paths {
        let Ok(metadata) = std::fs::metadata(&path) else {
            continue;
        };
        let mode = metadata.permissions().mode() & 0o7777;
        if mode & 0o044 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = %format_args!("{mode:04o}"),
                "group or others can read this database file, which holds users' commands, environments and logs: run chmod 600 on it"
            );
        }
    }
}

fn decode_lease(row: &SqliteRow) -> Result<DispatchLease> {
    let read_error = StoreError::query("read a dispatch lease");
    Ok(DispatchLease {
        name: row.try_get("name").map_err(read_error)?,
        holder: row.try_get("holder").map_err(read_error)?,
        epoch: row.try_get("epoch").map_err(read_error)?,
        expires_at_ms: row.try_get("expires_at_ms").map_err(read_error)?,
    })
}

async fn read_lease(conn: &mut SqliteConnection, name: &str) -> Result<Option<DispatchLease>> {
    let row = sqlx::query(leases::SELECT)
        .bind(name)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("read a dispatch lease"))?;
    row.as_ref().map(decode_lease).transpose()
}

/// Checks the fence against its lease. The write transaction holds
/// SQLite's write lock, so the lease cannot change before the commit.
async fn check_fence(conn: &mut SqliteConnection, fence: &LeaseFence) -> Result<()> {
    let lease = read_lease(conn, &fence.name).await?;
    fence.check(lease.as_ref())
}

async fn read_tunnel(
    conn: &mut SqliteConnection,
    container_uuid: &str,
) -> Result<Option<TunnelLease>> {
    let row = sqlx::query(tunnels::SELECT)
        .bind(container_uuid)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("read a tunnel lease"))?;
    row.as_ref().map(decode_tunnel).transpose()
}

fn decode_tunnel(row: &SqliteRow) -> Result<TunnelLease> {
    let read_error = StoreError::query("read a tunnel lease");
    Ok(TunnelLease {
        container_uuid: row.try_get("container_uuid").map_err(read_error)?,
        controller_url: row.try_get("controller_url").map_err(read_error)?,
        supervisor_id: row.try_get("supervisor_id").map_err(read_error)?,
        epoch: row.try_get("epoch").map_err(read_error)?,
        heartbeat_at_ms: row.try_get("heartbeat_at_ms").map_err(read_error)?,
    })
}

async fn commit(tx: sqlx::Transaction<'_, Sqlite>) -> Result<()> {
    tx.commit()
        .await
        .map_err(StoreError::query("commit a transaction"))
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("reach the database"))?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn insert_user(&self, user: &User, token: &ApiToken) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (uuid, username, is_admin, is_active, created_at, modified_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&user.uuid)
        .bind(&user.username)
        .bind(user.is_admin)
        .bind(user.is_active)
        .bind(time::format(&user.created_at))
        .bind(time::format(&user.modified_at))
        .execute(&mut *tx)
        .await;
        match inserted {
            Err(sqlx::Error::Database(err)) if err.is_unique_violation() => {
                return Err(StoreError::DuplicateUser {
                    username: user.username.clone(),
                })
            }
            Err(source) => {
                return Err(StoreError::Query {
                    operation: "insert a user",
                    source,
                })
            }
            Ok(_) => {}
        }
        insert_token(&mut tx, token).await?;
        commit(tx).await
    }

    async fn get_user(&self, uuid: &str) -> Result<Option<User>> {
        let row = sqlx::query(
            "SELECT uuid, username, is_admin, is_active, created_at, modified_at FROM users WHERE uuid = ?",
        )
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::query("read a user"))?;
        let Some(row) = row else { return Ok(None) };
        let read_error = StoreError::query("read a user");
        let timestamp = |column: &str| -> Result<Timestamp> {
            let text: String = row.try_get(column).map_err(read_error)?;
            time::parse(&text).map_err(|err| StoreError::Encode {
                table: "users",
                uuid: uuid.to_string(),
                reason: format!("{column} {text:?} is not a timestamp: {err}"),
            })
        };
        Ok(Some(User {
            uuid: row.try_get("uuid").map_err(read_error)?,
            username: row.try_get("username").map_err(read_error)?,
            is_admin: row.try_get("is_admin").map_err(read_error)?,
            is_active: row.try_get("is_active").map_err(read_error)?,
            created_at: timestamp("created_at")?,
            modified_at: timestamp("modified_at")?,
        }))
    }

    async fn get_token(&self, uuid: &str) -> Result<Option<ApiToken>> {
        let row = sqlx::query(
            "SELECT uuid, owner_uuid, secret_sha256, scopes, container_uuid, created_at, expires_at, revoked_at \
             FROM api_client_authorizations WHERE uuid = ?",
        )
        .bind(uuid)
        .fetch_optional(&self.pool)
        .await
        .map_err(StoreError::query("read a token"))?;
        row.as_ref().map(decode_token).transpose()
    }

    async fn insert_request(
        &self,
        request: &ContainerRequest,
        secrets: &Secrets,
        container: Option<&Container>,
        reused: Option<&ReusedContainer>,
        passed_over: Option<&[String]>,
    ) -> Result<Versioned<ContainerRequest>> {
        let mut tx = self.begin_write().await?;
        if let Some(container) = container {
            let key = reuse_key(container, &secrets.secret_mounts);
            if let Some(passed_over) = passed_over {
                check_passed_over(&mut tx, container, &key, passed_over).await?;
            }
            insert_container(&mut tx, container, secrets, &key).await?;
        }
        if let Some(reused) = reused {
            check_reused(&mut tx, reused).await?;
        }
        insert_record(&mut tx, &REQUESTS, &request.uuid, request).await?;
        write_request_secrets(&mut tx, &request.uuid, secrets).await?;
        record_attempt(&mut tx, request).await?;
        if let Some(container_uuid) = &request.container_uuid {
            recompute_priority(&mut tx, container_uuid).await?;
        }
        commit(tx).await?;
        Ok(Versioned {
            record: request.clone(),
            version: 1,
        })
    }

    async fn get_request(&self, uuid: &str) -> Result<Option<Versioned<ContainerRequest>>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        get_record(&mut conn, &REQUESTS, uuid).await
    }

    async fn get_request_secrets(&self, uuid: &str) -> Result<Option<Versioned<Secrets>>> {
        get_secrets(&self.pool, &REQUESTS, uuid).await
    }

    async fn list_requests(&self, query: &ListQuery) -> Result<Page<ContainerRequest>> {
        list_records(&self.pool, &REQUESTS, query).await
    }

    async fn update_request(&self, write: &RequestWrite) -> Result<Versioned<ContainerRequest>> {
        let record = &write.record;
        let mut tx = self.begin_write().await?;
        if let Some(container) = &write.new_container {
            let key = reuse_key(container, &write.secrets.secret_mounts);
            if let Some(passed_over) = &write.passed_over {
                check_passed_over(&mut tx, container, &key, passed_over).await?;
            }
            insert_container(&mut tx, container, &write.secrets, &key).await?;
        }
        if let Some(reused) = &write.reused_container {
            check_reused(&mut tx, reused).await?;
        }
        let version = update_record(
            &mut tx,
            &REQUESTS,
            &record.uuid,
            record,
            write.expected_version,
        )
        .await?;
        write_request_secrets(&mut tx, &record.uuid, &write.secrets).await?;
        record_attempt(&mut tx, record).await?;
        if let Some(container_uuid) = &record.container_uuid {
            recompute_priority(&mut tx, container_uuid).await?;
        }
        commit(tx).await?;
        Ok(Versioned {
            record: record.clone(),
            version,
        })
    }

    async fn delete_request(&self, uuid: &str, expected_version: i64) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let container_uuid: Option<Option<String>> = sqlx::query_scalar(
            "DELETE FROM container_requests WHERE uuid = ? AND version = ? RETURNING container_uuid",
        )
        .bind(uuid)
        .bind(expected_version)
        .fetch_optional(&mut *tx)
        .await
        .map_err(StoreError::query("delete a container request"))?;
        let Some(container_uuid) = container_uuid else {
            return Err(StoreError::Conflict {
                table: "container_requests",
                uuid: uuid.to_string(),
            });
        };
        sqlx::query("DELETE FROM request_attempts WHERE request_uuid = ?")
            .bind(uuid)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("forget a request's containers"))?;
        if let Some(container_uuid) = container_uuid {
            recompute_priority(&mut tx, &container_uuid).await?;
        }
        commit(tx).await
    }

    async fn reusable_containers(&self, reuse_key: &str) -> Result<Vec<Versioned<Container>>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        reusable_rows(&mut conn, reuse_key).await
    }

    async fn get_container(&self, uuid: &str) -> Result<Option<Versioned<Container>>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        get_record(&mut conn, &CONTAINERS, uuid).await
    }

    async fn get_container_secrets(&self, uuid: &str) -> Result<Option<Versioned<Secrets>>> {
        get_secrets(&self.pool, &CONTAINERS, uuid).await
    }

    async fn list_containers(&self, query: &ListQuery) -> Result<Page<Container>> {
        list_records(&self.pool, &CONTAINERS, query).await
    }

    async fn container_requested_by(&self, container_uuid: &str, user_uuid: &str) -> Result<bool> {
        sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM request_attempts WHERE container_uuid = ? AND owner_uuid = ?)",
        )
        .bind(container_uuid)
        .bind(user_uuid)
        .fetch_one(&self.pool)
        .await
        .map_err(StoreError::query("check who requested a container"))
    }

    async fn update_container(&self, write: &ContainerWrite) -> Result<Versioned<Container>> {
        let record = &write.record;
        let now = time::format(&record.modified_at);
        let mut tx = self.begin_write().await?;
        if let Some(fence) = &write.lease_fence {
            if let Err(err) = check_fence(&mut tx, fence).await {
                // Rolled back now rather than when the connection is next
                // used, so the transaction releases its locks at once.
                drop(tx.rollback().await);
                return Err(err);
            }
        }
        let version = update_record(
            &mut tx,
            &CONTAINERS,
            &record.uuid,
            record,
            write.expected_version,
        )
        .await?;
        match &write.credentials {
            CredentialChange::Keep => {}
            CredentialChange::Mint(minted) => {
                insert_token(&mut tx, &minted.token).await?;
                sqlx::query("UPDATE containers SET gateway_secret_sha256 = ? WHERE uuid = ?")
                    .bind(&minted.gateway_secret_sha256)
                    .bind(&record.uuid)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::query("store a gateway secret"))?;
            }
            CredentialChange::Revoke { token_uuid } => {
                if let Some(token_uuid) = token_uuid {
                    sqlx::query(
                        "UPDATE api_client_authorizations SET revoked_at = ? \
                         WHERE uuid = ? AND revoked_at IS NULL",
                    )
                    .bind(&now)
                    .bind(token_uuid)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::query("revoke a container token"))?;
                }
                sqlx::query("UPDATE containers SET gateway_secret_sha256 = NULL WHERE uuid = ?")
                    .bind(&record.uuid)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::query("forget a gateway secret"))?;
            }
        }
        if write.clear_secrets {
            sqlx::query(
                "UPDATE containers SET secret_mounts = NULL, runtime_token = NULL \
                 WHERE uuid = ? AND (secret_mounts IS NOT NULL OR runtime_token IS NOT NULL)",
            )
            .bind(&record.uuid)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("clear a container's secrets"))?;
        }
        if let Some(retry) = &write.retry {
            let key = reuse_key(&retry.new_container, &retry.secrets.secret_mounts);
            insert_container(&mut tx, &retry.new_container, &retry.secrets, &key).await?;
            for moved in &retry.requests {
                update_record(
                    &mut tx,
                    &REQUESTS,
                    &moved.record.uuid,
                    &moved.record,
                    moved.version,
                )
                .await?;
                record_attempt(&mut tx, &moved.record).await?;
            }
            recompute_priority(&mut tx, &retry.new_container.uuid).await?;
        }
        if write.finalize_requests {
            sqlx::query(
                "UPDATE container_requests SET state = 'Final', modified_at = ?, \
                 modified_by_user_uuid = ?, secret_mounts = NULL, runtime_token = NULL, \
                 cumulative_cost = cumulative_cost + ?, version = version + 1 \
                 WHERE container_uuid = ? AND state = 'Committed'",
            )
            .bind(&now)
            .bind(&record.modified_by_user_uuid)
            .bind(record.cost)
            .bind(&record.uuid)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("finalize a container's requests"))?;
        }
        commit(tx).await?;
        Ok(Versioned {
            record: record.clone(),
            version,
        })
    }

    async fn log_size(&self, container_uuid: &str, stream: LogStream) -> Result<u64> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        stream_size(&mut conn, container_uuid, stream).await
    }

    async fn append_log(
        &self,
        container_uuid: &str,
        stream: LogStream,
        offset: u64,
        data: &[u8],
    ) -> Result<AppendOutcome> {
        let mut tx = self.begin_write().await?;
        let size = stream_size(&mut tx, container_uuid, stream).await?;
        if offset > size {
            return Ok(AppendOutcome::Gap { size });
        }
        // Bytes before `size` are already stored. A retried append sends
        // the same bytes again, and they are skipped; different bytes are a
        // writer's mistake, and nothing is written. Only the overlap is
        // read, which is empty for an append at the end.
        let skip = usize::try_from(size - offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        if skip > 0 {
            let end = offset + skip as u64;
            let parts: Vec<Vec<u8>> = sqlx::query_scalar(
                "SELECT substr(data, max(? - byte_offset, 0) + 1, \
                 min(byte_offset + length(data), ?) - max(byte_offset, ?)) \
                 FROM container_logs WHERE container_uuid = ? AND stream = ? \
                 AND byte_offset + length(data) > ? AND byte_offset < ? ORDER BY byte_offset",
            )
            .bind(to_i64(offset))
            .bind(to_i64(end))
            .bind(to_i64(offset))
            .bind(container_uuid)
            .bind(stream.as_str())
            .bind(to_i64(offset))
            .bind(to_i64(end))
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::query("read a log"))?;
            if let Some(mismatch) =
                AppendOutcome::compare_overlap(size, offset, &parts.concat(), &data[..skip])
            {
                return Ok(mismatch);
            }
        }
        if skip == data.len() {
            return Ok(AppendOutcome::Appended { size, added: 0 });
        }
        let new_bytes = &data[skip..];
        sqlx::query(
            "INSERT INTO container_logs (container_uuid, stream, byte_offset, data) VALUES (?, ?, ?, ?)",
        )
        .bind(container_uuid)
        .bind(stream.as_str())
        .bind(to_i64(size))
        .bind(new_bytes)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::query("append to a log"))?;
        commit(tx).await?;
        let added = new_bytes.len() as u64;
        Ok(AppendOutcome::Appended {
            size: size + added,
            added,
        })
    }

    async fn read_log(
        &self,
        container_uuid: &str,
        stream: LogStream,
        offset: u64,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, u64)> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::query("begin a read transaction"))?;
        let size = stream_size(&mut tx, container_uuid, stream).await?;
        let end = size.min(offset.saturating_add(max_bytes));
        let mut data = Vec::new();
        if offset < end {
            let rows = sqlx::query(
                "SELECT byte_offset, data FROM container_logs \
                 WHERE container_uuid = ? AND stream = ? \
                 AND byte_offset + length(data) > ? AND byte_offset < ? ORDER BY byte_offset",
            )
            .bind(container_uuid)
            .bind(stream.as_str())
            .bind(to_i64(offset))
            .bind(to_i64(end))
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::query("read a log"))?;
            for row in rows {
                let read_error = StoreError::query("read a log");
                let chunk_offset: i64 = row.try_get("byte_offset").map_err(read_error)?;
                let chunk: Vec<u8> = row.try_get("data").map_err(read_error)?;
                let chunk_start = u64::try_from(chunk_offset).unwrap_or(0);
                let from =
                    usize::try_from(offset.saturating_sub(chunk_start)).unwrap_or(usize::MAX);
                let to = usize::try_from(end - chunk_start).unwrap_or(usize::MAX);
                let to = to.min(chunk.len());
                if from < to {
                    data.extend_from_slice(&chunk[from..to]);
                }
            }
        }
        tx.commit()
            .await
            .map_err(StoreError::query("end a read transaction"))?;
        Ok((data, size))
    }

    async fn latest_change_seq(&self) -> Result<i64> {
        sqlx::query_scalar(changes::LATEST_CHANGE_SEQ)
            .fetch_one(&self.pool)
            .await
            .map_err(StoreError::query("read the latest container change"))
    }

    async fn container_changes(
        &self,
        after: i64,
        visibility: &Visibility,
        limit: u64,
    ) -> Result<ChangePage> {
        let mut params = vec![Bound::Integer(Some(after))];
        let condition = visibility_condition(&CONTAINERS, visibility, &mut params);
        params.push(Bound::Integer(Some(changes::row_limit(limit))));
        let sql = changes::page_query(condition.as_deref());
        // One read transaction: the counter and the rows come from the
        // same snapshot.
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(StoreError::query("begin a read transaction"))?;
        let latest: i64 = sqlx::query_scalar(changes::LATEST_CHANGE_SEQ)
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::query("read the latest container change"))?;
        let rows = bind_all(sqlx::query(&sql), &params)
            .fetch_all(&mut *tx)
            .await
            .map_err(StoreError::query("read container changes"))?;
        tx.commit()
            .await
            .map_err(StoreError::query("end a read transaction"))?;
        changes::decode_page(&rows, limit, latest)
    }

    /// Only this controller writes a SQLite database's containers, and the
    /// API notifies after each of its writes.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<DispatchLease> {
        let statement = sqlx::query(leases::ACQUIRE)
            .bind(name)
            .bind(holder)
            .bind(expires_at_ms)
            .bind(now_ms);
        let lease = self
            .change_lease(name, "acquire a dispatch lease", statement)
            .await?;
        // The statement inserts the row when it is missing.
        lease.ok_or(StoreError::Conflict {
            table: "dispatch_leases",
            uuid: name.to_string(),
        })
    }

    async fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
        expires_at_ms: i64,
    ) -> Result<Option<DispatchLease>> {
        let statement = sqlx::query(leases::RENEW)
            .bind(expires_at_ms)
            .bind(name)
            .bind(holder)
            .bind(epoch);
        self.change_lease(name, "renew a dispatch lease", statement)
            .await
    }

    async fn release_lease(
        &self,
        name: &str,
        holder: &str,
        epoch: i64,
    ) -> Result<Option<DispatchLease>> {
        let statement = sqlx::query(leases::RELEASE)
            .bind(name)
            .bind(holder)
            .bind(epoch);
        self.change_lease(name, "release a dispatch lease", statement)
            .await
    }

    async fn claim_tunnel(
        &self,
        container_uuid: &str,
        controller_url: &str,
        supervisor_id: &str,
        now_ms: i64,
        stale_before_ms: i64,
    ) -> Result<TunnelLease> {
        let mut tx = self.begin_write().await?;
        sqlx::query(tunnels::CLAIM)
            .bind(container_uuid)
            .bind(controller_url)
            .bind(supervisor_id)
            .bind(now_ms)
            .bind(stale_before_ms)
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("claim a tunnel lease"))?;
        let lease = read_tunnel(&mut tx, container_uuid).await?;
        commit(tx).await?;
        // The statement inserts the row when it is missing.
        lease.ok_or(StoreError::Conflict {
            table: "tunnel_leases",
            uuid: container_uuid.to_string(),
        })
    }

    async fn heartbeat_tunnels(&self, controller_url: &str, now_ms: i64) -> Result<u64> {
        let done = sqlx::query(tunnels::HEARTBEAT)
            .bind(now_ms)
            .bind(controller_url)
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("refresh the tunnel leases"))?;
        Ok(done.rows_affected())
    }

    async fn release_tunnel(&self, container_uuid: &str, epoch: i64) -> Result<bool> {
        let done = sqlx::query(tunnels::RELEASE)
            .bind(container_uuid)
            .bind(epoch)
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("release a tunnel lease"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn release_controller_tunnels(&self, controller_url: &str) -> Result<u64> {
        let done = sqlx::query(tunnels::RELEASE_ALL)
            .bind(controller_url)
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("release a controller's tunnel leases"))?;
        Ok(done.rows_affected())
    }

    async fn get_gateway_secret_sha256(&self, container_uuid: &str) -> Result<Option<String>> {
        let hash: Option<Option<String>> =
            sqlx::query_scalar("SELECT gateway_secret_sha256 FROM containers WHERE uuid = ?")
                .bind(container_uuid)
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::query("read a gateway secret's hash"))?;
        Ok(hash.flatten())
    }

    async fn get_tunnel(&self, container_uuid: &str) -> Result<Option<TunnelLease>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        read_tunnel(&mut conn, container_uuid).await
    }

    fn spawn_change_listener(&self, _notifier: Arc<Notifier>) -> Option<ChangeListener> {
        None
    }

    async fn insert_collection(&self, collection: &Collection) -> Result<Versioned<Collection>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        insert_record(&mut conn, &COLLECTIONS, &collection.uuid, collection).await?;
        Ok(Versioned {
            record: collection.clone(),
            version: 1,
        })
    }

    async fn get_collection(&self, uuid: &str) -> Result<Option<Versioned<Collection>>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        get_record(&mut conn, &COLLECTIONS, uuid).await
    }

    async fn find_collection_by_pdh(
        &self,
        portable_data_hash: &str,
        visibility: &Visibility,
    ) -> Result<Option<Versioned<Collection>>> {
        let mut params = vec![Bound::Text(Some(portable_data_hash.to_string()))];
        let mut sql = format!("{} WHERE portable_data_hash = ?", COLLECTIONS.select);
        if let Some(condition) = visibility_condition(&COLLECTIONS, visibility, &mut params) {
            sql.push_str(" AND ");
            sql.push_str(&condition);
        }
        sql.push_str(" ORDER BY modified_at DESC, uuid DESC LIMIT 1");
        let row = bind_all(sqlx::query(&sql), &params)
            .fetch_optional(&self.pool)
            .await
            .map_err(StoreError::query("find a collection by portable data hash"))?;
        row.map(|row| decode_record(COLLECTIONS.name, COLLECTIONS.columns, &row))
            .transpose()
    }

    async fn list_collections(&self, query: &ListQuery) -> Result<Page<Collection>> {
        list_records(&self.pool, &COLLECTIONS, query).await
    }

    async fn update_collection(
        &self,
        collection: &Collection,
        expected_version: i64,
    ) -> Result<Versioned<Collection>> {
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(StoreError::query("connect to the database"))?;
        let version = update_record(
            &mut conn,
            &COLLECTIONS,
            &collection.uuid,
            collection,
            expected_version,
        )
        .await?;
        Ok(Versioned {
            record: collection.clone(),
            version,
        })
    }

    async fn delete_collection(&self, uuid: &str, expected_version: i64) -> Result<()> {
        let result = sqlx::query("DELETE FROM collections WHERE uuid = ? AND version = ?")
            .bind(uuid)
            .bind(expected_version)
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("delete a collection"))?;
        if result.rows_affected() == 0 {
            return Err(StoreError::Conflict {
                table: "collections",
                uuid: uuid.to_string(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[tokio::test]
    async fn new_database_files_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data/db/berth.db");
        let store = SqliteStore::open("sqlite://test", &path, 1).await.unwrap();
        // The migrations wrote to the database, so the WAL files exist.
        assert_eq!(mode_of(&path), 0o600, "database file");
        assert_eq!(mode_of(&dir.path().join("data")), 0o700, "data directory");
        assert_eq!(mode_of(&dir.path().join("data/db")), 0o700, "db directory");
        let user = User {
            uuid: "zzzzz-tpzed-0123456789abcde".into(),
            username: "alice".into(),
            is_admin: false,
            is_active: true,
            created_at: chrono::Utc::now(),
            modified_at: chrono::Utc::now(),
        };
        let token = ApiToken {
            uuid: "zzzzz-gj3su-0123456789abcde".into(),
            owner_uuid: user.uuid.clone(),
            secret_sha256: "0".repeat(64),
            scopes: vec!["all".into()],
            container_uuid: None,
            created_at: chrono::Utc::now(),
            expires_at: None,
            revoked_at: None,
        };
        store.insert_user(&user, &token).await.unwrap();
        for suffix in ["-wal", "-shm"] {
            let side = dir.path().join(format!("data/db/berth.db{suffix}"));
            assert_eq!(mode_of(&side), 0o600, "{suffix} file");
        }
        store.close().await;
    }

    #[tokio::test]
    async fn existing_database_keeps_its_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.db");
        std::fs::write(&path, b"").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let store = SqliteStore::open("sqlite://test", &path, 1).await.unwrap();
        store.ping().await.unwrap();
        assert_eq!(mode_of(&path), 0o640);
        store.close().await;
    }

    #[test]
    fn like_patterns_become_globs() {
        assert_eq!(like_to_glob("abc%"), "abc*");
        assert_eq!(like_to_glob("a_c"), "a?c");
        assert_eq!(like_to_glob("100\\%"), "100%");
        assert_eq!(like_to_glob("what?*["), "what[?][*][[]");
    }

    #[test]
    fn statements_name_every_column() {
        assert!(REQUESTS.insert.contains("published_ports, version"));
        assert!(CONTAINERS
            .update
            .contains("scheduler_job_id = ?, version = version + 1"));
        assert_eq!(
            CONTAINERS.insert.matches('?').count(),
            CONTAINER_COLUMNS.len()
        );
    }
}
