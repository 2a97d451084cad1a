#!/usr/bin/env bash
# Starts a throwaway PostgreSQL server for the test suite on a non-default
# port (55432 unless ATRIUM_PG_PORT says otherwise), installing Debian's
# postgresql package first when it is missing. Prints the URL to use as
# ATRIUM_TEST_POSTGRES_URL. Idempotent: a server already running there is
# reused.
set -euo pipefail

port="${ATRIUM_PG_PORT:-55432}"
dir="${ATRIUM_PG_DIR:-/tmp/atrium-test-pg-$port}"
url="postgres://postgres@127.0.0.1:$port/postgres"

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

if as_pg "$bindir/pg_isready" -q -h 127.0.0.1 -p "$port"; then
  echo "$url"
  exit 0
fi

if [ ! -f "$dir/PG_VERSION" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  as_pg "$bindir/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >/dev/null
fi
as_pg "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 30 \
  -o "-p $port -k /tmp -c listen_addresses=127.0.0.1 -c max_connections=300 -c fsync=on" start >/dev/null
echo "$url"
