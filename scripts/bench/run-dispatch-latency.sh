#!/usr/bin/env bash
# Measure how soon the dispatcher acts on a new container with the
# controller's change feed, against the same dispatcher without it, and
# how many list calls an idle dispatcher makes each way.
#
# Two ways, with the same poll_interval and resync_interval:
#   feed      the dispatcher follows the change feed (`watch: true`)
#   no-feed   it does not (`watch: false`), so it lists the queue at each
#             poll: how it heard of new containers before the feed
# Each round runs both ways in random order. A way starts `berth
# dispatch`, waits until the controller's request log shows its first
# pass's two list calls, sleeps a random part of the poll interval, and
# commits one request for `sleep 1` with `use_existing: false`. It
# follows the container through the change feed (a long-poll, so waiting
# adds no load) and records when a feed response first shows the
# container Locked and Running, counted from the commit's response. Once
# the container is Complete it stops the dispatcher.
#
# Then each way's dispatcher runs idle (no container) for
# BERTH_BENCH_IDLE seconds after its first pass, and the script counts the
# list calls (`GET /arvados/v1/containers`) and feed reads in the
# controller's request log over that window.
#
# It prints two Markdown tables: the median and 95th percentile (nearest
# rank) of commit-to-Locked and commit-to-Running per way, each median
# divided by the no-feed way's; and the idle calls per minute.
#
# Usage: scripts/bench/run-dispatch-latency.sh [ROUNDS]  (as root; default 10)
# Tunables (environment variables):
#   BERTH_BENCH_BIN      berth binary        [target/release/berth, built when a source changed]
#   BERTH_BENCH_BACKEND  slurm or local                                  [slurm]
#   BERTH_BENCH_POLL     poll_interval, whole seconds                      [10]
#   BERTH_BENCH_RESYNC   resync_interval, whole seconds                   [300]
#   BERTH_BENCH_IDLE     idle window per way, seconds; 0 skips it
#                        [resync + 10, so that it holds one resynchronisation]
#   BERTH_PODMAN_SOCK    Podman API socket                [/run/berth/podman.sock]
#   BERTH_TEST_IMAGE     image to run                  [localhost/busybox:latest]
# Needs python3, Podman's API socket with the test image (scripts/setup/
# podman.sh service-start, test-image.sh) and, for the Slurm backend,
# Slurm (scripts/setup/slurm.sh).
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"
# shellcheck source=scripts/bench/lib.sh
. "$REPO_ROOT/scripts/bench/lib.sh"

ROUNDS=${1:-10}
: "${BERTH_BENCH_BIN:=$REPO_ROOT/target/release/berth}"
: "${BERTH_BENCH_BACKEND:=slurm}"
: "${BERTH_BENCH_POLL:=10}"
: "${BERTH_BENCH_RESYNC:=300}"
: "${BERTH_BENCH_IDLE:=$((BERTH_BENCH_RESYNC + 10))}"
: "${BERTH_PODMAN_SOCK:=$BERTH_RUN_DIR/podman.sock}"
: "${BERTH_TEST_IMAGE:=localhost/busybox:latest}"
require_root "$@"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
[[ "$BERTH_BENCH_POLL" =~ ^[1-9][0-9]*$ ]] || die "invalid BERTH_BENCH_POLL '$BERTH_BENCH_POLL': give a positive whole number of seconds"
[[ "$BERTH_BENCH_RESYNC" =~ ^[1-9][0-9]*$ ]] || die "invalid BERTH_BENCH_RESYNC '$BERTH_BENCH_RESYNC': give a positive whole number of seconds"
[ "$BERTH_BENCH_RESYNC" -ge "$BERTH_BENCH_POLL" ] || die "invalid BERTH_BENCH_RESYNC '$BERTH_BENCH_RESYNC': it must be at least BERTH_BENCH_POLL ($BERTH_BENCH_POLL)"
[[ "$BERTH_BENCH_IDLE" =~ ^[0-9]+$ ]] || die "invalid BERTH_BENCH_IDLE '$BERTH_BENCH_IDLE': give a whole number of seconds, 0 to skip"
case "$BERTH_BENCH_BACKEND" in
  slurm) command -v sbatch >/dev/null || die "sbatch not found: run scripts/setup/slurm.sh first" ;;
  local) ;;
  *) die "invalid BERTH_BENCH_BACKEND '$BERTH_BENCH_BACKEND': use slurm or local" ;;
esac
[ -S "$BERTH_PODMAN_SOCK" ] || die "no Podman socket at $BERTH_PODMAN_SOCK: run scripts/setup/podman.sh service-start"
command -v python3 >/dev/null || die "python3 not found: install it"

bench_build "$BERTH_BENCH_BIN"
bench_start_controller "$BERTH_BENCH_BIN" berth-dispatch-bench
for way in feed no-feed; do
  watch=true
  [ "$way" = feed ] || watch=false
  bench_write_config "$work/$way.yml" "$BERTH_BENCH_BACKEND" "$watch" "$BERTH_BENCH_POLL" "$BERTH_BENCH_RESYNC"
done

cat >"$work/bench.py" <<'EOF'
import json, math, os, random, signal, statistics, subprocess, sys, time
import urllib.request

berth, work, api_url, token, image = sys.argv[1:6]
rounds, poll, idle = int(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8])
api_url = api_url.rstrip("/")
WAYS = ("feed", "no-feed")
# The route field ends with '"' and is followed by '}' or by more fields
# of the span (the request id).
LIST_SPAN = 'route="/arvados/v1/containers" '
FEED_SPAN = 'route="/arvados/v1/containers/changes" '


def fail(message):
    sys.exit("error: " + message)


def count(span):
    """Counts the requests on `span`'s route in the controller's log."""
    with open(os.path.join(work, "controller.log"), errors="replace") as log:
        return sum(
            1
            for line in log
            if " answered " in line
            and (span in line or span.rstrip() + "}" in line)
        )


def call(method, path, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api_url + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def start_dispatcher(way):
    """Starts `berth dispatch` and returns once its first pass has listed."""
    lists = count(LIST_SPAN)
    with open(os.path.join(work, way + ".log"), "a") as log:
        process = subprocess.Popen(
            [berth, "dispatch", "--config", os.path.join(work, way + ".yml")],
            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 60
    while count(LIST_SPAN) < lists + 2:
        if process.poll() is not None:
            fail("berth dispatch (%s) exited; see %s/%s.log" % (way, work, way))
        if time.monotonic() > deadline:
            stop(process)
            fail("berth dispatch (%s) made no first pass within 60 s" % way)
        time.sleep(0.05)
    return process


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def one_round(way):
    """Returns the seconds from commit to Locked and to Running."""
    process = start_dispatcher(way)
    try:
        time.sleep(random.uniform(0, poll))
        cursor = call("GET", "/arvados/v1/containers/changes")["cursor"]
        request = call("POST", "/arvados/v1/container_requests", {"container_request": {
            "state": "Committed", "priority": 1, "use_existing": False,
            "container_image": image, "command": ["sleep", "1"], "output_path": "/out",
            "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
            "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
        }})
        committed = time.monotonic()
        uuid = request["container_uuid"]
        if request["state"] != "Committed":
            fail("request %s is %s, not Committed" % (request["uuid"], request["state"]))
        locked = running = final = None
        deadline = committed + 3 * poll + 120
        while final is None:
            if time.monotonic() > deadline:
                fail("container %s did not finish within %.0f s" % (uuid, deadline - committed))
            page = call("GET", "/arvados/v1/containers/changes?after=%s&wait=30" % cursor)
            seen = time.monotonic()
            cursor = page["cursor"]
            for container in page["items"]:
                if container["uuid"] != uuid:
                    continue
                state = container["state"]
                if state != "Queued" and locked is None:
                    locked = seen
                if state == "Running" and running is None:
                    running = seen
                if state in ("Complete", "Cancelled"):
                    final = state
        if final != "Complete":
            fail("container %s ended %s; see %s/%s.log" % (uuid, final, work, way))
        if running is None:
            fail("container %s went from Locked to Complete between two feed reads" % uuid)
        return locked - committed, running - committed
    finally:
        stop(process)


def idle_load(way):
    """Returns list calls and feed reads per minute of an idle dispatcher."""
    process = start_dispatcher(way)
    try:
        time.sleep(1)
        lists, reads = count(LIST_SPAN), count(FEED_SPAN)
        start = time.monotonic()
        time.sleep(idle)
        minutes = (time.monotonic() - start) / 60
        lists, reads = count(LIST_SPAN) - lists, count(FEED_SPAN) - reads
    finally:
        stop(process)
    return lists, lists / minutes, reads / minutes


def p95(values):
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


print("warming up: one round each, not counted", file=sys.stderr)
for way in WAYS:
    one_round(way)
times = {way: {"locked": [], "running": []} for way in WAYS}
for number in range(1, rounds + 1):
    order = list(WAYS)
    random.shuffle(order)
    for way in order:
        locked, running = one_round(way)
        times[way]["locked"].append(locked)
        times[way]["running"].append(running)
    print("round %d of %d: %s" % (number, rounds, ", ".join(
        "%s %.3f/%.3f s" % (way, times[way]["locked"][-1], times[way]["running"][-1])
        for way in WAYS)), file=sys.stderr)

medians = {way: {kind: statistics.median(times[way][kind]) for kind in ("locked", "running")}
           for way in WAYS}
print()
print("| way | rounds | to Locked, median (s) | to Locked, p95 (s) | to Running, median (s) "
      "| to Running, p95 (s) | Locked median / no-feed's | Running median / no-feed's |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for way in WAYS:
    row = [way, str(rounds)]
    for kind in ("locked", "running"):
        row += ["%.3f" % medians[way][kind], "%.3f" % p95(times[way][kind])]
    for kind in ("locked", "running"):
        row.append("%.4f" % (medians[way][kind] / medians["no-feed"][kind]))
    print("| " + " | ".join(row) + " |")

if idle > 0:
    print("\nidle dispatchers, %d s each after the first pass" % idle, file=sys.stderr)
    print()
    print("| way | window (s) | list calls | list calls per minute | feed reads per minute |")
    print("| --- | --- | --- | --- | --- |")
    for way in WAYS:
        lists, lists_per_minute, reads_per_minute = idle_load(way)
        print("| %s | %d | %d | %.2f | %.2f |" % (way, idle, lists, lists_per_minute, reads_per_minute))
EOF

log "$ROUNDS rounds on $BERTH_BENCH_BACKEND, poll_interval ${BERTH_BENCH_POLL}s, resync_interval ${BERTH_BENCH_RESYNC}s, then ${BERTH_BENCH_IDLE} s idle per way"
python3 "$work/bench.py" "$BERTH_BENCH_BIN" "$work" "$api_url" "$user_token" "$BERTH_TEST_IMAGE" \
  "$ROUNDS" "$BERTH_BENCH_POLL" "$BERTH_BENCH_IDLE"
printf '\n%s backend, poll_interval %ss, resync_interval %ss, %s CPUs\n' \
  "$BERTH_BENCH_BACKEND" "$BERTH_BENCH_POLL" "$BERTH_BENCH_RESYNC" "$(nproc)"
