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
#   BEFORE=/path/to/old/weft BEFORE_FILTERS=/dir/of/old/wasm bench/filters.sh
#                                 # the same listeners on an older build (and older filter
#                                 # modules, by default the current ones), same run
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
NAMES=(none log-only telemetry tele-json policy quota fault all-4)
BEFORE=${BEFORE:-}

# The configuration of a weft whose admin listener is on base `$1` + 1 and whose listeners
# are on base + 2.. (in NAMES order), with the filter modules of directory `$3`, into `$2`.
write_config() {
  cat >"$2" <<EOC
admin: { address: "127.0.0.1:$(($1 + 1))" }
listeners:
  - { name: none, address: "127.0.0.1:$(($1 + 2))", routes: main }
  - { name: log-only, address: "127.0.0.1:$(($1 + 3))", routes: main, access_log: { path: "$work/access-$1.log" } }
  - { name: telemetry, address: "127.0.0.1:$(($1 + 4))", routes: main, filters: [telemetry], access_log: { path: "$work/access-$1.log" } }
  - { name: tele-json, address: "127.0.0.1:$(($1 + 5))", routes: main, filters: [tele-json] }
  - { name: policy, address: "127.0.0.1:$(($1 + 6))", routes: main, filters: [policy] }
  - { name: quota, address: "127.0.0.1:$(($1 + 7))", routes: main, filters: [quota] }
  - { name: fault, address: "127.0.0.1:$(($1 + 8))", routes: main, filters: [fault] }
  - { name: all-4, address: "127.0.0.1:$(($1 + 9))", routes: main, filters: [telemetry, policy, quota, fault], access_log: { path: "$work/access-$1.log" } }
routes:
  main:
    - to: [{ cluster: backend }]
clusters:
  - { name: backend, endpoints: ["127.0.0.1:$BACKEND"], protocol: http1 }
filters:
  - name: telemetry
    module: "$3/telemetry.wasm"
  - name: tele-json
    module: "$3/telemetry.wasm"
    config: { access_log: json }
  - name: policy
    module: "$3/policy.wasm"
    config:
      default: allow
      rules:
        - { name: no-admin, action: deny, when: { path: { prefix: /admin } } }
        - { name: mesh, action: allow, when: { identities: ["spiffe://mesh/ns/prod/*"] } }
        - { name: office, action: deny, when: { source_ips: [10.99.0.0/16] } }
  - name: quota
    module: "$3/quota.wasm"
    config:
      limits:
        - { name: per-key, requests: 100000000, per: 1s, key: [{ header: x-api-key }] }
  - name: fault
    module: "$3/fault.wasm"
    config:
      rules:
        - { name: chaos, match: { path: { prefix: / } }, abort: { http_status: 503, percentage: 0 } }
EOC
}

# Starts weft `$1` on the configuration for base `$2` and modules `$3`; sets STARTED_PID.
start_weft() {
  write_config "$2" "$work/weft-$2.yaml" "$3"
  taskset -c "$PROXY_CPU" "$1" run --config "$work/weft-$2.yaml" --workers 1 2>"$work/weft-$2.log" & pids+=($!)
  STARTED_PID=$!
  for i in "${!NAMES[@]}"; do wait_port $(($2 + 2 + i)); done
  local code
  code=$(curl -s -o /dev/null -w '%{http_code}' -H 'x-api-key: bench' "http://127.0.0.1:$(($2 + 9))/")
  [ "$code" = 200 ] || { echo "$1: the filter chain answers $code" >&2; cat "$work/weft-$2.log" >&2; exit 1; }
}

start_backend "$BACKEND"
wait_port "$BACKEND"
start_weft "$WEFT" "$BASE_PORT" "$FILTERS"
WEFT_PID=$STARTED_PID
if [ -n "$BEFORE" ]; then
  start_weft "$BEFORE" $((BASE_PORT + 20)) "${BEFORE_FILTERS:-$FILTERS}"
  BEFORE_PID=$STARTED_PID
fi
sleep 0.5
BACKEND_WORKER=$(backend_worker)

declare -A R
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS..." >&2
  R[direct]+="$(run_wrk "http://127.0.0.1:$BACKEND/" "$BACKEND_WORKER" "$CONNS" -H 'x-api-key: bench')"$'\n'
  for i in "${!NAMES[@]}"; do
    n=${NAMES[$i]}
    R[$n]+="$(run_wrk "http://127.0.0.1:$((BASE_PORT + 2 + i))/" "$WEFT_PID" "$CONNS" -H 'x-api-key: bench')"$'\n'
    if [ -n "$BEFORE" ]; then
      R[before-$n]+="$(run_wrk "http://127.0.0.1:$((BASE_PORT + 22 + i))/" "$BEFORE_PID" "$CONNS" -H 'x-api-key: bench')"$'\n'
    fi
  done
done

printf '\nBuilt-in filter benchmark: %s rounds, medians. weft: 1 worker on CPU %s; wrk + backend on CPU %s.\n' "$ROUNDS" "$PROXY_CPU" "$LOAD_CPU"
printf 'wrk: %s connections, %ss, HTTP/1.1 keep-alive.\n\n' "$CONNS" "$DURATION"
filter_table ", modules ${BEFORE_FILTERS:-the same}" "${NAMES[@]}"
base_cpu=$(col none 4)
echo
echo "the four built-in filters chained (all-4, with the access log): $(delta "$(col all-4 4)" "$base_cpu") µs of CPU per request over weft without filters (target <= +20)"
echo "(direct: the backend alone; its CPU column is the backend's. log-only, telemetry and all-4 write weft's native access-log line per request; tele-json has the filter write its own line.)"
