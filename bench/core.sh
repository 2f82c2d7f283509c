#!/usr/bin/env bash
# Core proxy benchmark, all in one run on loopback:
#   direct-to-backend, weft, and nginx as a reverse proxy (upstream keep-alive), each proxy with
#   ONE worker pinned to CPU 0; the load generator and the backend (nginx `return 200`) share
#   CPU 1. HTTP/1.1 keep-alive with wrk, h2c with h2load.
# Prints req/s, p50/p99 latency, proxy CPU µs per request (from /proc utime+stime), weft's idle
# RSS, and the ratios weft/nginx and weft/direct. Rounds alternate the targets; medians are
# reported.
#
#   bench/core.sh                 # defaults: 3 rounds × 10 s, 64 connections
#   ROUNDS=5 DURATION=20 bench/core.sh
#   BEFORE=/path/to/older/weft bench/core.sh   # also measures an older build, same run
#                                              # (same pinning), and prints after/before
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
H2_REQUESTS=${H2_REQUESTS:-300000}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-10}
BASE_PORT=${BASE_PORT:-18000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

source bench/lib.sh
bench_install wrk:wrk h2load:nghttp2-client nginx:nginx-light haproxy:haproxy taskset:util-linux

echo "building weft (release)..." >&2
cargo build --release -q -p weft-proxy
WEFT=${CARGO_TARGET_DIR:-target}/release/weft  # the build above (CARGO_TARGET_DIR honoured)

BACKEND=$((BASE_PORT + 0))
NGINX_H1=$((BASE_PORT + 1))
NGINX_H2=$((BASE_PORT + 2))
WEFT_PORT=$((BASE_PORT + 3))
ADMIN=$((BASE_PORT + 4))
BEFORE_PORT=$((BASE_PORT + 5))
BEFORE_ADMIN=$((BASE_PORT + 6))
HAPROXY_H2=$((BASE_PORT + 7))
RATE_CLIENTS=${RATE_CLIENTS:-50}
RATE_PER_CLIENT=${RATE_PER_CLIENT:-100}   # 50 x 100 = 5,000 req/s
BEFORE=${BEFORE:-}

nginx_proxy_conf "$work/proxy.conf" "$BACKEND" "    listen 127.0.0.1:$NGINX_H1;
    listen 127.0.0.1:$NGINX_H2 http2;" "  http2_max_requests 10000000;"
weft_proxy_yaml "$work/weft.yaml" "$WEFT_PORT" "$ADMIN" "$BACKEND"

haproxy_h2c_cfg "$work/haproxy.cfg" "$HAPROXY_H2" "$BACKEND"

if [ -n "$BEFORE" ]; then
  sed -e "s/$WEFT_PORT/$BEFORE_PORT/" -e "s/$ADMIN/$BEFORE_ADMIN/" "$work/weft.yaml" >"$work/before.yaml"
fi

start_backend "$BACKEND"
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" & pids+=($!)
taskset -c "$PROXY_CPU" haproxy -f "$work/haproxy.cfg" -db 2>"$work/haproxy.log" & pids+=($!)
HAPROXY_PID=$!
taskset -c "$PROXY_CPU" "$WEFT" run --config "$work/weft.yaml" --workers 1 2>"$work/weft.log" & pids+=($!)
WEFT_PID=$!
if [ -n "$BEFORE" ]; then
  taskset -c "$PROXY_CPU" "$BEFORE" run --config "$work/before.yaml" --workers 1 2>"$work/before.log" & pids+=($!)
  BEFORE_PID=$!
  wait_port "$BEFORE_PORT"
fi
for port in $BACKEND $NGINX_H1 $NGINX_H2 $HAPROXY_H2 $WEFT_PORT; do wait_port "$port"; done
sleep 0.5
NGINX_WORKER=$(pgrep -P "$(cat "$work/proxy.pid")" | head -1)
BACKEND_WORKER=$(backend_worker)
IDLE_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$WEFT_PID/status")

# One fixed-rate run: prints the p99 in µs (from h2load's per-request log).
run_rate() { # url
  local log="$work/rate.log"
  rm -f "$log"
  taskset -c "$LOAD_CPU" h2load --h1 -c "$RATE_CLIENTS" --rps "$RATE_PER_CLIENT" -D "$DURATION" -t 1 \
    --log-file="$log" "$1" >/dev/null
  awk '{ print $3 }' "$log" | sort -n | awk '{ v[NR] = $1 } END { printf "%.0f\n", v[int(NR*0.99)] }'
}

declare -A R
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS..." >&2
  R[h1_direct]+="$(run_wrk "http://127.0.0.1:$BACKEND/" "$BACKEND_WORKER" "$CONNS")"$'\n'
  R[h1_nginx]+="$(run_wrk "http://127.0.0.1:$NGINX_H1/" "$NGINX_WORKER" "$CONNS")"$'\n'
  R[h1_weft]+="$(run_wrk "http://127.0.0.1:$WEFT_PORT/" "$WEFT_PID" "$CONNS")"$'\n'
  R[h2_nginx]+="$(run_h2 "http://127.0.0.1:$NGINX_H2/" "$NGINX_WORKER")"$'\n'
  R[h2_weft]+="$(run_h2 "http://127.0.0.1:$WEFT_PORT/" "$WEFT_PID")"$'\n'
  R[h2_haproxy]+="$(run_h2 "http://127.0.0.1:$HAPROXY_H2/" "$HAPROXY_PID")"$'\n'
  R[rate_direct]+="$(run_rate "http://127.0.0.1:$BACKEND/")"$'\n'
  R[rate_nginx]+="$(run_rate "http://127.0.0.1:$NGINX_H1/")"$'\n'
  R[rate_weft]+="$(run_rate "http://127.0.0.1:$WEFT_PORT/")"$'\n'
  if [ -n "$BEFORE" ]; then
    R[h1_before]+="$(run_wrk "http://127.0.0.1:$BEFORE_PORT/" "$BEFORE_PID" "$CONNS")"$'\n'
    R[h2_before]+="$(run_h2 "http://127.0.0.1:$BEFORE_PORT/" "$BEFORE_PID")"$'\n'
  fi
done
LOADED_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$WEFT_PID/status")

printf '\nCore proxy benchmark: %s rounds, medians. Proxies: 1 worker on CPU %s; wrk/h2load + backend on CPU %s.\n' "$ROUNDS" "$PROXY_CPU" "$LOAD_CPU"
printf 'wrk: %s connections, %ss; h2load: %s requests, %s clients x %s streams.\n\n' "$CONNS" "$DURATION" "$H2_REQUESTS" "$H2_CLIENTS" "$H2_STREAMS"
printf '%-16s %10s %9s %9s %14s\n' "target" "req/s" "p50 µs" "p99 µs" "proxy CPU µs/req"
targets=(h1_direct h1_nginx h1_weft h2_nginx h2_haproxy h2_weft)
[ -n "$BEFORE" ] && targets+=(h1_before h2_before)
for k in "${targets[@]}"; do
  cpu=$(col "$k" 4)
  [ "$k" = h1_direct ] && cpu="(backend) $cpu"
  printf '%-16s %10s %9s %9s %14s\n' "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "$cpu"
done
echo
echo "HTTP/1.1 throughput weft/nginx:  $(ratio "$(col h1_weft 1)" "$(col h1_nginx 1)")   (target >= 1.15)"
echo "HTTP/1.1 throughput weft/direct: $(ratio "$(col h1_weft 1)" "$(col h1_direct 1)")"
echo "HTTP/1.1 CPU/request weft/nginx: $(ratio "$(col h1_weft 4)" "$(col h1_nginx 4)")   (target <= 0.80)"
echo "h2c throughput weft/nginx:       $(ratio "$(col h2_weft 1)" "$(col h2_nginx 1)")"
echo "h2c CPU/request weft/nginx:      $(ratio "$(col h2_weft 4)" "$(col h2_nginx 4)")"
echo "h2c throughput weft/haproxy:     $(ratio "$(col h2_weft 1)" "$(col h2_haproxy 1)")   (target >= 1.00)"
echo "h2c CPU/request weft/haproxy:    $(ratio "$(col h2_weft 4)" "$(col h2_haproxy 4)")"
rd=$(col rate_direct 1)
echo "p99 at $((RATE_CLIENTS * RATE_PER_CLIENT)) req/s (HTTP/1.1): direct ${rd} µs; added by nginx $(delta "$(col rate_nginx 1)" "$rd") µs, by weft $(delta "$(col rate_weft 1)" "$rd") µs   (target: weft <= nginx)"
echo "weft RSS: idle $((IDLE_RSS / 1024)) MiB ($IDLE_RSS KiB), after load $((LOADED_RSS / 1024)) MiB   (idle target <= 15 MiB)"
if [ -n "$BEFORE" ]; then
  echo "after/before ($BEFORE): HTTP/1.1 throughput $(ratio "$(col h1_weft 1)" "$(col h1_before 1)"), CPU/request $(ratio "$(col h1_weft 4)" "$(col h1_before 4)"); h2c throughput $(ratio "$(col h2_weft 1)" "$(col h2_before 1)"), CPU/request $(ratio "$(col h2_weft 4)" "$(col h2_before 4)")"
fi
