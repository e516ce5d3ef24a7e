#!/usr/bin/env bash
# Side-by-side A/B of `ievo bench` in one call: the variants alternate (A B A B ...) so that clock
# and thermal drift fall on both alike, and the mean tokens/s of each variant is printed per model.
#
#   tools/ab_bench.sh "NAME=VAR=value ..." [MODELS] [ROUNDS]
#
# A variant is NAME=VAR=value (an environment variable for ievo), NAME=--set=key=value (a config
# override) or NAME=bin=PATH (another ievo binary, e.g. the previous commit's). MODELS are config
# names under configs/ (default: the three of issue 8), ROUNDS the number of alternations (2).
# STEPS / WARMUP as in bench/peer/compare.sh (8 / 3). IEVO: the binary (build-dev/ievo, else
# build/ievo). Example, cuDNN attention's plan autotuning off and on:
#   tools/ab_bench.sh "off=IEVO_CUDNN_ATTN_AUTOTUNE=0 on=IEVO_CUDNN_ATTN_AUTOTUNE=1" internlm2-1.8b
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { sed -n '2,13p' "$0"; exit 2; }
VARIANTS=$1
MODELS=${2:-llama-134m tinyllama-1.1b internlm2-1.8b}
ROUNDS=${3:-2}
IEVO=${IEVO:-build-dev/ievo}
[ -x "$IEVO" ] || IEVO=build/ievo
work=$(mktemp -d /tmp/ievo_ab.XXXXXX)

for m in $MODELS; do
  for r in $(seq "$ROUNDS"); do
    for v in $VARIANTS; do
      name=${v%%=*} spec=${v#*=}
      bin=$IEVO envs=() args=()
      case "$spec" in
        bin=*) bin=${spec#bin=} ;;
        --set=*) args=(--set "${spec#--set=}") ;;
        *) envs=("$spec") ;;
      esac
      log="$work/${m}_${name}_$r.log"
      env "${envs[@]}" "$bin" bench "configs/$m.yaml" --steps "${STEPS:-8}" --warmup "${WARMUP:-3}" \
        "${args[@]}" > "$log" 2>&1 || { echo "$m $name round $r failed:"; tail -5 "$log"; }
      tps=$(awk '/tokens\/s/{print $2; exit}' "$log")
      echo "$m $name round $r: ${tps:-?} tokens/s  $(grep -E '^ +(forward|backward|optimizer)' "$log" | awk '{printf "%s %s ms  ", $1, $2}')"
      echo "$m $name $tps" >> "$work/all.txt"
    done
  done
done
echo "== mean tokens/s per variant"
awk '$3 != "" {s[$1" "$2] += $3; n[$1" "$2]++} END {for (k in s) printf "%-40s %10.0f  (%d runs)\n", k, s[k] / n[k], n[k]}' \
  "$work/all.txt" | sort
