#!/usr/bin/env bash
# One meeting across three regions on this machine (see lib.sh for the topology):
# a presenter and local viewers in eu, viewers in us and ap, each participant finding its edge
# through the geo-DNS from inside its region. Prints, per region, the edge the DNS gave, the
# one-way delay from the eu presenter (p50/p99), the inter-region link delay on that path,
# what the cascade adds on top, and loss. Then each node's own share (hops.py): per origin and
# edge, the p50/p99 of its residence histograms over the measured part (client datagrams at the
# publisher's edge; cascade datagrams relayed to links and delivered to subscribers), and the
# line "per cascade hop p99 <= X ms" (figures only: speed never decides the exit code).
#
#   sudo bash bench/multiregion/run.sh [viewers-per-region=4] [duration=10s] [profile=debug]
#
# Exits 0 when every participant joined through its own region's edge (geo-DNS), each remote
# region's median delay is at least its link's and within 50 ms of it, loss is under 1%, and
# the nodes' cascade residence histograms counted the media (the figures are real; their size
# is never judged).
# Also the `multiregion` suite of scripts/test.sh (3 viewers per region, 8 s).
#
# Needs root (network namespaces). Builds kcs and loadtest; installs etcd via
# control-plane/deps.sh. Everything started is stopped at the end, also on failure.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
VIEWERS=${1:-4}
DURATION=${2:-10s}
PROFILE=${3:-debug}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "$(id -u)" != 0 ]; then
    echo "SKIP multiregion: needs root (network namespaces)"
    exit 77
fi
# Under scripts/test.sh (KCS_BIN set): use the binaries it built.
if [ -n "${KCS_BIN:-}" ]; then
    BIN=${BIN:-$(dirname "$KCS_BIN")}
    KCS_SKIP_BUILD=1
fi
if [ -z "${KCS_SKIP_BUILD:-}" ]; then
    flag=$([ "$PROFILE" = release ] && echo --release || true)
    (cd "$ROOT" && cargo build -q $flag -p edge-node --bin kcs -p loadtest --bin loadtest)
fi
bash "$ROOT/control-plane/deps.sh" >/dev/null
BIN=${BIN:-$TARGET/$([ "$PROFILE" = release ] && echo release || echo debug)}
# shellcheck source=lib.sh
source "$ROOT/bench/multiregion/lib.sh"
MR_DIR=$(mktemp -d /tmp/kcs-mr-XXXXXX)
OUT=${OUT:-$ROOT/artifacts/multiregion}
mkdir -p "$OUT"
trap 'mr_down; cp "$MR_DIR"/*.log "$OUT"/ 2>/dev/null || true; rm -rf "$MR_DIR"' EXIT
mr_up

room=mr-$$
declare -A EDGE
for r in "${MR_REGIONS[@]}"; do
    EDGE[$r]=$(mr_dig_edge "$r" | head -1)
    if ! mr_in_region "${MR_INDEX[$r]}" "${EDGE[$r]}"; then
        mr_log "geo-DNS gave region $r the edge '${EDGE[$r]}', not one of its own"
        exit 1
    fi
done

# The presenter's region starts first (the room's origin is placed near the first joiner).
common=(--token-api "http://$MR_CP_HTTP" --api-key "$MR_API_KEY" --room "$room" --quiet)
ip netns exec mr-eu "$BIN/loadtest" webinar --presenters 1 --viewers "$VIEWERS" \
    --target "http://${EDGE[eu]}:8080" --identity-prefix eu --duration "$DURATION" \
    "${common[@]}" --json "$OUT/eu.json" >"$OUT/eu.txt" 2>&1 &
pids=($!)
sleep 3
for r in us ap; do
    ip netns exec "mr-$r" "$BIN/loadtest" webinar --presenters 0 --viewers "$VIEWERS" \
        --target "http://${EDGE[$r]}:8080" --identity-prefix "$r" --duration "$DURATION" \
        "${common[@]}" --json "$OUT/$r.json" >"$OUT/$r.txt" 2>&1 &
    pids+=($!)
done
# The measured part: from once every region's participants had time to join and their media
# to settle (a third of the duration, at most 5 s), to the end of the runs.
case "$DURATION" in *[0-9]s) secs=${DURATION%s} ;; *) secs=9 ;; esac
settle=$(( secs / 3 < 5 ? secs / 3 : 5 ))
sleep "$settle"
mr_scrape "$MR_DIR/metrics-before"
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
mr_scrape "$MR_DIR/metrics-after"
cp -r "$MR_DIR/metrics-before" "$MR_DIR/metrics-after" "$OUT"/ 2>/dev/null || true

python3 - "$OUT" "$VIEWERS" <<PY || status=1
import json, statistics, sys
out, viewers = sys.argv[1], int(sys.argv[2])
link = {"eu": 0, "us": ${MR_DELAY[eu-us]}, "ap": ${MR_DELAY[eu-ap]}}
ok = True
print("region  edge         joined  p50 ms  p99 ms  steady p99 ms  link ms  p50 - link  loss")
for r in ["eu", "us", "ap"]:
    rep = json.load(open(f"{out}/{r}.json"))
    d = rep.get("delay") or {}
    p50, p99 = d.get("p50"), d.get("p99")
    # Per-second p99 once the cascade's links and keyframes have settled (after 3 s of media).
    secs = [s["delay_p99_ms"] for s in rep["timeline"] if s.get("delay_p99_ms")]
    steady = statistics.median(secs[3:]) if len(secs) > 3 else None
    want = viewers + (1 if r == "eu" else 0)
    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    print(f"{r:6}  {rep['target'][7:-5]:11}  {rep['participants_joined']:>3}/{want:<3}  {fmt(p50):>6}  {fmt(p99):>6}  "
          f"{fmt(steady):>13}  {link[r]:7}  {fmt(None if p50 is None else p50 - link[r]):>10}  {rep['loss']*100:.2f}%")
    # What must hold: everyone joined through their region's edge and got the presenter's media
    # through the cascade (a remote region's delay is at least the link's), with little loss.
    if rep["participants_joined"] != want or p50 is None or rep["loss"] > 0.01:
        ok = False
    elif p50 < link[r] or p50 > link[r] + 50:
        ok = False
print("PASS multiregion" if ok else "FAIL multiregion: see the table and " + out)
sys.exit(0 if ok else 1)
PY
echo "each node's own share of the delay over the measured part (${settle}s after the last start to the end):"
python3 "$ROOT/bench/multiregion/hops.py" --expect-cascade "$MR_DIR/metrics-before" "$MR_DIR/metrics-after" || status=1
exit $status
