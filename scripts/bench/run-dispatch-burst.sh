#!/usr/bin/env bash
# Measure how fast a burst of queued containers reaches Slurm's queue
# through the dispatcher, against a plain shell loop of sbatch calls.
#
# Two ways, each round in random order, on the same Slurm:
#   sbatch  a bash loop of COUNT `sbatch` calls, one after the other, each
#           with the same options and the same two-line job script as the
#           dispatcher submits (`exec berth supervise ...`), timed from the
#           loop's start.
#   berth   COUNT container requests are committed through the API while
#           no dispatcher runs, so they wait Queued. Then `berth dispatch`
#           starts, and the time runs from its start: its start-up, the
#           listing of the queue, the lock calls, the sbatch calls and the
#           recording of the job ids all count.
# Each way ends when `squeue` lists all COUNT jobs; the script polls it
# every 0.1 s in both ways.
#
# Before each way the script waits until slurmctld's job table (MaxJobCount
# records, ended jobs included for MinJobAge) has room for twice COUNT
# jobs, because a full table makes sbatch wait and retry.
#
# No job runs: the dispatcher's sbatch_args add `--begin=now+1hour` and so
# does the loop, so the jobs wait in Slurm's queue (reason BeginTime) until
# the script cancels them at the end of each way. (`--hold` would not do:
# the dispatcher's renicing with `scontrol update ... Nice=N` releases a
# held job.) A fresh controller (SQLite
# database) serves each berth round, and every job is cancelled on exit.
#
# It prints a Markdown table: per way, the median, minimum and maximum
# seconds to COUNT jobs, and the ratio berth / sbatch of the medians (the
# goal is at most 1.0). It also prints, for the last berth round, the
# number of controller requests by route, from the controller's log.
#
# Usage: scripts/bench/run-dispatch-burst.sh [COUNT] [ROUNDS]
#        (as root; defaults 1000 and 1)
# Tunables (environment variables):
#   BERTH_BENCH_BIN         berth binary   [target/release/berth, built if missing]
#   BERTH_BENCH_CONCURRENT  dispatch.scheduler_calls.max_concurrent        [8]
#   BERTH_BENCH_KEEP        keep the work directory when set
# Needs python3 and Slurm (scripts/setup/slurm.sh). No container runs, so
# Podman is not needed.
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

COUNT=${1:-1000}
ROUNDS=${2:-1}
: "${BERTH_BENCH_BIN:=$REPO_ROOT/target/release/berth}"
: "${BERTH_BENCH_CONCURRENT:=8}"
require_root "$@"
[[ "$COUNT" =~ ^[1-9][0-9]*$ ]] || die "invalid COUNT '$COUNT': give a positive whole number"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
[[ "$BERTH_BENCH_CONCURRENT" =~ ^[1-9][0-9]*$ ]] || die "invalid BERTH_BENCH_CONCURRENT '$BERTH_BENCH_CONCURRENT': give a positive whole number"
command -v sbatch >/dev/null || die "sbatch not found: run scripts/setup/slurm.sh first"
command -v python3 >/dev/null || die "python3 not found: install it"
squeue --noheader --user=root >/dev/null || die "squeue failed: is slurmctld running? (scripts/setup/slurm.sh)"

if [ ! -x "$BERTH_BENCH_BIN" ]; then
  log "building $BERTH_BENCH_BIN"
  (cd "$REPO_ROOT" && cargo build --release -p berth)
fi

work=$(mktemp -d /tmp/berth-burst-bench.XXXXXX)
# A cluster id and a job name prefix of this run alone, so that cleaning
# up never touches other jobs on the shared Slurm.
cluster=$(python3 -c 'import random, string; print("b" + "".join(random.choice(string.ascii_lowercase + string.digits) for _ in range(4)))')
baseline_prefix="berth-burst-$cluster-"

# cancel_jobs: cancels every job of this run, by id.
cancel_jobs() {
  local ids
  ids=$(squeue --noheader --user=root --format='%i %j' |
    awk -v a="$cluster-dz642-" -v b="$baseline_prefix" 'index($2, a) == 1 || index($2, b) == 1 { print $1 }')
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    printf '%s\n' $ids | xargs -n 500 scancel
  fi
}

# stop_children: stops the controller, dispatcher and sbatch loop that the
# Python driver started and left running (when it failed), by the pids it
# wrote, if those pids still name the same programs.
stop_children() {
  local name comm pid
  for name in controller:berth dispatcher:berth loop:bash; do
    comm=${name#*:}
    name=${name%%:*}
    if pid=$(live_pid "$work/$name.pid" "$comm"); then
      kill "$pid" 2>/dev/null || true
      # Wait, so that no sbatch it runs lands after the cancel below.
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
}

cleanup() {
  stop_children
  cancel_jobs || true
  if [ -n "${BERTH_BENCH_KEEP:-}" ]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

(umask 077 && python3 -c 'import secrets; print(secrets.token_hex(24))' >"$work/system-token")

cat >"$work/bench.py" <<'EOF'
import json, os, random, re, signal, statistics, subprocess, sys, time
import urllib.parse
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

berth, work, cluster, prefix = sys.argv[1:5]
count, rounds, concurrent = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
WAYS = ("sbatch", "berth")
# Container RAM 64 MiB plus the dispatcher's default reserve of 256 MiB.
MEM_MIB = 64 + 256


def fail(message):
    sys.exit("error: " + message)


def squeue_names():
    out = subprocess.run(
        ["squeue", "--noheader", "--user=root", "--format=%j"],
        capture_output=True, text=True)
    if out.returncode != 0:
        return None
    return out.stdout.split()


def listed(name_prefix):
    names = squeue_names()
    return None if names is None else sum(1 for n in names if n.startswith(name_prefix))


def cancel(name_prefix):
    out = subprocess.run(["squeue", "--noheader", "--user=root", "--format=%i %j"],
                         capture_output=True, text=True, check=True)
    ids = [line.split()[0] for line in out.stdout.splitlines()
           if len(line.split()) == 2 and line.split()[1].startswith(name_prefix)]
    for i in range(0, len(ids), 500):
        subprocess.run(["scancel"] + ids[i:i + 500], check=True)
    deadline = time.monotonic() + 120
    while listed(name_prefix):
        if time.monotonic() > deadline:
            fail("jobs named %s* are still listed 120 s after scancel" % name_prefix)
        time.sleep(0.5)


def wait_listed(name_prefix, start, process, what, done_ok=False):
    """Polls squeue every 0.1 s until `count` jobs named name_prefix* are
    listed; returns the seconds since `start`. Fails when `process` exits
    first, unless it exits with 0 and `done_ok` (a loop that has finished
    submitting)."""
    deadline = start + 600
    while True:
        n = listed(name_prefix)
        if n is not None and n >= count:
            return time.monotonic() - start
        code = process.poll()
        if code is not None and not (done_ok and code == 0):
            fail("%s exited with %s before %d jobs were listed (%s listed); "
                 "was slurmctld restarted meanwhile?" % (what, code, count, n))
        if time.monotonic() > deadline:
            fail("only %s of %d jobs listed after 600 s" % (n, count))
        time.sleep(0.1)


def stop(process):
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def write_pid(name, process):
    with open(os.path.join(work, name + ".pid"), "w") as f:
        f.write("%d\n" % process.pid)


def wait_for_room():
    """Waits until slurmctld's job table has room for `count` more jobs and
    as many again. The table also keeps ended and cancelled jobs for
    MinJobAge (300 s by default), and at MaxJobCount records sbatch only
    prints "Slurm temporarily unable to accept job" and retries, which
    would time that round's submissions instead of the submitting."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, check=True)
    limit = next((int(line.split("=")[1]) for line in config.stdout.splitlines()
                  if line.split("=")[0].strip() == "MaxJobCount"), 10000)
    deadline = time.monotonic() + 900
    while True:
        out = subprocess.run(["squeue", "--noheader", "--states=all", "--format=%i"],
                             capture_output=True, text=True, check=True)
        records = len(out.stdout.split())
        if limit - records >= 2 * count:
            return
        if time.monotonic() > deadline:
            fail("slurmctld keeps %d job records of MaxJobCount %d after 900 s" % (records, limit))
        print("waiting for ended jobs to leave slurmctld's job table (%d of %d records)"
              % (records, limit), file=sys.stderr)
        time.sleep(15)


def sbatch_round(round_no):
    """Times a plain loop of sbatch calls of the dispatcher's job script."""
    name = "%s%d-" % (prefix, round_no)
    credentials = os.path.join(work, "credentials")
    loop = os.path.join(work, "loop.sh")
    with open(loop, "w") as f:
        f.write("set -e\nfor i in $(seq -w 1 %d); do\n" % count)
        f.write("  printf '#!/bin/sh\\nexec %%s %%s %%s %%s %%s\\n' \"'%s'\" \"'supervise'\" \"'--credentials'\" "
                "\"'%s/x.json'\" \"'%s$i'\" |\n" % (berth, credentials, name))
        f.write("    sbatch --parsable --job-name=%s$i --comment=%s$i --no-requeue --chdir=/ "
                "--mem=%d --cpus-per-task=1 --nice=0 --output=%s/slurm-%%j.out --begin=now+1hour >/dev/null\n"
                % (name, name, MEM_MIB, work))
        f.write("done\n")
    start = time.monotonic()
    process = subprocess.Popen(["bash", loop])
    write_pid("loop", process)
    seconds = wait_listed(name, start, process, "the sbatch loop", done_ok=True)
    if process.wait() != 0:
        fail("the sbatch loop failed")
    cancel(name)
    return seconds


def call(api_url, token, method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(api_url + path, data=data, method=method)
    request.add_header("Authorization", "Bearer " + token)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def write_config(path, round_dir, api_url=None):
    with open(path, "w") as f:
        f.write("cluster_id: %s\nsystem_token_file: %s\n" % (cluster, os.path.join(work, "system-token")))
        f.write("controller:\n  listen: 127.0.0.1:0\n  database_url: sqlite://%s\n"
                % os.path.join(round_dir, "berth.db"))
        if api_url:
            f.write("dispatch:\n  backend: slurm\n  api_url: %s\n" % api_url)
            f.write("  credentials_dir: %s\n" % os.path.join(round_dir, "credentials"))
            f.write("  scheduler_calls:\n    max_concurrent: %d\n" % concurrent)
            f.write("  slurm:\n    output: %s/slurm-%%j.out\n    sbatch_args: [\"--begin=now+1hour\"]\n" % work)


def berth_round(round_no):
    """Queues `count` containers, then times a dispatcher from its start
    until Slurm lists all their jobs. Returns the seconds and the
    controller's requests by route during the dispatcher's run."""
    round_dir = os.path.join(work, "round%d" % round_no)
    os.makedirs(os.path.join(round_dir, "credentials"), mode=0o700)
    write_config(os.path.join(round_dir, "controller.yml"), round_dir)
    out_path = os.path.join(round_dir, "controller.out")
    log_path = os.path.join(round_dir, "controller.log")
    env = dict(os.environ, RUST_LOG="info,berth_controller::api=debug")
    with open(out_path, "w") as out, open(log_path, "w") as log:
        controller = subprocess.Popen(
            [berth, "controller", "--config", os.path.join(round_dir, "controller.yml")],
            stdout=out, stderr=log, env=env)
    write_pid("controller", controller)
    try:
        api_url = None
        deadline = time.monotonic() + 60
        while api_url is None:
            with open(out_path) as out:
                for line in out:
                    if line.startswith("berth controller listening on "):
                        api_url = line.split()[-1].rstrip("/")
            if controller.poll() is not None:
                fail("berth controller exited; see " + log_path)
            if time.monotonic() > deadline:
                fail("berth controller printed no address within 60 s")
            time.sleep(0.05)
        token = subprocess.run(
            [berth, "admin", "create-user", "bench", "--config", os.path.join(round_dir, "controller.yml")],
            capture_output=True, text=True, check=True).stdout.strip()
        def commit(_):
            return call(api_url, token, "POST", "/arvados/v1/container_requests", {"container_request": {
                "state": "Committed", "priority": 1, "use_existing": False,
                "container_image": "localhost/busybox:latest", "command": ["true"],
                "output_path": "/out", "mounts": {"/out": {"kind": "tmp", "capacity": 1 << 20}},
                "runtime_constraints": {"ram": 64 << 20, "vcpus": 1},
            }})
        # Committed four at a time, before the dispatcher starts: not timed.
        with ThreadPoolExecutor(4) as pool:
            for request in pool.map(commit, range(count)):
                if request["state"] != "Committed":
                    fail("request %s is %s, not Committed" % (request["uuid"], request["state"]))
        config = os.path.join(round_dir, "dispatch.yml")
        write_config(config, round_dir, api_url)
        before = routes(log_path)
        with open(os.path.join(round_dir, "dispatch.log"), "w") as log:
            start = time.monotonic()
            dispatcher = subprocess.Popen([berth, "dispatch", "--config", config],
                                          stdout=subprocess.DEVNULL, stderr=log)
        write_pid("dispatcher", dispatcher)
        try:
            seconds = wait_listed(cluster + "-dz642-", start, dispatcher, "berth dispatch")
            # Let it record the job ids before counting its requests.
            recorded = start + 600
            while time.monotonic() < recorded:
                done = call(api_url, token, "GET",
                            '/arvados/v1/containers?limit=0&count=exact&filters='
                            + urllib.parse.quote('[["scheduler_job_id","!=",null]]'))
                if done.get("items_available", 0) >= count:
                    break
                time.sleep(0.2)
            requests = routes(log_path) - before
        finally:
            stop(dispatcher)
        cancel(cluster + "-dz642-")
        return seconds, requests
    finally:
        stop(controller)


def routes(log_path):
    """Counts the controller's answered requests by method and route."""
    counter = Counter()
    with open(log_path, errors="replace") as log:
        for line in log:
            if " answered " not in line or "route=" not in line:
                continue
            method = re.search(r"method=(\S+)", line)
            route = re.search(r'route="([^"]*)"', line)
            if method and route:
                counter[method.group(1) + " " + route.group(1)] += 1
    return counter


results = {way: [] for way in WAYS}
last_requests = Counter()
for round_no in range(1, rounds + 1):
    order = list(WAYS)
    random.shuffle(order)
    for way in order:
        wait_for_room()
        if way == "sbatch":
            seconds = sbatch_round(round_no)
        else:
            seconds, last_requests = berth_round(round_no)
        results[way].append(seconds)
        print("round %d: %s %.2f s" % (round_no, way, seconds), file=sys.stderr)

base = statistics.median(results["sbatch"])
print("| way | median (s) | min (s) | max (s) | jobs/s | way / sbatch |")
print("| --- | --- | --- | --- | --- | --- |")
for way in WAYS:
    values = results[way]
    median = statistics.median(values)
    print("| %s | %.2f | %.2f | %.2f | %.0f | %.2f |"
          % (way, median, min(values), max(values), count / median, median / base))
print()
print("Controller requests during the last berth round:")
for route, n in sorted(last_requests.items()):
    print("- %s: %d" % (route, n))
EOF

log "$COUNT containers, $ROUNDS round(s), cluster $cluster, work in $work"
python3 "$work/bench.py" "$BERTH_BENCH_BIN" "$work" "$cluster" "$baseline_prefix" \
  "$COUNT" "$ROUNDS" "$BERTH_BENCH_CONCURRENT"
