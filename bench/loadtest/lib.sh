# Shell pieces shared by the load-test benchmarks (sourced, not run): build the binaries, start
# and stop `kcs dev` or Janus pinned to one core, wait for them. Traffic stays on loopback
# (Janus: in its own network namespace, see janus-netns.sh).
#
# Set before sourcing: ROOT (repo), PROFILE (release|debug). Sets BIN (binaries' dir).

LT_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$LT_TARGET/$([ "$PROFILE" = release ] && echo release || echo debug)

# SKIP_BUILD=1: use the binaries already in $BIN.
lt_build() {
    [ "${SKIP_BUILD:-0}" = 1 ] && return 0
    local flag
    flag=$([ "$PROFILE" = release ] && echo --release || true)
    (cd "$ROOT" && cargo build $flag -p edge-node --bin kcs -p loadtest --bin loadtest)
}

lt_machine() {
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load average $(cut -d' ' -f1-3 /proc/loadavg); profile $PROFILE"
}

# lt_start_edge CPU DATA_DIR LOG: starts `kcs dev` on CPU with one forwarding worker on free
# loopback ports; sets EDGE_PID and EDGE_URL.
lt_start_edge() {
    local cpu=$1 data=$2 log=$3 http udp
    http=127.0.0.1:$((20000 + RANDOM % 10000))
    udp=127.0.0.1:$((30000 + RANDOM % 10000))
    taskset -c "$cpu" "$BIN/kcs" dev --http "$http" --udp "$udp" --advertise 127.0.0.1 \
        --workers 1 --data-dir "$data" >"$log" 2>&1 &
    EDGE_PID=$!
    EDGE_URL=http://$http
    for _ in $(seq 100); do curl -sf "$EDGE_URL/healthz" >/dev/null && return 0; sleep 0.1; done
    echo "kcs did not start: $(tail -5 "$log")" >&2
    return 1
}

# lt_start_janus CPU NS CONFIG_DIR LOG: makes network namespace NS, writes a minimal config,
# starts Janus in NS on CPU; sets JANUS_PID and JANUS_URL. Needs root and the janus package.
lt_start_janus() {
    local cpu=$1 ns=$2 cfg=$3 log=$4 ip=127.0.0.2 port=8188
    bash "$ROOT/bench/loadtest/janus-netns.sh" up "$ns"
    bash "$ROOT/bench/loadtest/janus-config.sh" "$cfg" "$ip" "$port" "$ns-a" 40000-44999
    ip netns exec "$ns" taskset -c "$cpu" janus --configs-folder "$cfg" >"$log" 2>&1 &
    JANUS_PID=$!
    JANUS_URL=janus+ws://$ip:$port
    for _ in $(seq 100); do
        ip netns exec "$ns" bash -c ": </dev/tcp/$ip/$port" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "janus did not start: $(tail -5 "$log")" >&2
    return 1
}

lt_stop() {
    local pid=$1
    [ -n "$pid" ] || return 0
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
