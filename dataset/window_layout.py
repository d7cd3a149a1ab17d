"""Where sliding windows go over a volume (nnU-Net's layout) and how they are weighted (a Gaussian
importance map), in NumPy; runtime/loops/inference.py runs the windows."""
import itertools
import math

import numpy as np

from dataset.windows import MULTIPLE, train_crop_shape

SIGMA_SCALE = 1 / 8
MIN_IMPORTANCE = 1e-3


def sliding_window_shape(volume_shape):
    """The sliding window per axis: the training crop, at least 32 (smaller volumes are padded)."""
    return tuple(max(MULTIPLE, crop) for crop in train_crop_shape(volume_shape))


def window_starts(size, window, overlap):
    """Where the windows of one axis start, as nnU-Net lays them: consecutive windows step by at
    most window·(1 − overlap), the steps are spread evenly, and the last window ends at the border.
    An axis no longer than the window gets one window at 0."""
    span = size - window
    if span <= 0:
        return [0]
    count = math.ceil(span / (window * (1.0 - overlap))) + 1
    return [int(round(i * span / (count - 1))) for i in range(count)]


def window_grid(volume_shape, window, overlap):
    """(padded shape, starts): the volume's grid padded at the end up to the window where it is
    smaller, and the (N, 3) int32 starts of every window over it, in C order."""
    padded = tuple(max(size, w) for size, w in zip(volume_shape, window))
    axes = [window_starts(size, w, overlap) for size, w in zip(padded, window)]
    return padded, np.array(list(itertools.product(*axes)), np.int32).reshape(-1, 3)


def gaussian_importance(window, sigma_scale=SIGMA_SCALE):
    """The importance map of a window: a Gaussian centred on it with σ = sigma_scale·window per
    axis, 1 at its peak, raised to at least 1e-3 so that no voxel's weight vanishes; float32."""
    profiles = [np.exp(-0.5 * ((np.arange(w) - (w - 1) / 2) / (sigma_scale * w)) ** 2) for w in window]
    importance = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return np.maximum(importance / importance.max(), MIN_IMPORTANCE).astype(np.float32)


def importance_sum(padded_shape, window, starts, importance):
    """The sum of the importance maps of every window over the padded grid: (D, H, W) float32."""
    total = np.zeros(padded_shape, np.float32)
    for start in starts:
        total[tuple(slice(s, s + w) for s, w in zip(start, window))] += importance
    return total
