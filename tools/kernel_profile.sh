#!/usr/bin/env bash
# Where a training step's GPU time goes, kernel by kernel (issue 8's "profile first"): one
# `ievo bench` step of each config under Nsight Compute, one metric (gpu__time_duration) per kernel,
# no cache flush and no clock locking, so each kernel's time is what it takes inside a real step
# (kernels run one at a time under ncu: no overlap, and launch gaps are not counted). Then
# tools/kernel_profile.py sums the times by kind (GEMM, attention, norms, ...) and lists the top
# kernels; compare the sum with the step time `ievo bench` prints to see the gaps.
#
#   On the device (ncu in the image, no nsys):  IEVO=build-dev/ievo tools/kernel_profile.sh llama-134m tinyllama-1.1b
#   Writes $OUT/profile_<config>.csv (ncu's raw page, slimmed to the columns kernel_profile.py reads),
#   $OUT/profile_<config>.txt (summary).
# Only the second of two steps is profiled (ncu --nvtx-include "step_2/", the trainer's NVTX range
# of a step): the first step's one-time work (the GEMM and cuDNN plan autotuning's timing
# launches, weight casts) runs unprofiled before it, so the profile holds the kernels a timed step
# runs, with the algorithms autotuning chose.
set -uo pipefail
cd "$(dirname "$0")/.."
IEVO=${IEVO:-build-dev/ievo}
[ -x "$IEVO" ] || IEVO=build/ievo
OUT=${OUT:-/tmp/ievo_profile}
mkdir -p "$OUT"
NCU=${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}
for cfg in "${@:-tinyllama-1.1b}"; do
  csv="$OUT/profile_$cfg.csv"
  echo "== bench $cfg (no profiler: the step time to set against the kernel sum)"
  # SM clock and power every 250 ms meanwhile: a sustained step may run below the clocks the
  # isolated kernels under ncu get (power limit), which shows up as "gap" below.
  smi=""
  if command -v nvidia-smi > /dev/null 2>&1; then
    nvidia-smi --query-gpu=clocks.sm,power.draw,temperature.gpu --format=csv,noheader,nounits \
      -lms 250 > "$OUT/smi_$cfg.csv" 2>/dev/null &
    smi=$!
  fi
  "$IEVO" bench "configs/$cfg.yaml" --steps ${IEVO_PROFILE_STEPS:-5} --warmup 3 ${IEVO_PROFILE_ARGS:-} \
    > "$OUT/bench_$cfg.log" 2>&1 || tail -20 "$OUT/bench_$cfg.log"
  [ -n "$smi" ] && kill "$smi" 2>/dev/null
  grep -iE "tokens/s|step|phase|forward|backward|optimizer|peak" "$OUT/bench_$cfg.log" | tail -12
  [ -s "$OUT/smi_$cfg.csv" ] && python3 - "$OUT/smi_$cfg.csv" <<'PY'
import sys
rows = [[float(x) for x in l.split(",")] for l in open(sys.argv[1]) if l.count(",") == 2 and "N/A" not in l]
busy = [r for r in rows if r[1] > 150]  # samples while the GPU works (watts)
if busy:
    c = sorted(r[0] for r in busy)
    print(f"   while busy ({len(busy)} samples): SM clock median {c[len(c) // 2]:.0f} MHz (min {c[0]:.0f}, "
          f"max {c[-1]:.0f}), power mean {sum(r[1] for r in busy) / len(busy):.0f} W, max temp {max(r[2] for r in busy):.0f} C")
PY
  echo "== profile $cfg"
  t0=$SECONDS
  "$NCU" --metrics gpu__time_duration.sum --cache-control none --clock-control none \
    --nvtx --nvtx-include "step_2/" --csv --page raw --log-file "$csv" \
    "$IEVO" bench "configs/$cfg.yaml" --steps 1 --warmup 1 ${IEVO_PROFILE_ARGS:-} \
    > "$OUT/profile_$cfg.log" 2>&1 || { echo "ncu failed:"; tail -20 "$OUT/profile_$cfg.log"; continue; }
  echo "   $((SECONDS - t0)) s"
  python3 tools/kernel_profile.py --slim "$csv" | tee "$OUT/profile_$cfg.txt"
done
# The PyTorch peer's kernels for the same configs (torch.profiler over one warm step), when
# IEVO_PROFILE_PEER=1.
if [ "${IEVO_PROFILE_PEER:-0}" = 1 ]; then
  for cfg in "${@:-tinyllama-1.1b}"; do
    echo "== peer profile $cfg"
    python3 bench/peer/llama_peer.py --config "configs/$cfg.yaml" --steps 3 --warmup 3 \
      --profile "$OUT/peer_profile_$cfg.txt" > "$OUT/peer_$cfg.log" 2>&1 || tail -20 "$OUT/peer_$cfg.log"
    grep -E '"tokens_per_s"|"step_time_s"' "$OUT/peer_$cfg.log"
    head -45 "$OUT/peer_profile_$cfg.txt" | cut -c1-200
  done
fi
