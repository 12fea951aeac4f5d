#!/usr/bin/env bash
# Benchmarks live migration of `flexnbd` (serve -> mirror -> listen) with the
# shared harness's migrate-bench: plain (1 GiB random), load (the same under a
# random 4 KiB write load) and sparse (8 GiB with 64 MiB of data, on /tmp).
# Each run checks that the destination ends up identical to the source.
#
#   bench/migrate-bench.sh                   # plain load sparse, 3 reps each
#   REPS=1 bench/migrate-bench.sh            # one of each
#   bench/migrate-bench.sh sparse plain-tmp  # chosen variants
#
# Builds the release binary first. Needs the shared harness (BENCH_HARNESS,
# default ../shared/bench beside the checkout) and, for `load`, fio (or
# LOAD_TOOL=python with python3-libnbd). Results go to OUT (default
# bench/results/): the TSV, the servers' logs, and a summary per run.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/../shared/bench}
[ -x "$HARNESS/migrate-bench" ] || { echo "migrate-bench not found at $HARNESS (set BENCH_HARNESS)" >&2; exit 1; }

(cd "$ROOT" && cargo build --release --quiet)
export FLEXNBD=$ROOT/target/release/flexnbd
export NAME=${NAME:-flexnbd}
export OUT=${OUT:-$HERE/results}
STAMP=$(date +%Y%m%d-%H%M%S)
export TSV=${TSV:-$OUT/migrate-$STAMP.tsv}
mkdir -p "$OUT"
[ $# -eq 0 ] && set -- plain load sparse
"$HARNESS/migrate-bench" "$@" | tee "$OUT/migrate-$STAMP.summary"
