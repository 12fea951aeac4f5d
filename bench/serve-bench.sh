#!/usr/bin/env bash
# Benchmarks `flexnbd serve` side by side with nbdkit's file plugin and qemu-nbd
# in one run (same images, same machine, same clients: nbdcopy and fio), over
# TCP and unix sockets, then prints the medians and flexnbd's ratio to each peer.
#
#   bench/serve-bench.sh                 # full run (1 GiB image, 3 reps, 10 s fio)
#   QUICK=1 bench/serve-bench.sh         # smoke run
#   ROUNDS=2 PEERS="nbdkit-file" bench/serve-bench.sh
#
# Needs the shared harness (nbd-bench, peers.sh, bench-table): BENCH_HARNESS,
# default ../shared/bench beside the checkout. Results go to OUT (default
# bench/results/, ignored by git).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/../shared/bench}
[ -x "$HARNESS/peers.sh" ] || { echo "benchmark harness not found at $HARNESS (set BENCH_HARNESS)" >&2; exit 1; }

(cd "$ROOT" && cargo build --release --quiet)
BIN=$ROOT/target/release/flexnbd
export OUT=${OUT:-$HERE/results}
export TSV=${TSV:-$OUT/serve-$(date +%Y%m%d-%H%M%S).tsv}
export PEERS=${PEERS:-nbdkit-file qemu-nbd}
export CANDIDATE_NAME=flexnbd
export CANDIDATE_START="exec $BIN serve --addr 127.0.0.1 --port \$PORT --file \$FILE"
export CANDIDATE_START_UNIX="exec $BIN serve --unix \$SOCK --file \$FILE"
mkdir -p "$OUT"
"$HARNESS/peers.sh"
python3 "$HERE/ratios.py" "$TSV" flexnbd | tee "${TSV%.tsv}-ratios.md"
