#!/usr/bin/env bash
# Run Berth's whole test suite, unit and integration tests, against a real
# single-node Slurm cluster and a real Podman API socket on this host.
#
# It first runs the set-up scripts (each reuses what is already running):
#   scripts/setup/slurm.sh                 Slurm: slurmctld, slurmd, munged
#   scripts/setup/podman.sh service-start  Podman's Docker-compatible API
#   scripts/setup/test-image.sh            localhost/busybox:latest, archive
#   scripts/setup/postgres.sh start        PostgreSQL (unless BERTH_TEST_POSTGRES=0)
# and makes a Python virtual environment with the Arvados Python SDK
# (`pip install arvados-python-client`, from PyPI) unless it exists,
# then builds the workspace's tests and runs them with cargo-nextest when it
# is installed, else with `cargo test`, with --no-fail-fast, on SQLite; then,
# without extra arguments, runs the test that stops slurmctld for 30 s on its
# own (BERTH_TEST_STOP_SLURMCTLD=1), since it would disturb the other Slurm
# tests; then runs the controller's tests (its store and API suites) a second time on
# PostgreSQL, and, without extra arguments, the end-to-end test of two
# controllers sharing PostgreSQL (e2e_shell_move). Extra arguments go to both runs, e.g. `scripts/test.sh -p
# berth-core` or a test filter; the second run then takes them in place of
# `-p berth-controller`.
# Each phase's duration is printed; the exit status is the test run's.
#
# Needs: root, Debian 12 with apt access (packages are installed when
# missing), and Rust (cargo) 1.89 or newer.
#
# The tests read these variables, which this script exports:
#   DOCKER_HOST                unix:// path of the Podman API socket
#   BERTH_INTEGRATION=1        run the tests that need Slurm and Podman
#   BERTH_TEST_IMAGE           image tag loaded in Podman
#   BERTH_TEST_IMAGE_ARCHIVE   the same image as a `docker save` archive
#   BERTH_TEST_DATABASE_URL    PostgreSQL URL, in the PostgreSQL runs only
#   BERTH_TEST_PYTHON          the virtual environment's python, for the SDK test
#   SLURM_CONF                 only when BERTH_SLURM_CONF names another file
#
# Tunables (environment variables):
#   BERTH_TEST_POSTGRES  1: start PostgreSQL (scripts/setup/postgres.sh) and
#                        run the controller's tests on it too; 0: SQLite only [1]
#   BERTH_TEST_RUNNER    nextest or cargo-test; default: nextest if installed
#   BERTH_TEST_VENV      the SDK's virtual environment   [$BERTH_STATE_DIR/venv]
#   and the tunables of the set-up scripts (BERTH_PODMAN_SOCK, ...), which
#   this script passes on.
set -euo pipefail
SETUP_NAME="test"
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/setup/lib.sh
. "$REPO_ROOT/scripts/setup/lib.sh"

: "${BERTH_TEST_POSTGRES:=1}"
: "${BERTH_PODMAN_SOCK:=$BERTH_RUN_DIR/podman.sock}"
: "${BERTH_TEST_IMAGE:=localhost/busybox:latest}"
: "${BERTH_TEST_IMAGE_ARCHIVE:=$BERTH_STATE_DIR/test-image/busybox.tar}"
: "${BERTH_TEST_VENV:=$BERTH_STATE_DIR/venv}"
export BERTH_PODMAN_SOCK BERTH_TEST_IMAGE BERTH_TEST_IMAGE_ARCHIVE

t_total=$(now_ms)
phase_names=()
phase_seconds=()

# run_phase NAME COMMAND...: runs COMMAND, then records and prints how long
# it took. A failing phase stops the script (set -e), with its time printed.
run_phase() {
  local name=$1 t0 status=0
  shift
  log "=== $name"
  t0=$(now_ms)
  "$@" || status=$?
  phase_names+=("$name")
  phase_seconds+=("$(seconds_since "$t0")")
  log "=== $name: $(if [ "$status" = 0 ]; then echo ok; else echo "failed (exit $status)"; fi) in ${phase_seconds[-1]} s"
  return "$status"
}

print_timings() {
  local i line=""
  for i in "${!phase_names[@]}"; do
    line+="${phase_names[$i]} ${phase_seconds[$i]} s, "
  done
  log "timings: ${line}total $(seconds_since "$t_total") s"
}
trap print_timings EXIT

require_root "$@"
cd "$REPO_ROOT"

# ------------------------------------------------------------ toolchain
# rustup installs cargo into ~/.cargo/bin, which a non-login shell (sudo, CI)
# may not have on its PATH.
if ! command -v cargo >/dev/null && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]; then
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
  die "cargo not found. Install Rust 1.89 or newer with rustup (Debian 12's rustc package is too old):
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
    . \"\$HOME/.cargo/env\"
then run $0 again (scripts/demo.sh installs Rust this way by itself)."
fi
# Crates with C code (SQLite, ring) need a C compiler and the C library headers.
command -v cc >/dev/null || apt_install --no-install-recommends gcc libc6-dev

runner=${BERTH_TEST_RUNNER:-}
if [ -z "$runner" ]; then
  if cargo nextest --version >/dev/null 2>&1; then runner=nextest; else runner=cargo-test; fi
fi
case "$runner" in
  nextest) test_command=(cargo nextest run) ;;
  cargo-test) test_command=(cargo test) ;;
  *) die "invalid BERTH_TEST_RUNNER '$runner'; use nextest or cargo-test" ;;
esac
# The whole workspace, unless the extra arguments pick packages.
scope=(--workspace)
for arg in "$@"; do
  case "$arg" in
    --) break ;;
    -p|-p*|--package|--package=*) scope=() ;;
  esac
done
log "$(cargo --version), test runner: ${test_command[*]} ${scope[*]} --no-fail-fast $*"

# ------------------------------------------------------------- services
run_phase slurm scripts/setup/slurm.sh
run_phase podman scripts/setup/podman.sh service-start
run_phase test-image scripts/setup/test-image.sh

# python_sdk_venv: makes $BERTH_TEST_VENV with the Arvados Python SDK, or
# reuses it when its python already imports the SDK.
python_sdk_venv() {
  if "$BERTH_TEST_VENV/bin/python" -c 'import arvados' 2>/dev/null; then
    log "reusing the Arvados Python SDK in $BERTH_TEST_VENV"
    return 0
  fi
  command -v python3 >/dev/null || apt_install python3 || return
  python3 -c 'import ensurepip' 2>/dev/null || apt_install python3-venv || return
  python3 -m venv --clear "$BERTH_TEST_VENV" || return
  "$BERTH_TEST_VENV/bin/pip" install --quiet arvados-python-client
}
run_phase python-sdk python_sdk_venv
export BERTH_TEST_PYTHON=$BERTH_TEST_VENV/bin/python

if [ "$BERTH_TEST_POSTGRES" = 1 ]; then
  postgres_output=$(mktemp)
  run_phase postgres scripts/setup/postgres.sh start >"$postgres_output"
  BERTH_TEST_DATABASE_URL=$(sed -n 's/^DATABASE_URL=//p' "$postgres_output")
  rm -f "$postgres_output"
  [ -n "$BERTH_TEST_DATABASE_URL" ] || die "scripts/setup/postgres.sh printed no DATABASE_URL"
  # Deliberately not DATABASE_URL: sqlx's query macros would read that at
  # compile time and check every query against this database. It is set
  # only for the second run, so the first one tests SQLite.
fi

export DOCKER_HOST=unix://$BERTH_PODMAN_SOCK
export BERTH_INTEGRATION=1
if [ -n "${BERTH_SLURM_CONF:-}" ] && [ "$BERTH_SLURM_CONF" != /etc/slurm/slurm.conf ]; then
  export SLURM_CONF=$BERTH_SLURM_CONF
fi
log "DOCKER_HOST=$DOCKER_HOST BERTH_INTEGRATION=1 BERTH_TEST_IMAGE=$BERTH_TEST_IMAGE BERTH_TEST_IMAGE_ARCHIVE=$BERTH_TEST_IMAGE_ARCHIVE"

# ---------------------------------------------------------------- tests
run_phase build "${test_command[@]}" "${scope[@]}" --no-run "$@"
status=0
if [ "$runner" = nextest ]; then
  run_phase tests "${test_command[@]}" "${scope[@]}" --no-fail-fast "$@" || status=$?
else
  # `cargo test` prints one "test result:" line per test binary, the last
  # often for doc tests with 0 tests; a closing total over all of them
  # shows the reader (and CI) how many ran.
  test_output=$(mktemp)
  # shellcheck disable=SC2016 # $@ and $0 belong to the inner shell
  run_phase tests bash -c 'set -o pipefail; "$@" 2>&1 | tee "$0"' "$test_output" \
    "${test_command[@]}" "${scope[@]}" --no-fail-fast "$@" || status=$?
  sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed; \([0-9]*\) ignored.*/\1 \2 \3/p' "$test_output" \
    | awk '{ p += $1; f += $2; s += $3 } END { printf "total: %d passed, %d failed, %d skipped\n", p, f, s }'
  rm -f "$test_output"
fi
if [ "$#" -eq 0 ]; then
  # The slurmctld outage test stops the Slurm controller that the other
  # Slurm tests share, so it runs alone, after them.
  # The same scope as the run above, so that nothing is built again.
  if [ "$runner" = nextest ]; then
    outage_filter=(-E 'binary(e2e_slurm_faults) & test(slurmctld_outage)')
  else
    outage_filter=(--test e2e_slurm_faults -- slurmctld_outage)
  fi
  run_phase tests-slurmctld-outage env BERTH_TEST_STOP_SLURMCTLD=1 \
    "${test_command[@]}" "${scope[@]}" "${outage_filter[@]}" || status=$?
fi
if [ "$BERTH_TEST_POSTGRES" = 1 ]; then
  # The controller's tests again, each on a schema of its own in PostgreSQL.
  pg_args=("$@")
  [ "$#" -gt 0 ] || pg_args=(-p berth-controller)
  pg_scope=("${scope[@]}")
  [ "$#" -gt 0 ] || pg_scope=()
  run_phase tests-postgres env BERTH_TEST_DATABASE_URL="$BERTH_TEST_DATABASE_URL" \
    "${test_command[@]}" "${pg_scope[@]}" --no-fail-fast "${pg_args[@]}" || status=$?
  if [ "$#" -eq 0 ]; then
    # The end-to-end test of two controllers sharing one database needs
    # PostgreSQL, which the first run does not have.
    if [ "$runner" = nextest ]; then
      shared_filter=(-E 'binary(e2e_shell_move)')
    else
      shared_filter=(--test e2e_shell_move)
    fi
    run_phase tests-postgres-e2e env BERTH_TEST_DATABASE_URL="$BERTH_TEST_DATABASE_URL" \
      "${test_command[@]}" "${scope[@]}" "${shared_filter[@]}" || status=$?
  fi
fi
exit "$status"
