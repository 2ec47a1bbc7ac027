"""Random lookups in a Python dict of 400,000 string values (~72 MiB under
lego): random access to compressible data, the compressed tier's case.

usage: dict_lookups.py LOOKUPS     (the benchmarks use 100,000 and 500,000)
Deterministic: prints the total length of the values looked up.
"""
import random
import sys

random.seed(1)
d = {}
for i in range(400000):
    d[i] = ("value-%d" % i) * 3
s = 0
for _ in range(int(sys.argv[1])):
    s += len(d[random.randrange(400000)])
print(s)
