#!/usr/bin/env bash
# Measure the container gateway on loopback with the example
# crates/berth-controller/examples/gateway_bench.rs, release build:
#
# 1. stream: one bulk stream client -> controller 1 -> controller 2 ->
#    tunnel -> fake supervisor, in both directions, against a direct
#    loopback TCP connection in the same run. Both controllers run inside
#    the example's process on one SQLite file.
# 2. tunnels: a `berth controller` process of its own (SQLite, started by
#    scripts/bench/lib.sh), and the example, in another process, as the
#    dial side of IDLE_TUNNELS idle tunnels. It prints the controller's
#    resident memory per tunnel, and the p50 and p99 latency of
#    sequential `GET /arvados/v1/containers/UUID` calls without tunnels and
#    with IDLE_TUNNELS tunnels open (keepalive PINGs running).
#    On a machine with two CPUs or more, the controller and the timing
#    client run on CPU 0 and the dial side on CPU 1 (taskset). The dial
#    side stands for IDLE_TUNNELS compute nodes, which have CPUs of their
#    own. BERTH_BENCH_PIN=0 runs all three unpinned.
#
# Usage: scripts/bench/run-gateway.sh [SIZE_MIB] [ROUNDS] [IDLE_TUNNELS] [REQUESTS]
#        (default 1024, 3, 10000 and 4000); IDLE_TUNNELS 0 skips part 2.
# Each process holds one socket per tunnel, so IDLE_TUNNELS must stay
# below `ulimit -n` (the controller and the dial side have their own
# limits). The script raises the soft limit to the hard limit when it is
# lower. Needs only Rust and python3: no Slurm, Podman or PostgreSQL.
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"
# shellcheck source=scripts/bench/lib.sh
. "$REPO_ROOT/scripts/bench/lib.sh"

SIZE_MIB=${1:-1024}
ROUNDS=${2:-3}
IDLE=${3:-10000}
REQUESTS=${4:-4000}
[[ "$SIZE_MIB" =~ ^[1-9][0-9]*$ ]] || die "invalid SIZE_MIB '$SIZE_MIB': give a positive whole number"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || die "invalid ROUNDS '$ROUNDS': give a positive whole number"
[[ "$IDLE" =~ ^[0-9]+$ ]] || die "invalid IDLE_TUNNELS '$IDLE': give a whole number"
[[ "$REQUESTS" =~ ^[1-9][0-9]*$ ]] || die "invalid REQUESTS '$REQUESTS': give a positive whole number"

hard_limit=$(ulimit -Hn)
if [ "$hard_limit" = unlimited ] || [ "$hard_limit" -gt "$(ulimit -n)" ]; then
  ulimit -n "$hard_limit"
fi
fd_limit=$(ulimit -n)
if [ "$fd_limit" != unlimited ] && [ $((IDLE + 200)) -gt "$fd_limit" ]; then
  die "IDLE_TUNNELS $IDLE needs about $((IDLE + 200)) open files per process, but ulimit -n is $fd_limit; give fewer tunnels or raise the hard limit"
fi

cd "$REPO_ROOT"
target="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release"
log "building berth and the gateway_bench example (release)"
# One command for both, so that they share one set of dependency features.
cargo build --release --quiet -p berth -p berth-controller --bin berth --example gateway_bench
bench="$target/examples/gateway_bench"

log "bulk stream, $SIZE_MIB MiB, $ROUNDS rounds"
"$bench" stream --size-mib "$SIZE_MIB" --rounds "$ROUNDS"

[ "$IDLE" = 0 ] && exit 0
log "$IDLE idle tunnels on one berth controller (SQLite)"
# bench_write_config writes a supervisor section, which the controller
# does not read; Podman need not run.
: "${BERTH_PODMAN_SOCK:=/run/berth/podman.sock}"
bench_start_controller "$target/berth" berth-gateway-bench
(umask 077 && printf '%s\n' "$user_token" >"$work/user-token")
dial_side=()
client_cpu=()
if [ "${BERTH_BENCH_PIN:-1}" != 0 ] && [ "$(nproc)" -ge 2 ]; then
  command -v taskset >/dev/null || die "taskset is missing: install util-linux, or set BERTH_BENCH_PIN=0"
  taskset -a -p -c 0 "$controller_pid" >/dev/null
  dial_side=(taskset -c 1)
  client_cpu=(--client-cpu 0)
  log "controller and timing client on CPU 0, dial side on CPU 1"
fi
"${dial_side[@]}" "$bench" tunnels --url "$api_url" --system-token-file "$work/system-token" \
  --user-token-file "$work/user-token" --controller-pid "$controller_pid" \
  --count "$IDLE" --requests "$REQUESTS" "${client_cpu[@]}"
