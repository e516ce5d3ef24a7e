#!/usr/bin/env python3
"""bench/peer/table.py on synthetic results of bench/peer/compare.sh (ctest: tools_peer_table).

One model, llama-134m (goal 1.3x), three rounds (round 1 in the folder, rounds 2 and 3 in
round2/ and round3/):
  round   ievo tok/s   peer tok/s   ratio
  1       600,000      500,000      1.200
  2       650,000      480,000      1.354
  3       620,000      490,000      1.265
Medians: ievo 620,000, peer 490,000, ratio 1.265; the rounds' ratios 1.200-1.354; ievo's peak
memory the highest of its rounds (12 GiB). A variant (ckpt_full, 550,000) is set against the
peer's median: 1.122. A single round gives the plain table (no rounds column). "goal met" on
another model (internlm2-1.8b, goal 1.2): yes, by the mean only, by the median only, no, as the
ratio of tokens/s and that of the median steps fall on either side of the goal.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "..", "bench", "peer", "table.py")
GIB = 1024 ** 3


def result(tps, peak_gib, median_step):
    return {"tokens_per_s": tps, "mfu": tps / 1.4e6, "peak_mem_bytes": peak_gib * GIB,
            "step_time_s": 32768 / tps, "step_time_median_s": median_step, "phases_s": {}}


def write(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def table(d):
    return subprocess.run([sys.executable, TOOL, d], check=True, capture_output=True, text=True).stdout


def row(text, first_cell):
    """The cells of the main table's row of a model (the first row that starts with it)."""
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, (first_cell, text)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def main():
    d = tempfile.mkdtemp(prefix="peer_table_")
    try:
        write(os.path.join(d, "meta.json"), {"card": "H100", "models": ["llama-134m"], "steps": 10, "warmup": 4})
        rounds = [(600000, 500000, 10, 0.0546), (650000, 480000, 12, 0.0504), (620000, 490000, 11, 0.0528)]
        for r, (it, pt, peak, med) in enumerate(rounds, start=1):
            sub = d if r == 1 else os.path.join(d, f"round{r}")
            write(os.path.join(sub, "ievo_llama-134m.json"), result(it, peak, med))
            write(os.path.join(sub, "peer_llama-134m.json"), result(pt, 13, 0.0668))
        one = tempfile.mkdtemp(dir=d, prefix="single_")
        shutil.copy(os.path.join(d, "meta.json"), one)
        shutil.copy(os.path.join(d, "ievo_llama-134m.json"), one)
        shutil.copy(os.path.join(d, "peer_llama-134m.json"), one)
        write(os.path.join(d, "ievo_llama-134m_ckpt_full.json"), result(550000, 9, 0.06))

        t = table(d)
        cells = row(t, "llama-134m")
        assert cells[1] == "620,000" and cells[2] == "490,000", cells
        assert cells[3] == "1.265x (1.30x)", cells
        assert cells[4] == f"{0.0668 / 0.0528:.2f}x", cells  # median steps: peer 0.0668, ievo 0.0528
        assert cells[5] == "no", cells  # 1.265 and 1.27 against 1.3
        assert cells[8] == "12.0" and cells[9] == "13.0", cells
        assert cells[10] == "1.200–1.354x (3)", cells
        # internlm2-1.8b (goal 1.2), one round: by the mean only (the peer's slow steps), both,
        # by the median only (ievo's slow steps), neither.
        g = tempfile.mkdtemp(dir=d, prefix="goal_")
        write(os.path.join(g, "meta.json"), {"models": ["internlm2-1.8b"]})
        for (itps, ptps, imed, pmed), want in (((30000, 24000, 0.40, 0.46), "by the mean only"),
                                               ((30000, 24000, 0.40, 0.50), "yes"),
                                               ((30000, 26000, 0.40, 0.49), "by the median only"),
                                               ((30000, 26000, 0.41, 0.46), "no")):
            write(os.path.join(g, "ievo_internlm2-1.8b.json"), result(itps, 50, imed))
            write(os.path.join(g, "peer_internlm2-1.8b.json"), result(ptps, 55, pmed))
            c = row(table(g), "internlm2-1.8b")
            assert c[5] == want, (want, c)
        assert "3 rounds" in t, t
        vrows = [line for line in t.splitlines() if "| ckpt_full |" in line]
        assert len(vrows) == 1 and "| 1.122x |" in vrows[0], vrows

        t1 = table(one)
        cells = row(t1, "llama-134m")
        assert len(cells) == 10 and cells[3] == "1.200x (1.30x)" and cells[5] == "no", cells
        assert "rounds" not in t1, t1
    finally:
        shutil.rmtree(d)
    print("tools_peer_table: ok")


if __name__ == "__main__":
    main()
