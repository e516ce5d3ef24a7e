#!/usr/bin/env bash
# Runs a command while sampling the SM clock and power (nvidia-smi, every 100 ms); prints the
# median clock and mean power while the GPU is busy (> 150 W). Usage: tools/clock_probe.sh CMD...
set -uo pipefail
log=$(mktemp)
nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 100 > "$log" 2>/dev/null &
smi=$!
"$@"
rc=$?
kill "$smi" 2>/dev/null
python3 - "$log" <<'PY'
import sys
rows = [[float(x) for x in l.split(",")] for l in open(sys.argv[1]) if l.count(",") == 1 and "N/A" not in l]
busy = [r for r in rows if r[1] > 150]
if busy:
    c = sorted(r[0] for r in busy)
    print(f"  busy samples {len(busy)}: SM clock median {c[len(c) // 2]:.0f} MHz (min {c[0]:.0f}), power mean {sum(r[1] for r in busy) / len(busy):.0f} W")
PY
rm -f "$log"
exit $rc
