"""Builds a ~200 MB structure of dicts, lists, strings and ints, then walks
it in a different order and prints a checksum. Used to compare a run under
lego with a plain run."""
import hashlib
import sys

n = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
records = []
index = {}
for i in range(n):
    rec = {"id": i, "name": "user%08d" % i, "tags": [i % 7, i % 11, i % 13], "score": (i * 2654435761) % 1000003}
    records.append(rec)
    index[rec["name"]] = rec
h = hashlib.sha256()
for i in range(0, n, 3):
    rec = index["user%08d" % ((i * 7919) % n)]
    h.update(("%d:%s:%d:%s" % (rec["id"], rec["name"], rec["score"], rec["tags"])).encode())
total = sum(r["score"] for r in records)
print(n, total, h.hexdigest())
