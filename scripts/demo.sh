#!/usr/bin/env bash
# Set up a one-host Berth on a fresh Debian 12 machine and run a first
# container through it.
#
# Steps (each reuses what is already there, so running twice is safe):
#   1. Slurm, Podman's API socket and the test image, through scripts/setup/.
#   2. Rust: when cargo is missing, it installs Rust with rustup into
#      ~/.cargo (the official installer, downloaded from sh.rustup.rs),
#      because Debian 12's rustc is older than the 1.89 Berth needs.
#   3. cargo build --release -p berth.
#   4. `berth dev` (controller and dispatcher in one process) in the
#      background, with its data directory, pid file and log below. A running
#      one is reused when it runs the binary just built and responds; any
#      other is stopped and started again.
#   5. `berth run` of a small container, its output and exit code, `berth ls`.
#
# Usage: scripts/demo.sh [start|stop|status]   (as root)
#   start    all of the above (the default)
#   stop     stop the background `berth dev` (Slurm and Podman keep running;
#            scripts/setup/slurm-stop.sh and podman.sh service-stop stop them)
#   status   report whether `berth dev` is running, and where its env file is
#
# Tunables (environment variables):
#   BERTH_DEMO_DIR      data directory of `berth dev` (SQLite, env file)
#                                                       [/var/lib/berth/demo]
#   BERTH_DEMO_LISTEN   address the API listens on              [127.0.0.1:8780]
#   BERTH_DEMO_BACKEND  dispatcher backend: auto, slurm or local         [auto]
#   BERTH_DEMO_WAIT     seconds to wait for `berth dev` to become ready     [60]
#   BERTH_DEMO_BIN      use this berth binary and skip the build
#   and the set-up scripts' tunables (BERTH_PODMAN_SOCK, BERTH_TEST_IMAGE, ...).
set -euo pipefail
SETUP_NAME=demo
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

: "${BERTH_DEMO_DIR:=$BERTH_STATE_DIR/demo}"
: "${BERTH_DEMO_LISTEN:=127.0.0.1:8780}"
: "${BERTH_DEMO_BACKEND:=auto}"
: "${BERTH_DEMO_WAIT:=60}"
: "${BERTH_PODMAN_SOCK:=$BERTH_RUN_DIR/podman.sock}"
: "${BERTH_TEST_IMAGE:=localhost/busybox:latest}"
export BERTH_PODMAN_SOCK BERTH_TEST_IMAGE

PIDFILE=$BERTH_RUN_DIR/berth-dev.pid
LOGFILE=$BERTH_LOG_DIR/berth-dev.log
ENV_FILE=$BERTH_DEMO_DIR/env

command=${1:-start}
case "$command" in
  start|stop|status) ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown command '$command'; use start, stop or status" ;;
esac
require_root "$@"

# demo_pid: prints the pid of the `berth dev` this script started, if it is
# still alive. The process is recognised by its arguments rather than its
# name, since BERTH_DEMO_BIN may give the binary another name.
demo_pid() {
  local pid
  [ -s "$PIDFILE" ] || return 1
  pid=$(tr -dc '0-9' <"$PIDFILE")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF " dev --data-dir $BERTH_DEMO_DIR " || return 1
  printf '%s\n' "$pid"
}

# stop_demo: stops that `berth dev`, allowing it time to stop its dispatcher.
stop_demo() {
  local pid
  if pid=$(demo_pid); then
    stop_process "$pid" "berth dev" 20
  else
    log "berth dev is not running (pid file $PIDFILE)"
  fi
  rm -f "$PIDFILE"
}

if [ "$command" = stop ]; then
  stop_demo
  exit 0
fi
if [ "$command" = status ]; then
  if pid=$(demo_pid); then
    echo "berth dev is running (pid $pid, log $LOGFILE); its settings: . $ENV_FILE"
    exit 0
  fi
  echo "berth dev is not running"
  exit 1
fi

t_script=$(now_ms)
if [ -r /etc/os-release ] && ! grep -qx 'VERSION_ID="12"' /etc/os-release; then
  log "warning: this demo is made for Debian 12; this machine is $(sed -n 's/^PRETTY_NAME=//p' /etc/os-release)"
fi

# --------------------------------------------------------------- services
log "=== Slurm, Podman and the test image"
"$REPO_ROOT/scripts/setup/slurm.sh" >/dev/null
"$REPO_ROOT/scripts/setup/podman.sh" service-start
"$REPO_ROOT/scripts/setup/test-image.sh"

# ------------------------------------------------------------------ build
if [ -n "${BERTH_DEMO_BIN:-}" ]; then
  berth=$BERTH_DEMO_BIN
  [ -x "$berth" ] || die "BERTH_DEMO_BIN=$berth is not an executable file"
  log "=== using $berth (BERTH_DEMO_BIN), no build"
else
  log "=== Rust and the build"
  if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  fi
  # Crates with C code (SQLite, ring) need a C compiler and the C headers.
  command -v cc >/dev/null || apt_install --no-install-recommends gcc libc6-dev
  if ! command -v cargo >/dev/null; then
    log "cargo not found: installing Rust with rustup into ${CARGO_HOME:-$HOME/.cargo} (Debian 12's rustc is too old for Berth)"
    apt_install --no-install-recommends curl ca-certificates
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal \
      || die "the rustup installer failed; install Rust 1.89 or newer by hand (https://rustup.rs) and run $0 again"
    export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  fi
  log "$(cargo --version)"
  t_build=$(now_ms)
  (cd "$REPO_ROOT" && cargo build --release -p berth) || die "cargo build --release -p berth failed; see the errors above"
  berth=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/berth
  log "built $berth in $(seconds_since "$t_build") s"
fi

# -------------------------------------------------------------- berth dev
# api_responds: true when `berth ls` works with the settings in the env file.
api_responds() {
  [ -r "$ENV_FILE" ] || return 1
  (
    # shellcheck disable=SC1090
    . "$ENV_FILE"
    "$berth" ls >/dev/null 2>&1
  )
}

show_log_tail() {
  log "last lines of $LOGFILE:"
  tail -n 30 "$LOGFILE" >&2 || true
}

log "=== berth dev"
reused=0
if pid=$(demo_pid); then
  # After a rebuild, /proc/PID/exe of the old process ends in " (deleted)".
  if [ "$(readlink "/proc/$pid/exe")" = "$(readlink -f "$berth")" ] && api_responds; then
    log "berth dev is already running (pid $pid) with this binary; reusing it"
    reused=1
  else
    log "berth dev (pid $pid) runs another binary or does not respond; restarting it"
    stop_demo
  fi
fi

if [ "$reused" = 0 ]; then
  mkdir -p "$BERTH_DEMO_DIR"
  chmod 0700 "$BERTH_DEMO_DIR"
  # berth dev removes its env file when it starts and writes it when it is
  # ready. Removing it here as well means a file left by an earlier run is
  # never taken for readiness.
  rm -f "$ENV_FILE"
  # berth dev prints its env lines, token included, to the log too.
  mkdir -p "$(dirname "$LOGFILE")"
  touch "$LOGFILE"
  chmod 0600 "$LOGFILE"
  printf '\n=== %s: %s dev --data-dir %s --listen %s --backend %s --docker-host unix://%s\n' \
    "$(date -Is)" "$berth" "$BERTH_DEMO_DIR" "$BERTH_DEMO_LISTEN" "$BERTH_DEMO_BACKEND" "$BERTH_PODMAN_SOCK" >>"$LOGFILE"
  t_dev=$(now_ms)
  start_detached "$PIDFILE" "$LOGFILE" "$berth" dev \
    --data-dir "$BERTH_DEMO_DIR" --listen "$BERTH_DEMO_LISTEN" \
    --backend "$BERTH_DEMO_BACKEND" --docker-host "unix://$BERTH_PODMAN_SOCK"
  deadline=$(( $(date +%s) + BERTH_DEMO_WAIT ))
  until [ -s "$ENV_FILE" ]; do
    if ! demo_pid >/dev/null; then
      show_log_tail
      die "berth dev exited before it was ready; see $LOGFILE"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      show_log_tail
      stop_demo
      die "berth dev did not write $ENV_FILE within ${BERTH_DEMO_WAIT} s (stopped it); see $LOGFILE"
    fi
    sleep 0.2
  done
  log "berth dev is ready (pid $(cat "$PIDFILE")) after $(seconds_since "$t_dev") s; log $LOGFILE"
fi

# --------------------------------------------------------- a first container
# shellcheck disable=SC1090
. "$ENV_FILE"
log "=== BERTH_API_HOST=$BERTH_API_HOST (token in $ENV_FILE)"
# The single quotes keep $(hostname) for the container's shell.
# shellcheck disable=SC2016
demo_command='echo "hello from $(hostname)"; uname -a'
echo "\$ berth run --ram 64M $BERTH_TEST_IMAGE -- sh -c '$demo_command'"
status=0
"$berth" run --ram 64M "$BERTH_TEST_IMAGE" -- sh -c "$demo_command" || status=$?
echo "exit code: $status"
echo
echo "\$ berth ls"
"$berth" ls || log "berth ls failed (exit $?)"

cat <<EOF

Berth is running in the background: pid $(cat "$PIDFILE"), log $LOGFILE
(demo finished in $(seconds_since "$t_script") s).

Use the CLI from another shell:
  . $ENV_FILE          # sets BERTH_API_* and ARVADOS_API_* (HTTPS, self-signed)
  $berth run --ram 64M $BERTH_TEST_IMAGE -- echo hi
  $berth ls
  $berth logs -f UUID
  $berth cancel UUID

Stop it:   $0 stop
Stop Slurm and the Podman API socket too:
           $REPO_ROOT/scripts/setup/slurm-stop.sh
           $REPO_ROOT/scripts/setup/podman.sh service-stop
EOF
exit "$status"
