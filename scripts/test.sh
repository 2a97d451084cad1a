#!/usr/bin/env bash
# Runs every test of the workspace: starts a throwaway PostgreSQL server
# (installing Debian's package when missing), installs the pinned Python
# test packages, then `cargo test`. Extra arguments go to cargo test.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${ATRIUM_TEST_POSTGRES_URL:-}" ]; then
  ATRIUM_TEST_POSTGRES_URL="$(scripts/postgres.sh)"
fi
export ATRIUM_TEST_POSTGRES_URL

# The isolation tests (root) drive iproute2 and nftables, as the agent does;
# the registry's tests push and pull with skopeo, a real OCI client; the
# agent runs workloads' containers with runc and makes volumes with
# mkfs.ext4 (e2fsprogs) and loop mounts (mount); the tests' own images are
# busybox (busybox-static's /bin/busybox).
if ! command -v nft >/dev/null || ! command -v ip >/dev/null || ! command -v skopeo >/dev/null \
  || ! command -v runc >/dev/null || ! command -v mkfs.ext4 >/dev/null || [ ! -x /bin/busybox ] \
  || ! command -v tcpdump >/dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2 skopeo runc e2fsprogs mount \
    busybox-static tcpdump >&2
fi

# The llama-cpp engine test has the agent build llama-cpp-python (once per
# machine, into /var/cache/atrium/engines) with the host's Python: venv,
# cmake and a C++ compiler.
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null \
  || ! /usr/bin/python3 -c 'import ensurepip' 2>/dev/null; then
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ python3-venv >&2
fi

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r requirements-test.txt

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$log" || status=$?

# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
