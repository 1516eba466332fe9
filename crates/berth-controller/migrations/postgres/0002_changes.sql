-- The container change feed (`GET containers/changes`) and the
-- notifications that wake waiters on every controller.
--
-- Every insert or update of a containers row sets its change_seq to the
-- next value of one counter, so a reader that remembers the largest
-- change_seq it has seen finds every later change with
-- `change_seq > remembered`. change_seq is not a record field: the API
-- never shows it.
--
-- Commit order: a writer takes the counter row's lock at its first write to
-- containers and holds it until it commits or rolls back. So transactions
-- that write containers commit one at a time, in counter order, and a
-- reader never sees change N+1 committed while N is not.
--
-- Notifications: each container write and each log append sends
-- `pg_notify('berth_changes', 'container:UUID')` or `'log:UUID'`. PostgreSQL
-- delivers them at commit, to every session that LISTENs on the channel:
-- each controller keeps one such session and wakes its waiters.

ALTER TABLE containers ADD COLUMN change_seq BIGINT NOT NULL DEFAULT 0;

-- Existing rows are numbered in the order they last changed.
UPDATE containers SET change_seq = ranked.seq
FROM (
    SELECT uuid, row_number() OVER (ORDER BY modified_at, uuid) AS seq FROM containers
) AS ranked
WHERE containers.uuid = ranked.uuid;

CREATE INDEX containers_change_seq ON containers (change_seq);

-- One row: the change_seq of the latest container change (0 before any).
CREATE TABLE container_change_counter (
    id    INTEGER PRIMARY KEY NOT NULL CHECK (id = 1),
    value BIGINT NOT NULL
);
INSERT INTO container_change_counter (id, value)
SELECT 1, COALESCE(MAX(change_seq), 0) FROM containers;

-- Takes the counter's lock before a statement locks any containers row, so
-- every container writer takes the counter first and row locks after it,
-- and the counter adds no lock cycle. Without it, the row trigger below
-- would take the counter after the row's lock, and a transaction that
-- writes two containers could deadlock with another that writes the second
-- of them.
CREATE FUNCTION berth_lock_change_counter() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM container_change_counter WHERE id = 1 FOR UPDATE;
    RETURN NULL;
END;
$$;

CREATE TRIGGER containers_lock_change_counter
BEFORE INSERT OR UPDATE ON containers
FOR EACH STATEMENT EXECUTE FUNCTION berth_lock_change_counter();

CREATE FUNCTION berth_next_change_seq() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    UPDATE container_change_counter SET value = value + 1 WHERE id = 1
    RETURNING value INTO NEW.change_seq;
    PERFORM pg_notify('berth_changes', 'container:' || NEW.uuid);
    RETURN NEW;
END;
$$;

CREATE TRIGGER containers_change_seq
BEFORE INSERT OR UPDATE ON containers
FOR EACH ROW EXECUTE FUNCTION berth_next_change_seq();

CREATE FUNCTION berth_notify_log_append() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('berth_changes', 'log:' || NEW.container_uuid);
    RETURN NULL;
END;
$$;

CREATE TRIGGER container_logs_notify
AFTER INSERT ON container_logs
FOR EACH ROW EXECUTE FUNCTION berth_notify_log_append();
