#!/usr/bin/env python3
"""The PyTorch peer of `ievo bench`: the same Llama, batch and optimiser in plain PyTorch.

    python3 bench/peer/llama_peer.py --config configs/tinyllama-1.1b.yaml --steps 10 --warmup 5 \
        --json peer.json
    python3 bench/peer/llama_peer.py --attention --json sdpa.json     # SDPA kernels alone

The model is read from ievo's YAML config (model.*, data.seq_len, train.micro_batch_size,
train.global_batch_size, optim.*), so both sides train the same shapes. Settings are those of the
issue's bar: fp32 master weights with torch.autocast(bfloat16), torch.compile, SDPA (flash
backend by default), fused AdamW, gradient clipping at optim.grad_clip (ievo clips too), random
tokens. A compact Llama (HF layout and maths: RMSNorm, rotary embeddings, GQA, SwiGLU, untied
LM head), no HF transformers code.

Reported over the timed steps (same definitions as ievo bench, launch/bench.h): tokens/s, MFU =
(6 N_matmul + 6 L d T) tokens/s / 989e12, peak memory = torch.cuda.max_memory_allocated over the
whole run, and time per phase (forward, backward, optimizer) from CUDA events.

--attention times F.scaled_dot_product_attention alone (causal, bf16, B=4 H=16 T=4096 hd=128 by
default, the layout [B, T, H, hd] transposed as a model does) with the flash and cuDNN backends,
and a bf16 8192^3 matmul, for the kernel comparison with bench_gpu_kernels.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

PEAK_FLOPS = 989e12  # H100 SXM dense bf16, as ievo


# ----------------------------------------------------------------------------- config

def read_config(path, overrides):
    with open(path) as f:
        y = yaml.safe_load(f)
    for ov in overrides:  # key.sub=value, like ievo's --set
        key, value = ov.split("=", 1)
        node = y
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    m, d, t, o = y["model"], y["data"], y["train"], y.get("optim", {})
    c = dict(
        vocab=m["vocab_size"], d=m["hidden_size"], layers=m["num_layers"], heads=m["num_heads"],
        kv_heads=m.get("num_kv_heads", m["num_heads"]), ffn=m["ffn_hidden_size"],
        theta=float(m.get("rope_theta", 10000.0)), eps=float(m.get("norm_eps", 1e-5)),
        init_std=float(m.get("init_std", 0.02)), seq=d["seq_len"], micro=t["micro_batch_size"],
        batch=t["global_batch_size"], lr=float(o.get("lr", 3e-4)),
        weight_decay=float(o.get("weight_decay", 0.1)), beta1=float(o.get("beta1", 0.9)),
        beta2=float(o.get("beta2", 0.95)), eps_adam=float(o.get("eps", 1e-8)),
        grad_clip=float(o.get("grad_clip", 1.0)))
    c["hd"] = m.get("head_dim") or c["d"] // c["heads"]
    return c


def matmul_params(c):
    qd, kvd = c["heads"] * c["hd"], c["kv_heads"] * c["hd"]
    per_layer = c["d"] * qd + 2 * c["d"] * kvd + qd * c["d"] + 3 * c["d"] * c["ffn"]
    return c["layers"] * per_layer + c["vocab"] * c["d"]


def flops_per_token(c):
    return 6.0 * matmul_params(c) + 6.0 * c["layers"] * c["d"] * c["seq"]


# ----------------------------------------------------------------------------- model

class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rope_tables(seq, hd, theta, device):
    inv = 1.0 / (theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd))
    ang = torch.outer(torch.arange(seq, device=device, dtype=torch.float32), inv)
    ang = torch.cat([ang, ang], dim=-1)  # HF Llama: rotate_half layout
    return ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]


def apply_rope(x, cos, sin):  # x [B, T, H, hd]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], dim=-1)
    return (x * cos + rot * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c, gqa_native):
        super().__init__()
        d, qd, kvd = c["d"], c["heads"] * c["hd"], c["kv_heads"] * c["hd"]
        self.c, self.gqa_native = c, gqa_native
        self.ln1, self.ln2 = RMSNorm(d, c["eps"]), RMSNorm(d, c["eps"])
        self.wq = nn.Linear(d, qd, bias=False)
        self.wk = nn.Linear(d, kvd, bias=False)
        self.wv = nn.Linear(d, kvd, bias=False)
        self.wo = nn.Linear(qd, d, bias=False)
        self.wg = nn.Linear(d, c["ffn"], bias=False)
        self.wu = nn.Linear(d, c["ffn"], bias=False)
        self.wd = nn.Linear(c["ffn"], d, bias=False)

    def forward(self, x, cos, sin):
        c = self.c
        B, T, _ = x.shape
        h = self.ln1(x)
        q = apply_rope(self.wq(h).view(B, T, c["heads"], c["hd"]), cos, sin).transpose(1, 2)
        k = apply_rope(self.wk(h).view(B, T, c["kv_heads"], c["hd"]), cos, sin).transpose(1, 2)
        v = self.wv(h).view(B, T, c["kv_heads"], c["hd"]).transpose(1, 2)
        if c["kv_heads"] != c["heads"] and not self.gqa_native:
            rep = c["heads"] // c["kv_heads"]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        gqa = c["kv_heads"] != c["heads"] and self.gqa_native
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        x = x + self.wo(o.transpose(1, 2).reshape(B, T, -1))
        h = self.ln2(x)
        return x + self.wd(F.silu(self.wg(h)) * self.wu(h))


class HeadLoss(nn.Module):
    """Final norm, LM head and the mean token cross-entropy (fp32 logits, as HF does)."""

    def __init__(self, c):
        super().__init__()
        self.norm = RMSNorm(c["d"], c["eps"])
        self.head = nn.Linear(c["d"], c["vocab"], bias=False)

    def forward(self, x, targets):
        logits = self.head(self.norm(x))
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


class Llama(nn.Module):
    def __init__(self, c, gqa_native):
        super().__init__()
        self.c = c
        self.embed = nn.Embedding(c["vocab"], c["d"])
        self.blocks = nn.ModuleList(Block(c, gqa_native) for _ in range(c["layers"]))
        self.out = HeadLoss(c)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=c["init_std"])

    def forward(self, ids, targets, cos, sin):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x, cos, sin)
        return self.out(x, targets)


# ----------------------------------------------------------------------------- helpers

def sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {"flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "default": [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]}[name]


def gqa_supported(backends):
    """Whether SDPA with enable_gqa=True runs under these backends (else K/V are repeated)."""
    from torch.nn.attention import sdpa_kernel
    q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    try:
        with sdpa_kernel(backends):
            F.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True).sum().backward()
        torch.cuda.synchronize()
        return True
    except Exception as e:  # noqa: BLE001 - any refusal means: repeat K/V
        print(f"peer: SDPA enable_gqa not supported by {backends}: {str(e)[:200]}", file=sys.stderr)
        return False


def device_name():
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- training bench

def train_bench(args):
    from torch.nn.attention import sdpa_kernel
    c = read_config(args.config, args.set)
    assert c["batch"] % c["micro"] == 0, "global batch not divisible by the micro-batch"
    accum = c["batch"] // c["micro"]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    backends = sdpa_backend(args.sdpa)
    gqa_native = c["kv_heads"] == c["heads"] or gqa_supported(backends)
    t_build = time.perf_counter()
    with dev:
        model = Llama(c, gqa_native)
    cos, sin = rope_tables(c["seq"], c["hd"], c["theta"], dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=c["lr"], betas=(c["beta1"], c["beta2"]), eps=c["eps_adam"], fused=True)
    if args.compile == "blocks":  # each block compiled (one graph shared by all), and the head
        for b in model.blocks:
            b.compile()
        model.out.compile()
    elif args.compile == "full":
        model.compile()
    params = list(model.parameters())

    ev = {k: torch.cuda.Event(enable_timing=True) for k in ("start", "fwd", "bwd", "opt")}
    steps, phases, losses, compile_s = [], [], [], None
    torch.cuda.reset_peak_memory_stats()
    total = args.warmup + args.steps + (1 if args.profile else 0)
    prof = None
    for step in range(total):
        if args.profile and step == total - 1:  # the last step under torch.profiler (not timed)
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            prof.__enter__()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ev["start"].record()
        fwd_ms = bwd_ms = 0.0
        loss_sum = 0.0
        for _ in range(accum):
            tokens = torch.randint(0, c["vocab"], (c["micro"], c["seq"] + 1), device=dev)
            ids, targets = tokens[:, :-1], tokens[:, 1:]
            a, b_, e = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            a.record()
            with sdpa_kernel(backends), torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(ids, targets, cos, sin)
            b_.record()
            (loss / accum).backward()
            e.record()
            e.synchronize()
            fwd_ms += a.elapsed_time(b_)
            bwd_ms += b_.elapsed_time(e)
            loss_sum += loss.item()
        ev["bwd"].record()
        if c["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, c["grad_clip"], foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ev["opt"].record()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if step == 0:
            compile_s = dt
        losses.append(loss_sum / accum)
        if step >= args.warmup:
            steps.append(dt)
            phases.append({"forward": fwd_ms / 1e3, "backward": bwd_ms / 1e3,
                           "optimizer": ev["bwd"].elapsed_time(ev["opt"]) / 1e3})
        print(f"peer step {step + 1}/{total} | loss {losses[-1]:.4f} | {dt * 1e3:.1f} ms", file=sys.stderr)
        if prof is not None:
            prof.__exit__(None, None, None)
            steps.pop()  # the profiled step's time is not a measurement
            phases.pop()
            with open(args.profile, "w") as f:
                f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90))

    tokens_per_step = c["batch"] * c["seq"]
    tps = tokens_per_step * len(steps) / sum(steps)
    res = {
        "config": args.config, "device": device_name(), "torch": torch.__version__,
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "compile": args.compile, "sdpa": args.sdpa, "sdpa_gqa_native": gqa_native,
        "model": f"d{c['d']} L{c['layers']} h{c['heads']}/{c['kv_heads']} ffn{c['ffn']} V{c['vocab']}",
        "params": sum(p.numel() for p in params), "seq_len": c["seq"], "global_batch": c["batch"],
        "micro_batch": c["micro"], "steps": args.steps, "warmup": args.warmup,
        "tokens_per_s": tps, "mfu": flops_per_token(c) * tps / PEAK_FLOPS,
        "step_time_s": statistics.mean(steps), "step_time_median_s": statistics.median(steps),
        "peak_mem_bytes": torch.cuda.max_memory_allocated(),
        "reserved_mem_bytes": torch.cuda.max_memory_reserved(),
        "phases_s": {k: statistics.mean(p[k] for p in phases) for k in phases[0]},
        "first_step_s": compile_s, "setup_s": time.perf_counter() - t_build - sum(steps),
        "first_loss": losses[0], "last_loss": losses[-1],
    }
    return res


# ----------------------------------------------------------------------------- kernel bench

def median_ms(fn, iters, reps=5):
    """Median over iters samples of the mean time of reps back-to-back calls (CUDA events), so
    Python's per-call overhead overlaps the previous call's kernels (as bench_gpu_kernels)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


def attention_bench(args):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    B, H, T, hd = args.attn_shape
    fwd_flops = 4.0 * B * H * hd * T * T / 2  # causal half, as bench_gpu_kernels
    res = {"device": device_name(), "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
           "shape": {"B": B, "H": H, "T": T, "hd": hd}, "sdpa": {}}
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*s):
        return (torch.rand(*s, device="cuda", generator=g) - 0.5).to(torch.bfloat16)

    # [B, T, H, hd] as a model's projections give, viewed [B, H, T, hd].
    q, k, v, do = (rnd(B, T, H, hd).transpose(1, 2) for _ in range(4))
    for name, be in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            with sdpa_kernel([be]):
                f = median_ms(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True), args.iters)
                out = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)

                def fb():
                    o = F.scaled_dot_product_attention(qq, kk, vv, is_causal=True)
                    torch.autograd.grad(o, (qq, kk, vv), do)
                fbm = median_ms(fb, args.iters)
                bm = median_ms(lambda: torch.autograd.grad(out, (qq, kk, vv), do, retain_graph=True),
                               args.iters)
            res["sdpa"][name] = {"fwd_ms": f, "bwd_ms": bm, "fwd_bwd_ms": fbm,
                                 "fwd_tflops": fwd_flops / f / 1e9, "bwd_tflops": 2.5 * fwd_flops / bm / 1e9,
                                 "fwd_bwd_tflops": 3.5 * fwd_flops / fbm / 1e9}
        except Exception as e:  # noqa: BLE001 - report and go on
            res["sdpa"][name] = {"error": str(e)[:300]}
    n = 8192
    a, b = rnd(n, n), rnd(n, n)
    ms = median_ms(lambda: a @ b, args.iters)
    res["matmul8192"] = {"ms": ms, "tflops": 2.0 * n ** 3 / ms / 1e9}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="ievo YAML config (model, seq_len, batch, optim)")
    ap.add_argument("--set", action="append", default=[], help="override a config key: train.micro_batch_size=4")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", choices=["none", "blocks", "full"], default="blocks")
    ap.add_argument("--sdpa", choices=["flash", "cudnn", "efficient", "default"], default="flash")
    ap.add_argument("--attention", action="store_true", help="time the SDPA kernels alone")
    ap.add_argument("--attn-shape", type=int, nargs=4, default=[4, 16, 4096, 128], metavar=("B", "H", "T", "HD"))
    ap.add_argument("--iters", type=int, default=200,
                    help="--attention: samples per kernel (5 calls each); 200 keep each kernel busy for "
                         "0.5-3 s as bench_gpu_kernels does (a short burst runs at higher clocks)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--profile", help="run one more step under torch.profiler; its kernel table goes here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("peer: no CUDA device")
    if args.attention:
        res = attention_bench(args)
    else:
        if not args.config:
            sys.exit("peer: --config is required (or --attention)")
        res = train_bench(args)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
