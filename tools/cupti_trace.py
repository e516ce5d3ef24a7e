#!/usr/bin/env python3
"""Where the device idles inside one NVTX range (a training step), from tools/cupti_trace.sh's CSV.

The range's device work is every kernel, copy and memset whose runtime call was made inside the
range (CUPTI's correlation ids). Between consecutive pieces of work the device is idle; each gap
is put down to
  - the host, when the next piece's runtime call began after the device had gone idle (the host
    was busy elsewhere: a synchronisation, a host computation, the allocator); the host calls
    made meanwhile are listed;
  - the launch latency, when the call had been made before (the queue was not empty).
Then the range's device time by kernel and by family (GEMM, attention, other kernels, memsets,
copies), each piece counted once: a kernel that starts before the one ahead of it has ended
(programmatic dependent launch) counts only from that end.

  python3 tools/cupti_trace.py trace.csv[.gz] [--range step_3] [--top 20] [--kernels 30]
"""
import argparse
import bisect
import collections
import csv
import gzip
import re
import shutil
import subprocess
import sys

def blocking(name, dur_ns):
    """A call that waits for the device: a synchronisation, or a copy that took the host > 20 us
    (a pageable copy waits for the stream)."""
    return bool(SYNC.search(name)) or ("Memcpy" in name and dur_ns > 20e3)


SYNC = re.compile(r"Synchronize|^cudaMemcpy(_v\d+)?$|^cuMemcpyDtoH|^cuMemcpyHtoD(_v\d+)?$|^cudaMalloc|^cudaFree|^cuMemAlloc|^cuMemFree")


def load(path):
    work, api, marks = [], {}, {}
    api_rows = []
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        for r in csv.DictReader(f):
            k = r["kind"]
            s, e, w, c, n = int(r["start_ns"]), int(r["end_ns"]), int(r["where"]), int(r["corr"]), r["name"]
            if k in "KCS":
                work.append((s, e, k, w, c, n))
            elif k in "AD":  # a runtime call and the driver call it makes share the correlation
                if c not in api or s < api[c][0]:
                    api[c] = (s, e, n)
                api_rows.append((s, e, n, w))
            elif k == "M":
                m = marks.setdefault(c, [None, None, None])
                if s:
                    m[0], m[2] = s, n
                else:
                    m[1] = e
    ranges = [(m[2], m[0], m[1]) for m in marks.values() if m[0] and m[1] and m[2]]
    return work, api, sorted(api_rows), sorted(ranges, key=lambda x: x[1])


def short(n):
    return re.sub(r"\(.*", "", n)[:70]


def demangled(names):
    """{mangled: demangled} through c++filt where it is installed (else the names themselves)."""
    names = sorted(set(names))
    if not names or not shutil.which("c++filt"):
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return {n: (out[i] if i < len(out) and out[i] else n) for i, n in enumerate(names)}


def kernel_label(kind, name, plain):
    """A kernel's function name without scopes, template arguments and parameters (cuBLAS's
    nvjet and cuDNN's generated kernels keep their names); a memset or copy: its kind and bytes."""
    if kind == "S":
        return "memset " + name
    if kind == "C":
        return "copy " + name
    d = plain.get(name, name)
    if d == name and not name.startswith("_Z"):
        return name[:70]
    d = re.sub(r"\(.*$", "", d.replace("(anonymous namespace)", "anon"))
    while re.search(r"<[^<>]*>", d):
        d = re.sub(r"<[^<>]*>", "", d)
    return d.split("::")[-1].split(" ")[-1][:70] or name[:70]


def family(kind, name):
    if kind == "S":
        return "memsets"
    if kind == "C":
        return "copies"
    if re.search(r"nvjet|gemm|splitKreduce|cutlass", name, re.I):
        return "GEMM"
    if re.search(r"cudnn|sdpa|flash|attention|fmha", name, re.I):
        return "attention"
    return "other kernels"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--range", help="NVTX range name (default: the last step_<N>)")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--kernels", type=int, default=30, help="rows of the device time by kernel")
    a = ap.parse_args()
    work, api, api_rows, ranges = load(a.csv)
    steps = [r for r in ranges if (r[0] == a.range if a.range else re.fullmatch(r"step_\d+", r[0]))]
    if not steps:
        sys.exit(f"{a.csv}: no NVTX range {a.range or 'step_<N>'} (ranges: {sorted({r[0] for r in ranges})[:20]})")
    name, r0, r1 = steps[-1]
    api_rows = [x for x in api_rows if r0 <= x[0] <= r1]
    inside = {c for c, (s, e, n) in api.items() if r0 <= s <= r1}
    w = sorted(x for x in work if x[4] in inside)
    if not w:
        sys.exit(f"{a.csv}: range {name} launched no device work")
    counts = collections.Counter(x[2] for x in w)
    busy = w[0][1] - w[0][0]
    idle = host_late = latency = 0
    gaps = []
    end = w[0][1]
    busy_start = w[0][0]
    prev = w[0]
    for x in w[1:]:
        s, e = x[0], x[1]
        if s > end:
            gap = s - end
            launch = api.get(x[4], (s, s, "?"))[0]
            if launch > end:  # the call came after the device went idle
                h = min(gap, launch - end)
                calls = collections.Counter(n for (cs, ce, n, t) in api_rows if end <= cs < launch)
                syncs = [(ce - cs, n) for (cs, ce, n, t) in api_rows if cs < launch and ce > end and blocking(n, ce - cs)]
                why = ", ".join(f"{n} x{c}" for n, c in calls.most_common(4))
                if syncs:
                    why = "; ".join(x for x in ("after " + max(syncs)[1], why) if x)
            else:
                h, why = 0, "launch latency"
            host_late += h
            latency += gap - h
            idle += gap
            gaps.append((gap, h, short(prev[5]), short(x[5]), why))
        if e > end:
            busy += e - max(s, end)
            end = e
            prev = x
    span = end - busy_start
    print(f"range {name}: host {(r1 - r0) / 1e6:.3f} ms; device work {len(w)} "
          f"({counts['K']} kernels, {counts['C']} copies, {counts['S']} memsets), "
          f"first start to last end {span / 1e6:.3f} ms")
    print(f"  device busy {busy / 1e6:.3f} ms, idle {idle / 1e6:.3f} ms in {len(gaps)} gaps: "
          f"host late {host_late / 1e6:.3f} ms, launch latency {latency / 1e6:.3f} ms "
          f"({latency / 1e3 / max(1, len(gaps)):.2f} us a gap)")
    print(f"  before the first work {(busy_start - r0) / 1e6:.3f} ms after the range began; "
          f"the range ends {(r1 - end) / 1e6:.3f} ms after the last work")
    hist = collections.Counter()
    for g, h, p, n, why in gaps:
        hist["<2us" if g < 2e3 else "2-5us" if g < 5e3 else "5-20us" if g < 20e3 else "20-100us" if g < 100e3 else ">=100us"] += g
    print("  idle by gap size (ms): " + ", ".join(f"{k} {hist[k] / 1e6:.3f}" for k in ["<2us", "2-5us", "5-20us", "20-100us", ">=100us"]))
    print(f"\ntop {a.top} gaps:")
    print(f"{'gap us':>9}{'host us':>9}  after -> before / why")
    for g, h, p, n, why in sorted(gaps, reverse=True)[: a.top]:
        print(f"{g / 1e3:>9.1f}{h / 1e3:>9.1f}  {p} -> {n}\n{'':20}{why}")
    # Copies and memsets: by size, with the next kernel (a library's memset precedes its kernel).
    kernels = [x for x in w if x[2] == "K"]
    small = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    ki = 0
    for x in w:
        if x[2] == "K":
            continue
        while ki < len(kernels) and kernels[ki][0] < x[0]:
            ki += 1
        key = ("memset " if x[2] == "S" else "copy ") + x[5]
        small[key][0] += 1
        small[key][1] += x[1] - x[0]
        small[key][2][short(kernels[ki][5]) if ki < len(kernels) else "(end)"] += 1
    print("\ncopies and memsets (count, device us; the kernel after them):")
    for key, (c, t, nxt) in sorted(small.items(), key=lambda x: -x[1][0])[:12]:
        print(f"  {c:5d} {t / 1e3:8.1f}  {key:22s} -> " + ", ".join(f"{n} x{k}" for n, k in nxt.most_common(2)))
    # Each blocking call: when, how long the host waited, how long until its next device work.
    print("\nblocking calls (ms into the range, host wait us, device idle after it us, the next work):")
    starts = [x[0] for x in w]
    for (cs, ce, n, t) in api_rows:
        if not (r0 <= cs <= r1 and blocking(n, ce - cs)):
            continue
        i = bisect.bisect_left(starts, ce)
        nxt = w[i] if i < len(w) else None
        idle_after = (nxt[0] - ce) / 1e3 if nxt else float("nan")
        print(f"  {(cs - r0) / 1e6:8.3f} {(ce - cs) / 1e3:9.1f} {idle_after:9.1f}  {n} -> {short(nxt[5]) if nxt else '(none)'}")
    sync_calls = [(ce - cs, n) for (cs, ce, n, t) in api_rows if r0 <= cs <= r1 and blocking(n, ce - cs)]
    print(f"\nblocking calls in the range: {len(sync_calls)}, {sum(d for d, _ in sync_calls) / 1e6:.3f} ms")
    for n, c in collections.Counter(n for _, n in sync_calls).most_common(10):
        print(f"  {c:5d}  {n}")
    per_api = collections.defaultdict(lambda: [0, 0])
    for (cs, ce, n, t) in api_rows:
        if r0 <= cs <= r1:
            per_api[n][0] += 1
            per_api[n][1] += ce - cs
    print("\nhost time in runtime and driver calls (a runtime call includes the driver calls it makes; top 12):")
    for n, (c, t) in sorted(per_api.items(), key=lambda x: -x[1][1])[:12]:
        print(f"  {t / 1e6:8.3f} ms {c:6d}  {n}")
    # Device time by kernel: each piece from the later of its start and the end of all work before
    # it, so that PDL's early starts (a kernel waiting in griddepcontrol.wait) count once.
    plain = demangled(x[5] for x in w if x[2] == "K")
    by_kernel = collections.defaultdict(lambda: [0, 0, 0])
    by_family = collections.Counter()
    end = w[0][0]
    for (s, e, k, t, c, n) in w:
        own = max(0, e - max(s, end))
        end = max(end, e)
        row = by_kernel[kernel_label(k, n, plain)]
        row[0] += 1
        row[1] += own
        row[2] += e - s
        by_family[family(k, n)] += own
    total = sum(by_family.values())
    print(f"\ndevice time by kernel (ms counted once, ms start to end, calls; top {a.kernels} of {len(by_kernel)}):")
    for label, (c, own, full) in sorted(by_kernel.items(), key=lambda x: -x[1][1])[: a.kernels]:
        print(f"  {own / 1e6:8.3f} {full / 1e6:8.3f} {c:6d}  {label}")
    print(f"device time by family (ms, of {total / 1e6:.3f}): " +
          ", ".join(f"{f} {t / 1e6:.3f}" for f, t in by_family.most_common()))


if __name__ == "__main__":
    main()
