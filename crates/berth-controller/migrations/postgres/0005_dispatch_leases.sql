-- Leader leases of dispatchers: one row per lease name (a cluster's
-- dispatchers of one batch system share a name), so that one dispatcher
-- is active and the others wait as standbys.
--
-- `holder` is the random id of the dispatcher process that holds the
-- lease, NULL once it released it. `epoch` grows by one each time another
-- process takes the lease, and never goes back, so a lock call that
-- carries an older epoch comes from a dispatcher that lost the lease.
-- `expires_at_ms` is the expiry in milliseconds since the Unix epoch, by
-- the clock of the controller that wrote it: controllers that share the
-- database need synchronised clocks (NTP).

CREATE TABLE dispatch_leases (
    name          TEXT COLLATE "C" PRIMARY KEY,
    holder        TEXT COLLATE "C",
    epoch         BIGINT NOT NULL,
    expires_at_ms BIGINT NOT NULL
);
