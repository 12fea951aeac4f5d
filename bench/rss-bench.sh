#!/usr/bin/env bash
# Peak server memory under many connections: one `flexnbd serve` on a tmpfs
# image, fio (ioengine=nbd, one connection per job) running each workload
# with JOBS connections at once (default 64), and the server's VmHWM (peak
# resident set) read from /proc after each workload.
#
#   bench/rss-bench.sh                 # 1 GiB image, 64 connections, 5 s each
#   JOBS=16 RUNTIME=3 bench/rss-bench.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
(cd "$ROOT" && cargo build --release --quiet)
BIN=$ROOT/target/release/flexnbd
JOBS=${JOBS:-64}
RUNTIME=${RUNTIME:-5}
SIZE=${SIZE:-1G}
DIR=$(mktemp -d /dev/shm/rss-bench.XXXXXX 2>/dev/null || mktemp -d)
PORT=$((20000 + RANDOM % 20000))
trap 'kill "$SRV" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"' EXIT
truncate -s "$SIZE" "$DIR/img"
"$BIN" serve --addr 127.0.0.1 --port "$PORT" --file "$DIR/img" &
SRV=$!
until nbdinfo --size "nbd://127.0.0.1:$PORT" >/dev/null 2>&1; do sleep 0.05; done
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$SRV/status"; }
printf '| workload | connections | server peak RSS (MiB) |\n|---|---|---|\n'
for w in randread:4k randwrite:4k read:1M write:1M; do
    rw=${w%%:*}; bs=${w##*:}
    fio --name=rss --ioengine=nbd --uri="nbd://127.0.0.1:$PORT" --rw="$rw" --bs="$bs" \
        --iodepth=8 --numjobs="$JOBS" --size="$SIZE" --time_based --runtime="$RUNTIME" \
        --group_reporting --output=/dev/null
    printf '| %s %s | %s | %.1f |\n' "$rw" "$bs" "$JOBS" "$(echo "$(hwm) / 1024" | bc -l)"
done
