#!/usr/bin/env bash
# Control-plane fan-out: 10,000 simulated proxy streams (one process) spread over two weft-cp
# replicas on one etcd; time from an apply on replica 1 to the last ACK, bytes of a whole vs an
# incremental snapshot, memory per 1,000 proxies — and, in the same run, the same proxies on one
# weft-cp with its state in memory (no etcd, no replica), the figures set against it.
#
#   bench/controlplane.sh                  # PROXIES=10000 REPLICAS=2 ROUNDS=5 CLUSTERS=200
#   BASELINE=0 bench/controlplane.sh       # without the one-replica run
set -euo pipefail
cd "$(dirname "$0")/.."
command -v etcd >/dev/null || {
  echo "bench/controlplane.sh: etcd is missing (apt-get install etcd-server)" >&2
  exit 1
}
# 10,000 streams: more descriptors than the default soft limit.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "building weft-cp (release)..." >&2
cargo build --release -q -p weft-controlplane --bin weft-cp
export WEFT_CP_BIN=$PWD/target/release/weft-cp
run() { cargo bench -q -p weft-controlplane --bench fanout | tee /dev/stderr | grep '^RESULT'; }
replicas=$(STORE=etcd run)
if [ "${BASELINE:-1}" = 1 ]; then
  echo >&2
  baseline=$(STORE=memory REPLICAS=1 run)
  field() { sed -n "s/.*$2=\([0-9.]*\).*/\1/p" <<<"$1"; }
  for f in median_ms max_ms rss_per_1000_mib; do
    awk -v a="$(field "$replicas" $f)" -v b="$(field "$baseline" $f)" -v f="$f" \
      'BEGIN { printf "%s: %s on etcd with replicas vs %s on one replica in memory: %.2fx\n", f, a, b, (b > 0 ? a / b : 0) }'
  done
fi
