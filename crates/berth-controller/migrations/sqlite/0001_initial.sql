-- Berth's first schema for SQLite.
--
-- Scalar fields of the API records are columns, so that list filters and
-- ordering run in SQL. Structured fields (mounts, command, environment, ...)
-- are JSON text. Timestamps are UTC RFC 3339 text with nine fractional
-- digits, so that comparing the text compares the instants.
-- Every record has a `version` that each write increments; writers update
-- `WHERE version = <the version they read>`, which makes each read-check-write
-- atomic.

CREATE TABLE users (
    uuid        TEXT PRIMARY KEY NOT NULL,
    username    TEXT NOT NULL UNIQUE,
    is_admin    INTEGER NOT NULL DEFAULT 0,
    is_active   INTEGER NOT NULL DEFAULT 1,
    created_at  TEXT NOT NULL,
    modified_at TEXT NOT NULL
);

-- API tokens. Only the SHA-256 of each secret is kept. A container token
-- has container_uuid set and is revoked when its container leaves Locked
-- or Running.
CREATE TABLE api_client_authorizations (
    uuid           TEXT PRIMARY KEY NOT NULL,
    owner_uuid     TEXT NOT NULL,
    secret_sha256  TEXT NOT NULL,
    scopes         TEXT NOT NULL DEFAULT '["all"]',
    container_uuid TEXT,
    created_at     TEXT NOT NULL,
    expires_at     TEXT,
    revoked_at     TEXT
);
CREATE INDEX api_client_authorizations_owner ON api_client_authorizations (owner_uuid);
CREATE INDEX api_client_authorizations_container ON api_client_authorizations (container_uuid);

CREATE TABLE containers (
    uuid                        TEXT PRIMARY KEY NOT NULL,
    owner_uuid                  TEXT NOT NULL,
    created_at                  TEXT NOT NULL,
    modified_at                 TEXT NOT NULL,
    modified_by_user_uuid       TEXT,
    state                       TEXT NOT NULL,
    started_at                  TEXT,
    finished_at                 TEXT,
    log                         TEXT,
    environment                 TEXT NOT NULL,
    cwd                         TEXT NOT NULL,
    command                     TEXT NOT NULL,
    output_path                 TEXT NOT NULL,
    output_glob                 TEXT NOT NULL,
    mounts                      TEXT NOT NULL,
    runtime_constraints         TEXT NOT NULL,
    runtime_status              TEXT NOT NULL,
    scheduling_parameters       TEXT NOT NULL,
    output                      TEXT,
    container_image             TEXT NOT NULL,
    progress                    REAL,
    priority                    INTEGER NOT NULL,
    exit_code                   INTEGER,
    auth_uuid                   TEXT,
    locked_by_uuid              TEXT,
    lock_count                  INTEGER NOT NULL,
    runtime_user_uuid           TEXT,
    runtime_auth_scopes         TEXT NOT NULL,
    gateway_address             TEXT,
    interactive_session_started INTEGER NOT NULL,
    output_storage_classes      TEXT NOT NULL,
    output_properties           TEXT NOT NULL,
    cost                        REAL NOT NULL,
    subrequests_cost            REAL NOT NULL,
    service                     INTEGER NOT NULL,
    published_ports             TEXT NOT NULL,
    scheduler_job_id            TEXT,
    -- SHA-256 of the gateway secret minted at lock; NULL when not locked.
    gateway_secret_sha256       TEXT,
    version                     INTEGER NOT NULL
);
CREATE INDEX containers_state_priority ON containers (state, priority);
CREATE INDEX containers_modified_at ON containers (modified_at);

CREATE TABLE container_requests (
    uuid                      TEXT PRIMARY KEY NOT NULL,
    owner_uuid                TEXT NOT NULL,
    created_at                TEXT NOT NULL,
    modified_at               TEXT NOT NULL,
    modified_by_user_uuid     TEXT,
    name                      TEXT,
    description               TEXT,
    properties                TEXT NOT NULL,
    state                     TEXT NOT NULL,
    requesting_container_uuid TEXT,
    container_uuid            TEXT REFERENCES containers (uuid),
    container_count           INTEGER NOT NULL,
    container_count_max       INTEGER,
    mounts                    TEXT NOT NULL,
    runtime_constraints       TEXT NOT NULL,
    scheduling_parameters     TEXT NOT NULL,
    container_image           TEXT,
    environment               TEXT NOT NULL,
    cwd                       TEXT,
    command                   TEXT NOT NULL,
    output_path               TEXT,
    output_glob               TEXT NOT NULL,
    output_name               TEXT,
    output_ttl                INTEGER NOT NULL,
    priority                  INTEGER NOT NULL,
    expires_at                TEXT,
    use_existing              INTEGER NOT NULL,
    filters                   TEXT,
    log_uuid                  TEXT,
    output_uuid               TEXT,
    output_storage_classes    TEXT NOT NULL,
    output_properties         TEXT NOT NULL,
    cumulative_cost           REAL NOT NULL,
    service                   INTEGER NOT NULL,
    published_ports           TEXT NOT NULL,
    version                   INTEGER NOT NULL
);
CREATE INDEX container_requests_owner ON container_requests (owner_uuid, modified_at);
CREATE INDEX container_requests_container ON container_requests (container_uuid, state);
CREATE INDEX container_requests_modified_at ON container_requests (modified_at);

-- Live logs: each row is one appended chunk of one stream, starting at
-- byte_offset. Chunks of a stream never overlap and leave no gaps, so the
-- stream's size is the end of its last chunk.
CREATE TABLE container_logs (
    container_uuid TEXT NOT NULL REFERENCES containers (uuid),
    stream         TEXT NOT NULL,
    byte_offset    INTEGER NOT NULL,
    data           BLOB NOT NULL,
    PRIMARY KEY (container_uuid, stream, byte_offset)
);
