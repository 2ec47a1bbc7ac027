"""The LegoOS paper's workload: TensorFlow training the classic CIFAR-10
tutorial CNN (two 5x5x64 convolutions with pooling, 384- and 192-unit dense
layers, on the tutorial's random 24x24 crops) on synthetic CIFAR-shaped
data (32x32x3) held in memory.

usage: tf_cnn.py SCALE     (SCALE 1.0: 20,000 images, 60 steps of 64,
                            ~1.2 GiB peak)

Needs tensorflow-cpu (from PyPI, in the interpreter that runs it). Four
intra-op threads, as in the paper's setup. Seeds are fixed, but four
threads add floating point in varying order, so the loss it prints is
rounded to one decimal (about ln 10 for these random labels): it catches
corrupted memory (NaN, garbage), not the last bits.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
scale = float(sys.argv[1])

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(4)
tf.config.threading.set_inter_op_parallelism_threads(1)
tf.keras.utils.set_random_seed(7)

n = max(512, int(20_000 * scale))
steps = max(4, int(60 * scale))
batch = 64
rng = np.random.default_rng(7)
# Pixels as a decoding loader keeps them: float32 in [0, 1).
x = rng.random((n, 32, 32, 3), dtype=np.float32)
y = rng.integers(0, 10, n).astype(np.int32)

L = tf.keras.layers
model = tf.keras.Sequential([
    tf.keras.Input((24, 24, 3)),
    L.Conv2D(64, 5, padding="same", activation="relu"),
    L.MaxPooling2D(3, 2, padding="same"),
    L.Conv2D(64, 5, padding="same", activation="relu"),
    L.MaxPooling2D(3, 2, padding="same"),
    L.Flatten(),
    L.Dense(384, activation="relu"),
    L.Dense(192, activation="relu"),
    L.Dense(10),
])
model.compile(optimizer=tf.keras.optimizers.SGD(0.01),
              loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
data = (tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(4096, seed=7)
        .map(lambda im, label: (tf.image.random_crop(im, (24, 24, 3), seed=7), label))
        .batch(batch).repeat())
hist = model.fit(data, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
loss = hist.history["loss"][-1]
print(f"images {n} steps {steps} loss {loss:.1f}")
