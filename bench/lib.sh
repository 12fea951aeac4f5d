# Shared set-up of the side-by-side benches (proxy-bench.sh, tls-bench.sh);
# sourced, not run. `bench_init NAME` builds flexnbd and sets:
#   HERE ROOT HARNESS BIN OUT TSV WORKLOADS ARGS DIR
# (QUICK=1: 64 MiB, 1 rep, 3 s fio; else SIZE, REPS, FIO_RUNTIME), creates
# the images in DIR (removed at exit) and checks the shared harness
# (BENCH_HARNESS, default ../shared/bench beside the checkout).
bench_init() {
    HERE=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
    ROOT=$(cd "$HERE/.." && pwd)
    HARNESS=${BENCH_HARNESS:-$ROOT/../shared/bench}
    [ -x "$HARNESS/nbd-bench" ] || { echo "nbd-bench not found in $HARNESS (set BENCH_HARNESS)" >&2; exit 1; }
    (cd "$ROOT" && cargo build --release --quiet)
    BIN=$ROOT/target/release/flexnbd
    OUT=${OUT:-$HERE/results}
    mkdir -p "$OUT"
    TSV=${TSV:-$OUT/$1-$(date +%Y%m%d-%H%M%S).tsv}
    WORKLOADS=${WORKLOADS:-seqread-c1,seqwrite,randread4k,randwrite4k}
    if [ -n "${QUICK:-}" ]; then
        ARGS=(--size 64M --reps 1 --fio-runtime 3)
    else
        ARGS=(--size "${SIZE:-1G}" --reps "${REPS:-3}" --fio-runtime "${FIO_RUNTIME:-10}")
    fi
    DIR=$(mktemp -d "/dev/shm/$1-bench.XXXXXX" 2>/dev/null || mktemp -d)
    trap 'rm -rf "$DIR"' EXIT
    "$HARNESS/nbd-bench" --prepare-only --dir "$DIR" "${ARGS[@]}" >/dev/null
}
