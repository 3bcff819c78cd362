#!/usr/bin/env bash
# Capacity of one edge core: `kcs dev` pinned to one core with one forwarding worker, the load
# tester pinned to the other core(s), `loadtest capacity` ramping viewers on one presenter until
# loss > 1% or p99 delay > 50 ms. Prints the summary; JSON and HTML reports go to $OUT.
#
#   bash bench/loadtest/capacity.sh [max-viewers] [step] [step-duration] [profile]
#   e.g. bash bench/loadtest/capacity.sh 400 25 5s release
#
# Traffic stays on loopback. The edge is stopped at the end, also on failure.
set -euo pipefail
MAX=${1:-300}
STEP=${2:-25}
STEP_DURATION=${3:-5s}
PROFILE=${4:-release}
EDGE_CPU=${EDGE_CPU:-0}
TOOL_CPUS=${TOOL_CPUS:-1}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$ROOT/bench/loadtest/out}
mkdir -p "$OUT"
flag=$([ "$PROFILE" = release ] && echo --release || true)
(cd "$ROOT" && cargo build $flag -p edge-node --bin kcs -p loadtest --bin loadtest)
BIN=$TARGET/$([ "$PROFILE" = release ] && echo release || echo debug)
DATA=$(mktemp -d)
HTTP=127.0.0.1:$((20000 + RANDOM % 10000))
UDP=127.0.0.1:$((30000 + RANDOM % 10000))
taskset -c "$EDGE_CPU" "$BIN/kcs" dev --http "$HTTP" --udp "$UDP" --advertise 127.0.0.1 \
  --workers 1 --data-dir "$DATA/data" >"$OUT/edge.log" 2>&1 &
EDGE=$!
trap 'kill $EDGE 2>/dev/null; wait $EDGE 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 100); do curl -sf "http://$HTTP/healthz" >/dev/null && break; sleep 0.1; done
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); profile $PROFILE"
echo "edge pid $EDGE on cpu $EDGE_CPU; loadtest on cpus $TOOL_CPUS"
taskset -c "$TOOL_CPUS" "$BIN/loadtest" capacity --max-viewers "$MAX" --step "$STEP" \
  --step-duration "$STEP_DURATION" --target "http://$HTTP" --server-pid "$EDGE" --threads 1 \
  --quiet --json "$OUT/capacity.json" --html "$OUT/capacity.html" || true
python3 - "$OUT/capacity.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("step  viewers  loss%   p99ms  pass")
for s in r["capacity_steps"]:
    p99 = "-" if s["p99_ms"] is None else f'{s["p99_ms"]:.1f}'
    print(f'      {s["viewers"]:>7}  {s["loss"]*100:5.2f}  {p99:>6}  {s["pass"]}')
tl = [x for x in r["timeline"] if x["server"] and x["server"]["cpu_pct"] is not None]
if tl:
    print(f'edge CPU max {max(x["server"]["cpu_pct"] for x in tl):.0f}%  RSS max {max(x["server"]["rss_mb"] for x in tl):.1f} MB')
print(f'rx packets/s max {max(x["rx_packets"] for x in r["timeline"])}; capacity: {r["capacity_viewers"]} viewers; tool kept up: {r["tool_kept_up"]}')
PY
