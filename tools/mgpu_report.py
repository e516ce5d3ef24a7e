#!/usr/bin/env python3
"""Numbers for tools/multi_gpu_run.sh (no third-party packages: it runs here and on the device).

  mgpu_report.py metrics RUN REF       max relative difference of every step's loss and grad_norm
                                       (RUN/metrics.jsonl against REF/metrics.jsonl)
  mgpu_report.py weights HF REF_HF     |a - b|_2 / |b|_2 over all weights of two HF directories'
                                       safetensors (F32/F64/BF16; the tensor names must match), then
                                       the largest of one tensor and its name
  mgpu_report.py get FILE KEY [KEY..]  values from a JSON file (nested keys), space separated
  mgpu_report.py busbw FILE OP MIB     ievo bench --comm JSON: the bus bandwidth (GB/s) of OP at the
                                       size closest to MIB MiB
"""
import glob
import json
import math
import os
import struct
import sys
from array import array


def metrics(run, ref):
    a = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl"))]
    b = [json.loads(l) for l in open(os.path.join(ref, "metrics.jsonl"))]
    if len(a) != len(b) or not a:
        raise SystemExit(f"{run}: {len(a)} steps, {ref}: {len(b)}")
    return max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b) for k in ("loss", "grad_norm"))


def read_safetensors(directory):
    out = {}
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise SystemExit(f"{directory}: no .safetensors files")
    for path in files:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(n))
            data = f.read()
        for name, t in header.items():
            if name == "__metadata__":
                continue
            lo, hi = t["data_offsets"]
            raw = data[lo:hi]
            if t["dtype"] == "F32":
                v = array("f", raw)
            elif t["dtype"] == "F64":
                v = array("d", raw)
            elif t["dtype"] == "BF16":  # the high half of an f32
                h = array("H", raw)
                v = array("f", struct.pack(f"<{len(h)}I", *[x << 16 for x in h]))
            else:
                raise SystemExit(f"{path}: tensor {name} has dtype {t['dtype']}")
            out[name] = v
    return out


def weights(hf, ref):
    a, b = read_safetensors(hf), read_safetensors(ref)
    if sorted(a) != sorted(b):
        raise SystemExit(f"{hf} and {ref} hold different tensors: {sorted(set(a) ^ set(b))}")
    worst, worst_name, diff2, norm2 = 0.0, "", 0.0, 0.0
    for name in a:
        x, y = a[name], b[name]
        if len(x) != len(y):
            raise SystemExit(f"{name}: {len(x)} elements against {len(y)}")
        d = sum((p - q) ** 2 for p, q in zip(x, y))
        n = sum(q * q for q in y)
        diff2, norm2 = diff2 + d, norm2 + n
        rel = math.sqrt(d / n) if n > 0 else math.sqrt(d)
        if rel >= worst:
            worst, worst_name = rel, name
    return math.sqrt(diff2 / norm2), worst, worst_name


def get(path, keys):
    j = json.load(open(path))
    vals = []
    for k in keys:
        v = j
        for part in k.split("."):
            v = v[part]
        vals.append(str(v))
    return " ".join(vals)


def busbw(path, op, mib):
    rows = [r for r in json.load(open(path))["results"] if r["op"] == op]
    if not rows:
        raise SystemExit(f"{path}: no {op} rows")
    want = float(mib) * 2**20
    best = min(rows, key=lambda r: abs(math.log(r["bytes"] / want)))
    return best["busbw_gbs"]


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "metrics":
        print(f"{metrics(*args):.2g}")
    elif cmd == "weights":
        model, worst, name = weights(*args)
        print(f"{model:.2g} {worst:.2g} {name}")
    elif cmd == "get":
        print(get(args[0], args[1:]))
    elif cmd == "busbw":
        print(f"{busbw(*args):.1f}")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
