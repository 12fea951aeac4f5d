#!/usr/bin/env bash
# Benchmarks TLS in one run: flexnbd serve without TLS ("plain"), flexnbd
# serve --tls require ("tls"), and nbdkit's file plugin with --tls=require
# ("nbdkit-tls"), same image and clients (nbdcopy, fio), over TCP; prints
# the medians and flexnbd TLS's ratio to each.
#
#   bench/tls-bench.sh               # 1 GiB image, 3 reps, 10 s fio
#   QUICK=1 bench/tls-bench.sh       # smoke run (64 MiB, 1 rep, 3 s fio)
#
# Certificates are made here (bench/make-certs.sh: a CA, a server
# certificate for 127.0.0.1, a client certificate); the clients find theirs where libnbd
# looks by default ($HOME/.pki/libnbd), so plain nbds:// URIs work for
# nbdcopy and fio alike. Needs the shared harness's nbd-bench
# (BENCH_HARNESS, default ../shared/bench beside the checkout).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
HARNESS=${BENCH_HARNESS:-$ROOT/../shared/bench}
[ -x "$HARNESS/nbd-bench" ] || { echo "nbd-bench not found in $HARNESS (set BENCH_HARNESS)" >&2; exit 1; }
(cd "$ROOT" && cargo build --release --quiet)
BIN=$ROOT/target/release/flexnbd
OUT=${OUT:-$HERE/results}
mkdir -p "$OUT"
TSV=${TSV:-$OUT/tls-$(date +%Y%m%d-%H%M%S).tsv}
WORKLOADS=${WORKLOADS:-seqread-c1,seqwrite,randread4k,randwrite4k}
if [ -n "${QUICK:-}" ]; then
    ARGS=(--size 64M --reps 1 --fio-runtime 3)
else
    ARGS=(--size "${SIZE:-1G}" --reps "${REPS:-3}" --fio-runtime "${FIO_RUNTIME:-10}")
fi
DIR=$(mktemp -d /dev/shm/tls-bench.XXXXXX 2>/dev/null || mktemp -d)
trap 'rm -rf "$DIR"' EXIT
"$HARNESS/nbd-bench" --prepare-only --dir "$DIR" "${ARGS[@]}" >/dev/null

PKI=$DIR/pki
"$HERE/make-certs.sh" "$PKI"
mkdir -p "$DIR/home/.pki/libnbd"
cp "$PKI/ca-cert.pem" "$PKI/client-cert.pem" "$PKI/client-key.pem" "$DIR/home/.pki/libnbd/"
export HOME=$DIR/home

run() { "$HARNESS/nbd-bench" --dir "$DIR" --tsv "$TSV" --workloads "$WORKLOADS" --transports tcp "${ARGS[@]}" "$@"; }
run --name plain --start "exec $BIN serve --addr 127.0.0.1 --port \$PORT --file \$FILE"
run --name tls --uri-tcp 'nbds://127.0.0.1:$PORT' \
    --start "exec $BIN serve --addr 127.0.0.1 --port \$PORT --file \$FILE --tls require --tls-certificates $PKI"
if command -v nbdkit >/dev/null; then
    run --name nbdkit-tls --uri-tcp 'nbds://127.0.0.1:$PORT' \
        --start "exec nbdkit -f -i 127.0.0.1 -p \$PORT --tls=require --tls-certificates=$PKI file \$FILE"
fi
python3 "$HERE/ratios.py" "$TSV" tls | tee "${TSV%.tsv}-ratios.md"
