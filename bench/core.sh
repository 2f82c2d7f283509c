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

need=()
command -v wrk >/dev/null || need+=(wrk)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v nginx >/dev/null || need+=(nginx-light)
command -v taskset >/dev/null || need+=(util-linux)
if ((${#need[@]})); then
  echo "installing ${need[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

echo "building weft (release)..." >&2
cargo build --release -q -p weft-proxy
WEFT=target/release/weft

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

BACKEND=$((BASE_PORT + 0))
NGINX_H1=$((BASE_PORT + 1))
NGINX_H2=$((BASE_PORT + 2))
WEFT_PORT=$((BASE_PORT + 3))
ADMIN=$((BASE_PORT + 4))

cat >"$work/backend.conf" <<EOF
worker_processes 1;
daemon off;
error_log $work/backend-error.log;
pid $work/backend.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  server { listen 127.0.0.1:$BACKEND; location / { return 200 "hello world\n"; } }
}
EOF
cat >"$work/proxy.conf" <<EOF
worker_processes 1;
daemon off;
error_log $work/proxy-error.log;
pid $work/proxy.pid;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 10000000;
  http2_max_requests 10000000;
  upstream backend { server 127.0.0.1:$BACKEND; keepalive 256; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:$NGINX_H1;
    listen 127.0.0.1:$NGINX_H2 http2;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
cat >"$work/weft.yaml" <<EOF
admin: { address: "127.0.0.1:$ADMIN" }
listeners:
  - { name: main, address: "127.0.0.1:$WEFT_PORT", routes: main }
routes:
  main:
    - to: [{ cluster: backend }]
clusters:
  - { name: backend, endpoints: ["127.0.0.1:$BACKEND"], protocol: http1 }
EOF

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 did not open" >&2; exit 1; }

taskset -c "$LOAD_CPU" nginx -c "$work/backend.conf" & pids+=($!)
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" & pids+=($!)
taskset -c "$PROXY_CPU" "$WEFT" run --config "$work/weft.yaml" --workers 1 2>"$work/weft.log" & pids+=($!)
WEFT_PID=$!
for p in $BACKEND $NGINX_H1 $NGINX_H2 $WEFT_PORT; do wait_port "$p"; done
sleep 0.5
NGINX_WORKER=$(pgrep -P "$(cat "$work/proxy.pid")" | head -1)
BACKEND_WORKER=$(pgrep -P "$(cat "$work/backend.pid")" | head -1)
IDLE_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$WEFT_PID/status")

TICK=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# One wrk run: prints "rps p50_us p99_us cpu_us_per_req".
run_wrk() { # url pid
  local c0 c1 out
  c0=$(cpu_ticks "$2")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$1")
  c1=$(cpu_ticks "$2")
  echo "$out" | awk -v c0="$c0" -v c1="$c1" -v tick="$TICK" '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return (v+0)*1000; if (v ~ /s$/) return (v+0)*1000000; return v }
    / 50% / { p50 = us($2) } / 99% / { p99 = us($2) }
    /requests in/ { n = $1 }
    /Requests\/sec/ { rps = $2 }
    END { printf "%.0f %.0f %.0f %.2f\n", rps, p50, p99, (c1 - c0) * 1000000 / tick / n }'
}

# One h2load run: prints "rps p50_us p99_us cpu_us_per_req" (percentiles from its per-request log).
run_h2() { # url pid
  local c0 c1 out log="$work/h2.log"
  rm -f "$log"
  c0=$(cpu_ticks "$2")
  out=$(taskset -c "$LOAD_CPU" h2load -n "$H2_REQUESTS" -c "$H2_CLIENTS" -m "$H2_STREAMS" -t 1 --log-file="$log" "$1")
  c1=$(cpu_ticks "$2")
  local rps ok
  rps=$(echo "$out" | awk '/^finished in/ { print $4 }')
  ok=$(echo "$out" | awk '/^requests:/ { print $8 }')
  [ "$ok" = "$H2_REQUESTS" ] || { echo "h2load: only $ok of $H2_REQUESTS succeeded" >&2; echo "$out" >&2; }
  # Log columns: start time, status, duration (µs).
  awk '{ print $3 }' "$log" | sort -n | awk -v rps="$rps" -v c0="$c0" -v c1="$c1" -v tick="$TICK" -v n="$H2_REQUESTS" '
    { v[NR] = $1 } END { printf "%.0f %.0f %.0f %.2f\n", rps, v[int(NR*0.5)], v[int(NR*0.99)], (c1 - c0) * 1000000 / tick / n }'
}

median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -A R
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS..." >&2
  R[h1_direct]+="$(run_wrk "http://127.0.0.1:$BACKEND/" "$BACKEND_WORKER")"$'\n'
  R[h1_nginx]+="$(run_wrk "http://127.0.0.1:$NGINX_H1/" "$NGINX_WORKER")"$'\n'
  R[h1_weft]+="$(run_wrk "http://127.0.0.1:$WEFT_PORT/" "$WEFT_PID")"$'\n'
  R[h2_nginx]+="$(run_h2 "http://127.0.0.1:$NGINX_H2/" "$NGINX_WORKER")"$'\n'
  R[h2_weft]+="$(run_h2 "http://127.0.0.1:$WEFT_PORT/" "$WEFT_PID")"$'\n'
done
LOADED_RSS=$(awk '/VmRSS/ {print $2}' "/proc/$WEFT_PID/status")

col() { echo -n "${R[$1]}" | awk -v c="$2" '{ print $c }' | median; }

printf '\nCore proxy benchmark: %s rounds, medians. Proxies: 1 worker on CPU %s; wrk/h2load + backend on CPU %s.\n' "$ROUNDS" "$PROXY_CPU" "$LOAD_CPU"
printf 'wrk: %s connections, %ss; h2load: %s requests, %s clients x %s streams.\n\n' "$CONNS" "$DURATION" "$H2_REQUESTS" "$H2_CLIENTS" "$H2_STREAMS"
printf '%-16s %10s %9s %9s %14s\n' "target" "req/s" "p50 µs" "p99 µs" "proxy CPU µs/req"
for k in h1_direct h1_nginx h1_weft h2_nginx h2_weft; do
  cpu=$(col "$k" 4)
  [ "$k" = h1_direct ] && cpu="(backend) $cpu"
  printf '%-16s %10s %9s %9s %14s\n' "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "$cpu"
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
echo
echo "HTTP/1.1 throughput weft/nginx:  $(ratio "$(col h1_weft 1)" "$(col h1_nginx 1)")   (target >= 1.15)"
echo "HTTP/1.1 throughput weft/direct: $(ratio "$(col h1_weft 1)" "$(col h1_direct 1)")"
echo "HTTP/1.1 CPU/request weft/nginx: $(ratio "$(col h1_weft 4)" "$(col h1_nginx 4)")   (target <= 0.80)"
echo "h2c throughput weft/nginx:       $(ratio "$(col h2_weft 1)" "$(col h2_nginx 1)")   (target >= 1.00)"
echo "h2c CPU/request weft/nginx:      $(ratio "$(col h2_weft 4)" "$(col h2_nginx 4)")"
echo "weft RSS: idle $((IDLE_RSS / 1024)) MiB ($IDLE_RSS KiB), after load $((LOADED_RSS / 1024)) MiB   (idle target <= 15 MiB)"
