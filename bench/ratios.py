#!/usr/bin/env python3
"""ratios.py TSV CANDIDATE: the candidate's median as a ratio of each peer's,
per workload and transport (higher is better for the candidate; for times,
the ratio is peer/candidate so that higher is still better)."""
import csv
import statistics
import sys

LOWER_IS_BETTER = {'sparsecopy', 'randread4k-p99', 'randwrite4k-p99', 'seqwrite-c1-p99'}
SKIP = {'seqwrite-verify', 'sparse-mapdata'}


def main():
    path, cand = sys.argv[1], sys.argv[2]
    vals = {}
    for r in csv.DictReader(open(path), delimiter='\t'):
        if r['workload'] in SKIP or r['name'] in ('bounds',) or r['name'].startswith('limit-'):
            continue
        try:
            v = [float(x) for x in r['values'].split(',') if x]
        except ValueError:
            continue
        vals.setdefault((r['name'], r['workload'], r['transport']), []).extend(v)
    med = {k: statistics.median(v) for k, v in vals.items() if v}
    peers = sorted({n for (n, _, _) in med if n != cand})
    keys = sorted({(w, t) for (n, w, t) in med if n == cand})
    print('| workload | transport | %s | %s |' % (cand, ' | '.join('%s | ratio' % p for p in peers)))
    print('|---|---|---|%s' % ('---|---|' * len(peers)))
    for w, t in keys:
        c = med[(cand, w, t)]
        cells = []
        for p in peers:
            pv = med.get((p, w, t))
            if pv is None or pv == 0 or c == 0:
                cells += ['', '']
                continue
            ratio = pv / c if w in LOWER_IS_BETTER else c / pv
            cells += ['%.4g' % pv, '%.2fx' % ratio]
        print('| %s | %s | %.4g | %s |' % (w, t, c, ' | '.join(cells)))


if __name__ == '__main__':
    main()
