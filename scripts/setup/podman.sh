#!/usr/bin/env bash
# Make rootful Podman with crun work on this host, and run Podman's
# Docker-compatible API socket, which `berth supervise` talks to through the
# Docker Engine API (DOCKER_HOST=unix://SOCKET).
#
# Usage: scripts/setup/podman.sh [setup|service-start|service-stop|service-status]
#   setup           install and fix up Podman (the default)
#   service-start   setup, then start the API service unless it is running
#   service-stop    stop the API service this script started (by pid file)
#   service-status  report whether the API service responds; exit 1 if not
#
# The fix-ups, each applied only when needed (so a second run changes nothing):
#   1. apt-get install podman crun curl python3 util-linux openssh-client
#      bsdutils iproute2 nftables tmux. Podman's
#      recommended packages are kept (catatonit for --init, slirp4netns,
#      fuse-overlayfs, uidmap): that is the combination this set-up was
#      tested with. The supervisor's `oci` runtime tests run crun directly,
#      and its Singularity stand-in (crates/berth-supervisor/tests/stand-ins)
#      runs on python3 with util-linux's unshare and mount. The SSH gateway
#      tests drive the OpenSSH client (`ssh`), on a terminal from bsdutils'
#      `script` or from tmux for the interactive session. The shell tests
#      put the compute node in a network namespace (iproute2's `ip netns`)
#      behind an nftables firewall.
#   2. cgroups: on a host with the hybrid layout (cgroup v1 controllers under
#      /sys/fs/cgroup plus a cgroup2 tree at /sys/fs/cgroup/unified), crun
#      refuses to create containers while the v2 tree still owns a controller
#      ("cgroups in hybrid mode not supported, drop all controllers from
#      cgroupv2"). On a Firecracker VM that controller is hugetlb. Mounting
#      each such controller as its own v1 hierarchy moves it out of the v2
#      tree. The kernel keeps it on v1 afterwards, even after an unmount.
#   3. ulimits: rootful Podman asks crun for RLIMIT_NOFILE and RLIMIT_NPROC
#      of 1048576. A process without CAP_SYS_RESOURCE cannot raise a limit
#      above its hard limit, so every container then fails with "setrlimit
#      RLIMIT_NOFILE: Operation not permitted". Podman 4.3 also lowers its
#      own RLIMIT_NPROC to 32768 when it starts. A containers.conf drop-in
#      sets default ulimits that fit: nofile = this shell's hard limit, nproc
#      = the smaller of the hard limit and 32768. The CLI and the API
#      service both apply it.
#
# Tunables (environment variables):
#   BERTH_PODMAN_SOCK     API socket path                 [/run/berth/podman.sock]
#   BERTH_PODMAN_PIDFILE  API service pid file         [/run/berth/podman-api.pid]
#   BERTH_PODMAN_LOG      API service log           [/var/log/berth/podman-api.log]
#   BERTH_PODMAN_WAIT     seconds to wait for the socket to respond           [30]
set -euo pipefail
SETUP_NAME=podman
# shellcheck source=scripts/setup/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BERTH_PODMAN_SOCK:=$BERTH_RUN_DIR/podman.sock}"
: "${BERTH_PODMAN_PIDFILE:=$BERTH_RUN_DIR/podman-api.pid}"
: "${BERTH_PODMAN_LOG:=$BERTH_LOG_DIR/podman-api.log}"
: "${BERTH_PODMAN_WAIT:=30}"

ULIMITS_CONF=/etc/containers/containers.conf.d/50-berth-ulimits.conf

command=${1:-setup}
case "$command" in
  setup|service-start|service-stop|service-status) ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) die "unknown command '$command'; use setup, service-start, service-stop or service-status" ;;
esac

t_script=$(now_ms)
require_root "$@"

socket_responds() {
  [ -S "$BERTH_PODMAN_SOCK" ] \
    && [ "$(curl -s --max-time 5 --unix-socket "$BERTH_PODMAN_SOCK" http://localhost/_ping 2>/dev/null)" = OK ]
}

# cwd_exists PID: true while the working directory of process PID exists.
cwd_exists() {
  local cwd
  cwd=$(readlink "/proc/$1/cwd") && [ "${cwd% (deleted)}" = "$cwd" ]
}

if [ "$command" = service-stop ]; then
  stop_by_pidfile "$BERTH_PODMAN_PIDFILE" podman
  rm -f "$BERTH_PODMAN_SOCK"
  exit 0
fi

if [ "$command" = service-status ]; then
  if socket_responds; then
    pid=$(live_pid "$BERTH_PODMAN_PIDFILE" podman || echo "unknown")
    echo "podman API service responds on unix://$BERTH_PODMAN_SOCK (pid $pid)"
    exit 0
  fi
  echo "podman API service does not respond on unix://$BERTH_PODMAN_SOCK"
  exit 1
fi

# --------------------------------------------------------------- install
apt_install podman crun curl python3 util-linux openssh-client bsdutils iproute2 nftables tmux
command -v podman >/dev/null || die "podman not found on PATH although its package is installed"

# --------------------------------------------------------------- cgroups
if [ "$(stat -f -c %T /sys/fs/cgroup)" = tmpfs ] && [ -r /sys/fs/cgroup/unified/cgroup.controllers ]; then
  for controller in $(cat /sys/fs/cgroup/unified/cgroup.controllers); do
    mkdir -p "/sys/fs/cgroup/$controller"
    if ! awk -v dir="/sys/fs/cgroup/$controller" '$2 == dir && $3 == "cgroup" { found = 1 } END { exit !found }' /proc/mounts; then
      mount -t cgroup -o "$controller" cgroup "/sys/fs/cgroup/$controller" \
        || die "failed to mount the cgroup v1 controller $controller at /sys/fs/cgroup/$controller"
      log "mounted cgroup controller $controller as v1 at /sys/fs/cgroup/$controller (crun rejects hybrid mode while cgroup v2 owns it)"
    fi
  done
  left=$(cat /sys/fs/cgroup/unified/cgroup.controllers)
  [ -z "$left" ] || die "cgroup v2 still owns controllers '$left'; crun will reject containers until they move to v1"
fi

# --------------------------------------------------------------- ulimits
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
if [ "$nofile" = unlimited ] || [ "$nofile" -gt 1048576 ]; then nofile=1048576; fi
if [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; then nproc=32768; fi
wanted=$(printf '%s\n' \
  "# Written by Berth's scripts/setup/podman.sh: container ulimits no higher" \
  "# than the hard limits here, since crun cannot raise them without" \
  "# CAP_SYS_RESOURCE." \
  "[containers]" \
  "default_ulimits = [\"nofile=$nofile:$nofile\", \"nproc=$nproc:$nproc\"]")
if [ "$(cat "$ULIMITS_CONF" 2>/dev/null)" != "$wanted" ]; then
  mkdir -p "$(dirname "$ULIMITS_CONF")"
  printf '%s\n' "$wanted" >"$ULIMITS_CONF"
  log "wrote $ULIMITS_CONF (nofile=$nofile, nproc=$nproc)"
fi

info=$(podman info --format 'podman {{.Version.Version}}, runtime {{.Host.OCIRuntime.Name}}, storage {{.Store.GraphDriverName}}, cgroups {{.Host.CgroupsVersion}}' 2>&1) \
  || die "'podman info' failed after set-up: $info"
log "$info"

# ----------------------------------------------------------- API service
if [ "$command" = service-start ]; then
  if pid=$(live_pid "$BERTH_PODMAN_PIDFILE" podman) && socket_responds && cwd_exists "$pid"; then
    log "API service is already running (pid $pid) on unix://$BERTH_PODMAN_SOCK"
  elif socket_responds; then
    log "something already responds on $BERTH_PODMAN_SOCK without a live pid in $BERTH_PODMAN_PIDFILE; using it as it is"
  else
    # A service whose socket stopped responding, or whose working directory
    # was deleted (conmon then fails every container), is restarted.
    [ -n "${pid:-}" ] && stop_by_pidfile "$BERTH_PODMAN_PIDFILE" podman
    mkdir -p "$(dirname "$BERTH_PODMAN_SOCK")"
    rm -f "$BERTH_PODMAN_SOCK"
    # --time=0: never exit for lack of requests.
    start_detached "$BERTH_PODMAN_PIDFILE" "$BERTH_PODMAN_LOG" \
      podman system service --time=0 "unix://$BERTH_PODMAN_SOCK"
    deadline=$(( $(date +%s) + BERTH_PODMAN_WAIT ))
    until socket_responds; do
      live_pid "$BERTH_PODMAN_PIDFILE" podman >/dev/null \
        || die "the API service exited during start-up; see $BERTH_PODMAN_LOG"
      [ "$(date +%s)" -lt "$deadline" ] \
        || die "the API service does not respond on $BERTH_PODMAN_SOCK after ${BERTH_PODMAN_WAIT} s; see $BERTH_PODMAN_LOG"
      sleep 0.1
    done
    log "started the API service (pid $(cat "$BERTH_PODMAN_PIDFILE")) on unix://$BERTH_PODMAN_SOCK, log $BERTH_PODMAN_LOG"
  fi
  log "use: export DOCKER_HOST=unix://$BERTH_PODMAN_SOCK"
fi
log "done in $(seconds_since "$t_script") s"
