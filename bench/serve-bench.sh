#!/usr/bin/env bash
# Benchmarks `flexnbd serve` side by side with its peers in one run (same
# images, same machine, same clients: nbdcopy and fio), over TCP and unix
# sockets: nbdkit's file plugin, qemu-nbd (writethrough and writeback),
# nbd-server, and the C flexnbd when FLEXNBD_C names its binary. Prints the
# medians with flexnbd's ratio to each peer, then what each server costs:
# throughput, p99 and server CPU per request (4 KiB random) or per MiB
# (sequential), with flexnbd's CPU as a ratio to the cheapest peer's.
#
#   bench/serve-bench.sh                 # full run (1 GiB tmpfs image, 3 reps, 10 s fio)
#   IMGBASE=/var/tmp bench/serve-bench.sh   # images on that file system (e.g. ext4)
#   FLEXNBD_C=/path/to/c/flexnbd bench/serve-bench.sh
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
export PEERS=${PEERS:-nbdkit-file qemu-nbd qemu-nbd-wb nbd-server${FLEXNBD_C:+ flexnbd-c}}
[ -n "${FLEXNBD_C:-}" ] && export FLEXNBD=$FLEXNBD_C
export CANDIDATE_NAME=flexnbd
export CANDIDATE_START="exec $BIN serve --addr 127.0.0.1 --port \$PORT --file \$FILE"
export CANDIDATE_START_UNIX="exec $BIN serve --unix \$SOCK --file \$FILE"
# The harness's defaults, set here so the cost table knows them too.
[ -n "${QUICK:-}" ] && { SIZE=${SIZE:-256M}; FIO_RUNTIME=${FIO_RUNTIME:-3}; }
export SIZE=${SIZE:-1G} FIO_RUNTIME=${FIO_RUNTIME:-10}
mkdir -p "$OUT"
"$HARNESS/peers.sh"
python3 "$HERE/ratios.py" "$TSV" flexnbd | tee "${TSV%.tsv}-ratios.md"
size_mib=$(numfmt --from=iec "$SIZE" | awk '{print $1 / 1048576}')
python3 "$HERE/cost.py" "$TSV" "$size_mib" "$FIO_RUNTIME" | tee "${TSV%.tsv}-cost.md"
