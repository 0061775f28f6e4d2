#!/usr/bin/env bash
# Install what tools/bench.py compares triofwd against; idempotent, skips what is present.
#
#   bash tools/bench_setup.sh        (run by `make bench`; needs root only if something is missing)
#
# Debian packages: haproxy, nginx + libnginx-mod-stream (the `stream {}` TCP proxy),
# iperf3 (bulk throughput), wrk (HTTP load), socat. From PyPI into .venv: uvloop, for the
# asyncio reference forwarder. `apt-get update` runs only when a package is missing.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PY:-$ROOT/.venv/bin/python}"
PACKAGES=(haproxy nginx libnginx-mod-stream iperf3 wrk socat)

die() { echo "bench_setup: $*" >&2; exit 1; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]})); then
    [[ "$(id -u)" == 0 ]] || die "missing packages: ${missing[*]}; run as root, or: sudo apt-get install -y ${missing[*]}"
    command -v apt-get >/dev/null || die "missing packages: ${missing[*]}, and there is no apt-get here"
    echo "bench_setup: installing ${missing[*]}"
    # Keep the packages' init scripts from starting system-wide nginx/haproxy/iperf3
    # daemons (nginx would take port 80): the benchmark starts its own, on 127.0.0.1.
    made_policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        made_policy=1
    fi
    trap '[[ -n "$made_policy" ]] && rm -f /usr/sbin/policy-rc.d' EXIT
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq || die "apt-get update failed"
    timeout 600 apt-get install -y -qq --no-install-recommends "${missing[@]}" || die "apt-get install ${missing[*]} failed"
else
    echo "bench_setup: packages present (${PACKAGES[*]})"
fi

[[ -x "$PY" ]] || die "$PY not found: run 'make' first (the Makefile creates .venv)"
if "$PY" -c 'import uvloop' 2>/dev/null; then
    echo "bench_setup: uvloop present"
else
    echo "bench_setup: installing uvloop into $(dirname "$(dirname "$PY")")"
    timeout 300 "$PY" -m pip install --quiet uvloop || die "pip install uvloop failed"
fi
