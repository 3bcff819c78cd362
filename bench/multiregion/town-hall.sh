#!/usr/bin/env bash
# A town hall across the multi-region cluster (topology in lib.sh): one meeting, participants in
# eu, us and ap, 3 edges per region (MR_EDGES_PER_REGION) behind the geo-DNS, the room's origin
# in eu (the presenters' region), remote edges fed through the QUIC cascade over delay relays.
#
#   sudo bash bench/multiregion/town-hall.sh [participants=10000] [media-receivers=1000] \
#       [profile=release] [presenters=3] [duration=20s] [join-rate=20] [audience-join-rate=5]
#
# Participants are spread evenly over the regions. In each region the geo-DNS is asked for
# meet.<zone> from inside the region; its answer lists the region's edges, least loaded first,
# and the region's participants are spread evenly over the answer (one `loadtest town-hall` per
# answered edge, as clients pick one of several A records). Presenters (audio + 3-layer
# simulcast camera) join first, on eu's first edge; media receivers (real WebRTC: ICE, DTLS,
# SRTP, lowest layer) follow at join-rate per second per load tester, signaling-only participants
# (WebSocket: roster deltas, events) at audience-join-rate per second per load tester (9 testers:
# 5/s each is 45 joins/s; every join is a roster delta to every session already in, so this rate
# sets the signaling load), then media flows for `duration` after the last join.
#
# Measured (town_hall.py): join success and p99, where participants landed (each edge's own
# participant gauge; at least 8 edges must have had some), per-edge media and signaling
# bandwidth and per-link cascade bandwidth (nftables counters), per-process CPU and RSS (/proc
# of every kcs, etcd, relay and loadtest process), one-way delay and loss per region, signaling
# messages per participant per second; each origin's and edge's own share of the delay
# (hops.py: residence histograms scraped before and after the run, joins included). Results in
# $OUT (default artifacts/town-hall).
# Exits 0 when >= 99.9% joined, >= 8 edges served, and every load tester with receivers
# measured media.
#
# Needs root. Raises the open-file limit (to the hard limit) and each namespace's port range and listen backlog.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PARTICIPANTS=${1:-10000}
RECEIVERS=${2:-1000}
PROFILE=${3:-release}
PRESENTERS=${4:-3}
DURATION=${5:-20s}
JOIN_RATE=${6:-20}
AUDIENCE_JOIN_RATE=${7:-5}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export MR_EDGES_PER_REGION=${MR_EDGES_PER_REGION:-3}
# Every participant's token comes from the control plane's API with one key: allow the storm.
export MR_TOKEN_RATE=${MR_TOKEN_RATE:-5000} MR_TOKEN_BURST=${MR_TOKEN_BURST:-5000}
if [ "$(id -u)" != 0 ]; then
    echo "SKIP town-hall: needs root (network namespaces)"
    exit 77
fi
if [ $((PRESENTERS + RECEIVERS)) -gt "$PARTICIPANTS" ]; then
    echo "town-hall: presenters + media receivers ($PRESENTERS + $RECEIVERS) exceed participants ($PARTICIPANTS)" >&2
    exit 2
fi
if [ -z "${KCS_SKIP_BUILD:-}" ]; then
    flag=$([ "$PROFILE" = release ] && echo --release || true)
    (cd "$ROOT" && cargo build -q $flag -p edge-node --bin kcs -p loadtest --bin loadtest)
fi
bash "$ROOT/control-plane/deps.sh" >/dev/null
BIN=${BIN:-$TARGET/$([ "$PROFILE" = release ] && echo release || echo debug)}
# shellcheck source=lib.sh
source "$ROOT/bench/multiregion/lib.sh"
# As many open files as allowed (each edge and tester holds ~1 per session, a few per receiver).
ulimit -n "$(ulimit -Hn)"
MR_DIR=$(mktemp -d /tmp/kcs-th-XXXXXX)
OUT=${OUT:-$ROOT/artifacts/town-hall}
rm -rf "$OUT"
mkdir -p "$OUT"
monitor=""
cleanup() {
    touch "$OUT/stop"
    [ -n "$monitor" ] && wait "$monitor" 2>/dev/null || true
    [ -f "$OUT/testers.pids" ] && while read -r p; do kill "$p" 2>/dev/null || true; done <"$OUT/testers.pids"
    nft delete table inet kcsbench 2>/dev/null || true
    mr_down
    cp "$MR_DIR"/*.log "$OUT"/ 2>/dev/null || true
    rm -rf "$MR_DIR"
}
trap cleanup EXIT
mr_up

# Sockets for thousands of sessions per namespace.
for r in "${MR_REGIONS[@]}"; do
    ip netns exec "mr-$r" sysctl -qw net.ipv4.ip_local_port_range="1024 65000" net.core.somaxconn=8192
done

# Byte counters: per edge in its namespace (media out from UDP 40000, signaling out from TCP
# 8080), per inter-region link and direction in the root namespace (UDP: the cascade).
: >"$OUT/edges"
for r in "${MR_REGIONS[@]}"; do
    i=${MR_INDEX[$r]}
    rules=""
    for n in $(mr_edge_numbers); do
        a=$(mr_edge_addr "$i" "$n")
        rules+="ip saddr $a udp sport 40000 counter comment \"edge-$r-$n media\""$'\n'
        rules+="ip saddr $a tcp sport 8080 counter comment \"edge-$r-$n signaling\""$'\n'
        echo "edge-$r-$n http://$a:8080" >>"$OUT/edges"
    done
    printf 'table inet kcsbench {\n chain edges {\n type filter hook output priority 0; policy accept;\n%s }\n}\n' \
        "$rules" | ip netns exec "mr-$r" nft -f -
done
rules=""
for a in "${MR_REGIONS[@]}"; do
    for b in "${MR_REGIONS[@]}"; do
        [ "$a" = "$b" ] || rules+="iifname \"mr-$a-r\" oifname \"mr-$b-r\" meta l4proto udp counter comment \"link $a->$b\""$'\n'
    done
done
printf 'table inet kcsbench {\n chain links {\n type filter hook forward priority 0; policy accept;\n%s }\n}\n' \
    "$rules" | nft -f -

python3 "$ROOT/bench/multiregion/town_hall.py" monitor "$OUT" "$MR_DIR/procs" "$OUT/edges" &
monitor=$!

# What the geo-DNS answers in each region: the region's own edges only.
declare -A ANSWER
testers=0
for r in "${MR_REGIONS[@]}"; do
    ANSWER[$r]=$(mr_dig_edge "$r" | tr '\n' ' ')
    for a in ${ANSWER[$r]}; do
        if ! mr_in_region "${MR_INDEX[$r]}" "$a"; then
            mr_log "geo-DNS gave region $r the edge '$a', not one of its own"
            exit 1
        fi
        testers=$((testers + 1))
    done
    mr_log "geo-DNS answer in $r: ${ANSWER[$r]}"
done

# The plan: receivers and audience spread evenly over the testers (one per answered edge).
audience=$((PARTICIPANTS - PRESENTERS - RECEIVERS))
room=th-$$
common=(--token-api "http://$MR_CP_HTTP" --api-key "$MR_API_KEY" --room "$room" --quiet
    --duration "$DURATION" --join-rate "$JOIN_RATE" --audience-join-rate "$AUDIENCE_JOIN_RATE")
plan=()
k=0
for r in "${MR_REGIONS[@]}"; do
    n=0
    for a in ${ANSWER[$r]}; do
        n=$((n + 1))
        v=$((RECEIVERS / testers + (k < RECEIVERS % testers ? 1 : 0)))
        s=$((audience / testers + (k < audience % testers ? 1 : 0)))
        p=$([ "$k" = 0 ] && echo "$PRESENTERS" || echo 0)
        plan+=("$r $n $a $p $v $s")
        k=$((k + 1))
    done
done
python3 - "$OUT" "$PARTICIPANTS" "$RECEIVERS" "$PRESENTERS" "$DURATION" "$JOIN_RATE" \
    "$AUDIENCE_JOIN_RATE" "$PROFILE" "$(uptime)" "${plan[@]}" <<'PY'
import json, sys
out, total, receivers, presenters, duration, rate, audience_rate, profile, load, *plan = sys.argv[1:]
rows = []
for line in plan:
    r, n, a, p, v, s = line.split()
    rows.append({"tester": f"tester-{r}-{n}.json", "region": r, "edge": a, "presenters": int(p),
                 "viewers": int(v), "audience": int(s)})
json.dump({"participants": int(total), "receivers": int(receivers), "presenters": int(presenters),
           "duration": duration, "join_rate": float(rate),
           "audience_join_rate": float(audience_rate), "profile": profile,
           "load_at_start": load.strip(), "regions": ["eu", "us", "ap"], "testers": len(rows),
           "plan": rows}, open(f"{out}/config.json", "w"), indent=2)
PY

start_tester() { # region n address presenters viewers audience
    ip netns exec "mr-$1" "$BIN/loadtest" town-hall --presenters "$4" --viewers "$5" --audience "$6" \
        --target "http://$3:8080" --identity-prefix "$1-$2" "${common[@]}" \
        --json "$OUT/tester-$1-$2.json" >"$OUT/tester-$1-$2.txt" 2>&1 &
    echo $! >>"$OUT/testers.pids"
    echo "$! loadtest-$1-$2" >>"$MR_DIR/procs"
}
mr_log "town hall: $PARTICIPANTS participants ($PRESENTERS presenters, $RECEIVERS media receivers, $audience signaling-only) over $testers edges; load: $(uptime)"
# Each node's residence histograms before the run, for its own share of the delay (hops.py).
mr_scrape "$OUT/metrics-before"
# The presenters' tester first: the room's origin is placed near the first joiner.
read -r r n a p v s <<<"${plan[0]}"
start_tester "$r" "$n" "$a" "$p" "$v" "$s"
sleep 3
for entry in "${plan[@]:1}"; do
    read -r r n a p v s <<<"$entry"
    start_tester "$r" "$n" "$a" "$p" "$v" "$s"
done
status=0
while read -r p; do wait "$p" || status=1; done <"$OUT/testers.pids"
touch "$OUT/stop"
wait "$monitor" || true
monitor=""
mr_log "load testers done (exit status $status); load: $(uptime)"
mr_scrape "$OUT/metrics-after"
python3 "$ROOT/bench/multiregion/town_hall.py" report "$OUT" | tee "$OUT/summary.txt"
report=${PIPESTATUS[0]}
echo "each node's own share of the delay over the whole run (joins included):" | tee -a "$OUT/summary.txt"
python3 "$ROOT/bench/multiregion/hops.py" "$OUT/metrics-before" "$OUT/metrics-after" | tee -a "$OUT/summary.txt" || true
exit "$report"
