"""Writes the sort workload's input: random text lines of 20-180 bytes.
usage: gen_lines.py SCALE OUTPUT     (SCALE 1.0: ~640 MB, ~1 GiB in sort)"""
import sys
import numpy as np

scale, out = float(sys.argv[1]), sys.argv[2]
total = max(1 << 20, int(640e6 * scale))
rng = np.random.default_rng(3)
alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789 ", dtype=np.uint8)
with open(out, "wb") as f:
    written = 0
    while written < total:
        chars = alphabet[rng.integers(0, len(alphabet), size=1 << 22)]
        ends = np.cumsum(rng.integers(20, 180, size=(1 << 22) // 20))
        ends = ends[ends < len(chars)]
        chars[ends] = ord("\n")
        block = chars[: ends[-1] + 1].tobytes()
        f.write(block)
        written += len(block)
