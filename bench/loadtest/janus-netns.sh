#!/usr/bin/env bash
# A network namespace for Janus and the load tester that drives it (root only):
#
#   bash bench/loadtest/janus-netns.sh up NAME     # lo up, veth NAME-a (127.0.0.2/32) + NAME-b
#   ip netns exec NAME janus ...; ip netns exec NAME loadtest ... --target janus+ws://127.0.0.2:PORT
#   bash bench/loadtest/janus-netns.sh down NAME
#
# Why: Janus's ICE (libnice) skips loopback interfaces, and we never send test traffic to a
# non-loopback address. A veth pair whose both ends stay in the namespace, one end carrying
# the loopback-range address 127.0.0.2, gives libnice a non-loopback interface whose packets
# never leave the namespace. NAME is at most 12 characters (interface names are 15).
set -euo pipefail
CMD=${1:?up|down}
NS=${2:?namespace name}
IP=${JANUS_IP:-127.0.0.2}
case "$CMD" in
up)
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add "$NS-a" type veth peer name "$NS-b"
    ip -n "$NS" addr add "$IP/32" dev "$NS-a"
    ip -n "$NS" link set "$NS-a" up
    ip -n "$NS" link set "$NS-b" up
    ;;
down)
    ip netns del "$NS" 2>/dev/null || true
    ;;
*)
    echo "usage: $0 up|down NAME" >&2
    exit 2
    ;;
esac
