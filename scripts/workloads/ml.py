"""Training loop of a two-layer perceptron on a synthetic CIFAR-10-shaped
dataset (32x32x3 images, 10 classes), with numpy/OpenBLAS threads.

usage: ml.py SCALE     (SCALE 1.0: 80,000 images, ~1 GiB working set)

Images are stored as float32 pixels in one array, as a loader that keeps the
decoded dataset in memory does; each epoch visits the mini-batches (64
consecutive images) in a new random order. Deterministic: prints the loss
and accuracy after each epoch, identical across runs.
"""
import sys
import numpy as np

scale = float(sys.argv[1])
n = max(1024, int(80_000 * scale)) // 64 * 64
dim, hidden, classes, batch, epochs = 3072, 256, 10, 64, 2
rng = np.random.default_rng(42)

# Labels come from a hidden linear teacher so the loss can go down.
teacher = rng.standard_normal((dim, classes)).astype(np.float32)
x = np.empty((n, dim), dtype=np.float32)
y = np.empty(n, dtype=np.int64)
for s in range(0, n, 4096):
    pixels = rng.integers(0, 256, size=(min(4096, n - s), dim), dtype=np.uint8)
    x[s:s + len(pixels)] = pixels / np.float32(255.0) - np.float32(0.5)
    y[s:s + len(pixels)] = np.argmax(x[s:s + len(pixels)] @ teacher, axis=1)

w1 = (rng.standard_normal((dim, hidden)) * 0.02).astype(np.float32)
w2 = (rng.standard_normal((hidden, classes)) * 0.05).astype(np.float32)
lr = np.float32(0.05)
for epoch in range(epochs):
    order = rng.permutation(n // batch)
    loss_sum, correct = 0.0, 0
    for b in order:
        xb, yb = x[b * batch:(b + 1) * batch], y[b * batch:(b + 1) * batch]
        h = np.maximum(xb @ w1, 0)
        logits = h @ w2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss_sum += float(-np.log(p[np.arange(batch), yb] + 1e-9).sum())
        correct += int((p.argmax(axis=1) == yb).sum())
        p[np.arange(batch), yb] -= 1
        p /= batch
        gw2 = h.T @ p
        gh = p @ w2.T
        gh[h <= 0] = 0
        gw1 = xb.T @ gh
        w1 -= lr * gw1
        w2 -= lr * gw2
    print(f"epoch {epoch}: loss {loss_sum / n:.3f} accuracy {correct / n:.3f}")
