# shellcheck shell=bash
# Helpers shared by the benchmark scripts in this folder: a scratch
# directory, a controller on a loopback port with SQLite, and dispatcher
# configuration files. A script sources scripts/setup/lib.sh first, then
# this file; it is not meant to be run on its own.
#
# bench_start_controller sets these variables for the script:
#   work            the scratch directory (removed on exit unless
#                   BERTH_BENCH_KEEP is set)
#   api_url         the controller's base URL
#   user_token      a token of the user `bench`
#   controller_pid  the controller's process
# The controller logs each request it completes, with its method and route,
# at debug level (RUST_LOG=info,berth_controller::api=debug), in
# $work/controller.log.

work=""
controller_pid=""
api_url=""
user_token=""

bench_cleanup() {
  [ -n "$controller_pid" ] && kill "$controller_pid" 2>/dev/null && wait "$controller_pid" 2>/dev/null
  if [ -n "$work" ]; then
    [ -n "${BERTH_BENCH_KEEP:-}" ] && log "kept $work" || rm -rf "$work"
  fi
}

# bench_build BIN: builds the release binary when BIN is the workspace's
# own (cargo rebuilds it only when a source changed), or when it is missing.
bench_build() {
  if [ "$1" = "$REPO_ROOT/target/release/berth" ] || [ ! -x "$1" ]; then
    log "building $1"
    (cd "$REPO_ROOT" && cargo build --release -p berth)
  fi
}

# bench_write_config FILE [BACKEND WATCH POLL RESYNC]: writes the
# controller's and supervisor's sections, and with BACKEND the
# dispatcher's, which needs the controller's address (api_url).
bench_write_config() {
  {
    printf 'cluster_id: bench\nsystem_token_file: %s\n' "$work/system-token"
    printf 'controller:\n  listen: 127.0.0.1:0\n  database_url: sqlite://%s\n' "$work/berth.db"
    printf '  blocks:\n    directory: %s\n' "$work/blocks"
    printf 'supervisor:\n  docker_host: unix://%s\n' "$BERTH_PODMAN_SOCK"
    if [ $# -gt 1 ]; then
      printf 'dispatch:\n  backend: %s\n  api_url: %s\n' "$2" "$api_url"
      printf '  poll_interval: %ss\n  resync_interval: %ss\n  watch: %s\n' "$4" "$5" "$3"
      printf '  credentials_dir: %s\n  slurm:\n    output: %s/slurm-%%j.out\n' \
        "$work/credentials" "$work"
      printf '  local:\n    log_dir: %s\n' "$work"
    fi
  } >"$1"
}

# bench_start_controller BIN PREFIX: makes the scratch directory
# /tmp/PREFIX.XXXXXX, starts `BIN controller` there and waits until it
# prints its address, then creates the user `bench`.
bench_start_controller() {
  local bin=$1
  work=$(mktemp -d "/tmp/$2.XXXXXX")
  trap bench_cleanup EXIT
  # The system token, in a file only its owner can read.
  (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(24))' >"$work/system-token")
  mkdir -m 0700 "$work/credentials"
  bench_write_config "$work/controller.yml"
  # Made here, so that the loop below never reads it before the controller
  # has opened it.
  : >"$work/controller.out"
  RUST_LOG=info,berth_controller::api=debug \
    "$bin" controller --config "$work/controller.yml" >"$work/controller.out" 2>"$work/controller.log" &
  controller_pid=$!
  for _ in $(seq 300); do
    api_url=$(sed -n 's/^berth controller listening on //p' "$work/controller.out")
    [ -n "$api_url" ] && break
    kill -0 "$controller_pid" 2>/dev/null || { tail -n 20 "$work/controller.log" >&2; die "berth controller exited"; }
    sleep 0.1
  done
  [ -n "$api_url" ] || die "berth controller did not print its address; see $work/controller.log"
  user_token=$("$bin" admin create-user bench --config "$work/controller.yml")
}
