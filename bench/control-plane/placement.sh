#!/usr/bin/env bash
# Placement latency against a real 3-member etcd cluster on loopback.
# Starts the cluster in a temp dir (killed and removed on exit), runs
# control-plane/examples/placement_bench.rs (release), prints p50/p90/p99/max per phase.
# Usage: bench/control-plane/placement.sh [ROOMS=2000] [CONCURRENCY=16] [ROUNDS=20]
set -euo pipefail
cd "$(dirname "$0")/../.."
bash control-plane/deps.sh

ROOMS=${1:-2000}
CONCURRENCY=${2:-16}
ROUNDS=${3:-20}

base=/tmp
[ -d /dev/shm ] && base=/dev/shm
dir=$(mktemp -d "$base/kcs-etcd-bench-XXXXXX")
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

# Six free loopback ports, chosen by the OS.
read -r -a ports < <(python3 - <<'PY'
import socket
socks = [socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)
cluster=""
for i in 0 1 2; do cluster+="m$i=http://127.0.0.1:${ports[$((2*i+1))]},"; done
cluster=${cluster%,}
endpoints=""
for i in 0 1 2; do
    c=http://127.0.0.1:${ports[$((2*i))]}
    p=http://127.0.0.1:${ports[$((2*i+1))]}
    endpoints+="$c,"
    etcd --name "m$i" --data-dir "$dir/m$i" \
        --listen-client-urls "$c" --advertise-client-urls "$c" \
        --listen-peer-urls "$p" --initial-advertise-peer-urls "$p" \
        --initial-cluster "$cluster" --initial-cluster-state new \
        --initial-cluster-token "bench-$$" --log-level warn 2>"$dir/m$i.log" &
    pids+=($!)
done
endpoints=${endpoints%,}
for _ in $(seq 1 300); do
    if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1; then break; fi
    sleep 0.1
done
ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p control-plane --example placement_bench
"$CARGO_TARGET_DIR/release/examples/placement_bench" "$endpoints" "$ROOMS" "$CONCURRENCY" "$ROUNDS"
