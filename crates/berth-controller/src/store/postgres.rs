//! The PostgreSQL backend of [`Store`]: an sqlx pool on a database that
//! several controllers may share, with the migrations of
//! `migrations/postgres` run at open.
//!
//! The tables match the SQLite backend's column for column, and records
//! map to columns the same way (see `mapping`). Text columns use the "C"
//! collation, so sorting and comparing (timestamps included) go by bytes as
//! in SQLite.
//!
//! Transactions run at PostgreSQL's default isolation, READ COMMITTED. A
//! conditional update (`WHERE uuid = $n AND version = $m`, see the parent
//! module) that meets a concurrent writer waits for it and then matches
//! no row, which the store reports as a conflict, so each read-check-write
//! stays atomic. Appends to a log take a transaction-scoped advisory lock
//! on the stream, so two appenders at the same offset run one after the
//! other. A list reads its count and its page in one REPEATABLE READ
//! snapshot.
//!
//! A URL may choose the schema through its connection options, for
//! example `postgres://HOST/DB?options[search_path]=berth`.
//!
//! Each controller keeps one more connection, outside the pool, that
//! LISTENs for the notifications the migration's triggers send at every
//! container write and log append (see `listener`).

use std::sync::Arc;
use std::sync::LazyLock;

use async_trait::async_trait;
use berth_core::priority::request_contribution;
use berth_core::time::{self, Timestamp};
use berth_core::{Collection, Container, ContainerRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sqlx::migrate::Migrator;
use sqlx::postgres::{
    PgArguments, PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow, Postgres,
};
use sqlx::query::Query;
use sqlx::Row;

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

mod listener;

static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// Rewrites the `?` placeholders of a statement built from fragments into
/// PostgreSQL's numbered `$1`, `$2`, ... in order. The fragments carry no
/// string literal with a `?`: every value is bound.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut next = 1;
    for c in sql.chars() {
        if c == '?' {
            out.push('$');
            out.push_str(&next.to_string());
            next += 1;
        } else {
            out.push(c);
        }
    }
    out
}

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
        let placeholders: Vec<String> = (1..=columns.len()).map(|i| format!("${i}")).collect();
        let assignments: Vec<String> = names
            .iter()
            .enumerate()
            .map(|(i, n)| format!("{n} = ${}", i + 1))
            .collect();
        let count = columns.len();
        Table {
            name,
            columns,
            select: format!("SELECT {}, version FROM {name}", names.join(", ")),
            insert: format!(
                "INSERT INTO {name} ({}, version) VALUES ({}, 1)",
                names.join(", "),
                placeholders.join(", ")
            ),
            update: format!(
                "UPDATE {name} SET {}, version = version + 1 WHERE uuid = ${} AND version = ${}",
                assignments.join(", "),
                count + 1,
                count + 2
            ),
        }
    }
}

static REQUESTS: LazyLock<Table> =
    LazyLock::new(|| Table::new("container_requests", REQUEST_COLUMNS));
static CONTAINERS: LazyLock<Table> = LazyLock::new(|| Table::new("containers", CONTAINER_COLUMNS));
static COLLECTIONS: LazyLock<Table> =
    LazyLock::new(|| Table::new("collections", COLLECTION_COLUMNS));

type PgQuery<'q> = Query<'q, Postgres, PgArguments>;

fn bind_all<'q>(mut query: PgQuery<'q>, values: &[Bound]) -> PgQuery<'q> {
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
    conn: &mut PgConnection,
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
    conn: &mut PgConnection,
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
    conn: &mut PgConnection,
    table: &Table,
    uuid: &str,
) -> Result<Option<Versioned<T>>> {
    let sql = format!("{} WHERE uuid = $1", table.select);
    let row = sqlx::query(&sql)
        .bind(uuid)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("read a record"))?;
    row.map(|row| decode_record(table.name, table.columns, &row))
        .transpose()
}

/// Recomputes a live container's priority from its Committed requests.
/// Records that a request has (had) a container, so that the request's
/// owner keeps reading it after a retry moves the request on.
async fn record_attempt(conn: &mut PgConnection, request: &ContainerRequest) -> Result<()> {
    let Some(container_uuid) = &request.container_uuid else {
        return Ok(());
    };
    sqlx::query(
        "INSERT INTO request_attempts (request_uuid, container_uuid, owner_uuid) VALUES ($1, $2, $3) \
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
async fn reusable_rows(conn: &mut PgConnection, key: &str) -> Result<Vec<Versioned<Container>>> {
    let sql = format!(
        "({select} WHERE reuse_key = $1 AND state IN ('Queued', 'Locked', 'Running')) \
         UNION ALL \
         ({select} WHERE reuse_key = $1 AND state = 'Complete' AND exit_code = 0 \
         ORDER BY finished_at, uuid LIMIT 1)",
        select = CONTAINERS.select
    );
    let rows = sqlx::query(&sql)
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
    conn: &mut PgConnection,
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
    conn: &mut PgConnection,
    container: &Container,
    secrets: &Secrets,
    key: &str,
) -> Result<()> {
    insert_record(conn, &CONTAINERS, &container.uuid, container).await?;
    let [secret_mounts, runtime_token] = encode_secrets(CONTAINERS.name, &container.uuid, secrets)?;
    sqlx::query(
        "UPDATE containers SET reuse_key = $1, secret_mounts = $2, runtime_token = $3 \
         WHERE uuid = $4",
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
    conn: &mut PgConnection,
    uuid: &str,
    secrets: &Secrets,
) -> Result<()> {
    let [secret_mounts, runtime_token] = encode_secrets(REQUESTS.name, uuid, secrets)?;
    sqlx::query(
        "UPDATE container_requests SET secret_mounts = $1, runtime_token = $2 WHERE uuid = $3",
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
    pool: &PgPool,
    table: &Table,
    uuid: &str,
) -> Result<Option<Versioned<Secrets>>> {
    let sql = format!(
        "SELECT secret_mounts, runtime_token, version FROM {} WHERE uuid = $1",
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
/// version it was chosen at. The row stays share-locked until the
/// transaction ends, so the container cannot change before the request
/// that takes it commits.
async fn check_reused(conn: &mut PgConnection, reused: &ReusedContainer) -> Result<()> {
    let version: Option<i64> =
        sqlx::query_scalar("SELECT version FROM containers WHERE uuid = $1 FOR SHARE")
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

async fn recompute_priority(conn: &mut PgConnection, container_uuid: &str) -> Result<()> {
    let rows = sqlx::query(
        "SELECT uuid, priority, created_at FROM container_requests \
         WHERE container_uuid = $1 AND state = 'Committed' AND priority > 0",
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
        "UPDATE containers SET priority = $1, modified_at = $2, version = version + 1 \
         WHERE uuid = $3 AND priority != $1 AND state IN ('Queued', 'Locked', 'Running')",
    )
    .bind(priority)
    .bind(time::format(&chrono::Utc::now()))
    .bind(container_uuid)
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
                Some("FALSE".to_string())
            }
        }
    }
}

/// PostgreSQL's jsonb operators for filters on keys of object columns.
/// Object columns hold JSON text, cast to jsonb where a filter reads
/// them; `jsonb_exists` stands for the `?` operator, whose name would
/// clash with the placeholders.
static JSON_SQL: JsonSql = JsonSql {
    exists: "jsonb_exists({col}::jsonb, ?)",
    text: "(CASE WHEN jsonb_typeof({col}::jsonb -> ?) = 'string' \
           THEN ({col}::jsonb ->> ?) END) COLLATE \"C\"",
    number: "(CASE WHEN jsonb_typeof({col}::jsonb -> ?) = 'number' \
             THEN ({col}::jsonb ->> ?)::double precision END)",
    boolean: "(CASE WHEN jsonb_typeof({col}::jsonb -> ?) = 'boolean' \
              THEN ({col}::jsonb ->> ?)::boolean END)",
    any: "({col}::jsonb ->> ?)",
    like: "LIKE ?",
    like_param: escape_trailing_backslash,
    ilike: "ILIKE ?",
    ilike_param: escape_trailing_backslash,
    key_param: str::to_string,
    false_literal: "FALSE",
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
        (_, Operand::Null) => "FALSE".to_string(),
        (FilterOp::Like, Operand::List(patterns)) if !patterns.is_empty() => {
            let alternatives: Vec<String> = patterns
                .iter()
                .map(|pattern| {
                    let Scalar::Text(pattern) = pattern else {
                        return "FALSE".to_string();
                    };
                    params.push(Bound::Text(Some(escape_trailing_backslash(pattern))));
                    format!("{name} LIKE ?")
                })
                .collect();
            format!("({})", alternatives.join(" OR "))
        }
        (FilterOp::In | FilterOp::NotIn, Operand::List(items)) => {
            let negate = filter.op == FilterOp::NotIn;
            if items.is_empty() {
                return if negate { "TRUE" } else { "FALSE" }.to_string();
            }
            params.extend(items.iter().map(Bound::from));
            let placeholders = vec!["?"; items.len()].join(", ");
            if negate {
                format!("({name} IS NULL OR {name} NOT IN ({placeholders}))")
            } else {
                format!("{name} IN ({placeholders})")
            }
        }
        (_, Operand::List(_)) => "FALSE".to_string(),
        (op, Operand::One(scalar)) => {
            let bound = match (op, scalar) {
                (FilterOp::Like | FilterOp::ILike, Scalar::Text(pattern)) => {
                    Bound::Text(Some(escape_trailing_backslash(pattern)))
                }
                _ => Bound::from(scalar),
            };
            params.push(bound);
            match op {
                FilterOp::Eq | FilterOp::In => comparison("="),
                // Null-safe: a NULL field is "not equal" to any value.
                FilterOp::NotEq | FilterOp::NotIn => comparison("IS DISTINCT FROM"),
                FilterOp::Lt => comparison("<"),
                FilterOp::Le => comparison("<="),
                FilterOp::Gt => comparison(">"),
                FilterOp::Ge => comparison(">="),
                FilterOp::Like => comparison("LIKE"),
                FilterOp::ILike => comparison("ILIKE"),
                FilterOp::Exists => "FALSE".to_string(),
            }
        }
    }
}

/// Makes a LIKE pattern that ends in its escape character `\\` match that
/// character literally, as SQLite does; PostgreSQL rejects such a pattern.
fn escape_trailing_backslash(pattern: &str) -> String {
    let mut escaped = false;
    for c in pattern.chars() {
        escaped = !escaped && c == '\\';
    }
    if escaped {
        format!("{pattern}\\")
    } else {
        pattern.to_string()
    }
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
    pool: &PgPool,
    table: &Table,
    query: &ListQuery,
) -> Result<Page<T>> {
    check_filter_text(&query.filters)?;
    let (condition, params) = where_clause(table, query);
    let mut conn = pool
        .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await
        .map_err(StoreError::query("begin a read transaction"))?;
    let items_available = if query.count {
        let sql = format!("SELECT COUNT(*) FROM {}{condition}", table.name);
        let sql = numbered(&sql);
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
    let sql = numbered(&sql);
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
    conn: &mut PgConnection,
    container_uuid: &str,
    stream: LogStream,
) -> Result<u64> {
    let end: Option<i64> = sqlx::query_scalar(
        "SELECT byte_offset + octet_length(data) FROM container_logs \
         WHERE container_uuid = $1 AND stream = $2 ORDER BY byte_offset DESC LIMIT 1",
    )
    .bind(container_uuid)
    .bind(stream.as_str())
    .fetch_optional(conn)
    .await
    .map_err(StoreError::query("read a log's size"))?;
    Ok(end.and_then(|end| u64::try_from(end).ok()).unwrap_or(0))
}

fn decode_token(row: &PgRow) -> Result<ApiToken> {
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

async fn insert_token(conn: &mut PgConnection, token: &ApiToken) -> Result<()> {
    let scopes = serde_json::to_string(&token.scopes).map_err(|err| StoreError::Encode {
        table: "api_client_authorizations",
        uuid: token.uuid.clone(),
        reason: err.to_string(),
    })?;
    sqlx::query(
        "INSERT INTO api_client_authorizations \
         (uuid, owner_uuid, secret_sha256, scopes, container_uuid, created_at, expires_at, revoked_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
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

/// The PostgreSQL store. Cloning shares the pool.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Connects to the database `url` names and runs the migrations. The
    /// database must exist; its tables are created when missing.
    pub async fn open(url: &str, max_connections: u32) -> Result<PostgresStore> {
        let options: PgConnectOptions = url.parse().map_err(|err| StoreError::InvalidUrl {
            url: redact(url),
            reason: format!("{err}: expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"),
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections.max(1))
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                url: redact(url),
                source,
            })?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|source| StoreError::Migrate {
                url: redact(url),
                source,
            })?;
        tracing::info!(url = %redact(url), "opened the PostgreSQL database");
        Ok(PostgresStore { pool })
    }

    /// Runs one statement that changes the dispatch lease `name`, and
    /// reads the lease back, in one transaction.
    async fn change_lease(
        &self,
        name: &str,
        operation: &'static str,
        statement: PgQuery<'_>,
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

    async fn begin_write(&self) -> Result<sqlx::Transaction<'_, Postgres>> {
        self.pool
            .begin()
            .await
            .map_err(StoreError::query("begin a write transaction"))
    }

    /// Begins a transaction that writes records, holding the change
    /// counter's lock from its first statement to its end. Record writers
    /// therefore run one at a time, like SQLite's: each one reads what the
    /// one before it committed (a recomputed priority counts every request
    /// that changed), and no two of them can wait for each other's row
    /// locks. The counter is locked anyway by every container write, until
    /// commit, so this costs little more than taking it first.
    async fn begin_record_write(&self) -> Result<sqlx::Transaction<'_, Postgres>> {
        let mut tx = self.begin_write().await?;
        sqlx::query("SELECT 1 FROM container_change_counter WHERE id = 1 FOR UPDATE")
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("lock the change counter"))?;
        Ok(tx)
    }
}

/// Returns the URL with its password replaced by `***`, for messages and
/// logs.
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            // Setting a password fails only for URLs that cannot have one.
            let _ = parsed.set_password(Some("***"));
            parsed.to_string()
        }
        Ok(_) | Err(_) => url.to_string(),
    }
}

fn decode_lease(row: &PgRow) -> Result<DispatchLease> {
    let read_error = StoreError::query("read a dispatch lease");
    Ok(DispatchLease {
        name: row.try_get("name").map_err(read_error)?,
        holder: row.try_get("holder").map_err(read_error)?,
        epoch: row.try_get("epoch").map_err(read_error)?,
        expires_at_ms: row.try_get("expires_at_ms").map_err(read_error)?,
    })
}

async fn read_lease(conn: &mut PgConnection, name: &str) -> Result<Option<DispatchLease>> {
    let row = sqlx::query(&numbered(leases::SELECT))
        .bind(name)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("read a dispatch lease"))?;
    row.as_ref().map(decode_lease).transpose()
}

/// Reads the fence's lease and keeps it from changing until the
/// transaction ends (`FOR SHARE`), then checks the fence.
async fn check_fence(conn: &mut PgConnection, fence: &LeaseFence) -> Result<()> {
    let sql = numbered(&format!("{} FOR SHARE", leases::SELECT));
    let row = sqlx::query(&sql)
        .bind(&fence.name)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("read a dispatch lease"))?;
    let lease = row.as_ref().map(decode_lease).transpose()?;
    fence.check(lease.as_ref())
}

async fn read_tunnel(conn: &mut PgConnection, container_uuid: &str) -> Result<Option<TunnelLease>> {
    let row = sqlx::query(&numbered(tunnels::SELECT))
        .bind(container_uuid)
        .fetch_optional(conn)
        .await
        .map_err(StoreError::query("read a tunnel lease"))?;
    row.as_ref().map(decode_tunnel).transpose()
}

fn decode_tunnel(row: &PgRow) -> Result<TunnelLease> {
    let read_error = StoreError::query("read a tunnel lease");
    Ok(TunnelLease {
        container_uuid: row.try_get("container_uuid").map_err(read_error)?,
        controller_url: row.try_get("controller_url").map_err(read_error)?,
        supervisor_id: row.try_get("supervisor_id").map_err(read_error)?,
        epoch: row.try_get("epoch").map_err(read_error)?,
        heartbeat_at_ms: row.try_get("heartbeat_at_ms").map_err(read_error)?,
    })
}

async fn commit(tx: sqlx::Transaction<'_, Postgres>) -> Result<()> {
    tx.commit()
        .await
        .map_err(StoreError::query("commit a transaction"))
}

#[async_trait]
impl Store for PostgresStore {
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
        let mut tx = self.begin_record_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (uuid, username, is_admin, is_active, created_at, modified_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
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
            "SELECT uuid, username, is_admin, is_active, created_at, modified_at FROM users WHERE uuid = $1",
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
             FROM api_client_authorizations WHERE uuid = $1",
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
        let mut tx = self.begin_record_write().await?;
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
        let mut tx = self.begin_record_write().await?;
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
        let mut tx = self.begin_record_write().await?;
        let container_uuid: Option<Option<String>> = sqlx::query_scalar(
            "DELETE FROM container_requests WHERE uuid = $1 AND version = $2 \
             RETURNING container_uuid",
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
        sqlx::query("DELETE FROM request_attempts WHERE request_uuid = $1")
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
            "SELECT EXISTS (SELECT 1 FROM request_attempts WHERE container_uuid = $1 AND owner_uuid = $2)",
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
        let mut tx = self.begin_record_write().await?;
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
                sqlx::query("UPDATE containers SET gateway_secret_sha256 = $1 WHERE uuid = $2")
                    .bind(&minted.gateway_secret_sha256)
                    .bind(&record.uuid)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::query("store a gateway secret"))?;
            }
            CredentialChange::Revoke { token_uuid } => {
                if let Some(token_uuid) = token_uuid {
                    sqlx::query(
                        "UPDATE api_client_authorizations SET revoked_at = $1 \
                         WHERE uuid = $2 AND revoked_at IS NULL",
                    )
                    .bind(&now)
                    .bind(token_uuid)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::query("revoke a container token"))?;
                }
                sqlx::query("UPDATE containers SET gateway_secret_sha256 = NULL WHERE uuid = $1")
                    .bind(&record.uuid)
                    .execute(&mut *tx)
                    .await
                    .map_err(StoreError::query("forget a gateway secret"))?;
            }
        }
        if write.clear_secrets {
            sqlx::query(
                "UPDATE containers SET secret_mounts = NULL, runtime_token = NULL \
                 WHERE uuid = $1 AND (secret_mounts IS NOT NULL OR runtime_token IS NOT NULL)",
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
                "UPDATE container_requests SET state = 'Final', modified_at = $1, \
                 modified_by_user_uuid = $2, secret_mounts = NULL, runtime_token = NULL, \
                 cumulative_cost = cumulative_cost + $4, version = version + 1 \
                 WHERE container_uuid = $3 AND state = 'Committed'",
            )
            .bind(&now)
            .bind(&record.modified_by_user_uuid)
            .bind(&record.uuid)
            .bind(record.cost)
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
        // Serialises appends to one stream; released when the transaction
        // ends.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("{container_uuid}/{}", stream.as_str()))
            .execute(&mut *tx)
            .await
            .map_err(StoreError::query("lock a log for appending"))?;
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
                "SELECT substring(data FROM (GREATEST($1 - byte_offset, 0) + 1)::integer \
                 FOR (LEAST(byte_offset + octet_length(data), $2) - GREATEST(byte_offset, $1))::integer) \
                 FROM container_logs WHERE container_uuid = $3 AND stream = $4 \
                 AND byte_offset + octet_length(data) > $1 AND byte_offset < $2 ORDER BY byte_offset",
            )
            .bind(to_i64(offset))
            .bind(to_i64(end))
            .bind(container_uuid)
            .bind(stream.as_str())
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
            "INSERT INTO container_logs (container_uuid, stream, byte_offset, data) VALUES ($1, $2, $3, $4)",
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
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(StoreError::query("begin a read transaction"))?;
        let size = stream_size(&mut tx, container_uuid, stream).await?;
        let end = size.min(offset.saturating_add(max_bytes));
        let mut data = Vec::new();
        if offset < end {
            let rows = sqlx::query(
                "SELECT byte_offset, data FROM container_logs \
                 WHERE container_uuid = $1 AND stream = $2 \
                 AND byte_offset + octet_length(data) > $3 AND byte_offset < $4 ORDER BY byte_offset",
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
        let sql = numbered(&changes::page_query(condition.as_deref()));
        // One snapshot for the counter and the rows. Writers commit in
        // counter order (see the migration), so the snapshot contains every
        // change up to the counter's value and none after it.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
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

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        expires_at_ms: i64,
    ) -> Result<DispatchLease> {
        let sql = numbered(leases::ACQUIRE);
        let statement = sqlx::query(&sql)
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
        let sql = numbered(leases::RENEW);
        let statement = sqlx::query(&sql)
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
        let sql = numbered(leases::RELEASE);
        let statement = sqlx::query(&sql).bind(name).bind(holder).bind(epoch);
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
        sqlx::query(&numbered(tunnels::CLAIM))
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
        let done = sqlx::query(&numbered(tunnels::HEARTBEAT))
            .bind(now_ms)
            .bind(controller_url)
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("refresh the tunnel leases"))?;
        Ok(done.rows_affected())
    }

    async fn release_tunnel(&self, container_uuid: &str, epoch: i64) -> Result<bool> {
        let done = sqlx::query(&numbered(tunnels::RELEASE))
            .bind(container_uuid)
            .bind(epoch)
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("release a tunnel lease"))?;
        Ok(done.rows_affected() > 0)
    }

    async fn release_controller_tunnels(&self, controller_url: &str) -> Result<u64> {
        let done = sqlx::query(&numbered(tunnels::RELEASE_ALL))
            .bind(controller_url)
            .execute(&self.pool)
            .await
            .map_err(StoreError::query("release a controller's tunnel leases"))?;
        Ok(done.rows_affected())
    }

    async fn get_gateway_secret_sha256(&self, container_uuid: &str) -> Result<Option<String>> {
        let hash: Option<Option<String>> =
            sqlx::query_scalar("SELECT gateway_secret_sha256 FROM containers WHERE uuid = $1")
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

    fn spawn_change_listener(&self, notifier: Arc<Notifier>) -> Option<ChangeListener> {
        let options = (*self.pool.connect_options()).clone();
        listener::spawn(options, notifier)
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
        let row = bind_all(sqlx::query(&numbered(&sql)), &params)
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
        let result = sqlx::query("DELETE FROM collections WHERE uuid = $1 AND version = $2")
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

/// These tests need a PostgreSQL database: they run when
/// `BERTH_TEST_DATABASE_URL` names one and pass without checking anything
/// otherwise. Each works in a schema of its own, dropped at the end.
#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    /// A store on a fresh schema, and the schema's name.
    async fn store() -> Option<(PostgresStore, String, String)> {
        let base = std::env::var("BERTH_TEST_DATABASE_URL").ok()?;
        let schema = format!("test_{:016x}", rand::random::<u64>());
        let mut conn = PgConnection::connect(&base).await.unwrap();
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut conn)
            .await
            .unwrap();
        let url = format!("{base}?options[search_path]={schema}");
        let store = PostgresStore::open(&url, 4).await.unwrap();
        Some((store, base, schema))
    }

    async fn drop_schema(store: PostgresStore, base: &str, schema: &str) {
        store.close().await;
        let mut conn = PgConnection::connect(base).await.unwrap();
        sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&mut conn)
            .await
            .unwrap();
    }

    fn container(uuid: &str) -> Container {
        serde_json::from_value(serde_json::json!({
            "uuid": uuid,
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

    fn request(uuid: &str, name: &str, container_uuid: &str) -> ContainerRequest {
        serde_json::from_value(serde_json::json!({
            "uuid": uuid,
            "owner_uuid": "zzzzz-tpzed-0123456789abcde",
            "created_at": "2024-01-01T00:00:00.000000000Z",
            "modified_at": "2024-01-01T00:00:00.000000000Z",
            "state": "Committed",
            "name": name,
            "priority": 1,
            "container_uuid": container_uuid,
        }))
        .unwrap()
    }

    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(
            numbered("a = ? AND b IN (?, ?)"),
            "a = $1 AND b IN ($2, $3)"
        );
    }

    #[test]
    fn trailing_escape_matches_itself() {
        assert_eq!(escape_trailing_backslash("a%\\"), "a%\\\\");
        assert_eq!(escape_trailing_backslash("a\\\\"), "a\\\\");
        assert_eq!(escape_trailing_backslash("a\\%"), "a\\%");
    }

    #[test]
    fn passwords_are_hidden_in_messages() {
        let shown = redact("postgres://berth:secret@127.0.0.1:5432/berth");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("127.0.0.1:5432/berth"), "{shown}");
    }

    #[tokio::test]
    async fn stale_version_is_a_conflict() {
        let Some((store, base, schema)) = store().await else {
            return;
        };
        let uuid = "zzzzz-dz642-0123456789abcde";
        let request = request("zzzzz-xvhdp-0123456789abcde", "one", uuid);
        store
            .insert_request(
                &request,
                &Secrets::default(),
                Some(&container(uuid)),
                None,
                None,
            )
            .await
            .unwrap();
        let read = store.get_container(uuid).await.unwrap().unwrap();
        // Inserting the request set the container's priority: version 2.
        assert_eq!(read.version, 2);
        assert!(read.record.priority > 0);
        let write = ContainerWrite {
            record: read.record.clone(),
            expected_version: read.version,
            credentials: CredentialChange::Keep,
            finalize_requests: false,
            retry: None,
            clear_secrets: false,
            lease_fence: None,
        };
        let (first, second) = tokio::join!(
            store.update_container(&write),
            store.update_container(&write)
        );
        let conflicts = [&first, &second]
            .iter()
            .filter(|result| matches!(result, Err(StoreError::Conflict { .. })))
            .count();
        assert_eq!(conflicts, 1, "{first:?} {second:?}");
        drop_schema(store, &base, &schema).await;
    }

    #[tokio::test]
    async fn log_chunks_round_trip_bytes() {
        let Some((store, base, schema)) = store().await else {
            return;
        };
        let uuid = "zzzzz-dz642-0123456789abcde";
        store
            .insert_request(
                &request("zzzzz-xvhdp-0123456789abcde", "one", uuid),
                &Secrets::default(),
                Some(&container(uuid)),
                None,
                None,
            )
            .await
            .unwrap();
        let stream = LogStream::Stdout;
        let bytes: Vec<u8> = (0..=255).collect();
        // The same chunk sent twice at once: one append adds it.
        let (a, b) = tokio::join!(
            store.append_log(uuid, stream, 0, &bytes),
            store.append_log(uuid, stream, 0, &bytes)
        );
        let mut added = [a.unwrap(), b.unwrap()].map(|outcome| match outcome {
            AppendOutcome::Appended { added, .. } => added,
            AppendOutcome::Gap { .. } => panic!("unexpected gap"),
            AppendOutcome::Mismatch { .. } => panic!("unexpected mismatch"),
        });
        added.sort();
        assert_eq!(added, [0, 256]);
        assert_eq!(
            store.append_log(uuid, stream, 200, &bytes).await.unwrap(),
            AppendOutcome::Mismatch {
                size: 256,
                position: 200
            }
        );
        let resent: Vec<u8> = bytes[200..].iter().chain(&bytes[..200]).copied().collect();
        store.append_log(uuid, stream, 200, &resent).await.unwrap();
        assert_eq!(store.log_size(uuid, stream).await.unwrap(), 456);
        assert_eq!(
            store.append_log(uuid, stream, 500, b"x").await.unwrap(),
            AppendOutcome::Gap { size: 456 }
        );
        let (data, size) = store.read_log(uuid, stream, 250, 10).await.unwrap();
        assert_eq!(size, 456);
        // The append at offset 200 resent 56 stored bytes: the store kept
        // only the 200 after them.
        let expected: Vec<u8> = bytes[250..].iter().chain(&bytes[..4]).copied().collect();
        assert_eq!(data, expected);
        drop_schema(store, &base, &schema).await;
    }

    #[tokio::test]
    async fn like_is_case_sensitive_and_ilike_is_not() {
        let Some((store, base, schema)) = store().await else {
            return;
        };
        let uuid = "zzzzz-dz642-0123456789abcde";
        store
            .insert_request(
                &request("zzzzz-xvhdp-0123456789abcde", "Alpha", uuid),
                &Secrets::default(),
                Some(&container(uuid)),
                None,
                None,
            )
            .await
            .unwrap();
        let name = super::super::find_column(REQUEST_COLUMNS, "name").unwrap();
        for (op, expected) in [(FilterOp::Like, 0), (FilterOp::ILike, 1)] {
            let query = ListQuery {
                visibility: Visibility::All,
                filters: vec![Filter {
                    column: name,
                    key: None,
                    op,
                    operand: Operand::One(Scalar::Text("alp%".into())),
                }],
                order: Vec::new(),
                limit: 10,
                offset: 0,
                count: true,
            };
            let page = store.list_requests(&query).await.unwrap();
            assert_eq!(page.items.len(), expected, "{op:?}");
            assert_eq!(page.items_available, Some(expected as u64), "{op:?}");
        }
        drop_schema(store, &base, &schema).await;
    }
}
