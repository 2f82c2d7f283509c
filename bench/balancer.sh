#!/usr/bin/env bash
# Balancer benchmark, in one run on loopback. One weft (1 worker, CPU 0) with a listener per
# balancing policy; load generator and backends on CPU 1.
#   1. Two endpoints, one of them 5 ms slower (weft-echo --delay-ms 5): throughput, p50/p99 and
#      the share of requests sent to the fast one, peak_ewma vs round_robin (and least_request).
#   2. The cost of the balancer itself: each policy over one nginx endpoint, proxy CPU µs per
#      request, and its ratio to round_robin's.
#
#   bench/balancer.sh                # 10 s per run
#   DURATION=20 bench/balancer.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10}
CONNS=${CONNS:-32}
BASE_PORT=${BASE_PORT:-18100}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}

source bench/lib.sh
bench_install wrk:wrk nginx:nginx-light curl:curl

echo "building weft and weft-echo (release)..." >&2
cargo build --release -q -p weft-proxy -p weft-testkit --bin weft --bin weft-echo
WEFT=${CARGO_TARGET_DIR:-target}/release/weft  # the build above (CARGO_TARGET_DIR honoured)
ECHO=${CARGO_TARGET_DIR:-target}/release/weft-echo

FAST=$((BASE_PORT + 0)); SLOW=$((BASE_PORT + 1)); NGINX=$((BASE_PORT + 2)); ADMIN=$((BASE_PORT + 3))
L_EWMA=$((BASE_PORT + 10)); L_RR=$((BASE_PORT + 11)); L_LR=$((BASE_PORT + 12))
C_RR=$((BASE_PORT + 20)); C_EWMA=$((BASE_PORT + 21)); C_LR=$((BASE_PORT + 22)); C_RANDOM=$((BASE_PORT + 23)); C_RING=$((BASE_PORT + 24))


listener() { echo "  - { name: $1, address: \"127.0.0.1:$2\", routes: $1 }"; }
route() { echo "  $1: [{ to: [{ cluster: $1 }] }]"; }
{
  echo "admin: { address: \"127.0.0.1:$ADMIN\" }"
  echo "listeners:"
  listener two_ewma $L_EWMA; listener two_rr $L_RR; listener two_lr $L_LR
  listener one_rr $C_RR; listener one_ewma $C_EWMA; listener one_lr $C_LR; listener one_random $C_RANDOM; listener one_ring $C_RING
  echo "routes:"
  for r in two_ewma two_rr two_lr one_rr one_ewma one_lr one_random one_ring; do route $r; done
  echo "clusters:"
  for p in "two_ewma peak_ewma" "two_rr round_robin" "two_lr least_request"; do
    set -- $p
    echo "  - { name: $1, endpoints: [\"127.0.0.1:$FAST\", \"127.0.0.1:$SLOW\"], lb: $2, protocol: http1 }"
  done
  for p in "one_rr round_robin" "one_ewma peak_ewma" "one_lr least_request" "one_random random"; do
    set -- $p
    echo "  - { name: $1, endpoints: [\"127.0.0.1:$NGINX\"], lb: $2, protocol: http1 }"
  done
  echo "  - { name: one_ring, endpoints: [\"127.0.0.1:$NGINX\"], lb: ring_hash, hash_key: { source_ip: true }, protocol: http1 }"
} >"$work/weft.yaml"

taskset -c "$LOAD_CPU" "$ECHO" --listen "127.0.0.1:$FAST" --name fast 2>/dev/null & pids+=($!)
taskset -c "$LOAD_CPU" "$ECHO" --listen "127.0.0.1:$SLOW" --name slow --delay-ms 5 2>/dev/null & pids+=($!)
start_backend "$NGINX"
taskset -c "$PROXY_CPU" "$WEFT" run --config "$work/weft.yaml" --workers 1 2>"$work/weft.log" & pids+=($!)
WEFT_PID=$!
for p in $FAST $SLOW $NGINX $L_EWMA $C_RING; do wait_port "$p"; done
sleep 0.5

fast_requests() { # cluster: requests its fast endpoint has received
  curl -s "127.0.0.1:$ADMIN/clusters" | tr -d ' \n' | sed 's/{"circuit_breakers_in_use"/\n&/g' |
    grep "\"name\":\"$1\"" |
    grep -o '"address":"127.0.0.1:'"$FAST"'"[^}]*"requests_total":[0-9]*' | grep -o '[0-9]*$' || echo 0
}
run() { # url -> "rps p50_us p99_us cpu_us_per_req requests"
  local c0 c1 out
  c0=$(cpu_ticks "$WEFT_PID")
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$1")
  c1=$(cpu_ticks "$WEFT_PID")
  echo "$out" | awk -v c0="$c0" -v c1="$c1" -v tick="$TICK" '
    function us(v) { if (v ~ /us$/) return v+0; if (v ~ /ms$/) return (v+0)*1000; if (v ~ /s$/) return (v+0)*1000000; return v }
    / 50% / { p50 = us($2) } / 99% / { p99 = us($2) } /requests in/ { n = $1 } /Requests\/sec/ { rps = $2 }
    END { printf "%.0f %.0f %.0f %.2f %d\n", rps, p50, p99, (c1 - c0) * 1000000 / tick / n, n }'
}

echo
echo "1. One of two endpoints 5 ms slower ($CONNS connections, ${DURATION}s each)"
printf '%-14s %9s %9s %9s %16s\n' policy req/s "p50 µs" "p99 µs" "to fast endpoint"
declare -A RPS P99
for p in "two_ewma peak_ewma $L_EWMA" "two_rr round_robin $L_RR" "two_lr least_request $L_LR"; do
  set -- $p
  before=$(fast_requests "$1")
  read -r rps p50 p99 _ n < <(run "http://127.0.0.1:$3/")
  after=$(fast_requests "$1")
  RPS[$2]=$rps; P99[$2]=$p99
  printf '%-14s %9s %9s %9s %15s%%\n' "$2" "$rps" "$p50" "$p99" "$(awk -v a="$before" -v b="$after" -v n="$n" 'BEGIN { printf "%.1f", (b - a) * 100 / n }')"
done
echo "peak_ewma/round_robin: throughput $(ratio "${RPS[peak_ewma]}" "${RPS[round_robin]}")x, p99 $(ratio "${P99[peak_ewma]}" "${P99[round_robin]}")x"

echo
echo "2. The balancer's own cost"
# End to end, the differences between policies (tens of ns) drown in the run-to-run noise of a
# request's whole cost (~20 µs); so measure a pick directly, and set it against that whole.
read -r rps _ _ whole _ < <(run "http://127.0.0.1:$C_EWMA/")
echo "weft with peak_ewma over one nginx endpoint: $rps req/s, $whole µs of proxy CPU per request"
cargo bench -q -p weft-proxy --bench balancer 2>/dev/null | tee "$work/picks.txt"
awk -v whole="$whole" '$2 ~ /^[0-9.]+$/ && $3 == "ns" {
  printf "%-14s %.2f %% of the proxy CPU per request (3 endpoints)\n", $1, $2 / 1000 / whole * 100 }' "$work/picks.txt"
