#!/usr/bin/env bash
# A throwaway replicated PostgreSQL for the failover tests: Debian's
# PostgreSQL 15, a primary and a synchronous standby managed by Debian's
# `patroni`, with Debian's `etcd-server` as its store, all on 127.0.0.1.
# Installs the packages when missing. Must run as root (PostgreSQL runs as
# the `postgres` user).
#
#   scripts/patroni.sh start   wipes any earlier cluster in the directory,
#                              starts a fresh one, waits until one node is
#                              the primary and the other its synchronous
#                              standby, and prints the URL naming both
#   scripts/patroni.sh stop    stops everything it started
#
# ATRIUM_PATRONI_DIR (default /tmp/atrium-patroni) holds everything; node N
# (1, 2) has its Patroni REST API on 127.0.0.1:$((REST_BASE + N)), its
# PostgreSQL on 127.0.0.1:$((PG_BASE + N)), the process group of its Patroni in nodeN.pid and
# PostgreSQL's data in nodeN/data. ATRIUM_PATRONI_PORT_BASE moves every
# port (default 25440: PostgreSQL 25441-2, REST 26441-2, etcd 27441-2 —
# below Linux's ephemeral range, 32768 up, so no test's client socket or
# free port can be holding one of them).
#
# Synchronous mode: a commit is acknowledged only once the standby has
# it, so a failover loses no acknowledged write; Patroni promotes only
# the synchronous standby.
set -euo pipefail

dir="${ATRIUM_PATRONI_DIR:-/tmp/atrium-patroni}"
base="${ATRIUM_PATRONI_PORT_BASE:-25440}"
PG_BASE=$base
REST_BASE=$((base + 1000))
ETCD_CLIENT=$((base + 2001))
ETCD_PEER=$((base + 2002))
password="atrium-test"

stop() {
  for pidfile in "$dir"/node*.pid "$dir"/etcd.pid; do
    [ -f "$pidfile" ] || continue
    # Each was started in its own session: the group is runuser and
    # Patroni (PostgreSQL makes its own, below).
    kill -9 -- "-$(cat "$pidfile")" 2>/dev/null || true
    rm -f "$pidfile"
  done
  # PostgreSQL outlives a killed Patroni: stop what runs from our data.
  for pm in "$dir"/node*/data/postmaster.pid; do
    [ -f "$pm" ] || continue
    kill -9 "$(head -n 1 "$pm")" 2>/dev/null || true
  done
}

if [ "${1:-}" = stop ]; then
  stop
  exit 0
fi
if [ "${1:-}" != start ]; then
  echo "usage: $0 start|stop" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "patroni.sh: run as root (PostgreSQL runs as the postgres user)" >&2
  exit 1
fi

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if ! command -v patroni >/dev/null || ! command -v etcd >/dev/null || [ -z "$bindir" ]; then
  echo "patroni.sh: installing Debian's patroni, etcd-server and postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq patroni etcd-server postgresql >&2
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

stop
rm -rf "$dir"
mkdir -p "$dir/etcd"
# A start that fails leaves nothing running.
trap 'status=$?; if [ "$status" != 0 ]; then stop; fi' EXIT
chmod 0755 "$dir"

setsid etcd --name atrium-test --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
  --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster "atrium-test=http://127.0.0.1:$ETCD_PEER" \
  >"$dir/etcd.log" 2>&1 </dev/null &
echo $! >"$dir/etcd.pid"

node_config() {
  local n=$1
  cat <<EOF
scope: atrium-test
name: node$n
restapi:
  listen: 127.0.0.1:$((REST_BASE + n))
  connect_address: 127.0.0.1:$((REST_BASE + n))
etcd3:
  hosts: 127.0.0.1:$ETCD_CLIENT
bootstrap:
  dcs:
    # loop_wait + 2 x retry_timeout <= ttl: a dead primary's leader key
    # lapses after ttl seconds, then the standby is promoted.
    ttl: 10
    loop_wait: 1
    retry_timeout: 4
    synchronous_mode: true
    postgresql:
      use_pg_rewind: true
      parameters:
        max_connections: 300
        wal_log_hints: "on"
  initdb:
    - encoding: UTF8
  pg_hba:
    - local all all trust
    - host replication replicator 127.0.0.1/32 scram-sha-256
    - host all all 127.0.0.1/32 scram-sha-256
postgresql:
  listen: 127.0.0.1:$((PG_BASE + n))
  connect_address: 127.0.0.1:$((PG_BASE + n))
  data_dir: $dir/node$n/data
  bin_dir: $bindir
  pgpass: $dir/node$n/pgpass
  authentication:
    superuser:
      username: postgres
      password: $password
    replication:
      username: replicator
      password: $password-replication
  parameters:
    unix_socket_directories: $dir/node$n
tags:
  nofailover: false
  noloadbalance: false
EOF
}

rest() { curl -s --max-time 2 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$((REST_BASE + $1))/$2" || true; }

wait_until() {
  local what=$1 secs=$2
  shift 2
  for _ in $(seq $((secs * 4))); do
    if "$@"; then return 0; fi
    sleep 0.25
  done
  echo "patroni.sh: timed out waiting for $what" >&2
  for log in "$dir"/etcd.log "$dir"/node*.log; do
    [ -f "$log" ] || continue
    echo "--- last lines of $log:" >&2
    tail -n 25 "$log" >&2
  done
  exit 1
}

start_node() {
  local n=$1
  mkdir -p "$dir/node$n"
  node_config "$n" >"$dir/node$n.yml"
  chown -R postgres:postgres "$dir/node$n" "$dir/node$n.yml"
  chmod 0700 "$dir/node$n"
  setsid runuser -u postgres -- patroni "$dir/node$n.yml" >"$dir/node$n.log" 2>&1 </dev/null &
  echo $! >"$dir/node$n.pid"
}

etcd_up() { curl -sf --max-time 2 "http://127.0.0.1:$ETCD_CLIENT/health" >/dev/null; }
wait_until "etcd" 30 etcd_up

# One node first, so it bootstraps and leads; then its standby copies it.
start_node 1
primary_1() { [ "$(rest 1 primary)" = 200 ]; }
wait_until "node1 to be the primary" 60 primary_1
start_node 2
sync_2() { [ "$(rest 2 sync)" = 200 ]; }
wait_until "node2 to be the synchronous standby" 90 sync_2

echo "postgres://postgres:$password@127.0.0.1:$((PG_BASE + 1)),127.0.0.1:$((PG_BASE + 2))/postgres?target_session_attrs=read-write"
