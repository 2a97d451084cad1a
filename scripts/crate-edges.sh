#!/usr/bin/env bash
# The crate boundaries ARCHITECTURE.md promises, checked on the resolved
# dependency graph (normal edges, the way the binary links them): the
# domain crates link no IO, and the planes tenants' traffic touches never
# link the control plane's store or the engine's ML stack. Exits non-zero,
# naming each forbidden edge, when one appears.
set -euo pipefail
cd "$(dirname "$0")/.."

io='tokio|reqwest|hyper|axum|sqlx|rustix|mio'
ml='candle-core|candle-nn|candle-transformers|tokenizers|gemm'
control='atrium-server|atrium-store'

# crate | forbidden dependencies (an extended regex of crate names)
rules=(
  "atrium-core|$io|$ml|$control|atrium-api|atrium-client"
  "atrium-api|$io|$ml|$control|atrium-client"
  "atrium-sched|$io|$ml|$control|atrium-api|atrium-client"
  "atrium-vector|$io|$ml|$control|atrium-api|atrium-client"
  "atrium-pull|$io|$ml|$control"
  "atrium-volume|tokio|reqwest|hyper|axum|sqlx|$ml|$control|atrium-api|atrium-client"
  "atrium-kube|$io|$ml|$control|atrium-api|atrium-client"
  "atrium-client|$ml|$control|atrium-engine|atrium-agent|atrium-gateway"
  "atrium-agent|$ml|$control|atrium-engine|atrium-gateway"
  "atrium-kube-driver|$ml|$control|atrium-engine|atrium-gateway|atrium-agent"
  "atrium-gateway|$ml|$control|atrium-engine|atrium-agent"
)

failed=0
for rule in "${rules[@]}"; do
  crate=${rule%%|*}
  forbidden=${rule#*|}
  found=$(cargo tree --locked --offline -p "$crate" -e normal --prefix none --format '{p}' \
    | awk '{print $1}' | sort -u | grep -Ex "$forbidden" || true)
  if [ -n "$found" ]; then
    for dep in $found; do
      echo "crate-edges: $crate must not depend on $dep; it does:" >&2
      cargo tree --locked --offline -p "$crate" -e normal -i "$dep" 2>/dev/null | head -n 8 >&2
    done
    failed=1
  fi
done
if [ "$failed" = 0 ]; then
  echo "crate-edges: ${#rules[@]} crates within their boundaries"
fi
exit "$failed"
