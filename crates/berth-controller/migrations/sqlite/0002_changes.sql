-- The container change feed (`GET containers/changes`).
--
-- Every insert or update of a containers row sets its change_seq to the
-- next value of one counter, so a reader that remembers the largest
-- change_seq it has seen finds every later change with
-- `change_seq > remembered`. SQLite has one writer at a time, so changes
-- commit in counter order.
--
-- change_seq is not a record field: the API never shows it.

ALTER TABLE containers ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;

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
    value INTEGER NOT NULL
);
INSERT INTO container_change_counter (id, value)
SELECT 1, COALESCE(MAX(change_seq), 0) FROM containers;

-- SQLite's triggers cannot assign to NEW, so these run after the write and
-- set change_seq with a second UPDATE. That UPDATE changes change_seq, so
-- the WHEN clause keeps it from firing the update trigger again even when
-- recursive triggers are enabled.
CREATE TRIGGER containers_change_seq_after_insert AFTER INSERT ON containers
BEGIN
    UPDATE container_change_counter SET value = value + 1 WHERE id = 1;
    UPDATE containers
    SET change_seq = (SELECT value FROM container_change_counter WHERE id = 1)
    WHERE rowid = NEW.rowid;
END;

CREATE TRIGGER containers_change_seq_after_update AFTER UPDATE ON containers
WHEN NEW.change_seq = OLD.change_seq
BEGIN
    UPDATE container_change_counter SET value = value + 1 WHERE id = 1;
    UPDATE containers
    SET change_seq = (SELECT value FROM container_change_counter WHERE id = 1)
    WHERE rowid = NEW.rowid;
END;
