#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the test suite on a non-default
# port (55432 unless ATRIUM_PG_PORT says otherwise), installing Debian's
# postgresql package first when it is missing. Prints the URL to use as
# ATRIUM_TEST_POSTGRES_URL. Idempotent: a server already running there is
# reused.
#
# Connections over TCP must give a password (SCRAM): tenants' databases
# (issue 21) live on this server in the tests, and a server that trusts
# every TCP client would not check their passwords. The local socket,
# reached only from this host, stays trusted for the script itself.
set -euo pipefail

port="${ATRIUM_PG_PORT:-55432}"
dir="${ATRIUM_PG_DIR:-/tmp/atrium-test-pg-$port}"
password="atrium-test"
url="postgres://postgres:$password@127.0.0.1:$port/postgres"

bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
  echo "postgres.sh: installing Debian's postgresql package" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
  bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
fi

# PostgreSQL refuses to run as root; Debian's package creates this user.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

# Passwords over TCP, trust on the local socket; applied to a running
# server too (one started by an older copy of this script trusted TCP).
require_passwords() {
  as_pg "$bindir/psql" -q -h /tmp -p "$port" -U postgres -d postgres \
    -c "ALTER ROLE postgres PASSWORD '$password'" >/dev/null
  local hba
  hba=$(as_pg "$bindir/psql" -Atq -h /tmp -p "$port" -U postgres -d postgres -c "SHOW hba_file")
  if grep -Eq '^host.*trust' "$hba"; then
    as_pg sh -c "printf '%s\n' 'local all all trust' 'host all all 127.0.0.1/32 scram-sha-256' \
      'host all all ::1/128 scram-sha-256' > '$hba'"
    as_pg "$bindir/psql" -q -h /tmp -p "$port" -U postgres -d postgres -c "SELECT pg_reload_conf()" >/dev/null
  fi
}

if ! as_pg "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port"; then
  if [ ! -f "$dir/PG_VERSION" ]; then
    rm -rf "$dir"
    mkdir -p "$dir"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
    as_pg "$bindir/initdb" -D "$dir" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 >/dev/null
  fi
  as_pg "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 \
    -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on" start >/dev/null
fi
require_passwords
echo "$url"
