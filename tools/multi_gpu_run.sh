#!/usr/bin/env bash
# The multi-GPU checks of docs/scaling.md (issue 12) on the N GPUs of one host, through
# tools/device_run.sh's IEVO_DEVICE_EXTRA (so the library path is set). Parts (IEVO_MGPU_PARTS,
# default all; a device call holds about two of them in its 10 minutes):
#   comm     ievo bench --comm on 2, 4, .. N ranks: NCCL bus bandwidth of ievo's all-reduce,
#            reduce-scatter and all-gather from 1 MiB to 1 GiB (launch/bench_comm.h)
#   correct  fp32 runs of two HF fixtures (llama_gqa, llama_tied: 2 layers) and a 4-layer random
#            model ("deep", configs/tiny.yaml) on every layout that fits N and the model: dp = N
#            with ZeRO 0-3, tp = N (+ Megatron SP), Ulysses S = N, pp = N (1F1B, GPipe), and with
#            N >= 4 dp x tp, dp x pp (also interleaved), tp x pp; with N >= 8 dp x tp x pp. Each is
#            compared with the model's one-GPU run: every step's loss and grad norm, and the final
#            weights (ievo convert to-hf of the last checkpoint; the relative L2 difference of all
#            weights together), both within 1e-5 relative; the worst single tensor is shown beside
#   weak     TinyLlama-1.1B (T2048, micro-batch 8 per GPU, bf16) on 1, 2, 4, .. N GPUs with
#            ZeRO-1 and ZeRO-3: tokens/s per GPU and the efficiency against one GPU
#   strong   TinyLlama-1.1B, global batch 8, on one GPU and on N under tp = N, tp = N + SP, pp = N
#   tp       the 7B-class Llama (configs/llama-7b.yaml, T4096, global batch 8 of micro-batches of
#            1, selective recomputation) under tp = 2, 4, .. N, tp = N + SP, and tp 2 x dp N/2
#            with ZeRO-1: tokens/s per GPU and MFU
# Beside every measured speed: `ievo plan`'s prediction, calibrated by a one-GPU ievo bench of the
# same model (tp: the same shape with 4 layers) and given the measured all-reduce bus bandwidth at
# 64 MiB (the size of a TinyLlama tensor-parallel all-reduce; ZeRO's buckets are 25 MiB).
# Environment: IEVO_BIN (build-dev/ievo), IEVO_GPUS (all), IEVO_MGPU_DEVICE (cuda; cpu runs the
# correct part over MPI, for trying the script without a GPU), IEVO_RUN_TIMEOUT per run (300 s),
# IEVO_SCALING_STEPS / WARMUP timed and warm-up steps of a bench (6 / 3), IEVO_WEAK_ZERO stages of
# the weak part ("1 3"), IEVO_TP_SP=0 leaves out the tp part's sequence-parallel row.
# Logs to $OUT: multi_gpu.log (every run's output), scaling.md (the tables), runs.tgz (metrics,
# bench and plan JSON).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${IEVO_BIN:-build-dev/ievo}
DEVICE=${IEVO_MGPU_DEVICE:-cuda}
if [ "$DEVICE" = cuda ]; then N=${IEVO_GPUS:-$(nvidia-smi -L | wc -l)}; else N=${IEVO_GPUS:-4}; fi
OUTDIR=${OUT:-/tmp/ievo-out}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/multi_gpu.log
SUM=$OUTDIR/scaling.md
W=${IEVO_MGPU_WORK:-/tmp/ievo-mgpu}
REP="python3 tools/mgpu_report.py"
TMO=${IEVO_RUN_TIMEOUT:-300}
export NCCL_NVLS_ENABLE=0
rm -rf "$W" && mkdir -p "$W"
CARD=$([ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || echo cpu)
echo "# Multi-GPU run: $CARD x$N, $(date -u +%F), ievo $(cat build-dev/paths.env 2>/dev/null | sed -n 's/^COMMIT=//p')" > "$SUM"

# run NP CMD...: the command on NP ranks (plainly when NP = 1), host threads shared out, each run
# bounded; its output goes to the log.
run() {
  local np=$1
  shift
  local threads=$(( $(nproc) / np ))
  [ "$threads" -gt 16 ] && threads=16
  [ "$threads" -lt 1 ] && threads=1
  echo "### $(date -u +%T) np=$np: $*" >> "$LOG"
  if [ "$np" = 1 ]; then
    OMP_NUM_THREADS=$threads timeout "$TMO" "$@" >> "$LOG" 2>&1
  else
    OMP_NUM_THREADS=$threads timeout "$TMO" mpirun --allow-run-as-root --oversubscribe --bind-to none -np "$np" \
      -x LD_LIBRARY_PATH -x NCCL_NVLS_ENABLE -x OMP_NUM_THREADS "$@" >> "$LOG" 2>&1
  fi
  local rc=$?
  [ $rc = 0 ] || echo "### rc=$rc" >> "$LOG"
  return $rc
}
sets() { local s=""; for kv in "$@"; do s="$s --set $kv"; done; echo "$s"; }
py() { python3 -c "$1"; }
PARTS=${IEVO_MGPU_PARTS:-comm correct weak strong tp}
want() { case " $PARTS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
# GPU counts 2, 4, .. N (powers of two up to N).
counts() { local g=2; while [ "$g" -le "$N" ]; do echo $g; g=$((g * 2)); done; }

# bw G: the measured all-reduce bus bandwidth at 64 MiB over G ranks (GB/s); measured here if the
# comm part did not run.
bw() {
  local f=$W/comm-g$1.json
  [ -f "$f" ] || run "$1" $BIN bench --comm --device "$DEVICE" --comm-min-mib 64 --comm-max-mib 64 --json "$f"
  $REP busbw "$f" all_reduce 64 2>>"$LOG" || echo 360
}

if want comm; then
  echo "## NCCL bus bandwidth of ievo's collectives (GB/s; sizes and factors as nccl-tests)" >> "$SUM"
  echo "| GPUs | op | 64 MiB | 256 MiB | 1 GiB |" >> "$SUM"
  echo "|---|---|---|---|---|" >> "$SUM"
  for g in $(counts); do
    run "$g" $BIN bench --comm --device "$DEVICE" --json "$W/comm-g$g.json"
    for op in all_reduce reduce_scatter all_gather; do
      echo "| $g | $op | $($REP busbw "$W/comm-g$g.json" $op 64) | $($REP busbw "$W/comm-g$g.json" $op 256) | $($REP busbw "$W/comm-g$g.json" $op 1024) |" >> "$SUM"
    done
  done
fi

if want correct; then
  echo "## Correctness: fp32, every layout against the model's one-GPU run" >> "$SUM"
  echo "| model | layout | GPUs | loss, grad norm: max rel. diff | final weights: rel. L2 diff | worst tensor | ok (< 1e-5) |" >> "$SUM"
  echo "|---|---|---|---|---|---|---|" >> "$SUM"
  G=$(( N > 4 ? N : 4 ))  # fixtures: global batch 4 of micro-batches of 1 (dp up to 4)
  layouts=()
  for z in 0 1 2 3; do layouts+=("$N|parallel.zero=$z"); done
  layouts+=("$N|parallel.tensor=$N" "$N|parallel.tensor=$N parallel.sequence=megatron parallel.zero=1"
            "$N|parallel.sequence=ulysses parallel.sequence_size=$N" "$N|parallel.pipeline=$N"
            "$N|parallel.pipeline=$N parallel.schedule=gpipe")
  if [ "$N" -ge 4 ]; then
    layouts+=("4|parallel.tensor=2 parallel.zero=1" "4|parallel.tensor=2 parallel.sequence=megatron parallel.zero=3"
              "4|parallel.pipeline=2 parallel.zero=1" "4|parallel.tensor=2 parallel.pipeline=2"
              "4|parallel.pipeline=2 parallel.schedule=interleaved parallel.virtual_stages=2 parallel.zero=2")
  fi
  if [ "$N" -ge 8 ]; then
    layouts+=("8|parallel.tensor=2 parallel.pipeline=2 parallel.zero=1"
              "8|parallel.tensor=2 parallel.pipeline=2 parallel.sequence=megatron parallel.zero=3")
  fi
  for model in llama_gqa llama_tied deep; do
    case $model in  # heads kv layers; the config and its settings
      llama_gqa) H=4 KV=2 L=2 ;;
      llama_tied) H=4 KV=4 L=2 ;;
      deep) H=4 KV=2 L=4 ;;
    esac
    if [ "$model" = deep ]; then
      cfg=configs/tiny.yaml
      common="model.num_layers=4 data.seq_len=64 train.steps=6 schedule.warmup_steps=2 train.global_batch_size=8 train.micro_batch_size=1 train.log_every=1 train.precision=fp32 run.device=$DEVICE"
    else
      F=tests/fixtures/$model
      cfg=$F/train.yaml
      common="model.init_from_hf=$F/hf data.paths=[$F/data] run.device=$DEVICE train.micro_batch_size=1 train.global_batch_size=$G"
    fi
    ref=$W/$model-ref
    # shellcheck disable=SC2046
    run 1 $BIN train $cfg $(sets $common run.dir=$ref) || echo "reference run of $model failed" >> "$LOG"
    last=$(ls -d "$ref"/checkpoints/step_* 2>/dev/null | sort -V | tail -1)
    [ -n "$last" ] && run 1 $BIN convert to-hf "$last" "$ref/hf"
    for entry in "${layouts[@]}"; do
      np=${entry%%|*}
      layout=${entry#*|}
      # Skip what the model cannot split: heads / kv heads over tp and S, layers over pp x V.
      tp=1 pp=1 S=1 V=1
      for kv in $layout; do
        case $kv in
          parallel.tensor=*) tp=${kv#*=} ;;
          parallel.pipeline=*) pp=${kv#*=} ;;
          parallel.sequence_size=*) S=${kv#*=} ;;
          parallel.virtual_stages=*) V=${kv#*=} ;;
        esac
      done
      ok_tp=$(( H % tp == 0 && (KV % tp == 0 || tp % KV == 0) ))
      ok_s=$(( H % S == 0 && KV % S == 0 ))
      ok_pp=$(( pp * V <= L ))
      [ "$ok_tp$ok_s$ok_pp" = 111 ] || continue
      name=$model-$(echo "$layout" | tr ' =' '_-' | sed 's/parallel\.//g')
      # shellcheck disable=SC2046
      run "$np" $BIN train $cfg $(sets $common $layout run.dir=$W/$name)
      rc=$?
      d=$($REP metrics "$W/$name" "$ref" 2>>"$LOG" || echo "failed(rc=$rc)")
      last=$(ls -d "$W/$name"/checkpoints/step_* 2>/dev/null | sort -V | tail -1)
      wd="no-checkpoint" wt="-" wn=""
      if [ -n "$last" ] && run 1 $BIN convert to-hf "$last" "$W/$name/hf"; then
        read -r wd wt wn < <($REP weights "$W/$name/hf" "$ref/hf" 2>>"$LOG" || echo "failed - -")
      fi
      ok=$(py "print('yes' if float('$d') < 1e-5 and float('$wd') < 1e-5 else 'NO')" 2>/dev/null || echo NO)
      echo "| $model | $layout | $np | $d | $wd | $wt ${wn#model.} | $ok |" >> "$SUM"
    done
  done
fi

# bench NP NAME CONFIG SETS...: ievo bench --json $W/NAME.json on NP ranks.
STEPS=${IEVO_SCALING_STEPS:-6}
bench() {
  local np=$1 name=$2 cfg=$3
  shift 3
  # shellcheck disable=SC2046
  run "$np" $BIN bench "$cfg" --steps "$STEPS" --warmup "${WARMUP:-3}" $(sets "$@") --json "$W/$name.json"
}
# plan NAME CONFIG DP BENCH BW SETS...: ievo plan's estimate into $W/NAME-plan.json.
plan() {
  local name=$1 cfg=$2 dp=$3 calib=$4 bwv=$5
  shift 5
  # shellcheck disable=SC2046
  $BIN plan "$cfg" $(sets "$@") --dp "$dp" --bench-json "$calib" --intra-bw-gbs "$bwv" --json "$W/$name-plan.json" \
    >> "$LOG" 2>&1 || echo "### plan $name failed" >> "$LOG"
}
# Measured tokens/s (by the median step), per GPU, MFU %, peak GiB of a bench; and a plan's per GPU.
measured() {
  py "import json; j = json.load(open('$W/$1.json')); t = j['global_batch'] * j['seq_len'] / j['step_time_median_s']
print(round(t), round(t / j['ranks']), f\"{100 * j['mfu'] * j['tokens_per_s'] ** -1 * t:.1f}\", f\"{j['peak_mem_bytes'] / 2**30:.1f}\")" 2>>"$LOG" || echo "0 0 0 0"
}
planned() { $REP get "$W/$1-plan.json" tokens_per_s_per_gpu 2>>"$LOG" | py "import sys; print(round(float(sys.stdin.read() or 0)))" 2>/dev/null || echo n/a; }

if want weak; then
  echo "## Weak scaling, TinyLlama-1.1B (T2048, micro-batch 8 per GPU, bf16; tokens/s by the median step)" >> "$SUM"
  echo "| ZeRO | GPUs | tokens/s | per GPU | efficiency | plan per GPU | peak GiB |" >> "$SUM"
  echo "|---|---|---|---|---|---|---|" >> "$SUM"
  for z in ${IEVO_WEAK_ZERO:-1 3}; do
    base=0
    for g in 1 $(counts); do
      name=tl-z$z-g$g
      bench "$g" $name configs/tinyllama-1.1b.yaml parallel.zero=$z train.global_batch_size=$((8 * g))
      read -r tps per mfu mem < <(measured $name)
      [ "$g" = 1 ] && base=$per
      pg="-"
      if [ "$g" -gt 1 ]; then
        plan $name configs/tinyllama-1.1b.yaml "$g" "$W/tl-z$z-g1.json" "$(bw "$g")" parallel.zero=$z train.global_batch_size=$((8 * g))
        pg=$(planned $name)
      fi
      eff=$(py "print(f'{100 * $per / max($base, 1):.1f}%')")
      echo "| $z | $g | $tps | $per | $eff | $pg | $mem |" >> "$SUM"
    done
  done
fi

if want strong; then
  echo "## Strong scaling, TinyLlama-1.1B (T2048, global batch 8, bf16)" >> "$SUM"
  echo "| layout | GPUs | tokens/s | speed-up | per GPU | plan per GPU | peak GiB (rank 0) |" >> "$SUM"
  echo "|---|---|---|---|---|---|---|" >> "$SUM"
  calib=$W/tl-z1-g1.json
  [ -f "$calib" ] || bench 1 tl-z1-g1 configs/tinyllama-1.1b.yaml parallel.zero=1
  base=$(measured tl-z1-g1 | cut -d' ' -f1)
  for layout in "parallel.tensor=$N" "parallel.tensor=$N parallel.sequence=megatron" \
                "parallel.pipeline=$N train.micro_batch_size=1"; do
    name=tl-strong-$(echo "$layout" | tr ' =' '_-' | sed 's/parallel\.//g')
    # shellcheck disable=SC2086
    bench "$N" $name configs/tinyllama-1.1b.yaml $layout
    read -r tps per mfu mem < <(measured $name)
    # shellcheck disable=SC2086
    plan $name configs/tinyllama-1.1b.yaml 1 "$calib" "$(bw "$N")" $layout
    echo "| $layout | $N | $tps | $(py "print(f'{$tps / max($base, 1):.2f}x')") | $per | $(planned $name) | $mem |" >> "$SUM"
  done
fi

if want tp; then
  echo "## Tensor parallelism, 7B-class Llama (configs/llama-7b.yaml: d4096 L32 h32/8 ffn14336, 7.24B; T4096, global batch 8 x micro-batch 1, selective recomputation, bf16)" >> "$SUM"
  echo "| layout | GPUs | tokens/s | per GPU | MFU | plan per GPU | plan MFU | peak GiB (rank 0) |" >> "$SUM"
  echo "|---|---|---|---|---|---|---|---|" >> "$SUM"
  # Calibration: the same shape with 4 layers on one GPU.
  bench 1 l7-L4-g1 configs/llama-7b.yaml model.num_layers=4 train.global_batch_size=8
  tp_layouts=()
  for t in $(counts); do tp_layouts+=("$t|parallel.tensor=$t"); done
  [ "${IEVO_TP_SP:-1}" = 1 ] && tp_layouts+=("$N|parallel.tensor=$N parallel.sequence=megatron")
  [ "$N" -ge 4 ] && tp_layouts+=("$N|parallel.tensor=2 parallel.zero=1")
  for entry in "${tp_layouts[@]}"; do
    np=${entry%%|*}
    layout=${entry#*|}
    tp=$(echo "$layout" | sed -n 's/.*parallel.tensor=\([0-9]*\).*/\1/p')
    name=l7-$(echo "$layout" | tr ' =' '_-' | sed 's/parallel\.//g')-g$np
    # shellcheck disable=SC2086
    bench "$np" $name configs/llama-7b.yaml $layout
    read -r tps per mfu mem < <(measured $name)
    # shellcheck disable=SC2086
    plan $name configs/llama-7b.yaml $((np / tp)) "$W/l7-L4-g1.json" "$(bw "$np")" $layout
    pm=$($REP get "$W/$name-plan.json" mfu 2>>"$LOG" | py "import sys; print(f'{100 * float(sys.stdin.read()):.1f}%')" 2>/dev/null || echo n/a)
    echo "| $layout | $np | $tps | $per | $mfu% | $(planned $name) | $pm | $mem |" >> "$SUM"
  done
fi

tar -czf "$OUTDIR/runs.tgz" -C "$W" --exclude='*/checkpoints' --exclude='*/hf' . 2>/dev/null || true
cat "$SUM"
