#!/usr/bin/env bash
# Sidecar overhead, in network namespaces (needs root): a client pod calls a server pod's
# service VIP through two sidecars (client sidecar → mesh mTLS → server sidecar → application),
# and, in the same run, the same application directly (a port `weft init` leaves alone).
# At fixed request rates (h2load --rps, HTTP/1.1 keep-alive) it prints p50/p99 of both and what
# the two hops add, each sidecar's CPU per request, and each sidecar's RSS, with anchors:
# Linkerd's proxy ≈ 26 MB, Istio's sidecar ≈ 60 MB and 0.2 vCPU per 1,000 req/s (200 µs CPU
# per request).
#
# Both sidecars (one worker each) share CPU 0; the load generator and the application (nginx,
# one worker) CPU 1. weft-cp runs in a hub namespace (the mesh's CA).
#
#   bench/sidecar.sh                         # RATES="1000 5000" DURATION=10 ROUNDS=3 CONNS=10
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || {
  echo "bench/sidecar.sh: needs root (network namespaces, nat rules)" >&2
  exit 1
}

RATES=${RATES:-"1000 5000"}
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-10}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
VIP=10.96.0.10

source bench/lib.sh
bench_install h2load:nghttp2-client nginx:nginx-light iptables-restore:iptables ip:iproute2 \
  taskset:util-linux setpriv:util-linux curl:curl

echo "building weft, weft-cp, weftctl (release)..." >&2
cargo build --release -q --locked -p weft-proxy --bin weft -p weft-controlplane --bin weft-cp --bin weftctl
bin=$PWD/target/release

nsp=wb$$
ns() {
  local n=$1
  shift
  ip netns exec "$nsp-$n" "$@"
}
teardown() {
  cleanup
  for n in client server hub; do ip netns del "$nsp-$n" 2>/dev/null || true; done
}
trap teardown EXIT

# The pods: a bridge in the hub, a veth to each pod.
ip netns add "$nsp-hub"
ns hub ip link set lo up
ns hub ip link add br0 type bridge
ns hub ip link set br0 up
ns hub ip addr add 10.77.0.254/24 dev br0
i=0
for pod in client server; do
  i=$((i + 1))
  ip netns add "$nsp-$pod"
  ns "$pod" ip link set lo up
  ns hub ip link add "v$i" type veth peer name eth0 netns "$nsp-$pod"
  ns hub ip link set "v$i" master br0 up
  ns "$pod" ip addr add "10.77.0.$i/24" dev eth0
  ns "$pod" ip link set eth0 up
  ns "$pod" ip route add default dev eth0
done

# The control plane and the mesh.
"$bin/weft-cp" --store "$work/cp.json" --init-admin "$work/admin" >/dev/null 2>&1
# (Background processes are started with `ip netns exec` itself, which becomes the process:
# its PID is the one to stop.)
ip netns exec "$nsp-hub" "$bin/weft-cp" --store "$work/cp.json" --listen 10.77.0.254:18000 2>"$work/cp.log" &
pids+=($!)
ctl() { ns hub "$bin/weftctl" --server https://10.77.0.254:18000 --credentials "$work/admin" "$@"; }
for _ in $(seq 100); do ctl status >/dev/null 2>&1 && break; sleep 0.1; done
cat >"$work/mesh.yaml" <<EOF
kind: mesh_service
spec:
  name: web
  addresses: ["$VIP"]
  ports: [ { port: 80, target_port: 8080, protocol: http } ]
  endpoints: ["10.77.0.2"]
  identities: ["spiffe://cluster.local/ns/default/sa/web"]
---
kind: sidecar
selector: { app: web }
spec: { name: web, mode: strict, ports: [ { port: 8080, protocol: http } ] }
---
kind: sidecar
selector: { app: client }
spec: { name: client }
EOF
ctl apply -f "$work/mesh.yaml" >/dev/null
ctl node add client --identity default/client --label app=client >"$work/client.token"
ctl node add web --identity default/web --label app=web >"$work/server.token"

# The application: nginx in the server pod, on 127.0.0.1:8080 (through the sidecar) and
# 0.0.0.0:8081 (direct).
nginx_hello app "listen 127.0.0.1:8080; listen 0.0.0.0:8081;" >"$work/app.conf"
ip netns exec "$nsp-server" taskset -c "$LOAD_CPU" nginx -c "$work/app.conf" &
pids+=($!)

ns client "$bin/weft" init --exclude-outbound-ports 8081 >/dev/null 2>&1
ns server "$bin/weft" init --inbound-ports 8080 --exclude-inbound-ports 15000 >/dev/null 2>&1
chmod 755 "$work"
sidecar() { # pod
  mkdir -p "$work/$1-state"
  echo "admin: { address: 127.0.0.1:15000 }" >"$work/$1-boot.yaml"
  chown -R 1337:1337 "$work/$1-state" "$work/$1.token"
  ip netns exec "$nsp-$1" taskset -c "$PROXY_CPU" setpriv --reuid 1337 --regid 1337 --clear-groups \
    "$bin/weft" run --workers 1 --config "$work/$1-boot.yaml" \
    --control-plane https://10.77.0.254:18000 --state-dir "$work/$1-state" \
    --join-token-file "$work/$1.token" 2>"$work/$1.log" &
  pids+=($!)
}
sidecar server
sidecar client
ready() {
  for _ in $(seq 300); do
    grep -q "name=sidecar-outbound " "$work/$1.log" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "the $1 sidecar did not start:" >&2
  cat "$work/$1.log" >&2
  exit 1
}
ready server
ready client
client_pid=${pids[-1]}
server_pid=${pids[-2]}
ns client curl -sf --max-time 10 "http://$VIP/" >/dev/null || {
  echo "the VIP does not answer through the sidecars" >&2
  exit 1
}

# One fixed-rate run: prints "p50_us p99_us client_cpu_us_per_req server_cpu_us_per_req".
run_rate() { # url rate
  local url=$1 rate=$2 n log c0 s0 c1 s1
  n=$((rate * DURATION))
  log="$work/h2load.log"
  rm -f "$log"
  c0=$(cpu_ticks "$client_pid")
  s0=$(cpu_ticks "$server_pid")
  ns client taskset -c "$LOAD_CPU" h2load --h1 -c "$CONNS" -n "$n" --rps=$((rate / CONNS)) \
    --log-file="$log" "$url" >"$work/h2load.out" 2>&1
  c1=$(cpu_ticks "$client_pid")
  s1=$(cpu_ticks "$server_pid")
  grep -q " 0 failed, 0 errored, 0 timeout" "$work/h2load.out" || {
    grep -E "requests:" "$work/h2load.out" >&2
  }
  awk '{ print $3 }' "$log" | sort -n | awk -v c="$((c1 - c0))" -v s="$((s1 - s0))" -v tick="$TICK" -v n="$n" '
    { v[NR] = $1 } END { printf "%.0f %.0f %.1f %.1f\n", v[int(NR*0.5)], v[int(NR*0.99)], c * 1000000 / tick / n, s * 1000000 / tick / n }'
}

declare -A R
for rate in $RATES; do
  for round in $(seq "$ROUNDS"); do
    echo "rate $rate, round $round" >&2
    R[direct$rate]+="$(run_rate "http://10.77.0.2:8081/" "$rate")"$'\n'
    R[mesh$rate]+="$(run_rate "http://$VIP/" "$rate")"$'\n'
  done
done
rss() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }

echo
printf '%-8s %-10s %9s %9s %16s %16s\n' "rate" "path" "p50 µs" "p99 µs" "client CPU µs/r" "server CPU µs/r"
for rate in $RATES; do
  for path in direct mesh; do
    printf '%-8s %-10s %9s %9s %16s %16s\n' "$rate/s" "$path" "$(col "$path$rate" 1)" "$(col "$path$rate" 2)" \
      "$([ "$path" = mesh ] && col "$path$rate" 3 || echo -)" "$([ "$path" = mesh ] && col "$path$rate" 4 || echo -)"
  done
done
echo
for rate in $RATES; do
  d50=$(col "direct$rate" 1) d99=$(col "direct$rate" 2) m50=$(col "mesh$rate" 1) m99=$(col "mesh$rate" 2)
  c=$(col "mesh$rate" 3) s=$(col "mesh$rate" 4)
  echo "at $rate req/s: two sidecars add p50 $(delta "$((m50))" "$((d50))" | sed 's/\.00//') µs, p99 $(delta "$((m99))" "$((d99))" | sed 's/\.00//') µs (direct p99 ${d99} µs, ratio $(ratio "$m99" "$d99")x); CPU per request: client sidecar $c µs, server sidecar $s µs (Istio's anchor: 200 µs); vCPU per 1,000 req/s: client $(awk -v c="$c" 'BEGIN { printf "%.3f", c / 1000 }'), server $(awk -v s="$s" 'BEGIN { printf "%.3f", s / 1000 }') (Istio: 0.2)"
done
echo "RSS after load: client sidecar $(rss "$client_pid") MiB, server sidecar $(rss "$server_pid") MiB (Linkerd's proxy ≈ 26 MB, Istio's sidecar ≈ 60 MB)"
