#!/usr/bin/env bash
# Installs, with apt-get, what the control-plane's tests and benchmarks need:
#   etcd (server + etcdctl) for the 3-member cluster harness, dig for the geo-DNS tests,
#   protoc and the well-known protos for building etcd-client, dnsperf for the DNS benchmark (optional).
# Idempotent: a quick no-op when everything is already installed.
set -euo pipefail

need=()
have_pkg() { dpkg -s "$1" >/dev/null 2>&1; }
command -v etcd >/dev/null 2>&1 || have_pkg etcd-server || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || have_pkg etcd-client || need+=(etcd-client)
command -v dig >/dev/null 2>&1 || have_pkg bind9-dnsutils || need+=(bind9-dnsutils)
command -v protoc >/dev/null 2>&1 || have_pkg protobuf-compiler || need+=(protobuf-compiler)
# etcd-client's protos import google/protobuf/descriptor.proto, shipped by libprotobuf-dev.
[ -f /usr/include/google/protobuf/descriptor.proto ] || have_pkg libprotobuf-dev || need+=(libprotobuf-dev)

optional=()
command -v dnsperf >/dev/null 2>&1 || have_pkg dnsperf || optional+=(dnsperf)

if [ ${#need[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ]; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
    # The etcd-server package starts a system etcd on 2379; the tests use their own ports, but
    # keep the machine quiet: don't start services from package scripts.
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        $SUDO bash -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d'
        made_policy=1
    fi
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
    if [ "$made_policy" = 1 ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi
fi
if [ ${#optional[@]} -gt 0 ]; then
    # dnsperf is only for the benchmark; its absence is not an error.
    $SUDO apt-get install -y -qq --no-install-recommends "${optional[@]}" ||
        echo "deps.sh: dnsperf not installable; bench/control-plane falls back to the bundled bench" >&2
fi
