-- Gateway tunnel leases: which controller holds the tunnel of a running
-- container, so that a controller without it forwards a shell there.
--
-- `controller_url` is the internal URL of the controller that accepted the
-- tunnel. `supervisor_id` is the random id the supervisor process sends
-- with every tunnel it dials: a new tunnel for the container replaces the
-- lease only when it comes from the same supervisor, or when the lease's
-- heartbeat is stale. `epoch` grows by one each time the lease changes
-- hands. `heartbeat_at_ms` is refreshed by the holding controller for all
-- its tunnels at once, in milliseconds since the Unix epoch by its clock.

CREATE TABLE tunnel_leases (
    container_uuid  TEXT PRIMARY KEY,
    controller_url  TEXT NOT NULL,
    supervisor_id   TEXT NOT NULL,
    epoch           INTEGER NOT NULL,
    heartbeat_at_ms INTEGER NOT NULL
);

CREATE INDEX tunnel_leases_controller ON tunnel_leases (controller_url);
