#!/usr/bin/env bash
# Wasm filter cost, all in one run on loopback: one weft (ONE worker pinned to CPU 0) with four
# listeners — no filter, one no-op filter, one filter that adds a response header, a chain of
# four such filters — and the backend alone (nginx `return 200`); wrk and the backend share
# CPU 1. HTTP/1.1 keep-alive. Rounds alternate the targets; medians are reported, with each
# filtered listener's throughput and CPU per request against weft without filters in the same
# run. Then VM start time and the guest calls' own cost (`cargo bench --bench wasm`).
#
#   bench/wasm.sh                 # defaults: 3 rounds × 10 s, 64 connections
#   ROUNDS=5 DURATION=20 bench/wasm.sh
#   BEFORE=/path/to/old/weft bench/wasm.sh   # the same listeners on an older build, same run
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNS=${CONNS:-64}
BASE_PORT=${BASE_PORT:-18100}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

source bench/lib.sh
bench_install wrk:wrk nginx:nginx-light taskset:util-linux
rustup target list --installed | grep -qx wasm32-wasip1 || rustup target add wasm32-wasip1

echo "building weft (release) and the filters..." >&2
cargo build --release -q -p weft-proxy
(cd tests/filters && cargo build --release -q --locked --target wasm32-wasip1)
WEFT=${CARGO_TARGET_DIR:-target}/release/weft  # the build above (CARGO_TARGET_DIR honoured)
FILTERS=$PWD/tests/filters/target/wasm32-wasip1/release

BEFORE=${BEFORE:-}
BACKEND=$((BASE_PORT + 0))
TARGETS=(none noop add-header chain-4)

# The configuration of a weft whose listeners are on ports base+1.. (in TARGETS order) and
# whose admin listener is on base+5.
write_config() {
  local b=$2
  cat >"$1" <<EOC
admin: { address: "127.0.0.1:$((b + 5))" }
listeners:
  - { name: none, address: "127.0.0.1:$((b + 1))", routes: main }
  - { name: noop, address: "127.0.0.1:$((b + 2))", routes: main, filters: [noop] }
  - { name: add-header, address: "127.0.0.1:$((b + 3))", routes: main, filters: [add-1] }
  - { name: chain-4, address: "127.0.0.1:$((b + 4))", routes: main, filters: [add-1, add-2, add-3, add-4] }
routes:
  main:
    - to: [{ cluster: backend }]
clusters:
  - { name: backend, endpoints: ["127.0.0.1:$BACKEND"], protocol: http1 }
filters:
  - { name: noop, module: "$FILTERS/noop.wasm" }
  - { name: add-1, module: "$FILTERS/add_header.wasm", config: "x-wasm-1: 1" }
  - { name: add-2, module: "$FILTERS/add_header.wasm", config: "x-wasm-2: 2" }
  - { name: add-3, module: "$FILTERS/add_header.wasm", config: "x-wasm-3: 3" }
  - { name: add-4, module: "$FILTERS/add_header.wasm", config: "x-wasm-4: 4" }
EOC
}

# Starts `$1` on the configuration for ports base `$2`; sets STARTED_PID.
start_weft() {
  write_config "$work/weft-$2.yaml" "$2"
  taskset -c "$PROXY_CPU" "$1" run --config "$work/weft-$2.yaml" --workers 1 2>"$work/weft-$2.log" & pids+=($!)
  STARTED_PID=$!
  for i in 1 2 3 4; do wait_port $(($2 + i)); done
  curl -s -o /dev/null -D - "http://127.0.0.1:$(($2 + 4))/" | grep -c '^x-wasm-' | grep -qx 4 || { echo "$1: the chain does not add its 4 headers" >&2; exit 1; }
}

start_backend "$BACKEND"
wait_port "$BACKEND"
start_weft "$WEFT" "$BASE_PORT"
WEFT_PID=$STARTED_PID
if [ -n "$BEFORE" ]; then
  start_weft "$BEFORE" $((BASE_PORT + 10))
  BEFORE_PID=$STARTED_PID
fi
sleep 0.5
BACKEND_WORKER=$(backend_worker)

declare -A R
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS..." >&2
  R[direct]+="$(run_wrk "http://127.0.0.1:$BACKEND/" "$BACKEND_WORKER" "$CONNS")"$'\n'
  for i in "${!TARGETS[@]}"; do
    t=${TARGETS[$i]}
    R[$t]+="$(run_wrk "http://127.0.0.1:$((BASE_PORT + i + 1))/" "$WEFT_PID" "$CONNS")"$'\n'
    if [ -n "$BEFORE" ]; then
      R[before-$t]+="$(run_wrk "http://127.0.0.1:$((BASE_PORT + 10 + i + 1))/" "$BEFORE_PID" "$CONNS")"$'\n'
    fi
  done
done

printf '\nWasm filter benchmark: %s rounds, medians. weft: 1 worker on CPU %s; wrk + backend on CPU %s.\n' "$ROUNDS" "$PROXY_CPU" "$LOAD_CPU"
printf 'wrk: %s connections, %ss, HTTP/1.1 keep-alive.\n\n' "$CONNS" "$DURATION"
filter_table "" "${TARGETS[@]}"
base_rps=$(col none 1); base_cpu=$(col none 4)
echo
echo "one headers-only filter (add-header): throughput $(ratio "$(col add-header 1)" "$base_rps" 3) of weft without filters (target >= 0.90), CPU $(delta "$(col add-header 4)" "$base_cpu") µs/request (target <= +3)"
echo "(direct: the backend alone; its CPU column is the backend's.)"
echo
echo "VM start and guest-call cost (cargo bench --bench wasm):" >&2
cargo bench -q -p weft-proxy --bench wasm 2>/dev/null | grep -E "vm start|guest calls"
