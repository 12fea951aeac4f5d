#!/usr/bin/env bash
# A migration against nbdcopy copying the same image between the same two
# servers, side by side in one run: for each rep, a 1 GiB random image
# (tmpfs) is (a) copied by `nbdcopy` from a `flexnbd serve` to a `flexnbd
# serve` on a sparse file, and (b) migrated by `flexnbd mirror --wait` from a
# `flexnbd serve` to a `flexnbd listen` on a sparse file; both destinations
# are checked against the source. Prints each time and the medians' ratio
# (migration time / nbdcopy time; 1.2 or less is the target).
#
#   bench/migrate-vs-nbdcopy.sh            # 1 GiB, 3 reps
#   SIZE=256M REPS=1 bench/migrate-vs-nbdcopy.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
(cd "$ROOT" && cargo build --release --quiet)
BIN=$ROOT/target/release/flexnbd
SIZE=${SIZE:-1G}
REPS=${REPS:-3}
DIR=$(mktemp -d /dev/shm/migrate-vs-nbdcopy.XXXXXX 2>/dev/null || mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
port() { echo $((20000 + RANDOM % 20000)); }
ready() { until nbdinfo --size "nbd://127.0.0.1:$1" >/dev/null 2>&1; do sleep 0.02; done; }
now() { date +%s.%N; }
head -c "$(numfmt --from=iec "$SIZE")" /dev/urandom > "$DIR/src"
want=$(md5sum < "$DIR/src")
copy=() mig=()
for rep in $(seq "$REPS"); do
    # (a) nbdcopy between two servers.
    cp "$DIR/src" "$DIR/a.src"; rm -f "$DIR/a.dst"; truncate -s "$SIZE" "$DIR/a.dst"
    p1=$(port); p2=$(port)
    "$BIN" serve --addr 127.0.0.1 --port "$p1" --file "$DIR/a.src" & pids+=($!); s1=$!
    "$BIN" serve --addr 127.0.0.1 --port "$p2" --file "$DIR/a.dst" & pids+=($!); s2=$!
    ready "$p1"; ready "$p2"
    t0=$(now); nbdcopy --flush "nbd://127.0.0.1:$p1" "nbd://127.0.0.1:$p2"; t1=$(now)
    kill "$s1" "$s2"; wait "$s1" "$s2" 2>/dev/null || true
    [ "$(md5sum < "$DIR/a.dst")" = "$want" ] || { echo "nbdcopy: destination differs" >&2; exit 1; }
    copy+=("$(echo "$t1 - $t0" | bc -l)")
    # (b) the migration between the same kind of servers.
    cp "$DIR/src" "$DIR/b.src"; rm -f "$DIR/b.dst"; truncate -s "$SIZE" "$DIR/b.dst"
    p1=$(port); p2=$(port)
    "$BIN" serve --addr 127.0.0.1 --port "$p1" --file "$DIR/b.src" --sock "$DIR/ctl" & pids+=($!); s1=$!
    # The listener's log says when it listens (a probe connection would
    # look like a migration that went away).
    "$BIN" listen --addr 127.0.0.1 --port "$p2" --file "$DIR/b.dst" --sock "$DIR/ctl2" -v 2> "$DIR/listen.log" & pids+=($!); s2=$!
    ready "$p1"; until [ -S "$DIR/ctl" ] && grep -q "listening on" "$DIR/listen.log"; do sleep 0.02; done
    t0=$(now); "$BIN" mirror --sock "$DIR/ctl" --addr 127.0.0.1 --port "$p2" --wait >/dev/null; t1=$(now)
    wait "$s1" 2>/dev/null || true
    kill "$s2"; wait "$s2" 2>/dev/null || true
    [ "$(md5sum < "$DIR/b.dst")" = "$want" ] || { echo "migration: destination differs" >&2; exit 1; }
    mig+=("$(echo "$t1 - $t0" | bc -l)")
    printf 'rep %s: nbdcopy %.2f s, migration %.2f s\n' "$rep" "${copy[-1]}" "${mig[-1]}"
    rm -f "$DIR/ctl" "$DIR/ctl2"
done
med() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mc=$(med "${copy[@]}"); mm=$(med "${mig[@]}")
printf '| size | nbdcopy (median s) | migration (median s) | migration / nbdcopy |\n|---|---|---|---|\n'
printf '| %s | %.2f | %.2f | %.2fx |\n' "$SIZE" "$mc" "$mm" "$(echo "$mm / $mc" | bc -l)"
