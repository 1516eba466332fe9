#!/usr/bin/env bash
# Measure what the change-feed triggers of the PostgreSQL migration
# 0002_changes cost a container write.
#
# It creates a schema of its own, applies the controller's migrations to it
# with psql and inserts one container. It then times pgbench runs of a
# one-row UPDATE of that container (one transaction each, one client) in
# three variants, interleaved round by round:
#   none   the containers table's triggers disabled: the write without
#          the feed
#   row    only the row trigger: next change_seq and pg_notify
#   both   the row trigger and the statement trigger that takes the
#          counter's lock first (what the migration installs)
# It prints the median of each variant's mean latency per transaction, in
# milliseconds, and its ratio to "none". The schema is dropped at the end.
#
# Usage: scripts/bench/run-trigger-cost.sh [ROUNDS]     (default 5)
# Tunables (environment variables):
#   BERTH_BENCH_DATABASE_URL  PostgreSQL database, postgres://USER:PASSWORD@HOST:PORT/DB
#                             [postgres://berth:berth@127.0.0.1:5432/berth]
#   BERTH_BENCH_TRANSACTIONS  transactions per pgbench run         [5000]
# Needs psql and pgbench (Debian: postgresql-client; pgbench is in the
# server package, under /usr/lib/postgresql/VERSION/bin).
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

ROUNDS=${1:-5}
: "${BERTH_BENCH_DATABASE_URL:=postgres://berth:berth@127.0.0.1:5432/berth}"
: "${BERTH_BENCH_TRANSACTIONS:=5000}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
[[ "$BERTH_BENCH_TRANSACTIONS" =~ ^[1-9][0-9]*$ ]] \
  || die "invalid BERTH_BENCH_TRANSACTIONS '$BERTH_BENCH_TRANSACTIONS': give a positive whole number"
command -v psql >/dev/null || die "psql not found: install postgresql-client"
pgbench=$(command -v pgbench || true)
for candidate in /usr/lib/postgresql/*/bin/pgbench; do
  [ -n "$pgbench" ] || [ ! -x "$candidate" ] || pgbench=$candidate
done
[ -n "$pgbench" ] || die "pgbench not found: install PostgreSQL's server package"

migrations=$REPO_ROOT/crates/berth-controller/migrations/postgres
schema=bench_triggers_$$
work=$(mktemp -d /tmp/berth-trigger-bench.XXXXXX)
sql() { psql -q -X -v ON_ERROR_STOP=1 "$BERTH_BENCH_DATABASE_URL" -c "SET search_path = $schema; $1" >/dev/null; }
cleanup() {
  psql -q -X "$BERTH_BENCH_DATABASE_URL" -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

psql -q -X -v ON_ERROR_STOP=1 "$BERTH_BENCH_DATABASE_URL" -c "CREATE SCHEMA $schema" >/dev/null
for file in "$migrations"/*.sql; do
  PGOPTIONS="-c search_path=$schema" psql -q -X -v ON_ERROR_STOP=1 "$BERTH_BENCH_DATABASE_URL" -f "$file" >/dev/null
done
sql "INSERT INTO containers (uuid, owner_uuid, created_at, modified_at, state, environment, cwd,
  command, output_path, output_glob, mounts, runtime_constraints, runtime_status,
  scheduling_parameters, container_image, priority, lock_count, runtime_auth_scopes,
  interactive_session_started, output_storage_classes, output_properties, cost,
  subrequests_cost, service, published_ports, version)
  VALUES ('zzzzz-dz642-000000000000000', 'zzzzz-tpzed-000000000000000',
  '2026-01-01T00:00:00.000000000Z', '2026-01-01T00:00:00.000000000Z', 'Queued', '{}', '.',
  '[]', '/out', '[]', '{}', '{}', '{}', '{}', 'busybox', 0, 0, '[]', FALSE, '[]', '{}', 0, 0,
  FALSE, '{}', 1)"
echo "UPDATE containers SET priority = priority + 1 WHERE uuid = 'zzzzz-dz642-000000000000000';" >"$work/update.sql"

# time_variant NAME: runs pgbench once and appends its mean latency in ms.
time_variant() {
  PGOPTIONS="-c search_path=$schema" "$pgbench" -n -c 1 -t "$BERTH_BENCH_TRANSACTIONS" \
    -f "$work/update.sql" "$BERTH_BENCH_DATABASE_URL" 2>/dev/null \
    | sed -n 's/^latency average = \([0-9.]*\) ms$/\1/p' >>"$work/$1.times"
}

log "$ROUNDS rounds of $BERTH_BENCH_TRANSACTIONS one-row updates per variant"
for round in $(seq "$ROUNDS"); do
  time_variant both
  sql "ALTER TABLE containers DISABLE TRIGGER containers_lock_change_counter"
  time_variant row
  sql "ALTER TABLE containers DISABLE TRIGGER USER"
  time_variant none
  sql "ALTER TABLE containers ENABLE TRIGGER USER"
  log "round $round done"
done

median() { sort -n "$work/$1.times" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
base=$(median none)
printf '| triggers | median latency per write (ms) | / none |\n| --- | --- | --- |\n'
for variant in none row both; do
  value=$(median "$variant")
  printf '| %s | %.3f | %.2f |\n' "$variant" "$value" "$(awk -v a="$value" -v b="$base" 'BEGIN { print a / b }')"
done
