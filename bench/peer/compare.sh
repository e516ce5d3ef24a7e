#!/usr/bin/env bash
# ievo vs the PyTorch peer on this GPU, side by side in one run, and a markdown table of the ratios
# (issue 8). On the device machine, after packing here:
#
#   IEVO_PACK_IEVO=1 IEVO_PACK_BENCH=1 IEVO_BUILD_DIR=build-cuda tools/device_run.sh pack
#   -> run tool: command "IEVO_DEVICE_EXTRA=bench/peer/compare.sh tools/device_run.sh run",
#      carry ["build-dev"]   (GPU tests first, then this script with the library path set)
#
# or anywhere with a GPU, PyTorch and a CUDA build:  IEVO=build/ievo KBENCH=build/bench/bench_gpu_kernels
# bench/peer/compare.sh
#
# For each model: `ievo bench` and bench/peer/llama_peer.py on the same config (W warm-up + N timed
# steps, random tokens), one after the other (never at once); then the attention/GEMM kernels of
# bench_gpu_kernels and PyTorch's SDPA on the same shape, and ievo's activation checkpointing
# variants on TinyLlama. The table is rewritten after every run. Writes $OUT/table.md (bench/peer/table.py) and $OUT/compare.tgz (every JSON and log).
# Environment: MODELS (config names under configs/), STEPS (10), WARMUP (5), PEER_COMPILE
# (blocks|full|none), PEER_SDPA (flash|cudnn|default), CKPT_VARIANTS ("full selective"),
# IEVO_TIMEOUT / PEER_TIMEOUT (seconds per run), OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ievo_compare}
MODELS=${MODELS:-llama-134m tinyllama-1.1b internlm2-1.8b}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-5}
PEER_COMPILE=${PEER_COMPILE:-blocks}
PEER_SDPA=${PEER_SDPA:-flash}
CKPT_VARIANTS=${CKPT_VARIANTS-full selective}
IEVO=${IEVO:-build-dev/ievo}
KBENCH=${KBENCH:-build-dev/bench/bench_gpu_kernels}
[ -x "$IEVO" ] || IEVO=build/ievo
[ -x "$KBENCH" ] || KBENCH=build/bench/bench_gpu_kernels
mkdir -p "$OUT"
work=$(mktemp -d /tmp/ievo_compare.XXXXXX)
export PYTHONUNBUFFERED=1

card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
torch_version=$(python3 -c 'import torch; print(torch.__version__)' 2>/dev/null)
commit=$(. build-dev/paths.env 2>/dev/null && echo "$COMMIT")
[ -n "$commit" ] || commit=$(git rev-parse --short HEAD 2>/dev/null)
python3 - "$work/meta.json" "$card" "$torch_version" "$commit" "$STEPS" "$WARMUP" $MODELS <<'EOF'
import datetime, json, sys
path, card, torch, commit, steps, warmup, *models = sys.argv[1:]
json.dump({"card": card, "torch": torch, "commit": commit, "steps": int(steps), "warmup": int(warmup),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "models": models}, open(path, "w"))
EOF

# run NAME TIMEOUT CMD...: logs to $work/NAME.log, prints the status and the log's end.
run() {
  local name=$1 limit=$2 t0=$SECONDS
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  [ "$rc" = 0 ] || tail -n 25 "$work/$name.log"
  # The table and the archive so far: a call cut short still returns what was measured.
  python3 bench/peer/table.py "$work" > "$OUT/table.md" 2>&1
  tar czf "$OUT/compare.tgz" -C "$work" .
}

for m in $MODELS; do
  run "ievo_$m" "${IEVO_TIMEOUT:-200}" "$IEVO" bench "configs/$m.yaml" --steps "$STEPS" --warmup "$WARMUP" \
    --json "$work/ievo_$m.json"
  grep -E "tokens/s|MFU|memory" "$work/ievo_$m.log"
  run "peer_$m" "${PEER_TIMEOUT:-300}" python3 bench/peer/llama_peer.py --config "configs/$m.yaml" \
    --steps "$STEPS" --warmup "$WARMUP" --compile "$PEER_COMPILE" --sdpa "$PEER_SDPA" --json "$work/peer_$m.json"
  grep -E '"(tokens_per_s|mfu|peak_mem_bytes|first_step_s)"' "$work/peer_$m.log"
done

if [ -x "$KBENCH" ]; then
  run kernels 180 "$KBENCH" --benchmark_filter='hd128|square8192|qkv_proj|mlp_up|lm_head' --benchmark_min_time=0.2 \
    --benchmark_counters_tabular=true --benchmark_out="$work/kernels.json" --benchmark_out_format=json
  grep -E "BM_" "$work/kernels.log"
fi
run sdpa 180 python3 bench/peer/llama_peer.py --attention --json "$work/sdpa.json"

for v in $CKPT_VARIANTS; do
  run "ievo_tinyllama-1.1b_ckpt_$v" "${IEVO_TIMEOUT:-200}" "$IEVO" bench configs/tinyllama-1.1b.yaml \
    --set "model.checkpointing=$v" --steps "$STEPS" --warmup "$WARMUP" --json "$work/ievo_tinyllama-1.1b_ckpt_$v.json"
  grep -E "tokens/s|memory" "$work/ievo_tinyllama-1.1b_ckpt_$v.log"
done


echo "== table ($OUT/table.md)"
cat "$OUT/table.md"
