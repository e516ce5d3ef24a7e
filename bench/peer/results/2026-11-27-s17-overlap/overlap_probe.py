# Session 17 probe: can a weight-gradient GEMM on a side stream hide a memory-bound backward
# kernel (SwiGLU / RMSNorm backward) that runs on the main stream? PyTorch stand-ins for ievo's
# kernels; times by CUDA events, medians of 20 reps.
import torch, statistics, sys
torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
dev = 'cuda'
bf = torch.bfloat16
carve = getattr(torch._C, '_set_sm_carveout_experimental', None)
print('carveout api:', carve is not None, torch.__version__)

@torch.compile
def swiglu_bwd(dh, g, u):
    s = torch.sigmoid(g.float())
    gf = g.float()
    dgate = (dh.float() * u.float() * s * (1 + gf * (1 - s))).to(bf)
    dup = (dh.float() * gf * s).to(bf)
    return dgate, dup

@torch.compile
def rms_bwd(dn, x, w, r):
    xf = x.float() * r[:, None]
    dxn = dn.float() * w.float()
    c = (dxn * xf).mean(-1, keepdim=True)
    return ((dxn - xf * c) * r[:, None]).to(bf)

def timeit(fn, reps=20):
    ts = []
    for _ in range(3): fn()
    torch.cuda.synchronize()
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)

main = torch.cuda.current_stream()
side = torch.cuda.Stream(priority=0)
hi = torch.cuda.Stream(priority=-5)

def run(name, N, d, F):
    h = torch.randn(N, F, device=dev, dtype=bf); dy = torch.randn(N, d, device=dev, dtype=bf)
    g = torch.randn(N, F, device=dev, dtype=bf); u = torch.randn(N, F, device=dev, dtype=bf)
    dh = torch.randn(N, F, device=dev, dtype=bf)
    x = torch.randn(N, d, device=dev, dtype=bf); dn = torch.randn(N, d, device=dev, dtype=bf)
    w = torch.randn(d, device=dev, dtype=bf); r = torch.rand(N, device=dev) + 0.5
    dgu = torch.randn(N, 2 * F, device=dev, dtype=bf)
    outw = torch.empty(F, d, device=dev, dtype=bf); outw2 = torch.empty(2 * F, d, device=dev, dtype=bf)
    gemm1 = lambda: torch.mm(h.t(), dy, out=outw)          # dW_down
    gemm2 = lambda: torch.mm(dgu.t(), x, out=outw2)        # dW_gate/up
    mem1 = lambda: swiglu_bwd(dh, g, u)
    mem2 = lambda: rms_bwd(dn, x, w, r)
    for gname, gemm, mname, mem in (('dW_down', gemm1, 'swiglu_bwd', mem1), ('dW_gateup', gemm2, 'rms_bwd', mem2)):
        res = {}
        for k in (0, 8, 16, 24, 32, 48):
            if k and carve is None: continue
            if carve: carve(k if k else None) if k else carve(None)
            tg = timeit(gemm); tm = timeit(mem)
            def seq():
                gemm(); mem()
            def conc_gfirst():
                ev = torch.cuda.Event(); ev.record(main)
                side.wait_event(ev); hi.wait_event(ev)
                with torch.cuda.stream(side): gemm()
                with torch.cuda.stream(hi): mem()
                main.wait_stream(side); main.wait_stream(hi)
            def conc_mfirst():
                ev = torch.cuda.Event(); ev.record(main)
                side.wait_event(ev); hi.wait_event(ev)
                with torch.cuda.stream(hi): mem()
                with torch.cuda.stream(side): gemm()
                main.wait_stream(side); main.wait_stream(hi)
            ts = timeit(seq); tc1 = timeit(conc_gfirst); tc2 = timeit(conc_mfirst)
            print(f'{name} {gname}+{mname} carveout {k:2d}: gemm {tg*1e3:7.1f} us  mem {tm*1e3:7.1f} us  sum {(tg+tm)*1e3:7.1f}  seq {ts*1e3:7.1f}  conc(G first) {tc1*1e3:7.1f}  conc(M first) {tc2*1e3:7.1f}  saved {100*(1-min(tc1,tc2)/ts):5.1f}%', flush=True)
        if carve: carve(None)

run('134m', 32768, 768, 2048)
run('tinyllama', 16384, 2048, 5632)
