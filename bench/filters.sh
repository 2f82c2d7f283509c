#!/usr/bin/env bash
# Built-in filter cost, all in one run on loopback: one weft (ONE worker pinned to CPU 0) with
# a listener per filter — none, telemetry, policy, quota, fault — and one with all four
# chained, plus the backend alone (nginx `return 200`); wrk and the backend share CPU 1.
# Access logs: `log-only` is a listener with weft's native access log and no filter;
# `telemetry` and `all-4` log natively (the filter adds the trace to the line); `tele-json` is
# the telemetry filter writing its own JSON line instead (the way before native logs).
# HTTP/1.1 keep-alive. Rounds alternate the targets; medians are reported, with each
# listener's throughput and CPU per request against weft without filters in the same run.
#
#   bench/filters.sh              # defaults: 3 rounds × 10 s, 64 connections
#   ROUNDS=5 DURATION=20 bench/filters.sh
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
BASE_PORT=${BASE_PORT:-18300}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

source bench/lib.sh
bench_install wrk:wrk nginx:nginx-light taskset:util-linux
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

echo "building weft and the built-in filters (release)..." >&2
cargo build --release -q -p weft-proxy
CARGO_TARGET_DIR=target/wasm-filters CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=debuginfo \
  cargo build --release -q --locked --target wasm32-wasip1 \
  -p weft-filter-telemetry -p weft-filter-policy -p weft-filter-quota -p weft-filter-fault
WEFT=${CARGO_TARGET_DIR:-target}/release/weft  # the build above (CARGO_TARGET_DIR honoured)
FILTERS=$PWD/target/wasm-filters/wasm32-wasip1/release

BACKEND=$((BASE_PORT + 0))
ADMIN=$((BASE_PORT + 1))
NAMES=(none log-only telemetry tele-json policy quota fault all-4)
declare -A PORT
for i in "${!NAMES[@]}"; do PORT[${NAMES[$i]}]=$((BASE_PORT + 2 + i)); done

cat >"$work/weft.yaml" <<EOC
admin: { address: "127.0.0.1:$ADMIN" }
listeners:
  - { name: none, address: "127.0.0.1:${PORT[none]}", routes: main }
  - { name: log-only, address: "127.0.0.1:${PORT[log-only]}", routes: main, access_log: { path: "$work/access.log" } }
  - { name: telemetry, address: "127.0.0.1:${PORT[telemetry]}", routes: main, filters: [telemetry], access_log: { path: "$work/access.log" } }
  - { name: tele-json, address: "127.0.0.1:${PORT[tele-json]}", routes: main, filters: [tele-json] }
  - { name: policy, address: "127.0.0.1:${PORT[policy]}", routes: main, filters: [policy] }
  - { name: quota, address: "127.0.0.1:${PORT[quota]}", routes: main, filters: [quota] }
  - { name: fault, address: "127.0.0.1:${PORT[fault]}", routes: main, filters: [fault] }
  - { name: all-4, address: "127.0.0.1:${PORT[all-4]}", routes: main, filters: [telemetry, policy, quota, fault], access_log: { path: "$work/access.log" } }
routes:
  main:
    - to: [{ cluster: backend }]
clusters:
  - { name: backend, endpoints: ["127.0.0.1:$BACKEND"], protocol: http1 }
filters:
  - name: telemetry
    module: "$FILTERS/telemetry.wasm"
  - name: tele-json
    module: "$FILTERS/telemetry.wasm"
    config: { access_log: json }
  - name: policy
    module: "$FILTERS/policy.wasm"
    config:
      default: allow
      rules:
        - { name: no-admin, action: deny, when: { path: { prefix: /admin } } }
        - { name: mesh, action: allow, when: { identities: ["spiffe://mesh/ns/prod/*"] } }
        - { name: office, action: deny, when: { source_ips: [10.99.0.0/16] } }
  - name: quota
    module: "$FILTERS/quota.wasm"
    config:
      limits:
        - { name: per-key, requests: 100000000, per: 1s, key: [{ header: x-api-key }] }
  - name: fault
    module: "$FILTERS/fault.wasm"
    config:
      rules:
        - { name: chaos, match: { path: { prefix: / } }, abort: { http_status: 503, percentage: 0 } }
EOC

start_backend "$BACKEND"
taskset -c "$PROXY_CPU" "$WEFT" run --config "$work/weft.yaml" --workers 1 2>"$work/weft.log" & pids+=($!)
WEFT_PID=$!
for p in $BACKEND "${PORT[@]}"; do wait_port "$p"; done
sleep 0.5
BACKEND_WORKER=$(backend_worker)
code=$(curl -s -o /dev/null -w '%{http_code}' -H 'x-api-key: bench' "http://127.0.0.1:${PORT[all-4]}/")
[ "$code" = 200 ] || { echo "the filter chain answers $code" >&2; cat "$work/weft.log" >&2; exit 1; }

declare -A R
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS..." >&2
  R[direct]+="$(run_wrk "http://127.0.0.1:$BACKEND/" "$BACKEND_WORKER" "$CONNS" -H 'x-api-key: bench')"$'\n'
  for n in "${NAMES[@]}"; do
    R[$n]+="$(run_wrk "http://127.0.0.1:${PORT[$n]}/" "$WEFT_PID" "$CONNS" -H 'x-api-key: bench')"$'\n'
  done
done

printf '\nBuilt-in filter benchmark: %s rounds, medians. weft: 1 worker on CPU %s; wrk + backend on CPU %s.\n' "$ROUNDS" "$PROXY_CPU" "$LOAD_CPU"
printf 'wrk: %s connections, %ss, HTTP/1.1 keep-alive.\n\n' "$CONNS" "$DURATION"
printf '%-12s %10s %8s %8s %10s %12s %14s\n' "target" "req/s" "p50 µs" "p99 µs" "CPU µs/req" "vs none rps" "vs none CPU µs"
base_rps=$(col none 1); base_cpu=$(col none 4)
for k in direct "${NAMES[@]}"; do
  cpu=$(col "$k" 4)
  if [ "$k" = direct ]; then
    printf '%-12s %10s %8s %8s %10s %12s %14s\n' "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "($cpu)" "$(ratio "$(col "$k" 1)" "$base_rps" 3)" "-"
  else
    printf '%-12s %10s %8s %8s %10s %12s %14s\n' "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "$cpu" "$(ratio "$(col "$k" 1)" "$base_rps" 3)" "$(delta "$cpu" "$base_cpu")"
  fi
done
echo
echo "(direct: the backend alone; its CPU column is the backend's. log-only, telemetry and all-4 write weft's native access-log line per request; tele-json has the filter write its own line.)"
