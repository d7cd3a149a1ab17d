"""The device half of the BraTS training transform, in keras.ops: it runs inside the compiled
training step of either engine.

The host (tf.data, or the NumPy synthetic data) ships each example compact: the uint8 crop, its
uint8 labels, the volume's per-channel mean and stdev, and the random decisions it drew (flip,
brighten, the per-channel brightness factor). Here, on the accelerator, the crop is flipped,
cast, z-scored and brightened and the labels become one-hot, as the reference did on the host:
6.4 times fewer bytes cross to the device (10.5 MB instead of 67.1 MB per 128³ example).
"""
from keras import ops

from dataset.windows import N_CLASSES

ZSCORE_EPS = 1e-8
FLIP_AXIS = 2  # axis 1 of a (D, H, W, C) volume, in a batch


def _per_example(value, rank):
    """A (B, ...) value shaped to broadcast over (B, D, H, W[, C]) tensors of `rank` axes."""
    trailing = tuple(value.shape[1:])
    return ops.reshape(value, (-1,) + (1,) * (rank - 1 - len(trailing)) + trailing)


def finish_train_batch(inputs, labels, n_classes=N_CLASSES):
    """(x float32 (B, D, H, W, C), one-hot y float32 (B, D, H, W, n_classes)) from a compact batch.

    `inputs` holds "image" uint8 (B, D, H, W, C), "mean" and "stdev" (B, C), "flip" and
    "brighten" bool (B,), "factor" (B, C); `labels` is uint8 (B, D, H, W). The order is the
    reference's: flip axis 1, foreground z-score, then (where drawn) the brightness factor added
    to every voxel still above 0 — added, not multiplied, a quirk of the reference kept here.
    """
    x = ops.cast(inputs["image"], "float32")
    flip = _per_example(inputs["flip"], 5)
    x = ops.where(flip, ops.flip(x, axis=FLIP_AXIS), x)
    y = ops.where(_per_example(inputs["flip"], 4), ops.flip(labels, axis=FLIP_AXIS), labels)
    mean, stdev = _per_example(inputs["mean"], 5), _per_example(inputs["stdev"], 5)
    x = ops.where(x > 0, (x - mean) / (stdev + ZSCORE_EPS), x)
    brighten = ops.logical_and(_per_example(inputs["brighten"], 5), x > 0)
    x = ops.where(brighten, x + _per_example(inputs["factor"], 5), x)
    return x, ops.one_hot(ops.cast(y, "int32"), n_classes)
