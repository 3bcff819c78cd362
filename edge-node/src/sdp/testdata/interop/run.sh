#!/usr/bin/env bash
# Interop run of the edge's SDP code against headless Chromium and aiortc, on loopback only.
# Needs: chromium (apt), aiortc (pip). Writes the clients' SDPs to OUT_DIR (default: a temp dir).
# usage: edge-node/src/sdp/testdata/interop/run.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$(mktemp -d)}
bin=$(cargo test -p edge-node --lib --no-run 2>&1 | sed -n 's/.*Executable unittests src\/lib.rs (\(.*\))/\1/p' | head -1)
[ -x "$bin" ] || { echo "test binary not found" >&2; exit 1; }
python3 "$here/aiortc_interop.py" "$bin" "$out"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
profile=$(mktemp -d)
python3 "$here/serve.py" "$port" "$bin" "$out" > "$out/chrome.log" 2>&1 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  if [ -n "${chrome:-}" ]; then kill "$chrome" 2>/dev/null || true; wait "$chrome" 2>/dev/null || true; fi
  rm -rf "$profile"
}
trap cleanup EXIT
sleep 1
chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync \
  --user-data-dir="$profile" --use-fake-ui-for-media-stream --use-fake-device-for-media-stream \
  --allow-loopback-in-peer-connection "http://127.0.0.1:$port/" > "$out/chromium.stderr" 2>&1 &
chrome=$!
for _ in $(seq 1 60); do grep -q '^done' "$out/chrome.log" && break; sleep 1; done
cat "$out/chrome.log"
echo "SDPs in $out"
! grep -q FAIL "$out/chrome.log"
