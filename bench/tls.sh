#!/usr/bin/env bash
# TLS termination benchmark, all in one run on loopback: weft and nginx terminating TLS (the
# same ECDSA P-256 certificate, TLS 1.3) in front of one backend (nginx `return 200`), each
# proxy with ONE worker pinned to CPU 0; the load generator and the backend share CPU 1.
#   - keep-alive: HTTP/1.1 over TLS (wrk), HTTP/2 over TLS via ALPN (h2load);
#   - new handshakes: every request on a new connection (wrk, `Connection: close`), no session
#     resumption (a full handshake each time);
#   - mesh handshakes (mutual, SVIDs) with X25519 and with the post-quantum X25519MLKEM768 that
#     mesh connections prefer (`cargo bench --bench handshake`: wrk's OpenSSL offers no ML-KEM).
# Prints req/s, p50/p99, proxy CPU µs per request, and the ratios weft/nginx. Rounds alternate
# the targets; medians are reported.
#
#   bench/tls.sh                  # defaults: 3 rounds × 10 s, 64 connections
#   ROUNDS=5 DURATION=20 bench/tls.sh
#   BEFORE=/path/to/older/weft bench/tls.sh   # also measures an older build, same run
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
NEW_CONNS=${NEW_CONNS:-16}
H2_REQUESTS=${H2_REQUESTS:-200000}
H2_CLIENTS=${H2_CLIENTS:-16}
H2_STREAMS=${H2_STREAMS:-10}
BASE_PORT=${BASE_PORT:-18200}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

source bench/lib.sh
bench_install wrk:wrk h2load:nghttp2-client nginx:nginx-light openssl:openssl taskset:util-linux

echo "building weft (release)..." >&2
cargo build --release -q -p weft-proxy
WEFT=${CARGO_TARGET_DIR:-target}/release/weft  # the build above (CARGO_TARGET_DIR honoured)

BACKEND=$((BASE_PORT + 0))
NGINX=$((BASE_PORT + 1))
WEFT_PORT=$((BASE_PORT + 2))
ADMIN=$((BASE_PORT + 3))
BEFORE_PORT=$((BASE_PORT + 4))
BEFORE_ADMIN=$((BASE_PORT + 5))
BEFORE=${BEFORE:-}

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj /CN=bench.test -addext subjectAltName=DNS:bench.test \
  -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null

nginx_proxy_conf "$work/proxy.conf" "$BACKEND" "    listen 127.0.0.1:$NGINX ssl http2;
    ssl_certificate $work/cert.pem;
    ssl_certificate_key $work/key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;"
cat >"$work/weft.yaml" <<EOC
admin: { address: "127.0.0.1:$ADMIN" }
listeners:
  - name: main
    address: "127.0.0.1:$WEFT_PORT"
    routes: main
    tls: { certificates: [{ cert: cert.pem, key: key.pem }] }
routes:
  main:
    - to: [{ cluster: backend }]
clusters:
  - { name: backend, endpoints: ["127.0.0.1:$BACKEND"], protocol: http1 }
EOC

if [ -n "$BEFORE" ]; then
  sed -e "s/$WEFT_PORT/$BEFORE_PORT/" -e "s/$ADMIN/$BEFORE_ADMIN/" "$work/weft.yaml" >"$work/before.yaml"
fi

start_backend "$BACKEND"
taskset -c "$PROXY_CPU" nginx -c "$work/proxy.conf" & pids+=($!)
taskset -c "$PROXY_CPU" "$WEFT" run --config "$work/weft.yaml" --workers 1 2>"$work/weft.log" & pids+=($!)
WEFT_PID=$!
if [ -n "$BEFORE" ]; then
  taskset -c "$PROXY_CPU" "$BEFORE" run --config "$work/before.yaml" --workers 1 2>"$work/before.log" & pids+=($!)
  BEFORE_PID=$!
  wait_port "$BEFORE_PORT"
fi
for p in $BACKEND $NGINX $WEFT_PORT; do wait_port "$p"; done
sleep 0.5
NGINX_WORKER=$(pgrep -P "$(cat "$work/proxy.pid")" | head -1)

declare -A R
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS..." >&2
  R[ka_nginx]+="$(run_wrk "https://127.0.0.1:$NGINX/" "$NGINX_WORKER" "$CONNS")"$'\n'
  R[ka_weft]+="$(run_wrk "https://127.0.0.1:$WEFT_PORT/" "$WEFT_PID" "$CONNS")"$'\n'
  R[h2_nginx]+="$(run_h2 "https://127.0.0.1:$NGINX/" "$NGINX_WORKER")"$'\n'
  R[h2_weft]+="$(run_h2 "https://127.0.0.1:$WEFT_PORT/" "$WEFT_PID")"$'\n'
  R[hs_nginx]+="$(run_wrk "https://127.0.0.1:$NGINX/" "$NGINX_WORKER" "$NEW_CONNS" -H "Connection: close")"$'\n'
  R[hs_weft]+="$(run_wrk "https://127.0.0.1:$WEFT_PORT/" "$WEFT_PID" "$NEW_CONNS" -H "Connection: close")"$'\n'
  if [ -n "$BEFORE" ]; then
    R[ka_before]+="$(run_wrk "https://127.0.0.1:$BEFORE_PORT/" "$BEFORE_PID" "$CONNS")"$'\n'
    R[hs_before]+="$(run_wrk "https://127.0.0.1:$BEFORE_PORT/" "$BEFORE_PID" "$NEW_CONNS" -H "Connection: close")"$'\n'
  fi
done

printf '\nTLS termination benchmark: %s rounds, medians. Proxies: 1 worker on CPU %s; load + backend on CPU %s.\n' "$ROUNDS" "$PROXY_CPU" "$LOAD_CPU"
printf 'ECDSA P-256, TLS 1.3. keep-alive: wrk %s connections; h2: h2load %s requests, %s clients x %s streams;\n' "$CONNS" "$H2_REQUESTS" "$H2_CLIENTS" "$H2_STREAMS"
printf 'handshakes: wrk %s connections, a new connection (full handshake) per request.\n\n' "$NEW_CONNS"
printf '%-22s %10s %9s %9s %18s\n' "target" "req/s" "p50 µs" "p99 µs" "proxy CPU µs/req"
targets=(ka_nginx ka_weft h2_nginx h2_weft hs_nginx hs_weft)
[ -n "$BEFORE" ] && targets+=(ka_before hs_before)
for k in "${targets[@]}"; do
  printf '%-22s %10s %9s %9s %18s\n' "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "$(col "$k" 4)"
done
echo
echo "keep-alive HTTP/1.1 over TLS, throughput weft/nginx: $(ratio "$(col ka_weft 1)" "$(col ka_nginx 1)")   CPU/request weft/nginx: $(ratio "$(col ka_weft 4)" "$(col ka_nginx 4)")"
echo "HTTP/2 over TLS,              throughput weft/nginx: $(ratio "$(col h2_weft 1)" "$(col h2_nginx 1)")   CPU/request weft/nginx: $(ratio "$(col h2_weft 4)" "$(col h2_nginx 4)")"
echo "new handshakes per second,    weft/nginx:            $(ratio "$(col hs_weft 1)" "$(col hs_nginx 1)")   CPU/handshake weft/nginx: $(ratio "$(col hs_weft 4)" "$(col hs_nginx 4)")"
if [ -n "$BEFORE" ]; then
  echo "after/before ($BEFORE): keep-alive throughput $(ratio "$(col ka_weft 1)" "$(col ka_before 1)"), CPU/request $(ratio "$(col ka_weft 4)" "$(col ka_before 4)"); handshakes/s $(ratio "$(col hs_weft 1)" "$(col hs_before 1)"), CPU/handshake $(ratio "$(col hs_weft 4)" "$(col hs_before 4)")"
fi
echo
taskset -c "$PROXY_CPU" cargo bench -q -p weft-proxy --bench handshake
