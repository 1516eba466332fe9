-- Container reuse, and the containers each request has had.
--
-- Each container keeps the SHA-256 of the fields two
-- containers must share to be interchangeable (see the controller's reuse
-- module), so that a committed request finds candidates with one indexed
-- lookup. The key is computed by the controller when it inserts a
-- container; containers created before this migration have none and are
-- never reused.

ALTER TABLE containers ADD COLUMN reuse_key TEXT COLLATE "C";
CREATE INDEX containers_reuse_key ON containers (reuse_key) WHERE reuse_key IS NOT NULL;

-- Every container a request has had: the one it has now, and the earlier
-- attempts that were cancelled and retried. A user reads a container
-- through any of their requests that had it, so the logs of earlier
-- attempts stay readable after a retry.
CREATE TABLE request_attempts (
    request_uuid   TEXT COLLATE "C" NOT NULL,
    container_uuid TEXT COLLATE "C" NOT NULL,
    owner_uuid     TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (request_uuid, container_uuid)
);
CREATE INDEX request_attempts_owner ON request_attempts (owner_uuid, container_uuid);
CREATE INDEX request_attempts_container ON request_attempts (container_uuid);

INSERT INTO request_attempts (request_uuid, container_uuid, owner_uuid)
SELECT uuid, container_uuid, owner_uuid FROM container_requests WHERE container_uuid IS NOT NULL;
