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
WEFT=target/release/weft
FILTERS=$PWD/tests/filters/target/wasm32-wasip1/release

BACKEND=$((BASE_PORT + 0))
NONE=$((BASE_PORT + 1))
NOOP=$((BASE_PORT + 2))
ADD=$((BASE_PORT + 3))
CHAIN=$((BASE_PORT + 4))
ADMIN=$((BASE_PORT + 5))

cat >"$work/weft.yaml" <<EOC
admin: { address: "127.0.0.1:$ADMIN" }
listeners:
  - { name: none, address: "127.0.0.1:$NONE", routes: main }
  - { name: noop, address: "127.0.0.1:$NOOP", routes: main, filters: [noop] }
  - { name: add-header, address: "127.0.0.1:$ADD", routes: main, filters: [add-1] }
  - { name: chain-4, address: "127.0.0.1:$CHAIN", routes: main, filters: [add-1, add-2, add-3, add-4] }
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

start_backend "$BACKEND"
taskset -c "$PROXY_CPU" "$WEFT" run --config "$work/weft.yaml" --workers 1 2>"$work/weft.log" & pids+=($!)
WEFT_PID=$!
for p in $BACKEND $NONE $NOOP $ADD $CHAIN; do wait_port "$p"; done
sleep 0.5
BACKEND_WORKER=$(backend_worker)
curl -s -o /dev/null -D - "http://127.0.0.1:$CHAIN/" | grep -c '^x-wasm-' | grep -qx 4 || { echo "the chain does not add its 4 headers" >&2; exit 1; }

declare -A R
for round in $(seq "$ROUNDS"); do
  echo "round $round/$ROUNDS..." >&2
  R[direct]+="$(run_wrk "http://127.0.0.1:$BACKEND/" "$BACKEND_WORKER" "$CONNS")"$'\n'
  R[none]+="$(run_wrk "http://127.0.0.1:$NONE/" "$WEFT_PID" "$CONNS")"$'\n'
  R[noop]+="$(run_wrk "http://127.0.0.1:$NOOP/" "$WEFT_PID" "$CONNS")"$'\n'
  R[add-header]+="$(run_wrk "http://127.0.0.1:$ADD/" "$WEFT_PID" "$CONNS")"$'\n'
  R[chain-4]+="$(run_wrk "http://127.0.0.1:$CHAIN/" "$WEFT_PID" "$CONNS")"$'\n'
done

printf '\nWasm filter benchmark: %s rounds, medians. weft: 1 worker on CPU %s; wrk + backend on CPU %s.\n' "$ROUNDS" "$PROXY_CPU" "$LOAD_CPU"
printf 'wrk: %s connections, %ss, HTTP/1.1 keep-alive.\n\n' "$CONNS" "$DURATION"
printf '%-12s %10s %8s %8s %10s %12s %14s\n' "target" "req/s" "p50 µs" "p99 µs" "CPU µs/req" "vs none rps" "vs none CPU µs"
base_rps=$(col none 1); base_cpu=$(col none 4)
for k in direct none noop add-header chain-4; do
  cpu=$(col "$k" 4)
  if [ "$k" = direct ]; then
    printf '%-12s %10s %8s %8s %10s %12s %14s\n' "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "($cpu)" "$(ratio "$(col "$k" 1)" "$base_rps" 3)" "-"
  else
    printf '%-12s %10s %8s %8s %10s %12s %14s\n' "$k" "$(col "$k" 1)" "$(col "$k" 2)" "$(col "$k" 3)" "$cpu" "$(ratio "$(col "$k" 1)" "$base_rps" 3)" "$(delta "$cpu" "$base_cpu")"
  fi
done
echo
echo "one headers-only filter (add-header): throughput $(ratio "$(col add-header 1)" "$base_rps" 3) of weft without filters (target >= 0.90), CPU $(delta "$(col add-header 4)" "$base_cpu") µs/request (target <= +3)"
echo "(direct: the backend alone; its CPU column is the backend's.)"
echo
echo "VM start and guest-call cost (cargo bench --bench wasm):" >&2
cargo bench -q -p weft-proxy --bench wasm 2>/dev/null | grep -E "vm start|guest calls"
