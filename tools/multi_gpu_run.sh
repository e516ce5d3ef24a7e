#!/usr/bin/env bash
# The multi-GPU checks of docs/scaling.md, in one device call (run through tools/device_run.sh's
# IEVO_DEVICE_EXTRA so the library path is set):
#   1. NCCL correctness: the HF fixtures under dp=N (N = GPUs here) with ZeRO 0/1/2/3 in fp32,
#      against the one-GPU run: every step's loss and grad norm within 1e-5 relative;
#   2. tensor / sequence / pipeline parallelism over NCCL: the same fixtures under tp=N, tp=N with
#      Megatron sequence parallelism, Ulysses S=N, pp=N (1F1B and GPipe), fp32, against the one-GPU
#      run within 1e-5 (the layouts' own checks; equal-to-one-process is tested on CPU in CI);
#   3. weak scaling of TinyLlama-1.1B (T2048, micro-batch 8 per GPU, bf16), ZeRO-1 and ZeRO-3:
#      tokens/s per GPU on 1 and N GPUs (median over the timed steps) and the efficiency; and the
#      same global batch (8 x 2048 tokens) on N GPUs under tp=N and pp=N (strong scaling).
# IEVO_MGPU_PARTS selects parts ("dp mp scaling", the default).
# Logs and a markdown summary go to $OUT (multi_gpu.log, scaling.md).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${IEVO_BIN:-build-dev/ievo}
N=${IEVO_GPUS:-$(nvidia-smi -L | wc -l)}
OUTDIR=${OUT:-/tmp/ievo-out}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/multi_gpu.log
SUM=$OUTDIR/scaling.md
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=4
MPI="mpirun --allow-run-as-root --oversubscribe -np $N -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE -x OMP_NUM_THREADS"
W=/tmp/ievo-mgpu
rm -rf "$W" && mkdir -p "$W"
echo "# Multi-GPU run: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x$N, $(date -u +%F)" > "$SUM"

series() { python3 -c "import json,sys; print(json.dumps([json.loads(l)[sys.argv[2]] for l in open(sys.argv[1])]))" "$1" "$2"; }
compare() {  # compare RUN_A RUN_B -> max relative difference of loss and grad_norm
  python3 - "$1" "$2" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
b = [json.loads(l) for l in open(sys.argv[2] + "/metrics.jsonl")]
assert len(a) == len(b) and a, (len(a), len(b))
print(max(abs(x[k] - y[k]) / abs(y[k]) for x, y in zip(a, b) for k in ("loss", "grad_norm")))
PY
}

PARTS=${IEVO_MGPU_PARTS:-dp mp scaling}
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

if want dp; then
echo "## NCCL correctness (fp32, HF fixtures, dp=$N vs one GPU)" >> "$SUM"
echo "| fixture | zero | max rel. diff (loss, grad norm) | ok (< 1e-5) |" >> "$SUM"
echo "|---|---|---|---|" >> "$SUM"
for v in llama_gqa llama_tied; do
  F=tests/fixtures/$v
  common="--set model.init_from_hf=$F/hf --set data.paths=[$F/data] --set run.device=cuda --set train.micro_batch_size=1"
  $BIN train $F/train.yaml $common --set run.dir=$W/$v-ref >> "$LOG" 2>&1 || echo "ref $v failed" >> "$LOG"
  for z in 0 1 2 3; do
    $MPI $BIN train $F/train.yaml $common --set parallel.zero=$z --set run.dir=$W/$v-z$z >> "$LOG" 2>&1
    rc=$?
    d=$(compare $W/$v-z$z $W/$v-ref 2>>"$LOG" || echo "failed(rc=$rc)")
    ok=$(python3 -c "print('yes' if float('$d') < 1e-5 else 'NO')" 2>/dev/null || echo NO)
    echo "| $v | $z | $d | $ok |" >> "$SUM"
  done
done
fi

if want mp; then
echo "## Tensor, sequence and pipeline parallelism over NCCL (fp32, HF fixtures, $N GPUs vs one GPU)" >> "$SUM"
echo "| fixture | layout | max rel. diff (loss, grad norm) | ok (< 1e-5) |" >> "$SUM"
echo "|---|---|---|---|" >> "$SUM"
for v in llama_gqa llama_tied; do
  F=tests/fixtures/$v
  common="--set model.init_from_hf=$F/hf --set data.paths=[$F/data] --set run.device=cuda --set train.micro_batch_size=1"
  [ -f "$W/$v-ref/metrics.jsonl" ] || $BIN train $F/train.yaml $common --set run.dir=$W/$v-ref >> "$LOG" 2>&1
  for layout in "parallel.tensor=$N" "parallel.tensor=$N parallel.sequence=megatron parallel.zero=1" \
                "parallel.sequence=ulysses parallel.sequence_size=$N" "parallel.pipeline=$N" \
                "parallel.pipeline=$N parallel.schedule=gpipe"; do
    sets=""
    for kv in $layout; do sets="$sets --set $kv"; done
    name=$(echo "$layout" | tr ' =' '_-')
    $MPI $BIN train $F/train.yaml $common $sets --set run.dir=$W/$v-$name >> "$LOG" 2>&1
    rc=$?
    d=$(compare $W/$v-$name $W/$v-ref 2>>"$LOG" || echo "failed(rc=$rc)")
    ok=$(python3 -c "print('yes' if float('$d') < 1e-5 else 'NO')" 2>/dev/null || echo NO)
    echo "| $v | $layout | $d | $ok |" >> "$SUM"
  done
done
fi

if want scaling; then
echo "## Weak scaling, TinyLlama-1.1B (T2048, micro-batch 8 per GPU, bf16)" >> "$SUM"
echo "| zero | GPUs | tokens/s (all) | tokens/s per GPU | efficiency | peak GiB |" >> "$SUM"
echo "|---|---|---|---|---|---|" >> "$SUM"
steps=${IEVO_SCALING_STEPS:-8}
median() { python3 - "$1" <<'PY'
import json, statistics, sys
m = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")][2:]
print(statistics.median(x["tokens_per_s"] for x in m), max(x.get("peak_mem_bytes", 0) for x in m) / 2**30)
PY
}
for z in 1 3; do
  base=""
  for g in 1 $N; do
    run=$W/tl-z$z-g$g
    args="configs/tinyllama-1.1b.yaml --set train.steps=$steps --set train.global_batch_size=$((8 * g)) --set parallel.zero=$z --set run.dir=$run --set checkpoint.at_end=false"
    if [ "$g" = 1 ]; then $BIN train $args >> "$LOG" 2>&1; else $MPI $BIN train $args >> "$LOG" 2>&1; fi
    read -r tps mem < <(median $run 2>>"$LOG" || echo "0 0")
    per=$(python3 -c "print(round($tps / $g))")
    [ -z "$base" ] && base=$per
    eff=$(python3 -c "print(f'{100 * $per / max($base, 1):.1f}%')")
    echo "| $z | $g | $(python3 -c "print(round($tps))") | $per | $eff | $(python3 -c "print(f'{$mem:.1f}')") |" >> "$SUM"
  done
done
echo "## Strong scaling, TinyLlama-1.1B (T2048, global batch 8, bf16): one GPU vs $N" >> "$SUM"
echo "| layout | GPUs | tokens/s | speed-up | peak GiB (rank 0) |" >> "$SUM"
echo "|---|---|---|---|---|" >> "$SUM"
base=""
for layout in "one-gpu" "parallel.tensor=$N" "parallel.tensor=$N parallel.sequence=megatron" \
              "parallel.pipeline=$N train.micro_batch_size=1"; do
  sets=""
  [ "$layout" = one-gpu ] || for kv in $layout; do sets="$sets --set $kv"; done
  name=$(echo "$layout" | tr ' =' '_-')
  run=$W/tl-strong-$name
  args="configs/tinyllama-1.1b.yaml --set train.steps=$steps --set train.global_batch_size=8 $sets --set run.dir=$run --set checkpoint.at_end=false"
  if [ "$layout" = one-gpu ]; then $BIN train $args >> "$LOG" 2>&1; g=1; else $MPI $BIN train $args >> "$LOG" 2>&1; g=$N; fi
  read -r tps mem < <(median $run 2>>"$LOG" || echo "0 0")
  [ -z "$base" ] && base=$tps
  echo "| $layout | $g | $(python3 -c "print(round($tps))") | $(python3 -c "print(f'{$tps / max($base, 1):.2f}x')") | $(python3 -c "print(f'{$mem:.1f}')") |" >> "$SUM"
done
fi
cat "$SUM"
