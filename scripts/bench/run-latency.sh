#!/usr/bin/env bash
# Measure how long one trivial container takes from submission to exit
# through Berth, against the same container run by hand through Slurm.
#
# Three ways to run `true` in the test image, interleaved so that the
# machine's noise falls on all three alike:
#   berth     `berth run IMAGE -- true` against a `berth dev` on Slurm:
#             request, dispatcher tick, lock, sbatch, supervisor, Podman,
#             log streaming and the final state, until `berth run` exits.
#   srun      `srun podman run --rm IMAGE true`: Slurm's interactive path.
#   sbatch    `sbatch --wait` of a script running the same podman command.
# It prints the median, minimum and maximum of each in seconds, and the
# ratio of Berth's median to each baseline's.
#
# Usage: scripts/bench/run-latency.sh [ROUNDS]        (as root; default 10)
# Tunables (environment variables):
#   BERTH_BENCH_BIN   berth binary        [target/release/berth, built if missing]
#   BERTH_PODMAN_SOCK Podman API socket   [/run/berth/podman.sock]
#   BERTH_TEST_IMAGE  image to run        [localhost/busybox:latest]
# Needs Slurm and Podman running (scripts/setup/slurm.sh, podman.sh
# service-start, test-image.sh). The dispatcher hears of a request through
# the controller's change feed, or at its next full pass (every second in
# `berth dev`) when the controller has no feed.
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

ROUNDS=${1:-10}
: "${BERTH_PODMAN_SOCK:=$BERTH_RUN_DIR/podman.sock}"
: "${BERTH_TEST_IMAGE:=localhost/busybox:latest}"
: "${BERTH_BENCH_BIN:=$REPO_ROOT/target/release/berth}"
require_root "$@"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"

if [ ! -x "$BERTH_BENCH_BIN" ]; then
  log "building $BERTH_BENCH_BIN"
  (cd "$REPO_ROOT" && cargo build --release -p berth)
fi
command -v srun >/dev/null || die "srun not found: run scripts/setup/slurm.sh first"
[ -S "$BERTH_PODMAN_SOCK" ] || die "no Podman socket at $BERTH_PODMAN_SOCK: run scripts/setup/podman.sh service-start"

work=$(mktemp -d /tmp/berth-bench.XXXXXX)
dev_pid=""
cleanup() {
  [ -n "$dev_pid" ] && kill "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

DOCKER_HOST=unix://$BERTH_PODMAN_SOCK "$BERTH_BENCH_BIN" dev --data-dir "$work/dev" \
  --listen 127.0.0.1:0 --backend slurm >/dev/null 2>"$work/dev.log" &
dev_pid=$!
for _ in $(seq 300); do
  [ -s "$work/dev/env" ] && break
  kill -0 "$dev_pid" 2>/dev/null || { tail -n 20 "$work/dev.log" >&2; die "berth dev exited"; }
  sleep 0.1
done
[ -s "$work/dev/env" ] || die "berth dev did not become ready; see $work/dev.log"
# shellcheck disable=SC1091
. "$work/dev/env"

podman_cmd="podman --url unix://$BERTH_PODMAN_SOCK run --rm --network none $BERTH_TEST_IMAGE true"
printf '#!/bin/sh\nexec %s\n' "$podman_cmd" >"$work/job.sh"

run_berth() { "$BERTH_BENCH_BIN" run --ram 64M "$BERTH_TEST_IMAGE" -- true 2>/dev/null; }
run_srun() { srun --quiet --mem=64 $podman_cmd; }
run_sbatch() { sbatch --quiet --wait --mem=64 --output=/dev/null "$work/job.sh" >/dev/null; }

# time_one NAME: runs run_NAME once and appends its wall time in seconds.
time_one() {
  local start end
  start=$(date +%s%N)
  "run_$1" || die "$1 run failed"
  end=$(date +%s%N)
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", (b - a) / 1e9 }' >>"$work/$1.times"
}

log "warming up (one run each, not counted)"
run_berth; run_srun; run_sbatch
log "measuring $ROUNDS rounds"
for _ in $(seq "$ROUNDS"); do
  for way in berth srun sbatch; do time_one "$way"; done
done

median() { sort -n "$1" | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
berth_median=$(median "$work/berth.times")
printf '\n%-8s %8s %8s %8s %14s\n' way median min max "berth/this"
for way in berth srun sbatch; do
  m=$(median "$work/$way.times")
  lo=$(sort -n "$work/$way.times" | head -n1)
  hi=$(sort -n "$work/$way.times" | tail -n1)
  ratio=$(awk -v a="$berth_median" -v b="$m" 'BEGIN { printf "%.2f", a / b }')
  printf '%-8s %8s %8s %8s %14s\n' "$way" "$m" "$lo" "$hi" "$ratio"
done
printf '\n%s rounds; times in seconds, submission to exit; %s\n' "$ROUNDS" "$(nproc) CPUs"
