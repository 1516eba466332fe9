#!/usr/bin/env bash
# Measure how soon the dispatcher locks a new container: from the commit of
# a container request until its container leaves the Queued state, with the
# controller's change feed against full passes alone.
#
# Two ways, interleaved round by round so that the machine's noise falls on
# both alike:
#   feed     the dispatcher follows the change feed (`watch: true`)
#   resync   the dispatcher only makes its full passes (`watch: false`),
#            which is how it heard of new containers before the feed
# Both use the same `resync_interval`. Each round and way starts
# `berth dispatch` on one controller (SQLite, local backend) and commits one
# request at a random point of the pass interval. It then reads the
# container every 5 ms until it has left Queued, and cancels the request
# and stops the dispatcher. The 5 ms reads bound the resolution. The lock
# comes right before the job's submission, so the time is also the
# dispatcher's share of queue-to-sbatch latency.
#
# It prints the median, minimum and maximum of each way in seconds, and the
# ratio of the resync way's median to the feed's.
#
# Usage: scripts/bench/run-dispatch-latency.sh [ROUNDS]      (default 10)
# Tunables (environment variables):
#   BERTH_BENCH_BIN     berth binary                  [target/release/berth, built if missing]
#   BERTH_BENCH_RESYNC  resync_interval, whole seconds [2]
# Needs python3. It needs no Slurm and no container runtime: the local
# backend's supervisors fail at once without a Docker API socket, after the
# lock, which is all this measures. The controller must serve
# GET /arvados/v1/containers/changes; without it the feed way falls back to
# full passes, and the two ways measure the same thing.
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

ROUNDS=${1:-10}
: "${BERTH_BENCH_BIN:=$REPO_ROOT/target/release/berth}"
: "${BERTH_BENCH_RESYNC:=2}"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
[[ "$BERTH_BENCH_RESYNC" =~ ^[1-9][0-9]*$ ]] || die "invalid BERTH_BENCH_RESYNC '$BERTH_BENCH_RESYNC': give a positive whole number of seconds"
command -v python3 >/dev/null || die "python3 not found: install it"

if [ ! -x "$BERTH_BENCH_BIN" ]; then
  log "building $BERTH_BENCH_BIN"
  (cd "$REPO_ROOT" && cargo build --release -p berth)
fi

work=$(mktemp -d /tmp/berth-dispatch-bench.XXXXXX)
controller_pid=""
dispatcher_pid=""
cleanup() {
  [ -n "$dispatcher_pid" ] && kill "$dispatcher_pid" 2>/dev/null && wait "$dispatcher_pid" 2>/dev/null
  [ -n "$controller_pid" ] && kill "$controller_pid" 2>/dev/null && wait "$controller_pid" 2>/dev/null
  [ -n "${BERTH_BENCH_KEEP:-}" ] && log "kept $work" || rm -rf "$work"
}
trap cleanup EXIT

# The system token, in a file only its owner can read.
(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(24))' >"$work/system-token")
mkdir -m 0700 "$work/credentials"

# write_config FILE [WATCH]: the controller's section, and with WATCH the
# dispatcher's, which needs the controller's address.
write_config() {
  {
    printf 'cluster_id: bench\nsystem_token_file: %s\n' "$work/system-token"
    printf 'controller:\n  listen: 127.0.0.1:0\n  database_url: sqlite://%s\n' "$work/berth.db"
    printf 'supervisor:\n  docker_host: unix://%s\n' "$work/no-docker.sock"
    if [ $# -gt 1 ]; then
      printf 'dispatch:\n  backend: local\n  api_url: %s\n  resync_interval: %ss\n  watch: %s\n  credentials_dir: %s\n' \
        "$api_url" "$BERTH_BENCH_RESYNC" "$2" "$work/credentials"
    fi
  } >"$1"
}

write_config "$work/controller.yml"
"$BERTH_BENCH_BIN" controller --config "$work/controller.yml" >"$work/controller.out" 2>"$work/controller.log" &
controller_pid=$!
api_url=""
for _ in $(seq 300); do
  api_url=$(sed -n 's/^berth controller listening on //p' "$work/controller.out")
  [ -n "$api_url" ] && break
  kill -0 "$controller_pid" 2>/dev/null || { tail -n 20 "$work/controller.log" >&2; die "berth controller exited"; }
  sleep 0.1
done
[ -n "$api_url" ] || die "berth controller did not print its address; see $work/controller.log"
user_token=$("$BERTH_BENCH_BIN" admin create-user bench --config "$work/controller.yml")
write_config "$work/feed.yml" true
write_config "$work/resync.yml" false

# One request: commit it after a random part of the pass interval, and
# read its container every 5 ms until it leaves Queued. Print the seconds
# from the commit's response to the first read that saw it locked. Then
# cancel the request, and wait up to 5 s for its container to end.
cat >"$work/one.py" <<'EOF'
import json, random, sys, time, urllib.request

api_url, token, interval = sys.argv[1].rstrip("/"), sys.argv[2], float(sys.argv[3])

def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api_url + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)

time.sleep(random.uniform(0, interval))
request = call("POST", "/arvados/v1/container_requests", {"container_request": {
    "state": "Committed", "priority": 1, "container_image": "busybox",
    "command": ["true"], "output_path": "/out",
    "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
    "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
}})
committed = time.monotonic()
container = "/arvados/v1/containers/" + request["container_uuid"]
deadline = committed + 10 * interval + 30
while call("GET", container)["state"] == "Queued":
    if time.monotonic() > deadline:
        sys.exit("the container was not locked within %.0f s" % (deadline - committed))
    time.sleep(0.005)
print("%.3f" % (time.monotonic() - committed))
call("PUT", "/arvados/v1/container_requests/" + request["uuid"],
     {"container_request": {"priority": 0}})
end = time.monotonic() + 5
while call("GET", container)["state"] not in ("Complete", "Cancelled") and time.monotonic() < end:
    time.sleep(0.05)
EOF

# time_one WAY: starts a dispatcher with WAY's configuration, times one
# request and stops the dispatcher.
time_one() {
  "$BERTH_BENCH_BIN" dispatch --config "$work/$1.yml" >/dev/null 2>>"$work/$1.log" &
  dispatcher_pid=$!
  # Its first pass starts at once; give it a moment to end.
  sleep 1
  kill -0 "$dispatcher_pid" 2>/dev/null || { tail -n 20 "$work/$1.log" >&2; die "berth dispatch ($1) exited"; }
  python3 "$work/one.py" "$api_url" "$user_token" "$BERTH_BENCH_RESYNC" >>"$work/$1.times" \
    || die "the $1 round failed; see $work/$1.log"
  kill -TERM "$dispatcher_pid"
  wait "$dispatcher_pid" || true
  dispatcher_pid=""
}

log "warming up (one round each, not counted)"
time_one feed
time_one resync
: >"$work/feed.times"
: >"$work/resync.times"
log "measuring $ROUNDS rounds (resync_interval ${BERTH_BENCH_RESYNC}s)"
for _ in $(seq "$ROUNDS"); do
  for way in feed resync; do time_one "$way"; done
done

median() { sort -n "$1" | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
feed_median=$(median "$work/feed.times")
printf '\n%-8s %8s %8s %8s %14s\n' way median min max "this/feed"
for way in feed resync; do
  m=$(median "$work/$way.times")
  lo=$(sort -n "$work/$way.times" | head -n1)
  hi=$(sort -n "$work/$way.times" | tail -n1)
  ratio=$(awk -v a="$m" -v b="$feed_median" 'BEGIN { if (b > 0) printf "%.1f", a / b; else print "inf" }')
  printf '%-8s %8s %8s %8s %14s\n' "$way" "$m" "$lo" "$hi" "$ratio"
done
printf '\n%s rounds; seconds from request commit to Locked; resync_interval %ss; %s CPUs\n' \
  "$ROUNDS" "$BERTH_BENCH_RESYNC" "$(nproc)"
