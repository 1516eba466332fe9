#!/usr/bin/env bash
# Stop the single-node Slurm cluster that scripts/setup/slurm.sh started:
# cancel its jobs, then stop slurmd, slurmctld and munged. Stopping a cluster
# that is not running prints so and succeeds.
#
# Jobs are cancelled first because a batch job's slurmstepd outlives slurmd:
# a job still running when the daemons stop would keep running, and its
# slurmstepd would keep retrying to reach a slurmd that is gone.
#
# Each daemon is found through the pid file that slurm.conf names (Slurm's
# default path when it names none) and is signalled only when that pid is
# alive and has the daemon's name. Nothing is stopped by name (no pkill), so
# a stale pid file never hits an unrelated process.
#
# Usage: scripts/setup/slurm-stop.sh        (as root)
#
# Tunables (environment variables):
#   BERTH_SLURM_CONF         slurm.conf of the cluster    [/etc/slurm/slurm.conf]
#   BERTH_SLURM_CANCEL_WAIT  seconds to wait for cancelled jobs to end; keep
#                            it above KillWait, after which Slurm sends KILL [40]
#   BERTH_SLURM_KEEP_MUNGE   1: leave munged running (other Slurm clusters or
#                            tools on this host may use it)                  [0]
#   BERTH_SLURM_PURGE        1: also delete the saved state and the logs in
#                            the directories slurm.conf names                [0]
set -euo pipefail
SETUP_NAME=slurm-stop
# shellcheck source=scripts/setup/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BERTH_SLURM_CONF:=/etc/slurm/slurm.conf}"
: "${BERTH_SLURM_CANCEL_WAIT:=40}"
: "${BERTH_SLURM_KEEP_MUNGE:=0}"
: "${BERTH_SLURM_PURGE:=0}"

require_root "$@"

# conf_value KEY: prints KEY's value from slurm.conf (keys are case
# insensitive), or nothing when the file or the key is missing.
conf_value() {
  [ -r "$BERTH_SLURM_CONF" ] || return 0
  sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\([^[:space:]#]*\).*/\1/Ip" "$BERTH_SLURM_CONF" | tail -n 1
}

[ -r "$BERTH_SLURM_CONF" ] || log "$BERTH_SLURM_CONF not found; looking for Slurm's default pid files"
ctld_pidfile=$(conf_value SlurmctldPidFile)
slurmd_pidfile=$(conf_value SlurmdPidFile)

export SLURM_CONF=$BERTH_SLURM_CONF
if scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs $jobs"
    # shellcheck disable=SC2086 # one argument per job id
    scancel $jobs || true
    deadline=$(( $(date +%s) + BERTH_SLURM_CANCEL_WAIT ))
    while [ -n "$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null)" ] && [ "$(date +%s)" -lt "$deadline" ]; do
      sleep 0.2
    done
    left=$(squeue -h -t PD,R,CG,S -o %i 2>/dev/null | tr '\n' ' ')
    [ -z "${left// /}" ] || log "jobs $left have not ended after ${BERTH_SLURM_CANCEL_WAIT} s; stopping the daemons anyway"
  fi
fi

# slurmd goes before slurmctld, so the controller never sees a node it cannot
# reach while it is still scheduling. slurmctld saves its state on TERM,
# which takes a few seconds.
stop_by_pidfile "${slurmd_pidfile:-/var/run/slurmd.pid}" slurmd
stop_by_pidfile "${ctld_pidfile:-/var/run/slurmctld.pid}" slurmctld 30

if [ "$BERTH_SLURM_KEEP_MUNGE" = 1 ]; then
  log "leaving munged running (BERTH_SLURM_KEEP_MUNGE=1)"
else
  stop_by_pidfile /run/munge/munged.pid munged
fi

if [ "$BERTH_SLURM_PURGE" = 1 ]; then
  for key in StateSaveLocation SlurmdSpoolDir; do
    dir=$(conf_value "$key")
    [ -n "$dir" ] && [ "$dir" != / ] && rm -rf "$dir" && log "removed $dir ($key)"
  done
  for key in SlurmctldLogFile SlurmdLogFile JobCompLoc; do
    file=$(conf_value "$key")
    [ -n "$file" ] && rm -f "$file" && log "removed $file ($key)"
  done
fi
exit 0
