#!/usr/bin/env bash
# Geo-DNS queries per second on one core: the control plane's DNS (one runtime thread, pinned
# to CPU 0) under dnsperf (pinned to CPU 1), without and with EDNS Client Subnet.
# Bounded: each dnsperf run lasts DURATION seconds; the server exits by itself.
# Usage: bench/control-plane/dns.sh [DURATION=10] [EDGES=30]
set -euo pipefail
cd "$(dirname "$0")/../.."
bash control-plane/deps.sh
command -v dnsperf >/dev/null || { echo "dnsperf not installed" >&2; exit 1; }

DURATION=${1:-10}
EDGES=${2:-30}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p control-plane --example dns_bench_server

port=$(python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
dir=$(mktemp -d)
server_pid=""
cleanup() {
    [ -n "$server_pid" ] && kill "$server_pid" 2>/dev/null || true
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

taskset -c 0 "$CARGO_TARGET_DIR/release/examples/dns_bench_server" "127.0.0.1:$port" "$EDGES" $((4 * DURATION + 30)) \
    >"$dir/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
    if dig @127.0.0.1 -p "$port" +short +time=1 +tries=1 meet.kcs.example A | grep -q .; then break; fi
    sleep 0.1
done

# A mix: nearest-edge lookups (A, AAAA), region names, SOA, NXDOMAIN.
cat >"$dir/queries" <<'Q'
meet.kcs.example A
meet.kcs.example A
meet.kcs.example A
meet.kcs.example AAAA
eu.meet.kcs.example A
us.meet.kcs.example A
kcs.example SOA
nope.kcs.example A
Q

run() {
    echo "== $1"
    shift
    taskset -c 1 dnsperf -s 127.0.0.1 -p "$port" -d "$dir/queries" -l "$DURATION" -c 4 -q 200 "$@" \
        | grep -E "Queries sent|Queries completed|Queries lost|Response codes|Queries per second|Average Latency|Latency StdDev"
}
run "no ECS"
# ECS option 8: family 1, source /24, scope 0, address 192.0.2 (RFC 7871 §6).
run "ECS 192.0.2.0/24" -E 8:00011800c00002
