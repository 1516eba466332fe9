#!/usr/bin/env bash
# Measure how fast `berth put` and `berth get` move a file through the
# controller's block store, against baselines on the same disk and the
# same loopback connection, in the same run.
#
# Each round, interleaved so that the machine's noise falls on all alike:
#   put        `berth put --block-size 67108864 FILE`: read, MD5, PUT of
#              each block, the server's MD5, write, fsync and rename, then
#              the collection's create. Each write starts from an empty
#              block store, so every block is written.
#   curl-put   `curl -T` of the same bytes, as one block of at most 64 MiB,
#              to the same block route: the server's part alone (only when
#              the file fits in one block).
#   get        `berth get UUID DEST`: GET of each block, MD5, write, fsync
#              and rename.
#   curl-get   `curl` of the same block with its signed locator.
#   cp         `cp FILE DEST && sync DEST`: the local copy the others
#              are compared with.
# It prints the median, minimum and maximum seconds of each and the ratio
# of each median to cp's.
#
# Usage: scripts/bench/run-transfer.sh [SIZE_MIB] [ROUNDS]   (default 64 5)
# Tunables (environment variables):
#   BERTH_BENCH_BIN   berth binary   [target/release/berth, built when a source changed]
#   BERTH_BENCH_KEEP  keep the scratch directory when set              []
# Needs only a local disk, curl and python3: no Slurm or Podman.
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"
# shellcheck source=scripts/bench/lib.sh
. "$REPO_ROOT/scripts/bench/lib.sh"

SIZE_MIB=${1:-64}
ROUNDS=${2:-5}
: "${BERTH_BENCH_BIN:=$REPO_ROOT/target/release/berth}"
: "${BERTH_PODMAN_SOCK:=/nonexistent/podman.sock}"
[[ "$SIZE_MIB" =~ ^[1-9][0-9]*$ ]] || die "invalid SIZE_MIB '$SIZE_MIB': give a positive whole number"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
command -v curl >/dev/null || die "curl not found: install it"

bench_build "$BERTH_BENCH_BIN"
bench_start_controller "$BERTH_BENCH_BIN" berth-bench-transfer
export BERTH_API_HOST=$api_url BERTH_API_TOKEN=$user_token

head -c "$((SIZE_MIB << 20))" /dev/urandom >"$work/data.bin"
one_block=""
[ "$SIZE_MIB" -le 64 ] && one_block=1
hash=$(md5sum "$work/data.bin" | cut -d' ' -f1)

# The token goes to curl through a header file, never on its command line.
(umask 077 && printf 'Authorization: Bearer %s\n' "$user_token" >"$work/auth-header")

run_put() { "$BERTH_BENCH_BIN" put --block-size 67108864 "$work/data.bin" >"$work/put.out"; }
run_curl_put() {
  curl -sS -f -H @"$work/auth-header" -T "$work/data.bin" "${api_url%/}/$hash" >"$work/locator"
}
run_get() {
  rm -rf "$work/got"
  "$BERTH_BENCH_BIN" get "$(cut -d' ' -f1 "$work/put.out")" "$work/got"
}
run_curl_get() {
  curl -sS -f -H @"$work/auth-header" -o "$work/curl-got.bin" "${api_url%/}/$(cat "$work/locator")"
}
run_cp() {
  rm -f "$work/copy.bin"
  cp "$work/data.bin" "$work/copy.bin" && sync "$work/copy.bin"
}

# A write of a block that is already stored only checks it, so each write
# starts from an empty block store; the reads that follow find the blocks
# the last write stored.
prepare() {
  case "$1" in
    put | curl-put) rm -rf "$work/blocks" ;;
  esac
}

# time_one NAME: runs run_NAME once and appends its wall time in seconds.
time_one() {
  local start end
  prepare "$1"
  start=$(date +%s%N)
  "run_${1//-/_}" || die "$1 failed"
  end=$(date +%s%N)
  awk -v a="$start" -v b="$end" 'BEGIN { printf "%.3f\n", (b - a) / 1e9 }' >>"$work/$1.times"
}

ways=(cp put get)
[ -n "$one_block" ] && ways=(cp curl-put put curl-get get)

log "warming up (one round, not counted)"
for way in "${ways[@]}"; do
  prepare "$way"
  "run_${way//-/_}" || die "$way failed"
done
cmp -s "$work/data.bin" "$work/got/data.bin" || die "berth get returned different bytes"
[ -z "$one_block" ] || cmp -s "$work/data.bin" "$work/curl-got.bin" || die "curl returned different bytes"

log "timing $ROUNDS rounds of $SIZE_MIB MiB"
for _ in $(seq "$ROUNDS"); do
  for way in "${ways[@]}"; do time_one "$way"; done
done

median() { sort -n "$1" | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
base=$(median "$work/cp.times")
printf '| way | median (s) | min (s) | max (s) | MiB/s (median) | this / cp |\n'
printf '| --- | --- | --- | --- | --- | --- |\n'
for way in "${ways[@]}"; do
  med=$(median "$work/$way.times")
  min=$(sort -n "$work/$way.times" | head -n1)
  max=$(sort -n "$work/$way.times" | tail -n1)
  awk -v w="$way" -v m="$med" -v lo="$min" -v hi="$max" -v b="$base" -v s="$SIZE_MIB" \
    'BEGIN { printf "| %s | %.3f | %.3f | %.3f | %.0f | %.2f |\n", w, m, lo, hi, s / m, m / b }'
done
