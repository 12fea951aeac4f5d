#!/usr/bin/env bash
# Where one flexnbd server spends its CPU on one 4 KiB workload: fio
# (iodepth 32, 8 s) against `flexnbd serve`, `perf record -g` of the server
# for 4 s of it, then IOPS, p99, server CPU per request, how often its threads
# slept per request (voluntary context switches), the server's thread
# count mid-run and perf's top entries (by thread and symbol).
#
#   bench/profile.sh                       # randread, TCP, image on tmpfs
#   RW=randwrite T=unix bench/profile.sh
#   IMGBASE=/var/tmp BIN=/path/to/other/flexnbd bench/profile.sh
#   PROXY=1 T=unix bench/profile.sh        # `flexnbd proxy` in front of the
#                                          # server: the proxy is profiled
#
# Needs fio, nbdinfo and perf (Debian: linux-perf).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -n "${BIN:-}" ] || { (cd "$ROOT" && cargo build --release --quiet); BIN=$ROOT/target/release/flexnbd; }
RW=${RW:-randread} T=${T:-tcp} TOP=${TOP:-25}
DIR=$(mktemp -d "${IMGBASE:-/dev/shm}/flexnbd-profile.XXXXXX")
PID=
cleanup() { [ -n "$PID" ] && kill "$PID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
trap cleanup EXIT
dd if=/dev/urandom of="$DIR/img" bs=1M count=1024 status=none
if [ "$T" = unix ]; then
    "$BIN" serve --unix "$DIR/sock" --file "$DIR/img" 2>"$DIR/log" & URI="nbd+unix:///?socket=$DIR/sock"
else
    PORT=$((20000 + RANDOM % 20000))
    "$BIN" serve --addr 127.0.0.1 --port "$PORT" --file "$DIR/img" 2>"$DIR/log" & URI="nbd://127.0.0.1:$PORT"
fi
PID=$!
for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
nbdinfo --size "$URI" >/dev/null || { cat "$DIR/log" >&2; exit 1; }
if [ -n "${PROXY:-}" ]; then
    UPID=$PID
    if [ "$T" = unix ]; then
        "$BIN" proxy --unix "$DIR/psock" --conn-unix "$DIR/sock" 2>"$DIR/plog" & URI="nbd+unix:///?socket=$DIR/psock"
    else
        "$BIN" proxy --addr 127.0.0.1 --port $((PORT + 1)) --conn-addr 127.0.0.1 --conn-port "$PORT" 2>"$DIR/plog" &
        URI="nbd://127.0.0.1:$((PORT + 1))"
    fi
    PID=$!
    cleanup() { kill "$PID" "$UPID" 2>/dev/null; wait 2>/dev/null; rm -rf "$DIR"; }
    for _ in $(seq 100); do nbdinfo --size "$URI" >/dev/null 2>&1 && break; sleep 0.1; done
    nbdinfo --size "$URI" >/dev/null || { cat "$DIR/plog" >&2; exit 1; }
fi
cpu() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
# Context switches of every thread of the server (voluntary: it slept).
switches() { cat /proc/"$PID"/task/*/status | awk '/^voluntary_ctxt_switches/ {n += $2} END {print n}'; }
t0=$(cpu)
( sleep 2; s0=$(switches); perf record -F 1999 -g -o "$DIR/perf.data" -p "$PID" -- sleep 4 >/dev/null 2>&1
  echo $(( $(switches) - s0 )) > "$DIR/sleeps"
  grep Threads "/proc/$PID/status" ) & PERF=$!
fio --name="$RW" --ioengine=nbd --uri="$URI" --rw="$RW" --bs=4k --iodepth=32 --numjobs=1 \
    --time_based --runtime=8 --norandommap --randrepeat=0 \
    --output-format=json --output="$DIR/fio.json" >/dev/null 2>&1
t1=$(cpu)
wait "$PERF" || true
python3 - "$DIR/fio.json" "$t0" "$t1" "$(getconf CLK_TCK)" "$DIR/sleeps" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]
d = j["read"] if j["read"]["total_ios"] else j["write"]
ticks = (int(sys.argv[3]) - int(sys.argv[2])) / int(sys.argv[4])
# Sleeps counted over 4 s of the 8 s run (perf's window, ~4 s).
sleeps = int(open(sys.argv[5]).read()) / 4 * d["runtime"] / 1000
print("%.0f IOPS, p99 %d us, server CPU %.2f us/request, %.2f sleeps/request"
      % (d["iops"], d["clat_ns"]["percentile"]["99.000000"] / 1000,
         ticks / d["total_ios"] * 1e6, sleeps / d["total_ios"]))
PY
perf report -i "$DIR/perf.data" --no-children --sort comm,symbol --stdio 2>/dev/null \
    | grep -E '^ +[0-9]' | head -"$TOP"
