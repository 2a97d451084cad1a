#!/usr/bin/env bash
# On a machine with NVIDIA GPUs: starts a control plane and an agent (no
# --simulate-gpus), then prints what nvidia-smi reports beside the node the
# agent registered, so the two can be compared. Usage:
#   scripts/gpu-inventory-check.sh [path/to/atrium] [output dir]
set -euo pipefail
bin=${1:-target/release/atrium}
out=${2:-$(mktemp -d)}
dir=$(mktemp -d)
port=17070
url=http://127.0.0.1:$port

echo "== nvidia-smi"
nvidia-smi --query-gpu=index,uuid,name,memory.total,mig.mode.current --format=csv,noheader,nounits | tee "$out/nvidia-smi.csv"

# Background processes write to files, so a caller's pipe closes when we exit.
"$bin" server --data-dir "$dir" --listen 127.0.0.1:$port --log warn >"$dir/server.out" 2>&1 &
server=$!
trap 'kill $server ${agent:-} 2>/dev/null || true' EXIT
for _ in $(seq 100); do [ -s "$dir/admin.token" ] && break; sleep 0.1; done
token=$(cat "$dir/admin.token")
cli() { "$bin" --server "$url" --token "$token" "$@"; }
for _ in $(seq 100); do cli site create local --jurisdiction LOCAL >/dev/null 2>&1 && break; sleep 0.1; done

ATRIUM_DATA_DIR="$dir" cli agent --node gpu-node --site local --log warn >"$dir/agent.out" 2>&1 &
agent=$!
for _ in $(seq 200); do cli node get gpu-node -o json >"$out/node.json" 2>/dev/null && break; sleep 0.1; done
echo "== node registered by the agent"
cat "$out/node.json"
kill $server $agent 2>/dev/null || true
wait 2>/dev/null || true
