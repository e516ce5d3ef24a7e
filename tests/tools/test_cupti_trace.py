#!/usr/bin/env python3
"""tools/cupti_trace.py on a synthetic trace whose gaps are known (ctest: tools_cupti_trace).

One NVTX range step_2 holds, on stream 7:
  k1 [100, 200) us, launched at 90;  a memset [202, 203) launched at 150 (launch latency 2 us);
  k2 [205, 300) launched at 160 (latency 2 us);  a blocking cudaStreamSynchronize [170, 301);
  k3 [350, 400) launched at 340 (the host late: the device idle from 300 to 350, 40 us of it
  before the launch call, 10 us after it).
Busy 100 + 1 + 95 + 50 = 246 us; idle 2 + 2 + 50 = 54 us; host late 40 us; latency 14 us.

A second trace, step_5, checks the device time by kernel: a mangled ievo kernel [0, 100) us, an
nvjet GEMM [80, 150) started early (PDL: 50 us of it counted), the same ievo kernel again
[150, 170) and a cuDNN kernel [170, 200).
"""
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "..", "tools", "cupti_trace.py")

US = 1000
ROWS = [
    ("M", 50, 0, 0, 1, "step_2"),
    ("A", 90, 95, 3, 10, "cudaLaunchKernel_v7000"),
    ("D", 91, 94, 3, 10, "cuLaunchKernel"),
    ("K", 100, 200, 7, 10, "k1(int)"),
    ("A", 150, 152, 3, 11, "cudaMemsetAsync_v3020"),
    ("S", 202, 203, 7, 11, "4"),
    ("A", 160, 165, 3, 12, "cudaLaunchKernel_v7000"),
    ("K", 205, 300, 7, 12, "k2"),
    ("A", 170, 301, 3, 13, "cudaStreamSynchronize_v3020"),
    ("A", 340, 345, 3, 14, "cudaLaunchKernel_v7000"),
    ("K", 350, 400, 7, 14, "k3"),
    ("M", 0, 410, 0, 1, ""),
    # outside the range: not counted
    ("A", 500, 505, 3, 15, "cudaLaunchKernel_v7000"),
    ("K", 510, 600, 7, 15, "k4"),
]


MANGLED = "_ZN4ievo3ops4cuda41_GLOBAL__N__a3f9b3e9_9_swiglu_cu_2e03b3e410swiglu_fwdI13__nv_bfloat16Li8EEEvPKT_S7_PS5_l"
ROWS_PDL = [
    ("M", 1, 0, 0, 1, "step_5"),
    ("A", 2, 3, 3, 20, "cudaLaunchKernelExC_v11060"),
    ("K", 10, 100, 7, 20, MANGLED),
    ("A", 4, 5, 3, 21, "cudaLaunchKernelExC_v11060"),
    ("K", 80, 150, 7, 21, "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT"),
    ("A", 6, 7, 3, 22, "cudaLaunchKernelExC_v11060"),
    ("K", 150, 170, 7, 22, MANGLED),
    ("A", 8, 9, 3, 23, "cudaLaunchKernelExC_v11060"),
    ("K", 170, 200, 7, 23, "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
    ("M", 0, 210, 0, 1, ""),
]


def run(rows):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.csv")
        with open(path, "w") as f:
            f.write("kind,start_ns,end_ns,where,corr,name\n")
            for k, s, e, w, c, n in rows:
                f.write(f"{k},{s * US},{e * US},{w},{c},{n}\n")
        return subprocess.run([sys.executable, TOOL, path], capture_output=True, text=True, check=True).stdout


def main():
    out = run(ROWS)
    print(out)
    expect = [
        "range step_2: host 0.360 ms; device work 4 (3 kernels, 0 copies, 1 memsets)",
        "device busy 0.246 ms, idle 0.054 ms in 3 gaps: host late 0.040 ms, launch latency 0.014 ms",
        "1  cudaStreamSynchronize_v3020",
        "1 1.0 memset 4 -> k2 x1",
        "50.0 40.0 k2 -> k3 after cudaStreamSynchronize_v3020",
        "0.120 131.0 49.0 cudaStreamSynchronize_v3020 -> k3",
        "0.100 0.100 1 k1",
        "0.001 0.001 1 memset 4",
        "device time by family (ms, of 0.246): other kernels 0.245, memsets 0.001",
    ]
    # columns are padded: compare with whitespace collapsed
    flat = " ".join(out.split())
    missing = [e for e in expect if " ".join(e.split()) not in flat]
    if missing:
        sys.exit(f"test_cupti_trace: missing {missing}")
    out = run(ROWS_PDL)
    print(out)
    # the ievo kernel's name demangled where c++filt is installed
    label = "swiglu_fwd" if shutil.which("c++filt") else MANGLED[:70]
    expect = [
        f"0.110 0.110 2 {label}",
        "0.050 0.070 1 nvjet_sm90_tst_128x128_64x6_2x1_v_bz_TNT",
        "0.030 0.030 1 cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
        "device time by family (ms, of 0.190): other kernels 0.110, GEMM 0.050, attention 0.030",
    ]
    flat = " ".join(out.split())
    missing = [e for e in expect if " ".join(e.split()) not in flat]
    if missing:
        sys.exit(f"test_cupti_trace: missing {missing}")
    print("test_cupti_trace: ok")


if __name__ == "__main__":
    main()
