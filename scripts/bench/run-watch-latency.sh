#!/usr/bin/env bash
# Measure how soon a reader of the container change feed hears of a
# container write, against a client that polls once a second, on loopback.
#
# It runs the example crates/berth-controller/examples/watch_latency.rs,
# which starts its own controllers on port 0:
#   SQLite       one controller: the write and both readers go to it.
#   PostgreSQL   two controllers on one schema (created for the run, then
#                dropped): the write goes through A, the readers call B, so
#                the wake-up crosses the database's LISTEN/NOTIFY.
# Each sample sleeps a random 0 to 1 s, then sets a container's
# scheduler_job_id and times how long until each reader's response carries
# the new value: the long-poller (wait=30, always waiting) and the poller
# (wait=0 once a second), in the same run. It prints a Markdown table with
# the median and 95th percentile in milliseconds, and each median divided by
# the long-poller's.
#
# Usage: scripts/bench/run-watch-latency.sh [SAMPLES]        (default 50)
# Tunables (environment variables):
#   BERTH_BENCH_DATABASE_URL  PostgreSQL database for the second set-up; when
#                             unset, scripts/setup/postgres.sh start (as root)
#                             provides one; "none" skips PostgreSQL      []
#   BERTH_BENCH_PROFILE       cargo profile of the example: release or dev
#                                                                  [release]
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

SAMPLES=${1:-50}
: "${BERTH_BENCH_DATABASE_URL:=}"
: "${BERTH_BENCH_PROFILE:=release}"
[[ "$SAMPLES" =~ ^[1-9][0-9]*$ ]] || die "invalid SAMPLES '$SAMPLES': give a positive whole number"
case "$BERTH_BENCH_PROFILE" in
  release) profile_args=(--release) ;;
  dev) profile_args=() ;;
  *) die "invalid BERTH_BENCH_PROFILE '$BERTH_BENCH_PROFILE': use release or dev" ;;
esac

if [ -z "$BERTH_BENCH_DATABASE_URL" ]; then
  require_root "$@"
  BERTH_BENCH_DATABASE_URL=$("$REPO_ROOT/scripts/setup/postgres.sh" start | sed -n 's/^DATABASE_URL=//p')
  [ -n "$BERTH_BENCH_DATABASE_URL" ] || die "scripts/setup/postgres.sh printed no DATABASE_URL"
fi
example_args=(--samples "$SAMPLES")
[ "$BERTH_BENCH_DATABASE_URL" = none ] || example_args+=(--postgres "$BERTH_BENCH_DATABASE_URL")

cd "$REPO_ROOT"
log "building the example (profile $BERTH_BENCH_PROFILE)"
cargo build --quiet "${profile_args[@]}" -p berth-controller --example watch_latency
log "$SAMPLES samples per set-up, about $((SAMPLES * 2)) s"
cargo run --quiet "${profile_args[@]}" -p berth-controller --example watch_latency -- "${example_args[@]}"
