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
. "$(dirname "$0")/lib.sh"
bench_init tls

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
