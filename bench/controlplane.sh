#!/usr/bin/env bash
# Control-plane fan-out: 1,000 simulated proxy streams (one process) subscribed to one weft-cp;
# time from `apply` to the last ACK, and weft-cp's memory.
#
#   bench/controlplane.sh                  # PROXIES=1000 ROUNDS=5
set -euo pipefail
cd "$(dirname "$0")/.."
echo "building weft-cp (release)..." >&2
cargo build --release -q -p weft-controlplane --bin weft-cp
WEFT_CP_BIN=$PWD/target/release/weft-cp cargo bench -q -p weft-controlplane --bench fanout
