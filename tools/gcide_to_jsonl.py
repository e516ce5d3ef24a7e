#!/usr/bin/env python3
"""GCIDE (Debian's dict-gcide, dictd format) -> JSON lines, one dictionary article per document.

The dictd database is two files: gcide.index (one line per headword: headword, TAB, offset, TAB,
length; offset and length in dictd's base64 digits A-Z a-z 0-9 + /) and gcide.dict.dz (the
articles' text, gzip/dictzip-compressed). Several headwords can point to the same article; each
article (offset, length) becomes one document, in file order, without the "00-database-*"
entries (the database's own description and licence text). The text is UTF-8 except for three
articles with stray Windows-1252 bytes, which are decoded as Windows-1252.

Every --valid-every-th article goes to valid.jsonl, the others to train.jsonl; --every N keeps
only every N-th article first (a smaller corpus with the same variety, for tests).

  tools/gcide_to_jsonl.py --dict-dir /usr/share/dictd --out-dir runs/gcide_data
"""
import argparse
import gzip
import json
import os
import sys

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
B64_VALUE = {c: i for i, c in enumerate(B64)}


def b64_number(s):
    v = 0
    for c in s:
        v = v * 64 + B64_VALUE[c]
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dict-dir", required=True, help="directory with gcide.index and gcide.dict.dz")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--valid-every", type=int, default=50, help="article i goes to valid if i %% N == 0")
    ap.add_argument("--every", type=int, default=1, help="keep only every N-th article")
    args = ap.parse_args()

    index = os.path.join(args.dict_dir, "gcide.index")
    data = os.path.join(args.dict_dir, "gcide.dict.dz")
    for f in (index, data):
        if not os.path.isfile(f):
            sys.exit(f"gcide_to_jsonl: {f} not found (install dict-gcide or run tools/gcide_example.sh fetch)")
    articles = set()
    with open(index, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3:
                sys.exit(f"{index}:{n}: expected headword<TAB>offset<TAB>length")
            if parts[0].startswith("00-database-") or parts[0].startswith("00-gcide-") or \
               parts[0].startswith("00-web1913-"):
                continue
            articles.add((b64_number(parts[1]), b64_number(parts[2])))
    with gzip.open(data, "rb") as f:
        text = f.read()

    os.makedirs(args.out_dir, exist_ok=True)
    counts = {"train": 0, "valid": 0}
    outs = {k: open(os.path.join(args.out_dir, k + ".jsonl.tmp"), "w", encoding="utf-8") for k in counts}
    kept = recoded = 0
    for i, (off, length) in enumerate(sorted(articles)):
        if i % args.every:
            continue
        raw = text[off:off + length]
        try:
            doc = raw.decode("utf-8")
        except UnicodeDecodeError:  # 3 articles carry stray Windows-1252 bytes (0x92 = ’)
            doc = raw.decode("cp1252", errors="replace")
            recoded += 1
        doc = doc.strip("\n")
        if not doc.strip():
            continue
        split = "valid" if kept % args.valid_every == 0 else "train"
        outs[split].write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
        counts[split] += 1
        kept += 1
    for k, f in outs.items():
        f.close()
        os.replace(os.path.join(args.out_dir, k + ".jsonl.tmp"), os.path.join(args.out_dir, k + ".jsonl"))
    print(f"gcide_to_jsonl: {counts['train']} train + {counts['valid']} valid articles -> {args.out_dir}"
          f" ({recoded} not UTF-8, read as Windows-1252)", file=sys.stderr)


if __name__ == "__main__":
    main()
