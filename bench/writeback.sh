#!/usr/bin/env bash
# What a long sequential write leaves for its FLUSH: `nbdcopy` (no --flush)
# copies 1 GiB of random data into `flexnbd serve` on an image on IMGBASE
# (default /var/tmp, a disk), while /proc/meminfo is sampled for the peak of
# Dirty; then one FLUSH is timed (libnbd from Debian's python3-libnbd).
# BINS names the builds to compare side by side, REPS the rounds.
#
#   bench/writeback.sh
#   BINS="/tmp/flexnbd-old target/release/flexnbd" REPS=3 bench/writeback.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${BINS:-}" ] || { (cd "$ROOT" && cargo build --release --quiet); BINS=$ROOT/target/release/flexnbd; }
DIR=$(mktemp -d "${IMGBASE:-/var/tmp}/flexnbd-writeback.XXXXXX")
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
dd if=/dev/urandom of="$DIR/src" bs=1M count=1024 status=none
truncate -s 1G "$DIR/img"
for r in $(seq "${REPS:-2}"); do
    for bin in $BINS; do
        sync
        "$bin" serve --unix "$DIR/sock" --file "$DIR/img" & PID=$!
        URI="nbd+unix:///?socket=$DIR/sock"
        for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
        ( peak=0; while kill -0 "$PID" 2>/dev/null && [ ! -e "$DIR/done" ]; do
              d=$(awk '/^Dirty:/ {print $2}' /proc/meminfo); [ "$d" -gt "$peak" ] && peak=$d
              sleep 0.1; done; echo "$peak" > "$DIR/peak" ) & SAMPLER=$!
        s=$(date +%s.%N); nbdcopy "$DIR/src" "$URI"; e=$(date +%s.%N)
        touch "$DIR/done"; wait "$SAMPLER" || true
        f=$(/usr/bin/python3 -c 'import nbd, sys, time
h = nbd.NBD(); h.connect_uri(sys.argv[1]); t = time.time(); h.flush(); print("%.2f" % (time.time() - t))' "$URI")
        printf '%s: copy %.2f s, dirty peak %d MiB, then FLUSH %s s\n' \
            "$bin" "$(echo "$e - $s" | bc)" $(( $(cat "$DIR/peak") / 1024 )) "$f"
        kill "$PID"; wait "$PID" 2>/dev/null || true; PID=
        rm -f "$DIR/done" "$DIR/sock"
    done
done
