#!/usr/bin/env python3
"""Markdown tables from the JSON files of bench/peer/compare.sh (ievo bench, the PyTorch peer,
bench_gpu_kernels and the peer's SDPA timings).  python3 bench/peer/table.py DIR

With several rounds (compare.sh ROUNDS; round 1 in DIR, round R in DIR/roundR/), a model's row
gives each side's median tokens/s over the rounds, their ratio, and the lowest and highest of the
rounds' own ratios (each round's ievo run against the peer run right after it).

"goal met": "yes" when both the ratio (of tokens/s from the mean step time) and the ratio of the
median steps reach the goal, "by the mean only" or "by the median only" when one does: a few
slow steps on one side move the mean, and then the two disagree."""
import glob
import json
import os
import statistics
import sys

GOALS = {"llama-134m": 1.3, "tinyllama-1.1b": 1.25, "internlm2-1.8b": 1.2}  # issue 8
GIB = 1024.0 ** 3


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "—"


def rounds(d, name):
    """The JSON of NAME (e.g. ievo_llama-134m) in every round that has it, round 1 first, as
    (round, result) pairs."""
    out = [(1, load(os.path.join(d, f"{name}.json")))]
    for sub in glob.glob(os.path.join(d, "round*")):
        r = os.path.basename(sub)[len("round"):]
        if r.isdigit():
            out.append((int(r), load(os.path.join(sub, f"{name}.json"))))
    return sorted((r, j) for r, j in out if j)


def summary(runs):
    """One result standing for several rounds' runs: the medians of tokens/s, MFU and the median
    step, the highest peak memory (the single run's own values when there is one)."""
    if len(runs) <= 1:
        return runs[0][1] if runs else None
    js = [j for _, j in runs]
    out = dict(js[0])
    for k in ("tokens_per_s", "mfu", "step_time_median_s"):
        vals = [j[k] for j in js if isinstance(j.get(k), (int, float))]
        if vals:
            out[k] = statistics.median(vals)
    out["peak_mem_bytes"] = max(j["peak_mem_bytes"] for j in js)
    return out


def goal_met(goal, ratio, median_ratio):
    """Whether the ratio and the ratio of the median steps reach the goal (see the docstring)."""
    if not goal or ratio is None or median_ratio is None:
        return "—"
    by_mean, by_median = ratio >= goal, median_ratio >= goal
    if by_mean and by_median:
        return "yes"
    if by_mean:
        return "by the mean only"
    return "by the median only" if by_median else "no"


def round_ratios(iruns, pruns):
    """Each round's ievo tokens/s over the same round's peer tokens/s."""
    peer = dict(pruns)
    return [j["tokens_per_s"] / peer[r]["tokens_per_s"] for r, j in iruns if r in peer]


def main(d):
    meta = load(os.path.join(d, "meta.json")) or {}
    lines = []
    lines.append(f"Card: {meta.get('card', '?')}; date: {meta.get('date', '?')}; "
                 f"PyTorch {meta.get('torch', '?')}; ievo commit {meta.get('commit', '?')}; "
                 f"{meta.get('steps', '?')} timed steps after {meta.get('warmup', '?')} warm-up steps.")
    lines.append("")
    n_rounds = max([len(rounds(d, f"ievo_{m}")) for m in (meta.get("models") or [])] + [1])
    if n_rounds > 1:
        lines.append(f"{n_rounds} rounds: tok/s and MFU are each side's median over the rounds, peak memory "
                     "the highest; the ratio is of the medians, with the lowest and highest of the "
                     "rounds' own ratios.")
        lines.append("")
    lines.append("| model | ievo tok/s | peer tok/s | ratio (goal) | ratio of median steps | goal met | ievo MFU | "
                 "peer MFU | ievo peak GiB | peer peak GiB |" + (" rounds' ratios |" if n_rounds > 1 else ""))
    lines.append("| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |" +
                 (" ---: |" if n_rounds > 1 else ""))
    models = meta.get("models") or sorted({os.path.basename(p)[5:-5] for p in glob.glob(os.path.join(d, "ievo_*.json"))
                                           if "_ckpt_" not in p and "_var_" not in p})
    for m in models:
        iruns, pruns = rounds(d, f"ievo_{m}"), rounds(d, f"peer_{m}")
        i, p = summary(iruns), summary(pruns)
        it = i["tokens_per_s"] if i else None
        pt = p["tokens_per_s"] if p else None
        r = it / pt if it and pt else None
        goal = GOALS.get(m)
        ratio = (f"{r:.3f}x" if r else "—") + (f" ({goal:.2f}x)" if goal else "")
        # tok/s come from the mean step time; a few slow steps on either side (host jitter, a
        # collection) move the mean, the median of the timed steps shows whether they did.
        im = i.get("step_time_median_s") if i else None
        pm = p.get("step_time_median_s") if p else None
        mr = pm / im if im and pm else None
        lines.append(" | ".join([
            f"| {m}", fmt(it, ",.0f"), fmt(pt, ",.0f"), ratio, f"{mr:.2f}x" if mr else "—",
            goal_met(goal, r, mr),
            fmt(100 * i["mfu"], ".1f") + "%" if i else "—", fmt(100 * p["mfu"], ".1f") + "%" if p else "—",
            fmt(i["peak_mem_bytes"] / GIB, ".1f") if i else "—",
            fmt(p["peak_mem_bytes"] / GIB, ".1f") if p else "—"]) + " |")
        if n_rounds > 1:
            rr = round_ratios(iruns, pruns)
            lines[-1] += (f" {min(rr):.3f}–{max(rr):.3f}x ({len(rr)}) |" if rr else " — |")
    lines.append("")
    lines.append("Time per step by phase, ms (ievo: device time between phase marks, forward = "
                 "embedding + blocks, backward includes the LM head's fused forward; peer: forward "
                 "includes the LM head and loss):")
    lines.append("")
    lines.append("| run | step | data | forward | backward | reduce | optimizer |")
    lines.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path in sorted(glob.glob(os.path.join(d, "ievo_*.json")) + glob.glob(os.path.join(d, "peer_*.json"))):
        r = load(path)
        if not r:
            continue
        ph = r.get("phases_s", {})
        lines.append(" | ".join([f"| {os.path.basename(path)[:-5]}", fmt(1e3 * r["step_time_s"], ".1f")] +
                                [fmt(1e3 * ph[k], ".1f") if k in ph else "—"
                                 for k in ("data", "forward", "backward", "reduce", "optimizer")]) + " |")
    variants = []
    for m in models:
        for path in sorted(glob.glob(os.path.join(d, f"ievo_{m}_*.json"))):
            variants.append((m, os.path.basename(path)[len(f"ievo_{m}_"):-5], load(path)))
    for m in models:
        for path in sorted(glob.glob(os.path.join(d, f"peer_{m}_*.json"))):
            variants.append((m, "peer " + os.path.basename(path)[len(f"peer_{m}_"):-5], load(path)))
    if variants:
        lines.append("")
        lines.append("Variants (same call; ratio and memory against the model's default peer run, its "
                     "median over the rounds):")
        lines.append("")
        lines.append("| model | variant | tok/s | ratio | MFU | peak GiB | peer peak GiB |")
        lines.append("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        for m, v, r in variants:
            if not r:
                lines.append(f"| {m} | {v} | failed | | | | |")
                continue
            p = summary(rounds(d, f"peer_{m}"))
            ratio = f"{r['tokens_per_s'] / p['tokens_per_s']:.3f}x" if p else "—"
            lines.append(f"| {m} | {v} | {r['tokens_per_s']:,.0f} | {ratio} | {100 * r['mfu']:.1f}% | "
                         f"{r['peak_mem_bytes'] / GIB:.1f} | {fmt(p['peak_mem_bytes'] / GIB, '.1f') if p else '—'} |")
    kern = load(os.path.join(d, "kernels.json"))
    sdpa = load(os.path.join(d, "sdpa.json"))
    if kern or sdpa:
        lines.append("")
        lines.append("Attention, causal, B 4, T 4096, 16 heads, hd 128 (TFLOP/s, causal FLOPs; backward = 2.5x "
                     "forward FLOPs; fwd+bwd = 3.5x over the sum of both times):")
        lines.append("")
        lines.append("| kernel | fwd | bwd | fwd+bwd |")
        lines.append("| --- | ---: | ---: | ---: |")
        ms = {}
        for b in (kern or {}).get("benchmarks", []):
            name = b["name"].split("/")[1] if "/" in b["name"] else b["name"]
            unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6, "s": 1e3}[b.get("time_unit", "ms")]
            if "error_occurred" not in b or not b["error_occurred"]:
                ms[name] = (b["real_time"] * unit, b.get("TFLOP/s"))
        for b in (load(os.path.join(d, "kernels_wheel_cublas.json")) or {}).get("benchmarks", []):
            if "hd128_cudnn" in b["name"] and not b.get("error_occurred"):
                name = b["name"].split("/")[1].replace("cudnn", "cudnn (PyTorch's cuDNN library)")
                ms[name] = (b["real_time"] * {"ms": 1.0, "us": 1e-3}[b.get("time_unit", "ms")], b.get("TFLOP/s"))
        labels = {"cudnnragged": "cudnn, ragged layout (packed documents)"}
        for impl in ("flash", "cudnn", "cudnnragged", "cudnn (PyTorch's cuDNN library)"):
            f, bw = ms.get(f"hd128_{impl}_fwd"), ms.get(f"hd128_{impl}_bwd")
            if f and bw:
                fwd_tf = f[1] / 1e12 if f[1] and f[1] > 1e6 else f[1]
                bwd_tf = bw[1] / 1e12 if bw[1] and bw[1] > 1e6 else bw[1]
                both = 3.5 * fwd_tf * f[0] / (f[0] + bw[0]) if fwd_tf else None
                lines.append(f"| ievo {labels.get(impl, impl)} | {fmt(fwd_tf, '.0f')} | {fmt(bwd_tf, '.0f')} | {fmt(both, '.0f')} |")
        for impl, r in (sdpa or {}).get("sdpa", {}).items():
            if "error" in r:
                lines.append(f"| PyTorch SDPA {impl} | error: {r['error'][:60]} | | |")
            else:
                both = 3.5 * r["fwd_tflops"] * r["fwd_ms"] / (r["fwd_ms"] + r["bwd_ms"])
                lines.append(f"| PyTorch SDPA {impl} | {r['fwd_tflops']:.0f} | {r['bwd_tflops']:.0f} | "
                             f"{both:.0f} ({r['fwd_bwd_tflops']:.0f} timed as one autograd call) |")
    gemm = {}
    for tag, name in (("", "default"), ("_autotune_off", "autotune off"), ("_wheel_cublas", "PyTorch's cuBLAS library")):
        for b in (load(os.path.join(d, f"kernels{tag}.json")) or {}).get("benchmarks", []):
            if b["name"].startswith("BM_matmul/") and not b.get("error_occurred"):
                tf = b.get("TFLOP/s")
                gemm.setdefault(b["name"].split("/")[1], {})[name] = tf / 1e12 if tf and tf > 1e6 else tf
    if gemm:
        cols = ["default", "autotune off", "PyTorch's cuBLAS library"]
        lines.append("")
        lines.append("ievo GEMMs (bench_gpu_kernels, TFLOP/s; TinyLlama shapes, N = 16384 tokens):")
        lines.append("")
        lines.append("| GEMM | " + " | ".join(cols) + " |")
        lines.append("| --- |" + " ---: |" * len(cols))
        for g, row in gemm.items():
            lines.append(f"| {g} | " + " | ".join(fmt(row.get(c), ".0f") for c in cols) + " |")
    if sdpa and "matmul8192" in sdpa:
        lines.append("")
        lines.append(f"PyTorch bf16 8192³ GEMM (torch.matmul): {sdpa['matmul8192']['tflops']:.0f} TFLOP/s.")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
