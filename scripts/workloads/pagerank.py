"""PageRank on a generated power-law graph, with numpy.

usage: pagerank.py SCALE     (SCALE 1.0: 3M vertices, 40M edges, ~1 GiB)

In-degrees follow a Zipf-like power law (a few vertices are linked from
everywhere); sources are uniform. Each iteration gathers rank/out-degree of
every edge's source and scatters it onto its destination. Deterministic:
prints the top vertices and their ranks.
"""
import sys
import numpy as np

scale = float(sys.argv[1])
n = max(10_000, int(3_000_000 * scale))
m = max(100_000, int(40_000_000 * scale))
iterations, damping = 10, 0.85
rng = np.random.default_rng(7)

src = np.empty(m, dtype=np.int32)
dst = np.empty(m, dtype=np.int32)
# A random relabelling, so popular vertices are scattered over the arrays.
perm = rng.permutation(n).astype(np.int32)
for s in range(0, m, 1 << 22):
    k = min(1 << 22, m - s)
    src[s:s + k] = rng.integers(0, n, size=k, dtype=np.int32)
    # Pareto-distributed popularity rank -> power-law in-degree.
    r = (rng.pareto(1.2, size=k) * n / 50).astype(np.int64) % n
    dst[s:s + k] = perm[r]
outdeg = np.bincount(src, minlength=n).astype(np.float64)
outdeg[outdeg == 0] = 1.0
inv_outdeg = 1.0 / outdeg

rank = np.full(n, 1.0 / n)
for _ in range(iterations):
    contrib = (rank * inv_outdeg)[src]
    rank = (1 - damping) / n + damping * np.bincount(dst, weights=contrib, minlength=n)

top = np.argsort(rank)[::-1][:5]
print("top vertices:", " ".join(f"{v}:{rank[v]:.6e}" for v in top))
print(f"rank sum: {rank.sum():.6f}")
