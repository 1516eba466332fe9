-- Collections: a manifest (normalised, without permission signatures) and
-- the portable data hash that names its content. Blocks live in the block
-- store, not in the database.

CREATE TABLE collections (
    uuid                    TEXT COLLATE "C" PRIMARY KEY NOT NULL,
    owner_uuid              TEXT COLLATE "C" NOT NULL,
    created_at              TEXT COLLATE "C" NOT NULL,
    modified_at             TEXT COLLATE "C" NOT NULL,
    modified_by_user_uuid   TEXT COLLATE "C",
    name                    TEXT COLLATE "C",
    description             TEXT COLLATE "C",
    properties              TEXT COLLATE "C" NOT NULL,
    portable_data_hash      TEXT COLLATE "C" NOT NULL,
    manifest_text           TEXT COLLATE "C" NOT NULL,
    replication_desired     BIGINT,
    storage_classes_desired TEXT COLLATE "C" NOT NULL,
    file_count              BIGINT NOT NULL,
    file_size_total         BIGINT NOT NULL,
    version                 BIGINT NOT NULL
);
CREATE INDEX collections_owner ON collections (owner_uuid);
CREATE INDEX collections_portable_data_hash ON collections (portable_data_hash);
CREATE INDEX collections_modified_at ON collections (modified_at);
