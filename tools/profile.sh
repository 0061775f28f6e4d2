#!/usr/bin/env bash
# Profile triofwd's hot paths with py-spy, as docs/profile.md did.
#
#   bash tools/profile.sh ka|cc|bulk [OUT.raw] [SECONDS]
#
#   ka    wrk -t2 -c64: small HTTP requests over 64 keep-alive connections
#   cc    the same with "Connection: close": a new connection per request
#   bulk  iperf3: one TCP stream
#
# The forwarder (python -m triofwd from this tree) runs alone on the last CPU; the backend
# (nginx or an iperf3 server) and the load run on the others, as in tools/bench.py. py-spy
# samples the forwarder at 250 Hz with native frames (--native: syscalls show as libc
# frames); tools/profile_top.py summarizes the raw output. Prints the rate and the
# forwarder's CPU share and rate per CPU-second. Needs nginx, iperf3, wrk (tools/bench_setup.sh)
# and py-spy (.venv/bin/pip install py-spy); root, or ptrace allowed, for py-spy.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
WORK="${TREE:-$ROOT}"   # TREE=dir: profile the triofwd package in dir instead (an A/B)
kind="${1:?usage: profile.sh ka|cc|bulk [OUT.raw] [SECONDS]}"
out="${2:-/tmp/triofwd-profile-$kind.raw}"
secs="${3:-5}"
tmp="$(mktemp -d)"
last=$(( $(nproc) - 1 )); others="0-$(( last > 0 ? last - 1 : 0 ))"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$tmp"; }
trap cleanup EXIT
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
backend=$(free_port); port=$(free_port)
if [[ $kind == bulk ]]; then
    taskset -c "$others" iperf3 -s -B 127.0.0.1 -p "$backend" >/dev/null 2>&1 & pids+=($!)
else
    mkdir -p "$tmp/t"
    cat >"$tmp/nginx.conf" <<CONF
daemon off; master_process off; worker_processes 1; pid $tmp/nginx.pid; error_log $tmp/error.log warn;
events { worker_connections 4096; }
http { access_log off; keepalive_requests 100000000; keepalive_timeout 300s;
  client_body_temp_path $tmp/t; proxy_temp_path $tmp/t; fastcgi_temp_path $tmp/t; uwsgi_temp_path $tmp/t; scgi_temp_path $tmp/t;
  server { listen 127.0.0.1:$backend backlog=4096; location / { return 200 "ok"; } } }
CONF
    taskset -c "$others" nginx -p "$tmp/" -c "$tmp/nginx.conf" & pids+=($!)
fi
printf '[settings]\nmax_connections = 5000\nshutdown_grace = "1s"\n[[routes]]\nname = "p"\nports = [%s]\nbind = "127.0.0.1"\ntargets = ["127.0.0.1:%s"]\n' \
    "$port" "$backend" >"$tmp/routes.toml"
(cd "$WORK" && exec taskset -c "$last" "$PY" -m triofwd serve "$tmp/routes.toml" --log-level warning) & fwd=$!; pids+=($fwd)
sleep 1.5
py-spy record --native -r 250 -d "$secs" -f raw -o "$out" -p "$fwd" >/dev/null 2>&1 & spy=$!
t0=$(awk '{print $14+$15}' "/proc/$fwd/stat")
case $kind in
    ka) rate=$(taskset -c "$others" wrk -t2 -c64 -d"$((secs + 1))s" "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {print $2}');;
    cc) rate=$(taskset -c "$others" wrk -t2 -c64 -d"$((secs + 1))s" -H "Connection: close" "http://127.0.0.1:$port/" | awk '/Requests\/sec/ {print $2}');;
    bulk) rate=$(taskset -c "$others" iperf3 -c 127.0.0.1 -p "$port" -t "$((secs + 1))" -J | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"] / 8e9)');;
    *) echo "unknown workload $kind" >&2; exit 2;;
esac
t1=$(awk '{print $14+$15}' "/proc/$fwd/stat")
wait "$spy" || true
"$PY" -c "r=$rate; c=($t1-$t0)/$(getconf CLK_TCK)/($secs+1); print(f'$kind: {r:,.2f} per second, forwarder CPU {c:.0%}, {r/c:,.2f} per CPU-second; profile in $out')"
"$PY" "$ROOT/tools/profile_top.py" "$out" --top 15
