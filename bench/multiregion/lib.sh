# Multi-region cluster on one machine (sourced by bench/multiregion/run.sh and the
# `multiregion` test suite). Needs root, iproute2, etcd (control-plane/deps.sh) and built
# `kcs` and `loadtest` binaries in $BIN.
#
# Topology (addresses from 10.77.0.0/16, private):
#
#   root namespace: routes between regions (ip_forward), runs the control plane and geo-DNS
#   on 10.77.0.1 (on loopback)
#   namespace mr-<region> per region, one veth pair to root:
#     10.77.R.1   the region's side of the veth: the origin's QUIC (7443), the etcd member
#                 (2379/2380), participants
#     10.77.R.11, 10.77.R.12, ...  the region's edges, $MR_EDGES_PER_REGION of them (default 2,
#                 at most 9; HTTP 8080, media UDP 40000)
#     10.77.R.254 root's side
#
# Distance: this kernel has no netem, so inter-region delay comes from `loadtest relay`
# (userspace, both directions). Every origin registers the cascade URL quic://10.78.R.1:7443,
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
MR_CP_HTTP=10.77.0.1:8090
MR_DNS=10.77.0.1:5353
MR_EDGES_PER_REGION=${MR_EDGES_PER_REGION:-2}

mr_edge_numbers() { seq 1 "$MR_EDGES_PER_REGION"; }

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
    ip addr replace 10.77.0.1/32 dev lo
    for r in "${MR_REGIONS[@]}"; do
        local i=${MR_INDEX[$r]} ns=mr-$r
        ip netns add "$ns"
        ip link add "mr-$r-r" type veth peer name "mr-$r-n"
        ip link set "mr-$r-n" netns "$ns"
        ip addr add "10.77.$i.254/24" dev "mr-$r-r"
        ip link set "mr-$r-r" up
        ip -n "$ns" addr add "10.77.$i.1/24" dev "mr-$r-n"
        for n in $(mr_edge_numbers); do ip -n "$ns" addr add "10.77.$i.1$n/24" dev "mr-$r-n"; done
        ip -n "$ns" link set "mr-$r-n" up
        ip -n "$ns" link set lo up
        ip -n "$ns" route add default via "10.77.$i.254"
        # Service addresses of every region's origin live here, served by relays.
        for o in "${MR_REGIONS[@]}"; do
            ip -n "$ns" addr add "10.78.${MR_INDEX[$o]}.1/32" dev lo
        done
    done
}

mr_netns_down() {
    for r in "${MR_REGIONS[@]}"; do
        ip netns del "mr-$r" 2>/dev/null || true
        ip link del "mr-$r-r" 2>/dev/null || true
    done
    ip addr del 10.77.0.1/32 dev lo 2>/dev/null || true
}

mr_etcd_up() {
    local cluster="" r i
    for r in "${MR_REGIONS[@]}"; do cluster+="$r=http://10.77.${MR_INDEX[$r]}.1:2380,"; done
    cluster=${cluster%,}
    MR_ETCD=""
    for r in "${MR_REGIONS[@]}"; do
        i=${MR_INDEX[$r]}
        MR_ETCD+="http://10.77.$i.1:2379,"
        mr_spawn "mr-$r" "$MR_DIR/etcd-$r.log" etcd --name "$r" --data-dir "$MR_DIR/etcd-$r" \
            --listen-client-urls "http://10.77.$i.1:2379" \
            --advertise-client-urls "http://10.77.$i.1:2379" \
            --listen-peer-urls "http://10.77.$i.1:2380" \
            --initial-advertise-peer-urls "http://10.77.$i.1:2380" \
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
    for r in "${MR_REGIONS[@]}"; do regions+="$r = [\"10.77.${MR_INDEX[$r]}.0/24\"]"$'\n'; done
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

# One origin per region on 10.77.R.1:7400, registered with the service address 10.78.R.1, and
# in every region a delay relay on that service address (see the header).
mr_origins_up() {
    local r o i
    for r in "${MR_REGIONS[@]}"; do
        i=${MR_INDEX[$r]}
        # shellcheck disable=SC2046
        mr_spawn "mr-$r" "$MR_DIR/origin-$r.log" "$BIN/kcs" origin \
            --cascade "10.77.$i.1:7400" --advertise "10.78.$i.1" --http "10.77.$i.1:8090" \
            --node-id "origin-$r" --region "$r" --etcd "$MR_ETCD" $(mr_tls_args "origin-$r")
        for o in "${MR_REGIONS[@]}"; do
            mr_spawn "mr-$o" "$MR_DIR/relay-$o-to-$r.log" "$BIN/loadtest" relay \
                --listen "10.78.$i.1:7400" --upstream "10.77.$i.1:7400" \
                --delay "$(mr_delay "$o" "$r")ms"
        done
    done
    for r in "${MR_REGIONS[@]}"; do
        mr_wait_http "mr-$r" "http://10.77.${MR_INDEX[$r]}.1:8090/healthz" || return 1
    done
    mr_log "origins: one per region, reached through delay relays"
}

# $MR_EDGES_PER_REGION edges per region, registered in etcd, verifying tokens with the control plane's keys.
mr_edges_up() {
    local r i n
    for r in "${MR_REGIONS[@]}"; do
        i=${MR_INDEX[$r]}
        for n in $(mr_edge_numbers); do
            mr_spawn "mr-$r" "$MR_DIR/edge-$r-$n.log" "$BIN/kcs" edge \
                --http "10.77.$i.1$n:8080" --udp "10.77.$i.1$n:40000" --advertise "10.77.$i.1$n" \
                --workers 1 --data-dir "$MR_DIR/edge-$r-$n" \
                --control-plane "http://$MR_CP_HTTP" --etcd "$MR_ETCD" --region "$r" \
                --node-id "edge-$r-$n" --public-url "http://10.77.$i.1$n:8080" \
                $( [ -f "$MR_DIR/certs/ca.pem" ] && mr_tls_args "edge-$r-$n" ) ${MR_EDGE_ARGS:-}
        done
    done
    for r in "${MR_REGIONS[@]}"; do
        for n in $(mr_edge_numbers); do mr_wait_http "mr-$r" "http://10.77.${MR_INDEX[$r]}.1$n:8080/healthz" || return 1; done
    done
    mr_log "edges: $MR_EDGES_PER_REGION per region up"
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
