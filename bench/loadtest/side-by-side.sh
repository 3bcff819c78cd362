#!/usr/bin/env bash
# The edge and Janus side by side, each on one core, under the identical load (issue 5):
#
#   1. `kcs dev --workers 1` pinned to core $SERVER_CPU; `loadtest capacity` (one presenter,
#      viewers ramped by STEP until loss > 1% or p99 delay > 50 ms) pinned to $TOOL_CPUS; then a
#      fixed run at half the capacity found (p99 delay, packets/s, RSS); the edge is stopped.
#   2. Janus (Debian's package, VideoRoom over WebSockets, minimal config from
#      janus-config.sh) pinned to the same core, in its own network namespace (janus-netns.sh;
#      the load tester runs there too); the same capacity search and half-capacity run.
#   Every viewer asks for simulcast layer $LAYER (default 1, ~500 kbit/s) so both forward alike.
#   3. One table: max viewers at < 1% loss, packets/s forwarded, p99 delay at half capacity,
#      server RSS per viewer, and the ratios edge/Janus.
#
#   sudo bash bench/loadtest/side-by-side.sh [max-viewers] [step] [step-duration] [profile]
#   e.g. bash bench/loadtest/side-by-side.sh 400 25 5s release
#
# Needs root (the namespace) and janus (scripts/install-test-deps.sh). Traffic stays on
# loopback addresses (127.0.0.1; 127.0.0.2 inside the namespace). Servers and the namespace are
# removed at the end, also on failure. Reports (JSON, HTML) go to $OUT.
set -euo pipefail
MAX=${1:-300}
STEP=${2:-25}
STEP_DURATION=${3:-5s}
PROFILE=${4:-release}
HALF_DURATION=${HALF_DURATION:-15s}
# Every viewer asks for this simulcast layer (0-2), so both servers forward the same stream.
LAYER=${LAYER:-1}
SERVER_CPU=${SERVER_CPU:-0}
TOOL_CPUS=${TOOL_CPUS:-1}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-$ROOT/bench/loadtest/out}
mkdir -p "$OUT"
# shellcheck source=bench/loadtest/lib.sh
. "$ROOT/bench/loadtest/lib.sh"
lt_build
TMP=$(mktemp -d)
NS=ltsbs$$
EDGE_PID=""
JANUS_PID=""
cleanup() {
    lt_stop "$EDGE_PID"
    lt_stop "$JANUS_PID"
    bash "$ROOT/bench/loadtest/janus-netns.sh" down "$NS"
    rm -rf "$TMP"
}
trap cleanup EXIT
lt_machine | tee "$OUT/machine.txt"

# measure NAME PID URL [netns]: capacity search, then a run at half the capacity found.
measure() {
    local name=$1 pid=$2 url=$3 ns=${4:-} wrap=()
    [ -n "$ns" ] && wrap=(ip netns exec "$ns")
    echo "== $name (pid $pid on cpu $SERVER_CPU; loadtest on cpus $TOOL_CPUS): capacity search"
    "${wrap[@]}" taskset -c "$TOOL_CPUS" "$BIN/loadtest" capacity --max-viewers "$MAX" \
        --step "$STEP" --step-duration "$STEP_DURATION" --target "$url" --room "sbs-cap" \
        --server-pid "$pid" --max-layer "$LAYER" --threads 1 --quiet \
        --json "$OUT/$name-capacity.json" --html "$OUT/$name-capacity.html" | tail -3 || true
    local cap half
    cap=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["capacity_viewers"] or 0)' "$OUT/$name-capacity.json")
    half=$(( cap / 2 ))
    [ "$half" -ge 1 ] || half=1
    echo "== $name: capacity $cap viewers; fixed run at $half viewers for $HALF_DURATION"
    "${wrap[@]}" taskset -c "$TOOL_CPUS" "$BIN/loadtest" webinar --presenters 1 \
        --viewers "$half" --duration "$HALF_DURATION" --target "$url" --room "sbs-half" \
        --server-pid "$pid" --max-layer "$LAYER" --threads 1 --quiet \
        --json "$OUT/$name-half.json" --html "$OUT/$name-half.html" | tail -3 || true
}

lt_start_edge "$SERVER_CPU" "$TMP/edge-data" "$OUT/edge.log"
measure edge "$EDGE_PID" "$EDGE_URL"
lt_stop "$EDGE_PID"
EDGE_PID=""

lt_start_janus "$SERVER_CPU" "$NS" "$TMP/janus-cfg" "$OUT/janus.log"
measure janus "$JANUS_PID" "$JANUS_URL" "$NS"
lt_stop "$JANUS_PID"
JANUS_PID=""

python3 - "$OUT" <<'PY' | tee "$OUT/side-by-side.txt"
import json, sys, os
out = sys.argv[1]
def load(n): return json.load(open(os.path.join(out, n)))
rows = {}
for name in ("edge", "janus"):
    cap, half = load(f"{name}-capacity.json"), load(f"{name}-half.json")
    viewers = cap["capacity_viewers"] or 0
    passing = [s for s in cap["capacity_steps"] if s["pass"]]
    # Forwarded packets/s: what the viewers received per second, mean over the seconds of the
    # last passing step (all its viewers connected).
    at_cap = [t["rx_packets"] for t in cap["timeline"] if t["connected"] - 1 == viewers]
    pps = round(sum(at_cap) / len(at_cap)) if at_cap else 0
    hv = half["participants_joined"] - 1
    p99 = (half["delay"] or {}).get("p99")
    # RSS per viewer, from the capacity search (the half run reuses a server whose allocator
    # kept the search's memory): growth from the first sample (before viewers joined) to the
    # highest sample while at most the passing viewer count was connected, per viewer.
    rss = [(t["connected"], t["server"]["rss_mb"]) for t in cap["timeline"]
           if t["server"] and t["server"]["rss_mb"]]
    peak = max((m for c, m in rss if c - 1 <= viewers), default=None)
    per_viewer_kb = (peak - rss[0][1]) * 1024 / viewers if rss and peak and viewers > 0 else None
    own = (half.get("edge_residence") or {}).get("p99_ms")
    # Fan-out span at half: viewers x the server's CPU per delivered packet (how long its core
    # takes to hand one packet to every viewer; the last copy cannot leave sooner).
    media = [t["rx_packets"] for t in half["timeline"] if t["rx_packets"]]
    cpu_half = half["server"]["cpu_avg_pct"]
    span = (hv * cpu_half / 100 / (sum(media) / len(media)) * 1000
            if media and cpu_half and hv > 0 else None)
    rows[name] = dict(span=span, viewers=viewers, pps=pps, p99=p99, own=own, half=hv, half_loss=half["loss"],
                      rss_kb=per_viewer_kb, rss_max=peak,
                      kept_up=cap["tool_kept_up"] and half["tool_kept_up"],
                      cpu=half["server"]["cpu_avg_pct"])
def fmt(v, f="{:.1f}"): return "-" if v is None else f.format(v)
def ratio(a, b): return "-" if not a or not b else f"{a / b:.2f}x"
e, j = rows["edge"], rows["janus"]
print("| | edge (kcs dev, 1 worker) | Janus 1.1.2 VideoRoom | edge / Janus |")
print("|---|---|---|---|")
print(f"| max viewers at < 1% loss, p99 < 50 ms (one presenter) | {e['viewers']} | {j['viewers']} | {ratio(e['viewers'], j['viewers'])} |")
print(f"| packets/s forwarded (mean over the last passing step) | {e['pps']} | {j['pps']} | {ratio(e['pps'], j['pps'])} |")
print(f"| p99 one-way delay at half capacity | {fmt(e['p99'])} ms ({e['half']} viewers, loss {e['half_loss']*100:.2f}%) | {fmt(j['p99'])} ms ({j['half']} viewers, loss {j['half_loss']*100:.2f}%) | {ratio(e['p99'], j['p99'])} |")
print(f"| of which the server's own share, p99 (kernel arrival to hand-off, histogram bound) | <= {fmt(e['own'], '{:g}')} ms | not measurable | |")
print(f"| fan-out span at half capacity (viewers x CPU per delivered packet: the floor under the last copy's delay) | {fmt(e['span'])} ms | {fmt(j['span'])} ms | |")
print(f"| server RSS per viewer (growth over the search, at capacity) | {fmt(e['rss_kb'], '{:.0f}')} KiB (max {fmt(e['rss_max'])} MB) | {fmt(j['rss_kb'], '{:.0f}')} KiB (max {fmt(j['rss_max'])} MB) | {ratio(e['rss_kb'], j['rss_kb'])} |")
print(f"| server CPU at half capacity (avg, of one core) | {fmt(e['cpu'], '{:.0f}')}% | {fmt(j['cpu'], '{:.0f}')}% | |")
print(f"| load tester kept up | {e['kept_up']} | {j['kept_up']} | |")
PY
