#!/usr/bin/env bash
# Measure the tunnel (crates/berth-tunnel) on loopback, in one process.
# First the throughput of one bulk stream through the tunnel against a
# direct TCP connection, for four HTTP/2 window settings and three maximum
# frame sizes, once without and once with an added round-trip time. Then the resident memory per idle
# tunnel.
#
# Usage: scripts/bench/run-tunnel.sh [SIZE_MIB] [IDLE_TUNNELS] [RTT_MS]
#        (default 1024, 5000 and 4)
# Each idle tunnel takes two sockets (both ends live in the process), so
# IDLE_TUNNELS must stay below half of `ulimit -n`.
# Needs only Rust: no Slurm, Podman or database.
set -euo pipefail
SETUP_NAME=bench
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

SIZE_MIB=${1:-1024}
IDLE=${2:-5000}
RTT_MS=${3:-4}
[[ "$SIZE_MIB" =~ ^[1-9][0-9]*$ ]] || die "invalid SIZE_MIB '$SIZE_MIB': give a positive whole number"
[[ "$IDLE" =~ ^[1-9][0-9]*$ ]] || die "invalid IDLE_TUNNELS '$IDLE': give a positive whole number"
[[ "$RTT_MS" =~ ^[0-9]+$ ]] || die "invalid RTT_MS '$RTT_MS': give a whole number of milliseconds"
fd_limit=$(ulimit -n)
if [ "$fd_limit" != unlimited ] && [ $((IDLE * 2 + 100)) -gt "$fd_limit" ]; then
  die "IDLE_TUNNELS $IDLE needs about $((IDLE * 2 + 100)) open files, but ulimit -n is $fd_limit; give fewer tunnels or raise the limit"
fi

cd "$REPO_ROOT"
cargo build --release --quiet -p berth-tunnel --example tunnel_bench
bench="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/tunnel_bench"
log "no added latency"
"$bench" "$SIZE_MIB" "$IDLE" 0
if [ "$RTT_MS" != 0 ]; then
  log "round-trip time $RTT_MS ms added by an in-process relay (no idle tunnels)"
  "$bench" "$SIZE_MIB" 0 "$RTT_MS"
fi
