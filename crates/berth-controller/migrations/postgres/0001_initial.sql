-- Berth's first schema for PostgreSQL, the same tables as the SQLite schema.
--
-- Scalar fields of the API records are columns, so that list filters and
-- ordering run in SQL. Structured fields (mounts, command, environment, ...)
-- are JSON text. Timestamps are UTC RFC 3339 text with nine fractional
-- digits, and every text column uses the "C" collation, so that comparing
-- and sorting text goes by bytes as in SQLite and comparing timestamps
-- compares the instants.
-- Every record has a `version` that each write increments; writers update
-- `WHERE version = <the version they read>`, which makes each read-check-write
-- atomic.

CREATE TABLE users (
    uuid        TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    username    TEXT COLLATE "C" NOT NULL UNIQUE,
    is_admin    BOOLEAN NOT NULL DEFAULT FALSE,
    is_active   BOOLEAN NOT NULL DEFAULT TRUE,
    created_at  TEXT COLLATE "C" NOT NULL,
    modified_at TEXT COLLATE "C" NOT NULL
);

-- API tokens. Only the SHA-256 of each secret is kept. A container token
-- has container_uuid set and is revoked when its container leaves Locked
-- or Running.
CREATE TABLE api_client_authorizations (
    uuid           TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    owner_uuid     TEXT COLLATE "C" NOT NULL,
    secret_sha256  TEXT COLLATE "C" NOT NULL,
    scopes         TEXT COLLATE "C" NOT NULL DEFAULT '["all"]',
    container_uuid TEXT COLLATE "C",
    created_at     TEXT COLLATE "C" NOT NULL,
    expires_at     TEXT COLLATE "C",
    revoked_at     TEXT COLLATE "C"
);
CREATE INDEX api_client_authorizations_owner ON api_client_authorizations (owner_uuid);
CREATE INDEX api_client_authorizations_container ON api_client_authorizations (container_uuid);

CREATE TABLE containers (
    uuid                        TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    owner_uuid                  TEXT COLLATE "C" NOT NULL,
    created_at                  TEXT COLLATE "C" NOT NULL,
    modified_at                 TEXT COLLATE "C" NOT NULL,
    modified_by_user_uuid       TEXT COLLATE "C",
    state                       TEXT COLLATE "C" NOT NULL,
    started_at                  TEXT COLLATE "C",
    finished_at                 TEXT COLLATE "C",
    log                         TEXT COLLATE "C",
    environment                 TEXT COLLATE "C" NOT NULL,
    cwd                         TEXT COLLATE "C" NOT NULL,
    command                     TEXT COLLATE "C" NOT NULL,
    output_path                 TEXT COLLATE "C" NOT NULL,
    output_glob                 TEXT COLLATE "C" NOT NULL,
    mounts                      TEXT COLLATE "C" NOT NULL,
    runtime_constraints         TEXT COLLATE "C" NOT NULL,
    runtime_status              TEXT COLLATE "C" NOT NULL,
    scheduling_parameters       TEXT COLLATE "C" NOT NULL,
    output                      TEXT COLLATE "C",
    container_image             TEXT COLLATE "C" NOT NULL,
    progress                    DOUBLE PRECISION,
    priority                    BIGINT NOT NULL,
    exit_code                   BIGINT,
    auth_uuid                   TEXT COLLATE "C",
    locked_by_uuid              TEXT COLLATE "C",
    lock_count                  BIGINT NOT NULL,
    runtime_user_uuid           TEXT COLLATE "C",
    runtime_auth_scopes         TEXT COLLATE "C" NOT NULL,
    gateway_address             TEXT COLLATE "C",
    interactive_session_started BOOLEAN NOT NULL,
    output_storage_classes      TEXT COLLATE "C" NOT NULL,
    output_properties           TEXT COLLATE "C" NOT NULL,
    cost                        DOUBLE PRECISION NOT NULL,
    subrequests_cost            DOUBLE PRECISION NOT NULL,
    service                     BOOLEAN NOT NULL,
    published_ports             TEXT COLLATE "C" NOT NULL,
    scheduler_job_id            TEXT COLLATE "C",
    -- SHA-256 of the gateway secret minted at lock; NULL when not locked.
    gateway_secret_sha256       TEXT COLLATE "C",
    version                     BIGINT NOT NULL
);
CREATE INDEX containers_state_priority ON containers (state, priority);
CREATE INDEX containers_modified_at ON containers (modified_at);

CREATE TABLE container_requests (
    uuid                      TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    owner_uuid                TEXT COLLATE "C" NOT NULL,
    created_at                TEXT COLLATE "C" NOT NULL,
    modified_at               TEXT COLLATE "C" NOT NULL,
    modified_by_user_uuid     TEXT COLLATE "C",
    name                      TEXT COLLATE "C",
    description               TEXT COLLATE "C",
    properties                TEXT COLLATE "C" NOT NULL,
    state                     TEXT COLLATE "C" NOT NULL,
    requesting_container_uuid TEXT COLLATE "C",
    container_uuid            TEXT COLLATE "C" REFERENCES containers (uuid),
    container_count           BIGINT NOT NULL,
    container_count_max       BIGINT,
    mounts                    TEXT COLLATE "C" NOT NULL,
    runtime_constraints       TEXT COLLATE "C" NOT NULL,
    scheduling_parameters     TEXT COLLATE "C" NOT NULL,
    container_image           TEXT COLLATE "C",
    environment               TEXT COLLATE "C" NOT NULL,
    cwd                       TEXT COLLATE "C",
    command                   TEXT COLLATE "C" NOT NULL,
    output_path               TEXT COLLATE "C",
    output_glob               TEXT COLLATE "C" NOT NULL,
    output_name               TEXT COLLATE "C",
    output_ttl                BIGINT NOT NULL,
    priority                  BIGINT NOT NULL,
    expires_at                TEXT COLLATE "C",
    use_existing              BOOLEAN NOT NULL,
    filters                   TEXT COLLATE "C",
    log_uuid                  TEXT COLLATE "C",
    output_uuid               TEXT COLLATE "C",
    output_storage_classes    TEXT COLLATE "C" NOT NULL,
    output_properties         TEXT COLLATE "C" NOT NULL,
    cumulative_cost           DOUBLE PRECISION NOT NULL,
    service                   BOOLEAN NOT NULL,
    published_ports           TEXT COLLATE "C" NOT NULL,
    version                   BIGINT NOT NULL
);
CREATE INDEX container_requests_owner ON container_requests (owner_uuid, modified_at);
CREATE INDEX container_requests_container ON container_requests (container_uuid, state);
CREATE INDEX container_requests_modified_at ON container_requests (modified_at);

-- Live logs: each row is one appended chunk of one stream, starting at
-- byte_offset. Chunks of a stream never overlap and leave no gaps, so the
-- stream's size is the end of its last chunk.
CREATE TABLE container_logs (
    container_uuid TEXT COLLATE "C" NOT NULL REFERENCES containers (uuid),
    stream         TEXT COLLATE "C" NOT NULL,
    byte_offset    BIGINT NOT NULL,
    data           BYTEA NOT NULL,
    PRIMARY KEY (container_uuid, stream, byte_offset)
);
