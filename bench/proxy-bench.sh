#!/usr/bin/env bash
# Benchmarks `flexnbd proxy` against direct access to the same server in one
# run: flexnbd serve alone ("direct"), flexnbd serve behind flexnbd proxy
# ("proxy"), and behind nbdkit's nbd plugin ("nbdkit-proxy", a peer doing
# the same hop; NO_NBDKIT=1 skips it), same images and clients (nbdcopy,
# fio), TCP and unix; prints the medians and the proxy's ratio to each.
#
#   bench/proxy-bench.sh               # 1 GiB image, 3 reps, 10 s fio
#   QUICK=1 bench/proxy-bench.sh       # smoke run (64 MiB, 1 rep, 3 s fio)
#
# Needs the shared harness's nbd-bench (BENCH_HARNESS, default ../shared/bench
# beside the checkout). Results go to OUT (default bench/results/).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
bench_init proxy

# The upstream listens beside the proxy: TCP on PORT+1, unix on SOCK.up. The
# proxy starts once the upstream answers (it refuses to start without one).
UP_TCP='P2=$((PORT+1)); '"$BIN"' serve --addr 127.0.0.1 --port $P2 --file $FILE & until nbdinfo --size nbd://127.0.0.1:$P2 >/dev/null 2>&1; do sleep 0.05; done; '
UP_UNIX="$BIN"' serve --unix $SOCK.up --file $FILE & until nbdinfo --size "nbd+unix:///?socket=$SOCK.up" >/dev/null 2>&1; do sleep 0.05; done; '

"$HARNESS/nbd-bench" --name direct --dir "$DIR" --tsv "$TSV" --workloads "$WORKLOADS" "${ARGS[@]}" \
    --start "exec $BIN serve --addr 127.0.0.1 --port \$PORT --file \$FILE" \
    --start-unix "exec $BIN serve --unix \$SOCK --file \$FILE"
"$HARNESS/nbd-bench" --name proxy --dir "$DIR" --tsv "$TSV" --workloads "$WORKLOADS" "${ARGS[@]}" \
    --start "$UP_TCP exec $BIN proxy --addr 127.0.0.1 --port \$PORT --conn-addr 127.0.0.1 --conn-port \$P2" \
    --start-unix "$UP_UNIX exec $BIN proxy --unix \$SOCK --conn-unix \$SOCK.up"
# nbdkit's nbd plugin is the same kind of hop: a peer's proxy in the same run.
if command -v nbdkit >/dev/null && [ -z "${NO_NBDKIT:-}" ]; then
    "$HARNESS/nbd-bench" --name nbdkit-proxy --dir "$DIR" --tsv "$TSV" --workloads "$WORKLOADS" "${ARGS[@]}" \
        --start "$UP_TCP exec nbdkit -f --exit-with-parent -i 127.0.0.1 -p \$PORT nbd hostname=127.0.0.1 port=\$P2" \
        --start-unix "$UP_UNIX exec nbdkit -f --exit-with-parent -U \$SOCK nbd socket=\$SOCK.up"
fi
python3 "$HERE/ratios.py" "$TSV" proxy | tee "${TSV%.tsv}-ratios.md"
