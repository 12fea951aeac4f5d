#!/usr/bin/env python3
"""cost.py TSV [SIZE_MIB] [FIO_RUNTIME] [FIO_RAMP]: what each server costs,
from one side-by-side run of the shared harness (nbd-bench): per workload and
transport, every server's throughput, p99 latency (random workloads) and
server CPU time, per request for the 4 KiB random workloads (the server's
CPU covers fio's ramp and run, FIO_RAMP + FIO_RUNTIME seconds, taken at the
IOPS shown) and per MiB for the sequential ones (nbdcopy moves SIZE_MIB). Medians over the reps; the best peer of each row
is marked, and the candidate's CPU is given as a ratio to the cheapest peer."""
import csv
import statistics
import sys

SKIP = {'seqwrite-verify', 'sparse-mapdata'}


def median(s):
    try:
        v = [float(x) for x in s.split(',') if x]
    except ValueError:
        return None
    return statistics.median(v) if v else None


def main():
    path = sys.argv[1]
    size_mib = float(sys.argv[2]) if len(sys.argv) > 2 else 1024.0
    runtime = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    runtime += float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    cand = 'flexnbd'
    rows, p99 = {}, {}
    for r in csv.DictReader(open(path), delimiter='\t'):
        name, w, t = r['name'], r['workload'], r['transport']
        if w in SKIP or name == 'bounds' or name.startswith('limit-'):
            continue
        if w.endswith('-p99'):
            p99[(name, w[:-4], t)] = median(r['values'])
            continue
        val, cpu = median(r['values']), median(r['srv_cpu_s'] or '')
        if val is None:
            continue
        rows[(name, w, t)] = (val, r['unit'], cpu)
    keys = sorted({(w, t) for (_, w, t) in rows})
    print('| workload | transport | server | throughput | p99 (us) | server CPU | CPU ratio to cheapest peer |')
    print('|---|---|---|---|---|---|---|')
    for w, t in keys:
        names = sorted(n for (n, ww, tt) in rows if (ww, tt) == (w, t))
        per = {}
        for n in names:
            val, unit, cpu = rows[(n, w, t)]
            if cpu is None or val <= 0:
                per[n] = None
            elif w.startswith('rand'):
                per[n] = cpu / (val * runtime) * 1e6  # us per request
            elif unit == 's':
                per[n] = cpu  # whole run
            else:
                per[n] = cpu / size_mib * 1e3  # ms per MiB
        what = 'us/req' if w.startswith('rand') else ('s' if rows[(names[0], w, t)][1] == 's' else 'ms/MiB')
        peers = [per[n] for n in names if n != cand and per[n] is not None]
        cheapest = min(peers) if peers else None
        for n in names:
            val, unit, _ = rows[(n, w, t)]
            lat = p99.get((n, w, t))
            ratio = ''
            if n == cand and cheapest and per[n] is not None:
                ratio = '%.2fx' % (per[n] / cheapest)
            print('| %s | %s | %s | %.1f %s | %s | %s | %s |' % (
                w, t, n, val, unit, '%.0f' % lat if lat is not None else '',
                '%.2f %s' % (per[n], what) if per[n] is not None else '', ratio))


if __name__ == '__main__':
    main()
