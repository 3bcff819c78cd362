#!/usr/bin/env bash
# Writes a minimal Janus configuration for benchmarks and tests: only the WebSocket transport
# and the VideoRoom plugin are loaded (the folders hold links to just those two modules), no
# event handlers or loggers, ICE host candidates from one interface only, an RTP port range,
# low log level. Janus starts from it in about a second, comparable to `kcs dev`.
#
#   bash bench/loadtest/janus-config.sh DIR IP WS_PORT ICE_IFACE [RTP_RANGE] [API_SECRET]
#   janus --configs-folder DIR      # then: loadtest ... --target janus+ws://IP:WS_PORT
#
# libnice never gathers loopback interfaces, so Janus runs in a network namespace made by
# janus-netns.sh, where ICE_IFACE (a veth) carries IP, a loopback-range address (127.0.0.2):
# every packet stays on this machine. The load tester runs in the same namespace and binds
# its media sockets on IP too (Janus cannot send from that interface to 127.0.0.1).
# RTP_RANGE defaults to 40000-40999. API_SECRET (optional) makes Janus refuse requests without
# it; the load tester sends `--token` as the API secret.
set -euo pipefail
DIR=${1:?config dir}
IP=${2:?ip}
WS_PORT=${3:?websocket port}
ICE_IFACE=${4:?ice interface}
RTP_RANGE=${5:-40000-40999}
API_SECRET=${6:-}
LIB=${JANUS_LIB:-$(dirname "$(dpkg -L janus 2>/dev/null | grep -m1 '/janus/plugins/libjanus_videoroom.so$')")/..}
[ -f "$LIB/plugins/libjanus_videoroom.so" ] || LIB=/usr/lib/x86_64-linux-gnu/janus
mkdir -p "$DIR/plugins" "$DIR/transports" "$DIR/events" "$DIR/loggers"
ln -sf "$LIB/plugins/libjanus_videoroom.so" "$DIR/plugins/"
ln -sf "$LIB/transports/libjanus_websockets.so" "$DIR/transports/"
secret_line=""
[ -n "$API_SECRET" ] && secret_line="api_secret = \"$API_SECRET\""
cat >"$DIR/janus.jcfg" <<CFG
general: {
	configs_folder = "$DIR"
	plugins_folder = "$DIR/plugins"
	transports_folder = "$DIR/transports"
	events_folder = "$DIR/events"
	loggers_folder = "$DIR/loggers"
	debug_level = ${JANUS_DEBUG_LEVEL:-2}
	debug_timestamps = true
	interface = "$IP"
	session_timeout = 60
	$secret_line
}
certificates: {
}
media: {
	rtp_port_range = "$RTP_RANGE"
}
nat: {
	ice_enforce_list = "$ICE_IFACE"
	ignore_mdns = true
}
plugins: {
}
transports: {
}
events: {
	broadcast = false
}
CFG
cat >"$DIR/janus.transport.websockets.jcfg" <<CFG
general: {
	json = "compact"
	ws = true
	ws_port = $WS_PORT
	ws_ip = "$IP"
	wss = false
}
admin: {
	admin_ws = false
	admin_wss = false
}
CFG
cat >"$DIR/janus.plugin.videoroom.jcfg" <<CFG
general: {
}
CFG
