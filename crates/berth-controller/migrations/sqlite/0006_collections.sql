-- Collections: a manifest (normalised, without permission signatures) and
-- the portable data hash that names its content. Blocks live in the block
-- store, not in the database.

CREATE TABLE collections (
    uuid                    TEXT PRIMARY KEY NOT NULL,
    owner_uuid              TEXT NOT NULL,
    created_at              TEXT NOT NULL,
    modified_at             TEXT NOT NULL,
    modified_by_user_uuid   TEXT,
    name                    TEXT,
    description             TEXT,
    properties              TEXT NOT NULL,
    portable_data_hash      TEXT NOT NULL,
    manifest_text           TEXT NOT NULL,
    replication_desired     INTEGER,
    storage_classes_desired TEXT NOT NULL,
    file_count              INTEGER NOT NULL,
    file_size_total         INTEGER NOT NULL,
    version                 INTEGER NOT NULL
);
CREATE INDEX collections_owner ON collections (owner_uuid);
CREATE INDEX collections_portable_data_hash ON collections (portable_data_hash);
CREATE INDEX collections_modified_at ON collections (modified_at);
