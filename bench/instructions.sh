#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind (callgrind), for weft and nginx as
# reverse proxies in front of the same backend: HTTP/1.1 keep-alive against nginx, h2c against
# haproxy. A count does not depend on what else the machine runs, so it tells apart changes of
# 1-2 % that wall-clock runs on a shared machine cannot; it does not see the kernel's share, nor
# what a cache miss or a copy costs in time (valgrind counts a `rep movsb` copy byte by byte).
# Time-based figures stay with bench/core.sh.
#
#   bench/instructions.sh                        # 20,000 measured requests per target
#   REQUESTS=50000 bench/instructions.sh
#   BEFORE=/path/to/older/weft bench/instructions.sh   # also an older build; prints after/before
#
# Each proxy runs under callgrind with counting off; it is switched on for the measured requests
# only (after 2,000 warm-up requests), so start-up and shutdown are not counted.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-20000}
WARMUP=${WARMUP:-2000}
BASE_PORT=${BASE_PORT:-18400}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
BEFORE=${BEFORE:-}

source bench/lib.sh
bench_install h2load:nghttp2-client nginx:nginx-light haproxy:haproxy valgrind:valgrind taskset:util-linux

echo "building weft (release)..." >&2
cargo build --release -q -p weft-proxy
WEFT=${CARGO_TARGET_DIR:-target}/release/weft  # the build above (CARGO_TARGET_DIR honoured)

BACKEND=$((BASE_PORT + 0))
PROXY_PORT=$((BASE_PORT + 1))
ADMIN=$((BASE_PORT + 2))

start_backend "$BACKEND"
wait_port "$BACKEND"
backend_worker >/dev/null

weft_proxy_yaml "$work/weft.yaml" "$PROXY_PORT" "$ADMIN" "$BACKEND"
nginx_proxy_conf "$work/proxy.conf" "$BACKEND" "    listen 127.0.0.1:$PROXY_PORT;"

haproxy_h2c_cfg "$work/haproxy.cfg" "$PROXY_PORT" "$BACKEND"

# load h1|h2 N: N requests to the proxy; prints how many succeeded.
load() {
  local args=(--h1 -c 64)
  [ "$1" = h2 ] && args=(-c 16 -m 10)
  taskset -c "$LOAD_CPU" h2load "${args[@]}" -n "$2" "http://127.0.0.1:$PROXY_PORT/" 2>&1 |
    awk '/^requests:/ { print $8 }'
}

# count NAME PROTO COMMAND...: instructions per request of COMMAND (a proxy on PROXY_PORT).
count() {
  local name=$1 proto=$2 out="$work/callgrind.$1" vp ok total
  shift 2
  taskset -c "$PROXY_CPU" valgrind --tool=callgrind --instr-atstart=no \
    --callgrind-out-file="$out" "$@" >"$work/$name.log" 2>&1 &
  vp=$!
  pids+=("$vp")
  # Under valgrind, start-up takes seconds.
  for _ in $(seq 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PROXY_PORT") 2>/dev/null && break
    kill -0 "$vp" 2>/dev/null || { echo "$name exited: see $work/$name.log" >&2; exit 1; }
    sleep 0.1
  done
  load "$proto" "$WARMUP" >/dev/null
  callgrind_control -i on "$vp" >/dev/null 2>&1
  ok=$(load "$proto" "$REQUESTS")
  callgrind_control -i off "$vp" >/dev/null 2>&1
  callgrind_control -d "$vp" >/dev/null 2>&1
  kill "$vp" 2>/dev/null || true
  wait "$vp" 2>/dev/null || true
  if [ "${ok:-0}" -ne "$REQUESTS" ]; then
    echo "$name: only ${ok:-0} of $REQUESTS requests succeeded (see $work/$name.log)" >&2
    exit 1
  fi
  # awk reads to the end: leaving early would fail the pipe (pipefail) with SIGPIPE.
  total=$(callgrind_annotate "$out.1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !seen { gsub(",", "", $1); print $1; seen = 1 }')
  R[$name]=$((total / REQUESTS))
}

declare -A R
count h1_weft h1 "$WEFT" run --config "$work/weft.yaml" --workers 1 --log-level warn
count h2_weft h2 "$WEFT" run --config "$work/weft.yaml" --workers 1 --log-level warn
count h1_nginx h1 nginx -g "master_process off;" -c "$work/proxy.conf"
count h2_haproxy h2 haproxy -db -f "$work/haproxy.cfg"
if [ -n "$BEFORE" ]; then
  count h1_before h1 "$BEFORE" run --config "$work/weft.yaml" --workers 1 --log-level warn
  count h2_before h2 "$BEFORE" run --config "$work/weft.yaml" --workers 1 --log-level warn
fi

echo
echo "User-space instructions per request (callgrind), $REQUESTS requests after $WARMUP warm-up."
echo "HTTP/1.1: h2load --h1, 64 connections; h2c: 16 connections x 10 streams."
echo
printf "%-12s %12s\n" target "instr/req"
for t in h1_nginx h1_weft h2_haproxy h2_weft h1_before h2_before; do
  [ -n "${R[$t]:-}" ] && printf "%-12s %12s\n" "$t" "${R[$t]}"
done
echo
echo "HTTP/1.1 weft/nginx: $(ratio "${R[h1_weft]}" "${R[h1_nginx]}")"
echo "h2c weft/haproxy:    $(ratio "${R[h2_weft]}" "${R[h2_haproxy]}")"
if [ -n "$BEFORE" ]; then
  echo "after/before ($BEFORE): HTTP/1.1 $(ratio "${R[h1_weft]}" "${R[h1_before]}" 3), h2c $(ratio "${R[h2_weft]}" "${R[h2_before]}" 3)"
fi
