#!/usr/bin/env bash
# Runs KCS on this machine in dev mode: edge, origin and control plane in one process on an
# embedded store, with a dev signing key in .kcs/. Installs protoc (needed to build the etcd
# client) when missing. Extra arguments go to `kcs dev` (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v protoc >/dev/null 2>&1 || [ ! -f /usr/include/google/protobuf/descriptor.proto ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "dev.sh: installing protobuf-compiler and libprotobuf-dev (build tools for the etcd client)"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends protobuf-compiler libprotobuf-dev >/dev/null
fi
exec cargo run --release -p edge-node --bin kcs -- dev "$@"
