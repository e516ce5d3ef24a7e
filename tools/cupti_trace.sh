#!/usr/bin/env bash
# Runs a CUDA command under ievo's CUPTI activity tracer (tools/cupti_trace/cupti_trace.cpp): every
# kernel, copy, memset, synchronisation, runtime call and NVTX range with one clock for host and
# device, written to OUT.csv at exit. tools/cupti_trace.py then shows where the device idles in a
# step and why (the host late, or the launch latency). A stand-in for Nsight Systems, which the
# lent device lacks.
#   tools/cupti_trace.sh OUT.csv build/ievo bench configs/llama-134m.yaml --steps 2 --warmup 1
#   python3 tools/cupti_trace.py OUT.csv --range step_3
# IEVO_TRACE_LIB: the tracer library (default: build/tools/libievo_cupti_trace.so, then build-dev's).
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OUT.csv COMMAND..." >&2; exit 2; }
out=$1
shift
lib=""
for c in "${IEVO_TRACE_LIB:-}" build/tools/libievo_cupti_trace.so build-dev/tools/libievo_cupti_trace.so; do
  if [ -n "$c" ] && [ -f "$c" ]; then lib=$(realpath "$c"); break; fi
done
[ -n "$lib" ] || { echo "cupti_trace: no libievo_cupti_trace.so (build the ievo_cupti_trace target)" >&2; exit 2; }
cupti=$(ldd "$lib" | awk '/libcupti/ {print $3}')
[ -f "$cupti" ] || { echo "cupti_trace: $lib does not find libcupti (ldd: $(ldd "$lib" | grep cupti))" >&2; exit 2; }
CUDA_INJECTION64_PATH=$lib NVTX_INJECTION64_PATH=$cupti IEVO_TRACE_OUT=$out exec "$@"
