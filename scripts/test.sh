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

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
  -r requirements-test.txt

cargo test --workspace --locked "$@"
