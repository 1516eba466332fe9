#!/usr/bin/env bash
# Run a PostgreSQL server for tests, without systemd, and print the
# DATABASE_URL that reaches it.
#
# Usage: scripts/setup/postgres.sh start|stop|status   (as root)
#   start    install PostgreSQL if missing, start the cluster, create the
#            role and database if missing, and print DATABASE_URL=... on
#            standard output (log lines go to standard error)
#   stop     stop the cluster; its data is kept
#   status   print the state of this host's clusters (pg_lsclusters)
#
# It uses Debian's cluster tools (postgresql-common). pg_ctlcluster starts
# the server directly on a host without systemd: it hands over to systemctl
# only when /run/systemd/system exists. Installing the package creates the
# cluster "<version> main" but may not start it (policy-rc.d), so `start`
# always checks. The server listens on 127.0.0.1 and on the Unix socket in
# /var/run/postgresql, Debian's default.
#
# Tunables (environment variables):
#   BERTH_PG_CLUSTER   cluster name; a missing one is created on BERTH_PG_PORT
#                      (drop it with: pg_dropcluster --stop VERSION NAME) [main]
#   BERTH_PG_PORT      port of a cluster this script creates             [5432]
#   BERTH_PG_USER      role, created as superuser so tests may add extensions
#                                                                        [berth]
#   BERTH_PG_PASSWORD  the role's password (a test password, printed in the
#                      URL)                                              [berth]
#   BERTH_PG_DB        database owned by that role                       [berth]
#   BERTH_PG_WAIT      seconds to wait for the server to accept connections [30]
set -euo pipefail
SETUP_NAME=postgres
# shellcheck source=scripts/setup/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

: "${BERTH_PG_CLUSTER:=main}"
: "${BERTH_PG_PORT:=5432}"
: "${BERTH_PG_USER:=berth}"
: "${BERTH_PG_PASSWORD:=berth}"
: "${BERTH_PG_DB:=berth}"
: "${BERTH_PG_WAIT:=30}"

command=${1:-}
case "$command" in
  start|stop|status) ;;
  *) die "usage: $0 start|stop|status (got '${command}')" ;;
esac

t_script=$(now_ms)
require_root "$@"

installed() { command -v pg_ctlcluster >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; }
if ! installed; then
  if [ "$command" != start ]; then
    log "PostgreSQL is not installed; nothing to do"
    exit 0
  fi
  # Recommends (sysstat, logrotate) are not needed for a test server.
  apt_install --no-install-recommends postgresql
  installed || die "PostgreSQL is still missing after apt-get install postgresql"
fi
version=$(ls /usr/lib/postgresql | sort -V | tail -n 1)

# cluster_field N: prints field N of this cluster's pg_lsclusters line
# (3 = port, 4 = status).
cluster_field() {
  pg_lsclusters -h | awk -v v="$version" -v c="$BERTH_PG_CLUSTER" -v n="$1" '$1 == v && $2 == c { print $n }'
}

case "$command" in
  status)
    pg_lsclusters
    ;;

  stop)
    if [ "$(cluster_field 4)" = online ]; then
      pg_ctlcluster "$version" "$BERTH_PG_CLUSTER" stop
      log "stopped cluster $version/$BERTH_PG_CLUSTER"
    else
      log "cluster $version/$BERTH_PG_CLUSTER is not running"
    fi
    ;;

  start)
    if [ -z "$(cluster_field 2)" ]; then
      pg_createcluster "$version" "$BERTH_PG_CLUSTER" --port "$BERTH_PG_PORT" >/dev/null
      log "created cluster $version/$BERTH_PG_CLUSTER on port $BERTH_PG_PORT"
    fi
    port=$(cluster_field 3)
    if [ "$(cluster_field 4)" = online ]; then
      log "cluster $version/$BERTH_PG_CLUSTER is already running on port $port"
    else
      # pg_ctl itself recognises and removes a postmaster.pid left by a
      # server that was killed.
      t_start=$(now_ms)
      pg_ctlcluster "$version" "$BERTH_PG_CLUSTER" start \
        || die "pg_ctlcluster $version $BERTH_PG_CLUSTER start failed; see /var/log/postgresql/postgresql-$version-$BERTH_PG_CLUSTER.log"
      log "started cluster $version/$BERTH_PG_CLUSTER on port $port in $(seconds_since "$t_start") s"
    fi

    deadline=$(( $(date +%s) + BERTH_PG_WAIT ))
    until pg_isready -q -h /var/run/postgresql -p "$port"; do
      [ "$(date +%s)" -lt "$deadline" ] \
        || die "PostgreSQL on port $port does not accept connections after ${BERTH_PG_WAIT} s; see /var/log/postgresql/"
      sleep 0.1
    done

    # Create the role and the database only when missing, so a re-run keeps
    # the data; psql's \gexec runs each generated statement.
    runuser -u postgres -- psql -p "$port" -X -q -v ON_ERROR_STOP=1 \
      -v role="$BERTH_PG_USER" -v password="$BERTH_PG_PASSWORD" -v db="$BERTH_PG_DB" <<'SQL' >/dev/null
SELECT format('CREATE ROLE %I LOGIN SUPERUSER PASSWORD %L', :'role', :'password')
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'db', :'role')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
SQL
    url="postgres://$BERTH_PG_USER:$BERTH_PG_PASSWORD@127.0.0.1:$port/$BERTH_PG_DB"
    PGPASSWORD=$BERTH_PG_PASSWORD psql -X -h 127.0.0.1 -p "$port" -U "$BERTH_PG_USER" -d "$BERTH_PG_DB" -qAtc 'SELECT 1' >/dev/null \
      || die "cannot log in as $BERTH_PG_USER to database $BERTH_PG_DB on 127.0.0.1:$port"
    log "ready in $(seconds_since "$t_script") s"
    echo "DATABASE_URL=$url"
    ;;
esac
