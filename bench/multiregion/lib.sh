# Multi-region cluster on one machine (sourced by bench/multiregion/run.sh and the
# `multiregion` test suite). Needs root, iproute2, etcd (control-plane/deps.sh) and built
# `kcs` and `loadtest` binaries in $BIN.
#
# Topology (documentation ranges only, as tests/README.md asks: hosts in 198.51.100.0/24, one
# /26 per region, R = 1, 2, 3 for eu, us, ap; service addresses in 203.0.113.0/24):
#
#   root namespace: routes between regions (ip_forward), runs the control plane and geo-DNS
#   on 198.51.100.1 (on loopback)
#   namespace mr-<region> per region, one veth pair to root, subnet 198.51.100.(64R)/26:
#     64R+1       the region's side of the veth: the origin's QUIC (7400), the etcd member
#                 (2379/2380), participants
#     64R+11, 64R+12, ...  the region's edges, $MR_EDGES_PER_REGION of them (default 2,
#                 at most 9; HTTP 8080, media UDP 40000)
#     64R+62      root's side
#
# Distance: this kernel has no netem, so inter-region delay comes from `loadtest relay`
# (userspace, both directions). Every origin registers the cascade URL quic://203.0.113.R:7400,
# a *service address*: inside each region namespace that address is a relay (on the
# namespace's loopback) forwarding to the origin's real address with that pair's one-way delay, 0 ms in
# the origin's own region. So one registered URL reaches every origin from every region, at
# the distance between the regions. Participants join their own region's edges directly.
#
# State: $MR_DIR holds logs and data; $MR_DIR/pids the processes to stop; $MR_DIR/procs the
# same processes as "pid name" lines (name = its log's name), for samplers of /proc.

MR_REGIONS=(eu us ap)
declare -A MR_INDEX=([eu]=1 [us]=2 [ap]=3)
# One-way delays in ms between regions (the issue's example figures).
declare -A MR_DELAY=([eu-us]=40 [us-eu]=40 [us-ap]=70 [ap-us]=70 [eu-ap]=120 [ap-eu]=120)
MR_ZONE=kcs.test
MR_API_KEY=mr-api-key
MR_ROOT_ADDR=198.51.100.1
MR_CP_HTTP=$MR_ROOT_ADDR:8090
MR_DNS=$MR_ROOT_ADDR:5353
MR_EDGES_PER_REGION=${MR_EDGES_PER_REGION:-2}

mr_edge_numbers() { seq 1 "$MR_EDGES_PER_REGION"; }

# Addresses (see the header): mr_addr R OFFSET is host 64R+OFFSET of region R's /26.
mr_addr() { echo "198.51.100.$((64 * $1 + $2))"; }
mr_subnet() { echo "198.51.100.$((64 * $1))/26"; }
mr_side_addr() { mr_addr "$1" 1; }
mr_root_side_addr() { mr_addr "$1" 62; }
mr_edge_addr() { mr_addr "$1" $((10 + $2)); } # region-index edge-number
mr_service_addr() { echo "203.0.113.$1"; }
# Whether ADDRESS is a host of region R's subnet.
mr_in_region() { # region-index address
    case "$2" in
    198.51.100.*) [ $((${2##*.} / 64)) -eq "$1" ] ;;
    *) return 1 ;;
    esac
}

mr_log() { echo "[multiregion $(date +%T)] $*" >&2; }

mr_delay() { # region-a region-b
    if [ "$1" = "$2" ]; then echo 0; else echo "${MR_DELAY[$1-$2]}"; fi
}

# Runs a command in the background inside namespace $1 (or root if "-"), logging to $2.
mr_spawn() {
    local ns=$1 log=$2
    shift 2
    if [ "$ns" = - ]; then
        "$@" >"$log" 2>&1 &
    else
        ip netns exec "$ns" "$@" >"$log" 2>&1 &
    fi
    echo $! >>"$MR_DIR/pids"
    echo "$! $(basename "$log" .log)" >>"$MR_DIR/procs"
    disown
}

mr_wait_http() { # ns url [tries]
    local ns=$1 url=$2
    for _ in $(seq "${3:-150}"); do
        if ip netns exec "$ns" curl -sf -o /dev/null "$url" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    mr_log "timed out waiting for $url in $ns"
    return 1
}

mr_netns_up() {
    sysctl -qw net.ipv4.ip_forward=1
    # No dummy interfaces in this kernel: service addresses live on loopback.
    ip addr replace "$MR_ROOT_ADDR/32" dev lo
    for r in "${MR_REGIONS[@]}"; do
        local i=${MR_INDEX[$r]} ns=mr-$r
        ip netns add "$ns"
        ip link add "mr-$r-r" type veth peer name "mr-$r-n"
        ip link set "mr-$r-n" netns "$ns"
        ip addr add "$(mr_root_side_addr "$i")/26" dev "mr-$r-r"
        ip link set "mr-$r-r" up
        ip -n "$ns" addr add "$(mr_side_addr "$i")/26" dev "mr-$r-n"
        for n in $(mr_edge_numbers); do ip -n "$ns" addr add "$(mr_edge_addr "$i" "$n")/26" dev "mr-$r-n"; done
        ip -n "$ns" link set "mr-$r-n" up
        ip -n "$ns" link set lo up
        ip -n "$ns" route add default via "$(mr_root_side_addr "$i")"
        # Service addresses of every region's origin live here, served by relays.
        for o in "${MR_REGIONS[@]}"; do
            ip -n "$ns" addr add "$(mr_service_addr "${MR_INDEX[$o]}")/32" dev lo
        done
    done
}

mr_netns_down() {
    for r in "${MR_REGIONS[@]}"; do
        ip netns del "mr-$r" 2>/dev/null || true
        ip link del "mr-$r-r" 2>/dev/null || true
    done
    ip addr del "$MR_ROOT_ADDR/32" dev lo 2>/dev/null || true
}

mr_etcd_up() {
    local cluster="" r a
    for r in "${MR_REGIONS[@]}"; do cluster+="$r=http://$(mr_side_addr "${MR_INDEX[$r]}"):2380,"; done
    cluster=${cluster%,}
    MR_ETCD=""
    for r in "${MR_REGIONS[@]}"; do
        a=$(mr_side_addr "${MR_INDEX[$r]}")
        MR_ETCD+="http://$a:2379,"
        mr_spawn "mr-$r" "$MR_DIR/etcd-$r.log" etcd --name "$r" --data-dir "$MR_DIR/etcd-$r" \
            --listen-client-urls "http://$a:2379" \
            --advertise-client-urls "http://$a:2379" \
            --listen-peer-urls "http://$a:2380" \
            --initial-advertise-peer-urls "http://$a:2380" \
            --initial-cluster "$cluster" --initial-cluster-state new \
            --initial-cluster-token "mr-$$" --log-level warn
    done
    MR_ETCD=${MR_ETCD%,}
    for _ in $(seq 300); do
        if ETCDCTL_API=3 etcdctl --endpoints "$MR_ETCD" endpoint health >/dev/null 2>&1; then
            mr_log "etcd: 3 members healthy ($MR_ETCD)"
            return 0
        fi
        sleep 0.1
    done
    mr_log "etcd did not become healthy"
    return 1
}

mr_control_plane_up() {
    local regions="" latency="" r o
    for r in "${MR_REGIONS[@]}"; do regions+="$r = [\"$(mr_subnet "${MR_INDEX[$r]}")\"]"$'\n'; done
    for r in "${MR_REGIONS[@]}"; do
        latency+="[routing.latency_ms.$r]"$'\n'
        for o in "${MR_REGIONS[@]}"; do
            [ "$r" = "$o" ] || latency+="$o = $(mr_delay "$r" "$o")"$'\n'
        done
    done
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$MR_DIR/signing-key.hex"
    cat >"$MR_DIR/control-plane.toml" <<EOF

http_listen = "$MR_CP_HTTP"
signing_keys = [{ kid = "mr", seed_file = "$MR_DIR/signing-key.hex" }]
# MR_PLAN_TREES=false: every edge takes the room's media from the origin (a star), to compare.
plan_trees = ${MR_PLAN_TREES:-true}

[etcd]
endpoints = [$(echo "$MR_ETCD" | sed 's/[^,]*/"&"/g')]

[dns]
zone = "$MR_ZONE"
listen = "$MR_DNS"
ttl_secs = 5
max_answers = $MR_EDGES_PER_REGION

[api]
api_keys = ["$MR_API_KEY"]
token_mint_rate = { per_second = ${MR_TOKEN_RATE:-50}, burst = ${MR_TOKEN_BURST:-200} }

[routing]
default_region = "eu"

[routing.regions]
$regions
$latency
EOF
    mr_spawn - "$MR_DIR/control-plane.log" "$BIN/kcs" control-plane --config "$MR_DIR/control-plane.toml"
    for _ in $(seq 150); do
        curl -sf -o /dev/null "http://$MR_CP_HTTP/readyz" && { mr_log "control plane ready on $MR_CP_HTTP, DNS $MR_DNS"; return 0; }
        sleep 0.1
    done
    mr_log "control plane did not become ready (see $MR_DIR/control-plane.log)"
    return 1
}

# Cluster CA and one certificate per node (origins and edges) for the cascade's mutual TLS.
mr_certs() {
    local nodes=() r n
    for r in "${MR_REGIONS[@]}"; do
        nodes+=(--node "origin-$r")
        for n in $(mr_edge_numbers); do nodes+=(--node "edge-$r-$n"); done
    done
    "$BIN/kcs" certs --out "$MR_DIR/certs" "${nodes[@]}" >"$MR_DIR/certs.log" 2>&1
}

mr_tls_args() { # node
    echo --ca "$MR_DIR/certs/ca.pem" --cert "$MR_DIR/certs/$1.pem" --key "$MR_DIR/certs/$1.key"
}

# One origin per region on its region's side address, port 7400, registered with its service
# address (203.0.113.R), and
# in every region a delay relay on that service address (see the header).
mr_origins_up() {
    local r o i a
    for r in "${MR_REGIONS[@]}"; do
        i=${MR_INDEX[$r]}
        # shellcheck disable=SC2046
        a=$(mr_side_addr "$i")
        mr_spawn "mr-$r" "$MR_DIR/origin-$r.log" "$BIN/kcs" origin \
            --cascade "$a:7400" --advertise "$(mr_service_addr "$i")" --http "$a:8090" \
            --node-id "origin-$r" --region "$r" --etcd "$MR_ETCD" $(mr_tls_args "origin-$r")
        for o in "${MR_REGIONS[@]}"; do
            mr_spawn "mr-$o" "$MR_DIR/relay-$o-to-$r.log" "$BIN/loadtest" relay \
                --listen "$(mr_service_addr "$i"):7400" --upstream "$a:7400" \
                --delay "$(mr_delay "$o" "$r")ms"
        done
    done
    for r in "${MR_REGIONS[@]}"; do
        mr_wait_http "mr-$r" "http://$(mr_side_addr "${MR_INDEX[$r]}"):8090/healthz" || return 1
    done
    mr_log "origins: one per region, reached through delay relays"
}

# $MR_EDGES_PER_REGION edges per region, registered in etcd, verifying tokens with the control plane's keys.
mr_edges_up() {
    local r i n a
    for r in "${MR_REGIONS[@]}"; do
        i=${MR_INDEX[$r]}
        for n in $(mr_edge_numbers); do
            a=$(mr_edge_addr "$i" "$n")
            mr_spawn "mr-$r" "$MR_DIR/edge-$r-$n.log" "$BIN/kcs" edge \
                --http "$a:8080" --udp "$a:40000" --advertise "$a" \
                --workers 1 --data-dir "$MR_DIR/edge-$r-$n" \
                --control-plane "http://$MR_CP_HTTP" --etcd "$MR_ETCD" --region "$r" \
                --node-id "edge-$r-$n" --public-url "http://$a:8080" \
                $( [ -f "$MR_DIR/certs/ca.pem" ] && mr_tls_args "edge-$r-$n" ) ${MR_EDGE_ARGS:-}
        done
    done
    for r in "${MR_REGIONS[@]}"; do
        for n in $(mr_edge_numbers); do mr_wait_http "mr-$r" "http://$(mr_edge_addr "${MR_INDEX[$r]}" "$n"):8080/healthz" || return 1; done
    done
    mr_log "edges: $MR_EDGES_PER_REGION per region up"
}

# Scrapes /metrics of every origin and edge into DIR/NODE.prom (for hops.py: each node's own
# share of the delay between two scrapes). A node that does not answer leaves no file.
mr_scrape() { # dir
    local dir=$1 r i n
    mkdir -p "$dir"
    for r in "${MR_REGIONS[@]}"; do
        i=${MR_INDEX[$r]}
        if [ "${MR_CASCADE:-1}" = 1 ]; then
            ip netns exec "mr-$r" curl -sf -m 2 -o "$dir/origin-$r.prom" \
                "http://$(mr_side_addr "$i"):8090/metrics" || rm -f "$dir/origin-$r.prom"
        fi
        for n in $(mr_edge_numbers); do
            ip netns exec "mr-$r" curl -sf -m 2 -o "$dir/edge-$r-$n.prom" \
                "http://$(mr_edge_addr "$i" "$n"):8080/metrics" || rm -f "$dir/edge-$r-$n.prom"
        done
    done
}

# What a participant in region $1 gets for meet.<zone> from the geo-DNS (one address per line).
mr_dig_edge() {
    ip netns exec "mr-$1" dig +short +time=1 +tries=2 -p "${MR_DNS##*:}" "@${MR_DNS%:*}" "meet.$MR_ZONE" A
}

mr_up() {
    MR_DIR=${MR_DIR:-$(mktemp -d /tmp/kcs-mr-XXXXXX)}
    : >"$MR_DIR/pids"
    : >"$MR_DIR/procs"
    if [ "$MR_EDGES_PER_REGION" -lt 1 ] || [ "$MR_EDGES_PER_REGION" -gt 9 ]; then
        mr_log "MR_EDGES_PER_REGION=$MR_EDGES_PER_REGION: use 1 to 9"
        return 1
    fi
    mr_netns_down
    mr_netns_up
    mr_etcd_up
    mr_control_plane_up
    if [ "${MR_CASCADE:-1}" = 1 ]; then
        mr_certs
        mr_origins_up
    fi
    mr_edges_up
}

mr_down() {
    [ -n "${MR_DIR:-}" ] && [ -f "$MR_DIR/pids" ] && while read -r p; do
        kill "$p" 2>/dev/null || true
    done <"$MR_DIR/pids"
    sleep 0.5
    [ -n "${MR_DIR:-}" ] && [ -f "$MR_DIR/pids" ] && while read -r p; do
        kill -9 "$p" 2>/dev/null || true
    done <"$MR_DIR/pids"
    mr_netns_down
}
