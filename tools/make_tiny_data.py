#!/usr/bin/env python3
"""Make configs/data/tiny.{bin,idx}: the byte-level tokens (vocabulary 256) of a plain-text file,
one document per paragraph, as a Megatron indexed dataset (uint16). The committed copy was made
from Debian's /usr/share/common-licenses/GPL-3 so that `ievo train configs/tiny.yaml` learns real
English text without a tokenizer:  python3 tools/make_tiny_data.py [TEXT] [PREFIX]"""
import struct
import sys

src = sys.argv[1] if len(sys.argv) > 1 else "/usr/share/common-licenses/GPL-3"
prefix = sys.argv[2] if len(sys.argv) > 2 else "configs/data/tiny"
text = open(src, "rb").read()
docs = [p.strip() + b"\n\n" for p in text.split(b"\n\n") if p.strip()]
with open(prefix + ".bin", "wb") as f:
    for d in docs:
        f.write(struct.pack(f"<{len(d)}H", *d))
sizes = [len(d) for d in docs]
pointers, off = [], 0
for s in sizes:
    pointers.append(off)
    off += 2 * s
with open(prefix + ".idx", "wb") as f:
    f.write(b"MMIDIDX\x00\x00")
    f.write(struct.pack("<QBQQ", 1, 8, len(docs), len(docs) + 1))
    f.write(struct.pack(f"<{len(sizes)}i", *sizes))
    f.write(struct.pack(f"<{len(pointers)}q", *pointers))
    f.write(struct.pack(f"<{len(docs) + 1}q", *range(len(docs) + 1)))
print(f"{prefix}: {len(docs)} documents, {sum(sizes)} tokens")
