-- Secrets of requests and containers: `secret_mounts` (JSON text of json
-- and text mounts) and `runtime_token` (a user's v2 token). NULL means
-- none.
--
-- They are kept in clear, because the controller must hand them over: the
-- secret mounts to the supervisor of the container, the runtime token to
-- a container that uses the API. The database's own access control (its
-- roles and pg_hba.conf) protects them. They are not record fields, so no
-- list, get or change feed returns them, and the controller clears them
-- when the request or container reaches a final state.

ALTER TABLE container_requests ADD COLUMN secret_mounts TEXT COLLATE "C";
ALTER TABLE container_requests ADD COLUMN runtime_token TEXT COLLATE "C";
ALTER TABLE containers ADD COLUMN secret_mounts TEXT COLLATE "C";
ALTER TABLE containers ADD COLUMN runtime_token TEXT COLLATE "C";
