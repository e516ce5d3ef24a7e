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
# (blocks|full|none), PEER_SDPA (flash|cudnn|default), CKPT_VARIANTS ("full selective") on
# CKPT_MODELS (tinyllama-1.1b), AUTOTUNE_OFF_MODELS (ievo with IEVO_GEMM_AUTOTUNE=0), WHEEL_BLAS_MODELS
# (ievo with the cuBLAS of PyTorch's wheel), PEER_CUDNN_MODELS (the peer with cuDNN SDPA),
# DENSE_OFF_MODELS (ievo with IEVO_CUDNN_ATTN_DENSE=0), HEAD_CHUNK_VARIANTS ("MODEL:TOKENS ...",
# ievo with --set model.head_chunk_tokens=TOKENS), SET_VARIANTS ("NAME:MODEL:key=value ...", ievo
# with --set key=value), ENV_VARIANTS ("NAME:MODEL:VAR=value ...", ievo with that environment
# variable, e.g. pdl_off:llama-134m:IEVO_PDL=0), SKIP_PEER / SKIP_KERNELS (set: ievo's runs only,
# or no kernel benchmarks), IEVO_TIMEOUT / PEER_TIMEOUT (seconds per run), ROUNDS (1: how many
# times the ievo/peer pairs of all models run, round after round; rounds 2.. into round<R>/, and
# the table gives each side's median over the rounds and the range of the rounds' ratios), OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ievo_compare}
MODELS=${MODELS:-llama-134m tinyllama-1.1b internlm2-1.8b}
ROUNDS=${ROUNDS:-1}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-5}
PEER_COMPILE=${PEER_COMPILE:-blocks}
PEER_SDPA=${PEER_SDPA:-flash}
CKPT_VARIANTS=${CKPT_VARIANTS-full selective}
CKPT_MODELS=${CKPT_MODELS-tinyllama-1.1b}
AUTOTUNE_OFF_MODELS=${AUTOTUNE_OFF_MODELS-}
WHEEL_BLAS_MODELS=${WHEEL_BLAS_MODELS-}
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

# Each round runs every model's pair (ievo, then the peer) before the next round, so that a card
# that drifts (clocks, heat) weighs on every pair alike.
for r in $(seq "$ROUNDS"); do
  sub=""
  [ "$r" = 1 ] || { sub="round$r/"; mkdir -p "$work/$sub"; }
  for m in $MODELS; do
    run "${sub}ievo_$m" "${IEVO_TIMEOUT:-200}" "$IEVO" bench "configs/$m.yaml" --steps "$STEPS" --warmup "$WARMUP" \
      --json "$work/${sub}ievo_$m.json"
    grep -E "tokens/s|MFU|memory" "$work/${sub}ievo_$m.log"
    [ -n "${SKIP_PEER-}" ] && continue
    run "${sub}peer_$m" "${PEER_TIMEOUT:-300}" python3 bench/peer/llama_peer.py --config "configs/$m.yaml" \
      --steps "$STEPS" --warmup "$WARMUP" --compile "$PEER_COMPILE" --sdpa "$PEER_SDPA" --json "$work/${sub}peer_$m.json"
    grep -E '"(tokens_per_s|mfu|peak_mem_bytes|first_step_s)"' "$work/${sub}peer_$m.log"
  done
done

if [ -x "$KBENCH" ] && [ -z "${SKIP_KERNELS-}" ]; then
  run kernels 180 "$KBENCH" --benchmark_filter='hd128|square8192|qkv_proj|mlp_up|lm_head' --benchmark_min_time=0.2 \
    --benchmark_counters_tabular=true --benchmark_out="$work/kernels.json" --benchmark_out_format=json
  grep -E "BM_" "$work/kernels.log"
fi
[ -n "${SKIP_KERNELS-}" ] || run sdpa 180 python3 bench/peer/llama_peer.py --attention --json "$work/sdpa.json"

# variant NAME MODEL [VAR=value ...] -- [ievo bench options]: ievo bench of MODEL under an
# environment, into ievo_MODEL_NAME.json (the table's variants section).
variant() {
  local name=$1 m=$2
  shift 2
  local envs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  run "ievo_${m}_$name" "${IEVO_TIMEOUT:-200}" env "${envs[@]}" "$IEVO" bench "configs/$m.yaml" \
    --steps "$STEPS" --warmup "$WARMUP" --json "$work/ievo_${m}_$name.json" "$@"
  grep -E "tokens/s|memory" "$work/ievo_${m}_$name.log"
}

for v in $CKPT_VARIANTS; do
  for m in $CKPT_MODELS; do
    variant "ckpt_$v" "$m" -- --set "model.checkpointing=$v"
  done
done
# cuDNN attention's ragged graphs instead of its dense ones (runtime/cuda/cudnn_attention.cpp).
for m in ${DENSE_OFF_MODELS-}; do variant dense_off "$m" IEVO_CUDNN_ATTN_DENSE=0 --; done
# The LM head + loss in chunks of another size (models/llama.h head_chunk_tokens).
for mc in ${HEAD_CHUNK_VARIANTS-}; do
  variant "head_chunk_${mc#*:}" "${mc%%:*}" -- --set "model.head_chunk_tokens=${mc#*:}"
done
# Any config override: SET_VARIANTS="NAME:MODEL:key=value ..." runs ievo bench of MODEL with
# --set key=value as variant NAME.
for nmk in ${SET_VARIANTS-}; do
  rest=${nmk#*:}
  variant "${nmk%%:*}" "${rest%%:*}" -- --set "${rest#*:}"
done
# Any environment switch: ENV_VARIANTS="NAME:MODEL:VAR=value ..." as variant NAME.
for nmv in ${ENV_VARIANTS-}; do
  rest=${nmv#*:}
  variant "${nmv%%:*}" "${rest%%:*}" "${rest#*:}" --
done
# The peer with PyTorch's cuDNN SDPA backend instead of flash (a stronger yardstick).
for m in ${PEER_CUDNN_MODELS-}; do
  run "peer_${m}_sdpa_cudnn" "${PEER_TIMEOUT:-300}" python3 bench/peer/llama_peer.py --config "configs/$m.yaml" \
    --steps "$STEPS" --warmup "$WARMUP" --compile "$PEER_COMPILE" --sdpa cudnn --json "$work/peer_${m}_sdpa_cudnn.json"
  grep -E '"(tokens_per_s|mfu|peak_mem_bytes)"' "$work/peer_${m}_sdpa_cudnn.log"
done
# cuBLASLt's first heuristic choice instead of the timed one (runtime/ops/matmul.cu).
if [ -n "$AUTOTUNE_OFF_MODELS" ]; then
  for m in $AUTOTUNE_OFF_MODELS; do variant autotune_off "$m" IEVO_GEMM_AUTOTUNE=0 --; done
  [ -x "$KBENCH" ] && run kernels_autotune_off 120 env IEVO_GEMM_AUTOTUNE=0 "$KBENCH" \
    --benchmark_filter='matmul' --benchmark_min_time=0.2 --benchmark_counters_tabular=true \
    --benchmark_out="$work/kernels_autotune_off.json" --benchmark_out_format=json
  grep -E "BM_" "$work/kernels_autotune_off.log"
fi
# The cuBLAS and cuDNN of PyTorch's wheels (often newer than the system's) instead of the system ones.
wheel_root=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null)
wb_dir=""
for lib in 'libcublasLt.so*' 'libcudnn.so*'; do
  f=$(find "$wheel_root" -name "$lib" 2>/dev/null | head -1)
  [ -n "$f" ] && wb_dir="${wb_dir:+$wb_dir:}$(dirname "$f")"
done
if [ -n "$WHEEL_BLAS_MODELS" ] && [ -n "$wb_dir" ]; then
  echo "== cuBLAS/cuDNN of the PyTorch wheel: $wb_dir"
  for m in $WHEEL_BLAS_MODELS; do variant wheel_cublas "$m" "LD_LIBRARY_PATH=$wb_dir:${LD_LIBRARY_PATH:-}" --; done
  [ -x "$KBENCH" ] && run kernels_wheel_cublas 120 env "LD_LIBRARY_PATH=$wb_dir:${LD_LIBRARY_PATH:-}" "$KBENCH" \
    --benchmark_filter='matmul|hd128_cudnn' --benchmark_min_time=0.2 --benchmark_counters_tabular=true \
    --benchmark_out="$work/kernels_wheel_cublas.json" --benchmark_out_format=json
  grep -E "BM_" "$work/kernels_wheel_cublas.log"
fi


echo "== table ($OUT/table.md)"
cat "$OUT/table.md"
