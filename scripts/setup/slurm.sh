#!/usr/bin/env bash
# Start a single-node Slurm cluster on this host: slurmctld and slurmd both
# run here, one partition holds the one node, and no systemd is needed.
# Berth's integration tests and the demo submit their jobs to it.
#
# Steps, each skipped when already done, so a second run changes nothing:
#   1. apt-get install slurmctld slurmd slurm-client munge, with
#      --no-install-recommends: the recommended slurm-wlm-plugins would pull
#      about 30 more packages (HDF5, InfluxDB, IPMI plugins and -dev files)
#      that this configuration never loads.
#   2. Create the munge key if missing and start munged.
#   3. Write slurm.conf for this host's real CPUs and memory (`slurmd -C`).
#   4. Start slurmctld and slurmd as plain background daemons.
#   5. Wait until the node is usable, then run one probe batch job.
#
# A cluster that is already running is reused: when slurm.conf was written by
# this script with the same settings, nothing is restarted; when its settings
# changed, the daemons are restarted with the new file. A slurm.conf written
# by something else is left alone while its daemons respond (the script then
# only checks that a node is usable); set BERTH_SLURM_REPLACE_CONF=1 to stop
# those daemons and replace that file (a copy is kept as slurm.conf.bak.TIME).
#
# Usage: scripts/setup/slurm.sh            (as root)
#        scripts/setup/slurm-stop.sh       stops what this started
#
# Tunables (environment variables):
#   BERTH_SLURM_CONF          slurm.conf path; a non-default path is passed to
#                             the daemons with -f, and clients need
#                             SLURM_CONF=PATH                 [/etc/slurm/slurm.conf]
#   BERTH_SLURM_CLUSTER       ClusterName                                 [berth]
#   BERTH_SLURM_PARTITION     name of the one (default) partition         [debug]
#   BERTH_SLURM_NODE          NodeName of this host           [$(hostname -s)]
#   BERTH_SLURMCTLD_PORT      slurmctld port                               [6817]
#   BERTH_SLURMD_PORT         slurmd port                                  [6818]
#   BERTH_SLURM_OVERSUBSCRIBE partition OverSubscribe; FORCE:4 lets four jobs
#                             share each core, so small test jobs run side by
#                             side                                      [FORCE:4]
#   BERTH_SLURM_KILL_WAIT     seconds between the TERM and the KILL that
#                             scancel sends; `berth supervise` uses them to
#                             stop its container and flush its logs       [30]
#   BERTH_SLURM_STATE_DIR     StateSaveLocation and SlurmdSpoolDir parent
#                                                       [/var/lib/berth/slurm]
#   BERTH_SLURM_LOG_DIR       daemon logs and jobcomp.log (finished jobs)
#                                                       [/var/log/berth/slurm]
#   BERTH_SLURM_RUN_DIR       pid files                      [/run/berth/slurm]
#   BERTH_SLURM_FRESH_STATE   1: when this script starts slurmctld, forget
#                             saved jobs so job ids start at 1 again; 0: keep
#                             them                                            [1]
#   BERTH_SLURM_PROBE         1: after starting slurmctld, run one batch job
#                             and wait for it; 0: skip                        [1]
#   BERTH_SLURM_WAIT          seconds to wait for the node and the probe job [60]
#   BERTH_SLURM_REPLACE_CONF  1: replace a slurm.conf this script did not
#                             write, stopping its daemons first               [0]
set -euo pipefail
SETUP_NAME=slurm
# shellcheck source=scripts/setup/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BERTH_SLURM_CONF:=/etc/slurm/slurm.conf}"
: "${BERTH_SLURM_CLUSTER:=berth}"
: "${BERTH_SLURM_PARTITION:=debug}"
: "${BERTH_SLURM_NODE:=$(hostname -s)}"
: "${BERTH_SLURMCTLD_PORT:=6817}"
: "${BERTH_SLURMD_PORT:=6818}"
: "${BERTH_SLURM_OVERSUBSCRIBE:=FORCE:4}"
: "${BERTH_SLURM_KILL_WAIT:=30}"
: "${BERTH_SLURM_STATE_DIR:=$BERTH_STATE_DIR/slurm}"
: "${BERTH_SLURM_LOG_DIR:=$BERTH_LOG_DIR/slurm}"
: "${BERTH_SLURM_RUN_DIR:=$BERTH_RUN_DIR/slurm}"
: "${BERTH_SLURM_FRESH_STATE:=1}"
: "${BERTH_SLURM_PROBE:=1}"
: "${BERTH_SLURM_WAIT:=60}"
: "${BERTH_SLURM_REPLACE_CONF:=0}"

# The first line of every slurm.conf this script writes; a file without it
# belongs to someone else.
CONF_MARKER="# Written by Berth's scripts/setup/slurm.sh; edits are overwritten."
# Slurm's clients and daemons read this variable to find a non-default file.
export SLURM_CONF=$BERTH_SLURM_CONF
DAEMON_CONF_ARGS=()
[ "$BERTH_SLURM_CONF" = /etc/slurm/slurm.conf ] || DAEMON_CONF_ARGS=(-f "$BERTH_SLURM_CONF")

MUNGE_KEY=/etc/munge/munge.key
MUNGE_PIDFILE=/run/munge/munged.pid

t_script=$(now_ms)
require_root "$@"

# --------------------------------------------------------------- install
apt_install --no-install-recommends slurmctld slurmd slurm-client munge
for program in slurmctld slurmd sbatch squeue sinfo scontrol munged munge unmunge; do
  command -v "$program" >/dev/null || die "$program not found on PATH although its package is installed"
done

# ----------------------------------------------------------------- munge
munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s "$MUNGE_KEY" ]; then
  # Debian's munge package normally creates the key when it is installed.
  log "creating $MUNGE_KEY"
  mungekey --create --keyfile="$MUNGE_KEY" --force
fi
# munged rejects a key that is readable by others or not owned by its user.
chown munge:munge "$MUNGE_KEY"
chmod 0400 "$MUNGE_KEY"

if munged_pid=$(live_pid "$MUNGE_PIDFILE" munged) && munge_works; then
  log "munged is already running (pid $munged_pid)"
else
  # A munged that died leaves its socket and lock file behind, and a new one
  # refuses to start while they exist.
  rm -f "$MUNGE_PIDFILE" /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  without_inherited_fds runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge_works && break; sleep 0.1; done
  munge_works || die "munged did not start; see /var/log/munge/munged.log"
  log "started munged (pid $(cat "$MUNGE_PIDFILE"))"
fi

# ------------------------------------------------------------ slurm.conf
# conf_value FILE KEY: prints KEY's value from a slurm.conf (keys are case
# insensitive), or nothing when the file or the key is missing.
conf_value() {
  [ -r "$1" ] || return 0
  sed -n "s/^[[:space:]]*$2[[:space:]]*=[[:space:]]*\([^[:space:]#]*\).*/\1/Ip" "$1" | tail -n 1
}

# Slurm's built-in pid file paths apply when a file does not name its own.
ctld_pidfile() { local v; v=$(conf_value "$BERTH_SLURM_CONF" SlurmctldPidFile); echo "${v:-/var/run/slurmctld.pid}"; }
slurmd_pidfile() { local v; v=$(conf_value "$BERTH_SLURM_CONF" SlurmdPidFile); echo "${v:-/var/run/slurmd.pid}"; }

ctld_responds() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

render_conf() {
  # `slurmd -C` prints this host's layout, e.g. "NodeName=vm CPUs=2
  # Boards=1 SocketsPerBoard=1 CoresPerSocket=2 ThreadsPerCore=1
  # RealMemory=24105"; its NodeName is replaced by ours.
  local hardware
  hardware=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //')
  case "$hardware" in *CPUs=*) ;; *) die "could not read this host's CPUs and memory from 'slurmd -C': $hardware" ;; esac

  # slurmd drains its node ("Low TmpDisk") when slurm.conf claims more space
  # in TmpFS than it measures. It measures total blocks times fragment size
  # in whole MiB, rounded down, so compute the same (df -m would round up).
  local blocks fragment tmp_mib
  read -r blocks fragment < <(stat -f -c '%b %S' /tmp)
  tmp_mib=$(( blocks * fragment / 1048576 ))

  # slurmctld listens on the address its host name resolves to, so the
  # "listen on loopback only" switch is safe only when that is loopback.
  local comm_params=NoInAddrAny
  if getent ahostsv4 "$(hostname -s)" | awk '$1 ~ /^127\./ { found = 1 } END { exit !found }'; then
    comm_params=NoCtldInAddrAny,NoInAddrAny
  fi

  cat <<EOF
$CONF_MARKER
ClusterName=$BERTH_SLURM_CLUSTER
# slurmctld only starts on the host named here, which must be this host's
# short name; the address is explicit so that no lookup is needed.
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$BERTH_SLURMCTLD_PORT
SlurmdPort=$BERTH_SLURMD_PORT
# Listen on 127.0.0.1 rather than on every interface.
CommunicationParameters=$comm_params
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$BERTH_SLURM_STATE_DIR/ctld
SlurmdSpoolDir=$BERTH_SLURM_STATE_DIR/spool
SlurmctldPidFile=$BERTH_SLURM_RUN_DIR/slurmctld.pid
SlurmdPidFile=$BERTH_SLURM_RUN_DIR/slurmd.pid
SlurmctldLogFile=$BERTH_SLURM_LOG_DIR/slurmctld.log
SlurmdLogFile=$BERTH_SLURM_LOG_DIR/slurmd.log
# Plugins that need no cgroup hierarchy and no systemd: job processes are
# tracked through /proc. A container started through Podman is not in that
# process tree, which is why the supervisor stops its container itself on TERM.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# Without slurmdbd there is no sacct; finished jobs are appended to jobcomp.log.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$BERTH_SLURM_LOG_DIR/jobcomp.log
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
# By default a batch job waits for the next 3-second scheduling pass;
# batch_sched_delay=0 starts it within about a second.
SchedulerParameters=batch_sched_delay=0
# CR_Core: cores are consumable, memory is not. With memory consumable and
# no DefMemPerCPU, a job without --mem would be given the whole node's memory
# and no second job could run beside it. --mem is still checked against
# RealMemory.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=$BERTH_SLURM_KILL_WAIT
InactiveLimit=0
SlurmdTimeout=300
TmpFS=/tmp
NodeName=$BERTH_SLURM_NODE NodeAddr=127.0.0.1 $hardware TmpDisk=$tmp_mib State=UNKNOWN
PartitionName=$BERTH_SLURM_PARTITION Nodes=$BERTH_SLURM_NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=$BERTH_SLURM_OVERSUBSCRIBE
EOF
}

desired_conf=$(mktemp)
trap 'rm -f "$desired_conf"' EXIT
render_conf >"$desired_conf"

# The daemons of the file in place (ours or not) are found through its pid files.
ctld_pid=$(live_pid "$(ctld_pidfile)" slurmctld || true)
slurmd_pid=$(live_pid "$(slurmd_pidfile)" slurmd || true)

# mode: "own" (the file is ours and up to date, or missing), "rewrite" (write
# ours, restarting daemons of the old file), or "reuse" (leave a foreign,
# running cluster alone).
mode=own
if [ -f "$BERTH_SLURM_CONF" ] && ! cmp -s "$desired_conf" "$BERTH_SLURM_CONF"; then
  if head -n 1 "$BERTH_SLURM_CONF" | grep -qxF "$CONF_MARKER"; then
    mode=rewrite
  elif [ "$BERTH_SLURM_REPLACE_CONF" != 1 ] && { [ -n "$ctld_pid" ] || ctld_responds; }; then
    mode=reuse
  else
    mode=rewrite
  fi
fi

if [ "$mode" = rewrite ]; then
  if [ -n "$ctld_pid" ] || [ -n "$slurmd_pid" ]; then
    log "$BERTH_SLURM_CONF changes: stopping the running Slurm daemons first"
    stop_by_pidfile "$(slurmd_pidfile)" slurmd
    stop_by_pidfile "$(ctld_pidfile)" slurmctld
    ctld_pid='' slurmd_pid=''
  fi
  if ! head -n 1 "$BERTH_SLURM_CONF" | grep -qxF "$CONF_MARKER"; then
    backup=$BERTH_SLURM_CONF.bak.$(date +%Y%m%d%H%M%S)
    cp -p "$BERTH_SLURM_CONF" "$backup"
    log "kept a copy of the previous $BERTH_SLURM_CONF at $backup"
  fi
fi
if [ "$mode" = rewrite ] || [ ! -f "$BERTH_SLURM_CONF" ]; then
  install -d -m 0755 "$(dirname "$BERTH_SLURM_CONF")"
  install -m 0644 "$desired_conf" "$BERTH_SLURM_CONF"
  log "wrote $BERTH_SLURM_CONF"
elif [ "$mode" = own ]; then
  log "$BERTH_SLURM_CONF is up to date"
else
  log "reusing the running Slurm cluster of $BERTH_SLURM_CONF, which this script did not write (BERTH_SLURM_REPLACE_CONF=1 replaces it)"
fi

# --------------------------------------------------------------- daemons
t_daemons=$(now_ms)
ctld_started=0
if [ "$mode" != reuse ]; then
  install -d -m 0755 "$BERTH_SLURM_RUN_DIR" "$BERTH_SLURM_LOG_DIR" "$BERTH_SLURM_STATE_DIR/spool"
  install -d -m 0700 "$BERTH_SLURM_STATE_DIR/ctld"

  if [ -n "$ctld_pid" ]; then
    log "slurmctld is already running (pid $ctld_pid)"
  elif ctld_responds; then
    log "slurmctld responds although $(ctld_pidfile) names no live slurmctld; using it as it is"
  else
    ctld_args=()
    if [ "$BERTH_SLURM_FRESH_STATE" = 1 ]; then
      # -c drops saved jobs but keeps the job id counter, which lives in the
      # same directory: emptying it makes ids start at 1 again.
      find "$BERTH_SLURM_STATE_DIR/ctld" -mindepth 1 -delete
      ctld_args+=(-c)
    fi
    rm -f "$BERTH_SLURM_RUN_DIR/slurmctld.pid"
    # slurmctld forks into the background and writes its pid file.
    without_inherited_fds slurmctld "${DAEMON_CONF_ARGS[@]}" "${ctld_args[@]}"
    for _ in $(seq 100); do ctld_responds && break; sleep 0.1; done
    ctld_responds || die "slurmctld started but does not respond to 'scontrol ping'; see $BERTH_SLURM_LOG_DIR/slurmctld.log"
    ctld_started=1
    log "started slurmctld (pid $(cat "$BERTH_SLURM_RUN_DIR/slurmctld.pid"))"
  fi

  if [ -n "$slurmd_pid" ]; then
    log "slurmd is already running (pid $slurmd_pid)"
  else
    rm -f "$BERTH_SLURM_RUN_DIR/slurmd.pid"
    without_inherited_fds slurmd "${DAEMON_CONF_ARGS[@]}" -N "$BERTH_SLURM_NODE"
    for _ in $(seq 50); do live_pid "$BERTH_SLURM_RUN_DIR/slurmd.pid" slurmd >/dev/null && break; sleep 0.1; done
    slurmd_pid=$(live_pid "$BERTH_SLURM_RUN_DIR/slurmd.pid" slurmd) \
      || die "slurmd did not start; see $BERTH_SLURM_LOG_DIR/slurmd.log"
    log "started slurmd (pid $slurmd_pid)"
  fi
fi

# ------------------------------------------------------ wait for the node
# In "reuse" mode any node of the running cluster will do; otherwise ours.
node_filter=()
[ "$mode" = reuse ] || node_filter=(-n "$BERTH_SLURM_NODE")
deadline=$(( $(date +%s) + BERTH_SLURM_WAIT ))
while :; do
  states=$(sinfo -h -N "${node_filter[@]}" -o '%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
  case " $states" in *" idle "*|*" mix "*|*" alloc "*|*" comp "*) break ;; esac
  # A node of ours that an old state file left down or drained is resumed.
  if [ "$mode" != reuse ]; then
    case "$states" in drain*|drng*|down*|fail*)
      scontrol update nodename="$BERTH_SLURM_NODE" state=resume 2>/dev/null || true ;;
    esac
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    scontrol show node "${node_filter[@]:1}" >&2 || true
    die "no usable Slurm node after ${BERTH_SLURM_WAIT} s (node states: '${states% }'); see the reason above and the logs in $BERTH_SLURM_LOG_DIR"
  fi
  sleep 0.2
done
log "node state '${states% }' ready $(seconds_since "$t_daemons") s after the daemon check"

# ------------------------------------------------------------ probe job
# slurmctld runs its first batch scheduling pass about 3 s after it starts,
# whatever the node's state. One trivial job here absorbs that delay, so the
# first job of a test starts at once, and proves that munge credentials, job
# launch and the spool directory work.
if [ "$BERTH_SLURM_PROBE" = 1 ] && [ "$ctld_started" = 1 ]; then
  t_probe=$(now_ms)
  probe_id=$(sbatch --parsable -J berth-setup-probe -o /dev/null --wrap true) \
    || die "sbatch of the probe job failed; see $BERTH_SLURM_LOG_DIR/slurmctld.log"
  probe_state=''
  while :; do
    probe_state=$(squeue -h -t all -j "$probe_id" -o %T 2>/dev/null || true)
    case "$probe_state" in
      COMPLETED) break ;;
      FAILED|CANCELLED|NODE_FAIL|BOOT_FAIL|OUT_OF_MEMORY|TIMEOUT|DEADLINE)
        die "probe job $probe_id ended $probe_state; see $BERTH_SLURM_LOG_DIR/slurmd.log" ;;
    esac
    [ "$(date +%s)" -lt "$deadline" ] \
      || die "probe job $probe_id is still '$probe_state' after ${BERTH_SLURM_WAIT} s; see $BERTH_SLURM_LOG_DIR/slurmctld.log"
    sleep 0.1
  done
  log "probe job $probe_id completed in $(seconds_since "$t_probe") s"
fi

log "Slurm ready in $(seconds_since "$t_script") s: config $BERTH_SLURM_CONF, partition(s) $(sinfo -h -o '%P' | tr '\n' ' ')"
[ "$BERTH_SLURM_CONF" = /etc/slurm/slurm.conf ] || log "clients need: export SLURM_CONF=$BERTH_SLURM_CONF"
sinfo
