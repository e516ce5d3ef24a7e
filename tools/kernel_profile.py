#!/usr/bin/env python3
"""Summarise an Nsight Compute CSV (--csv --page raw, metric gpu__time_duration.sum) by kernel kind.

Usage: tools/kernel_profile.py profile.csv [--top 30]
Prints the total GPU time, the time per kind (GEMM, attention, RMSNorm, ...) and the top kernels by
total time, with their count and mean duration.
"""
import argparse
import collections
import csv
import re
import sys

KINDS = [  # first match wins; patterns are searched in the demangled kernel name
    ("attention", r"sdpa|fmha|flash|attn|stats_kernel|ragged_aux"),
    ("gemm", r"gemm|nvjet|xmma|cutlass|cublas|splitK|sm90_"),
    ("rmsnorm", r"rms"),
    ("rope", r"rope"),
    ("swiglu", r"swiglu"),
    ("cross-entropy", r"ce_|cross|softmax|lse"),
    ("embedding", r"embed|gather_rows|scatter_rows|check_ids"),
    ("optimizer", r"adamw|scale_|clip"),
    ("norm/finite", r"sumsq|sum_partials|finite"),
    ("add/elementwise", r"add|axpy|elementwise|vectorized|unrolled"),
    ("cast/copy", r"cast|convert|copy|fill|memset"),
]
SLIM_COLUMNS = ["ID", "Kernel Name", "Grid Size", "Block Size", "Stream", "gpu__time_duration.sum"]
UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def kind(name):
    for k, pat in KINDS:
        if re.search(pat, name, re.I):
            return k
    return "other"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--slim", action="store_true",
                    help="rewrite the CSV with only the columns read here (ncu's raw page repeats "
                         "~250 device attributes on every row: ~2 KB a kernel)")
    a = ap.parse_args()
    lines = [l for l in open(a.csv, errors="replace") if l.startswith('"')]
    rows = list(csv.reader(lines))
    if len(rows) < 3:
        sys.exit(f"{a.csv}: no kernel rows")
    head, units = rows[0], rows[1]
    ki = head.index("Kernel Name")
    ti = head.index("gpu__time_duration.sum")
    if a.slim:
        keep = [head.index(c) for c in SLIM_COLUMNS if c in head]
        ki, ti = keep.index(ki), keep.index(ti)
        rows = [[r[i] if i < len(r) else "" for i in keep] for r in rows]
        head, units = rows[0], rows[1]
        with open(a.csv, "w", newline="") as f:
            csv.writer(f, quoting=csv.QUOTE_ALL).writerows(rows)
    scale = UNIT.get(units[ti], 1.0)
    per_kind = collections.Counter()
    per_name = collections.defaultdict(lambda: [0, 0.0])
    total = 0.0
    for r in rows[2:]:
        try:
            us = float(r[ti].replace(",", "")) * scale
        except ValueError:
            continue
        name = r[ki]
        short = re.sub(r"\(.*", "", name)[:110]
        per_kind[kind(name)] += us
        per_name[short][0] += 1
        per_name[short][1] += us
        total += us
    n = sum(c for c, _ in per_name.values())
    print(f"{a.csv}: {n} kernels, {total / 1e3:.1f} ms of GPU time")
    print(f"{'kind':<18}{'ms':>10}{'share':>8}")
    for k, us in per_kind.most_common():
        print(f"{k:<18}{us / 1e3:>10.2f}{100 * us / total:>7.1f}%")
    print(f"\ntop {a.top} kernels by total time:")
    print(f"{'ms':>9}{'count':>7}{'mean us':>10}  name")
    for name, (c, us) in sorted(per_name.items(), key=lambda x: -x[1][1])[: a.top]:
        print(f"{us / 1e3:>9.2f}{c:>7}{us / c:>10.1f}  {name}")


if __name__ == "__main__":
    main()
