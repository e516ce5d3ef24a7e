#!/usr/bin/env bash
# The real-text example (README "Real text: GCIDE"): the GNU Collaborative International
# Dictionary of English from Debian's dict-gcide package -> one JSON line per article ->
# a 4000-piece SentencePiece BPE tokenizer -> Megatron .bin/.idx (train + valid) ->
# configs/gcide.yaml (a small Llama on the CPU, packed articles, validation) -> ievo generate.
#
#   tools/gcide_example.sh          everything; re-running skips what is done (the .jsonl, the
#                                   up-to-date .bin/.idx and tokenizer, a finished run)
#   tools/gcide_example.sh fetch    only make the dictionary files available (tools/setup.sh)
#
# The dictionary comes from /usr/share/dictd when dict-gcide is installed; otherwise the .deb
# (14.8 MB) is downloaded with `apt-get download` and unpacked into .cache/gcide (no root
# needed, and no dictd server installed or started).
# Env: IEVO_BUILD_DIR (default build), GCIDE_DATA (default runs/gcide_data).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=.cache/gcide
DATA=${GCIDE_DATA:-runs/gcide_data}
BIN=${IEVO_BUILD_DIR:-build}/ievo

dict_dir() {
  if [ -f /usr/share/dictd/gcide.dict.dz ]; then echo /usr/share/dictd; else echo "$CACHE/usr/share/dictd"; fi
}

fetch() {
  [ -f "$(dict_dir)/gcide.dict.dz" ] && return 0
  mkdir -p "$CACHE"
  if ! (cd "$CACHE" && apt-get download dict-gcide >/dev/null 2>&1); then
    [ "$(id -u)" -eq 0 ] && apt-get update -qq >/dev/null 2>&1 || true
    (cd "$CACHE" && apt-get download dict-gcide >/dev/null 2>&1) ||
      { echo "gcide: could not download dict-gcide (apt-get download dict-gcide)" >&2; return 1; }
  fi
  dpkg-deb -x "$CACHE"/dict-gcide_*.deb "$CACHE"
  rm -f "$CACHE"/dict-gcide_*.deb
  echo "gcide: dictionary in $(dict_dir)" >&2
}

fetch
[ "${1:-}" = fetch ] && exit 0

[ -x "$BIN" ] || { echo "gcide: $BIN not found: build first (tools/setup.sh)" >&2; exit 1; }
if [ ! -f "$DATA/train.jsonl" ] || [ ! -f "$DATA/valid.jsonl" ]; then
  python3 tools/gcide_to_jsonl.py --dict-dir "$(dict_dir)" --out-dir "$DATA"
fi
W=$(nproc)
"$BIN" preprocess --input "$DATA/train.jsonl" --output-prefix "$DATA/train" \
  --tokenizer "$DATA/tokenizer.model" --train-tokenizer 4000 --workers "$W"
"$BIN" preprocess --input "$DATA/valid.jsonl" --output-prefix "$DATA/valid" \
  --tokenizer "$DATA/tokenizer.model" --workers "$W"
"$BIN" train configs/gcide.yaml
for prompt in 'Moon \Moon\, n.' 'Quixotic \Quix*ot"ic\, a.' 'Telescope'; do
  echo "----"
  "$BIN" generate runs/gcide --tokenizer "$DATA/tokenizer.model" --prompt "$prompt" \
    --max-new-tokens 120 --temperature 0.7 --top-p 0.9 --seed 1
done
