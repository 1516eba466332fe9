#!/usr/bin/env bash
# Measure, on an idle single-node Slurm cluster, how long Berth takes from a
# request's creation to its container Running, against plain `sbatch` from
# submission to the job's start; and from the container's exit to its
# request becoming Final.
#
# One controller (SQLite) and one `berth dispatch` (Slurm backend, change
# feed on) run for the whole benchmark. Each round runs two ways, in random
# order:
#   berth    commits a request for `sh -c 'sleep 1; cat /proc/uptime'` with
#            `use_existing: false` and follows the container through the
#            change feed (a long-poll). Creation to Running runs from just
#            before the create call to the feed response that first shows
#            the container Running. Exit to Final runs from the container's
#            last act (reading /proc/uptime, which shows the host's boot
#            clock, 10 ms steps) to the feed response that shows it Complete;
#            the script then checks that the request is Final, which the
#            controller writes in the same transaction.
#   sbatch   `sbatch` of a batch script whose first command writes the time
#            (`date +%s.%N`) to a file; submission to start runs from just
#            before sbatch is called to that time.
# Each way starts after a random pause of 0 to 1 s, so that its submissions
# fall at random points of Slurm's scheduling tick (once a second here).
# It prints the median, 95th percentile (nearest rank), minimum and maximum
# of each, and the differences the goals are stated in.
#
# Usage: scripts/bench/run-dispatch-timing.sh [ROUNDS]  (as root; default 20)
# Tunables (environment variables):
#   BERTH_BENCH_BIN    berth binary        [target/release/berth, built when a source changed]
#   BERTH_PODMAN_SOCK  Podman API socket   [/run/berth/podman.sock]
#   BERTH_TEST_IMAGE   image to run        [localhost/busybox:latest]
# Needs python3, Slurm (scripts/setup/slurm.sh), Podman's API socket and the
# test image (scripts/setup/podman.sh service-start, test-image.sh).
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"
# shellcheck source=scripts/bench/lib.sh
. "$REPO_ROOT/scripts/bench/lib.sh"

ROUNDS=${1:-20}
: "${BERTH_BENCH_BIN:=$REPO_ROOT/target/release/berth}"
: "${BERTH_PODMAN_SOCK:=$BERTH_RUN_DIR/podman.sock}"
: "${BERTH_TEST_IMAGE:=localhost/busybox:latest}"
require_root "$@"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
command -v sbatch >/dev/null || die "sbatch not found: run scripts/setup/slurm.sh first"
[ -S "$BERTH_PODMAN_SOCK" ] || die "no Podman socket at $BERTH_PODMAN_SOCK: run scripts/setup/podman.sh service-start"
command -v python3 >/dev/null || die "python3 not found: install it"

bench_build "$BERTH_BENCH_BIN"
bench_start_controller "$BERTH_BENCH_BIN" berth-timing-bench
bench_write_config "$work/dispatch.yml" slurm true 10 300
mkdir -m 0700 "$work/sbatch"

cat >"$work/bench.py" <<'EOF'
import json, math, os, random, signal, statistics, subprocess, sys, time
import urllib.request

berth, work, api_url, token, image, rounds = sys.argv[1:7]
rounds = int(rounds)
api_url = api_url.rstrip("/")


def fail(message):
    sys.exit("error: " + message)


def boot_clock():
    """The clock /proc/uptime shows, in seconds."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def call(method, path, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api_url + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
        return json.loads(raw) if response.headers.get_content_type() == "application/json" else raw


def start_dispatcher():
    """Starts `berth dispatch` and returns once it follows the feed."""
    log_path = os.path.join(work, "dispatch.log")
    with open(log_path, "a") as log:
        process = subprocess.Popen(
            [berth, "dispatch", "--config", os.path.join(work, "dispatch.yml")],
            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 60
    feed_reads = 'route="/arvados/v1/containers/changes"'
    while True:
        with open(os.path.join(work, "controller.log"), errors="replace") as log:
            if any(feed_reads in line for line in log):
                return process
        if process.poll() is not None:
            fail("berth dispatch exited; see " + log_path)
        if time.monotonic() > deadline:
            fail("berth dispatch read no change feed within 60 s; see " + log_path)
        time.sleep(0.05)


def berth_round():
    """Returns seconds from creation to Running and from exit to Final."""
    cursor = call("GET", "/arvados/v1/containers/changes")["cursor"]
    created = time.time()
    request = call("POST", "/arvados/v1/container_requests", {"container_request": {
        "state": "Committed", "priority": 1, "use_existing": False,
        "container_image": image, "command": ["sh", "-c", "sleep 1; cat /proc/uptime"],
        "output_path": "/out", "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
        "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
    }})
    uuid = request["container_uuid"]
    running = final = None
    deadline = time.monotonic() + 180
    while final is None:
        if time.monotonic() > deadline:
            fail("container %s did not finish within 180 s" % uuid)
        page = call("GET", "/arvados/v1/containers/changes?after=%s&wait=30" % cursor)
        seen, seen_boot = time.time(), boot_clock()
        cursor = page["cursor"]
        for container in page["items"]:
            if container["uuid"] != uuid:
                continue
            if container["state"] == "Running" and running is None:
                running = seen
            if container["state"] in ("Complete", "Cancelled"):
                final = container["state"]
                final_boot = seen_boot
    if final != "Complete":
        fail("container %s ended %s; see %s/dispatch.log" % (uuid, final, work))
    if running is None:
        fail("container %s went to Complete between two feed reads" % uuid)
    state = call("GET", "/arvados/v1/container_requests/" + request["uuid"])["state"]
    if state != "Final":
        fail("request %s is %s after its container completed" % (request["uuid"], state))
    stdout = call("GET", "/arvados/v1/containers/%s/log/stdout" % uuid)
    text = stdout.decode() if isinstance(stdout, bytes) else json.dumps(stdout)
    try:
        exited = float(text.split()[0])
    except (IndexError, ValueError):
        fail("container %s printed %r, not /proc/uptime" % (uuid, text))
    return running - created, final_boot - exited


def sbatch_round(number):
    """Returns seconds from calling sbatch to the job's first command."""
    mark = os.path.join(work, "sbatch", "started-%d" % number)
    script = "#!/bin/sh\ndate +%%s.%%N > %s.tmp && mv %s.tmp %s\n" % (mark, mark, mark)
    submitted = time.time()
    subprocess.run(["sbatch", "--parsable", "--job-name=berth-timing-bench",
                    "--output=/dev/null", "--mem=64", "--cpus-per-task=1"],
                   input=script.encode(), check=True, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not os.path.exists(mark):
        if time.monotonic() > deadline:
            fail("the sbatch job of round %d did not start within 120 s" % number)
        time.sleep(0.005)
    with open(mark) as started:
        return float(started.read()) - submitted


def p95(values):
    ordered = sorted(values)
    return ordered[math.ceil(0.95 * len(ordered)) - 1]


dispatcher = start_dispatcher()
try:
    print("warming up: one round each, not counted", file=sys.stderr)
    berth_round()
    sbatch_round(0)
    times = {"berth to Running": [], "sbatch to start": [], "exit to Final": []}
    for number in range(1, rounds + 1):
        ways = ["berth", "sbatch"]
        random.shuffle(ways)
        for way in ways:
            # Slurm starts jobs at its scheduler's ticks, one a second here.
            # Rounds follow each other at a steady pace, so without a random
            # pause each way would submit at its own fixed point of the tick.
            time.sleep(random.uniform(0, 1))
            if way == "berth":
                running, final = berth_round()
                times["berth to Running"].append(running)
                times["exit to Final"].append(final)
            else:
                times["sbatch to start"].append(sbatch_round(number))
        print("round %d of %d: %s" % (number, rounds, ", ".join(
            "%s %.3f s" % (kind, values[-1]) for kind, values in times.items())), file=sys.stderr)
finally:
    dispatcher.send_signal(signal.SIGTERM)
    try:
        dispatcher.wait(timeout=30)
    except subprocess.TimeoutExpired:
        dispatcher.kill()

print()
print("| measure | rounds | median (s) | p95 (s) | min (s) | max (s) |")
print("| --- | --- | --- | --- | --- | --- |")
for kind, values in times.items():
    print("| %s | %d | %.3f | %.3f | %.3f | %.3f |" % (
        kind, len(values), statistics.median(values), p95(values), min(values), max(values)))
difference = statistics.median(times["berth to Running"]) - statistics.median(times["sbatch to start"])
print()
print("creation to Running minus sbatch to start, medians: %+.3f s (goal: at most +0.500 s)" % difference)
print("exit to Final, median: %.3f s (goal: at most 0.500 s)" % statistics.median(times["exit to Final"]))
EOF

log "$ROUNDS rounds on Slurm, $(nproc) CPUs"
python3 "$work/bench.py" "$BERTH_BENCH_BIN" "$work" "$api_url" "$user_token" "$BERTH_TEST_IMAGE" "$ROUNDS"
