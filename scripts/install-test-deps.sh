#!/usr/bin/env bash
# Installs what the real-client tests need, idempotently: a second run with everything present
# is a fast no-op (dpkg -s / import / directory checks, no network).
#
#   apt: chromium chromium-driver (headless browser with fake camera/mic), iproute2 (netns, veth,
#        tc tbf), nftables (loss), ffmpeg (ffprobe; aiortc's PyAV wheels bring their own codecs),
#        fonts-noto-color-emoji (the meeting page's reactions and badges in the screenshots)
#        janus (the load tester's Janus target: loadtest/tests/against_janus.rs, bench/loadtest)
#   pip: aiortc aiohttp (a second, independent WebRTC stack for WHIP/WHEP interop)
#   npm: playwright-core, pinned by tests/e2e/package-lock.json (drives /usr/bin/chromium; never
#        downloads a browser of its own)
# Also runs control-plane/deps.sh when it exists (etcd, dig... for the control-plane tests).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PKGS=(chromium chromium-driver iproute2 nftables ffmpeg fonts-noto-color-emoji janus)
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PKGS[@]}"; do
    if ! dpkg -s "$p" >/dev/null 2>&1; then missing+=("$p"); fi
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-test-deps: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c 'import aiortc, aiohttp' >/dev/null 2>&1; then
    echo "install-test-deps: pip install aiortc aiohttp"
    "$PY" -m pip install -q aiortc aiohttp
fi

if [ ! -d tests/e2e/node_modules/playwright-core ]; then
    echo "install-test-deps: npm ci in tests/e2e"
    (cd tests/e2e && npm ci --no-audit --no-fund --silent)
fi

if [ -x control-plane/deps.sh ]; then
    control-plane/deps.sh
elif [ -f control-plane/deps.sh ]; then
    bash control-plane/deps.sh
fi
echo "install-test-deps: ok"
