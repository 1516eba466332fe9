# shellcheck shell=bash
# Helpers shared by the set-up scripts in this folder. Each script sources
# this file after setting SETUP_NAME (the tag its log lines carry); it is not
# meant to be run on its own.
#
# The scripts target a Debian 12 machine without systemd, where they run as
# root. Two facts of such machines shape these helpers:
# - /usr/sbin/policy-rc.d may forbid package scripts from starting services,
#   so the scripts start every daemon themselves and never rely on apt.
# - /run may live on the root file system rather than a tmpfs, so a pid file
#   can survive its process and its pid can be reused later by an unrelated
#   process. A pid file counts only when /proc/PID/comm names the expected
#   program.

export DEBIAN_FRONTEND=noninteractive
# Daemons such as slurmctld and munged live in sbin, which a non-login root
# shell may lack on its PATH.
case ":$PATH:" in
  *:/usr/sbin:*) ;;
  *) export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin ;;
esac

# Directories every Berth set-up script uses for its own state.
BERTH_RUN_DIR=${BERTH_RUN_DIR:-/run/berth}
BERTH_STATE_DIR=${BERTH_STATE_DIR:-/var/lib/berth}
BERTH_LOG_DIR=${BERTH_LOG_DIR:-/var/log/berth}

log() { printf '[%s] %s\n' "${SETUP_NAME:-setup}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${SETUP_NAME:-setup}" "$*" >&2; exit 1; }

now_ms() { date +%s%3N; }

# seconds_since START_MS: prints the time since START_MS as "1.23".
seconds_since() {
  local ms=$(( $(now_ms) - $1 ))
  printf '%d.%02d' $(( ms / 1000 )) $(( ms % 1000 / 10 ))
}

require_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons); try: sudo $0 $*"
}

# live_pid PIDFILE COMM: prints the pid in PIDFILE when that process is alive
# (not a zombie) and its command name is COMM; fails otherwise (missing, empty
# or stale file).
live_pid() {
  local file=$1 comm=$2 pid
  [ -s "$file" ] || return 1
  pid=$(tr -dc '0-9' <"$file")
  [ -n "$pid" ] && [ -r "/proc/$pid/comm" ] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
  # A killed daemon stays a zombie until PID 1 reaps it; that is not alive.
  [ "$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)" != Z ] || return 1
  printf '%s\n' "$pid"
}

# stop_process PID NAME [GRACE_SECONDS]: sends TERM to PID, waits up to
# GRACE_SECONDS (default 10) for it to exit, then sends KILL. NAME is only
# for the log. A process that is already gone counts as stopped.
stop_process() {
  local pid=$1 name=$2 grace=${3:-10}
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$(( $(date +%s) + grace ))
  while kill -0 "$pid" 2>/dev/null && [ "$(date +%s)" -lt "$deadline" ]; do
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) still running ${grace} s after TERM; sending KILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  log "stopped $name (pid $pid)"
}

# stop_by_pidfile PIDFILE COMM [GRACE_SECONDS]: stops the process named in
# PIDFILE with stop_process, but only if it is alive and its command name is
# COMM, and removes the pid file.
stop_by_pidfile() {
  local file=$1 comm=$2 grace=${3:-10} pid
  if pid=$(live_pid "$file" "$comm"); then
    stop_process "$pid" "$comm" "$grace"
  else
    log "$comm is not running (pid file $file)"
  fi
  rm -f "$file"
}

# A shell script that closes every file descriptor above 2, then execs its
# arguments. A daemon must not keep a pipe it inherited open, or a caller that
# reads this script's output through a pipe (a CI runner, say) would wait for
# it forever.
# shellcheck disable=SC2016 # $$ and $@ belong to the shell that runs it
CLOSE_FDS_AND_EXEC='for fd in /proc/$$/fd/*; do
  fd=${fd##*/}
  if [ "$fd" -gt 2 ] && [ -L "/proc/$$/fd/$fd" ]; then eval "exec $fd>&-"; fi
done
exec "$@"'

# without_inherited_fds COMMAND...: runs COMMAND with only stdin, stdout and
# stderr open, for daemons that fork into the background by themselves.
without_inherited_fds() {
  bash -c "$CLOSE_FDS_AND_EXEC" without_inherited_fds "$@"
}

# start_detached PIDFILE LOGFILE COMMAND...: starts COMMAND in its own session
# (so it outlives the calling shell and its terminal), with stdin from
# /dev/null, both output streams appended to LOGFILE and no other inherited
# file descriptor, and writes its pid to PIDFILE. The pid is written by the
# shell that then execs COMMAND, so it is the daemon's own pid whether or not
# setsid had to fork.
start_detached() {
  local pidfile=$1 logfile=$2
  shift 2
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
  rm -f "$pidfile"
  # The daemon runs from /: a daemon left in the caller's working directory
  # breaks once that directory is deleted (podman's conmon then fails every
  # container with "Failed to get working directory").
  # shellcheck disable=SC2016 # $$, $0 and $@ belong to the inner shell
  setsid bash -c 'cd / && echo $$ >"$0" && exec "$@"' "$pidfile" \
    bash -c "$CLOSE_FDS_AND_EXEC" "$1" "$@" \
    </dev/null >>"$logfile" 2>&1 &
  local waited=0
  while [ ! -s "$pidfile" ] && [ "$waited" -lt 50 ]; do
    sleep 0.1
    waited=$(( waited + 1 ))
  done
  [ -s "$pidfile" ] || die "failed to start $1: no pid written to $pidfile; see $logfile"
}

# package_installed NAME: true when dpkg reports NAME fully installed.
package_installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# apt_install [--no-install-recommends] PACKAGE...: installs the packages
# that are not installed yet. Runs `apt-get update` first when the machine
# has no package lists, and once more (then retries) when the install fails,
# which is what stale lists on an older image look like.
apt_install() {
  local opts=() missing=() p
  while [ $# -gt 0 ]; do
    case "$1" in
      --*) opts+=("$1") ;;
      *) package_installed "$1" || missing+=("$1") ;;
    esac
    shift
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "apt-get not found: these scripts need Debian 12 (missing packages: ${missing[*]})"

  local t0
  t0=$(now_ms)
  log "installing with apt-get: ${missing[*]}"
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null; then
    apt-get update -qq || die "apt-get update failed; check the machine's apt sources and network"
  fi
  if ! apt-get install -y -qq "${opts[@]}" "${missing[@]}" >/dev/null; then
    log "apt-get install failed; refreshing the package lists and retrying"
    apt-get update -qq || die "apt-get update failed; check the machine's apt sources and network"
    apt-get install -y -qq "${opts[@]}" "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed; run it by hand to see why"
  fi
  for p in "${missing[@]}"; do
    package_installed "$p" || die "package $p is still not installed after apt-get install"
  done
  log "installed ${missing[*]} in $(seconds_since "$t0") s"
}
