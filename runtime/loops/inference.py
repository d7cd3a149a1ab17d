"""Whole-volume inference on any backend: the centred window or overlapping sliding windows with
Gaussian blending, test-time mirroring, and ensembles of checkpoints.

The device work is written once with keras.ops and compiled by the engine (jax.jit or
tf.function): `window_probabilities` runs the network on a batch (with mirroring, on the 8
mirrorings in one batch), `accumulate_windows` adds a batch of windows' Gaussian-weighted
probabilities into sums that stay on the device. The host only loops over the batches of
`sw_batch_size` windows of a volume; the window layout, the importance map and the sum of the
maps (which depend on the volume's shape alone) are computed once per shape in NumPy.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from keras import ops

from dataset.window_layout import gaussian_importance, importance_sum, window_grid

# The 8 mirrorings of the three spatial axes of a (B, D, H, W, C) batch, the identity first.
MIRRORS = tuple(axes for r in range(4) for axes in itertools.combinations((1, 2, 3), r))
# Device tensors (the backend's arrays) are typed Any.
Forward = Callable[[Any], Any]  # the model's inference: a batch to its probabilities
Report = Callable[[int, int], Any]  # report(done, total) after each batch of windows


def _mirror(x, axes):
    return ops.flip(x, axis=axes) if axes else x


def window_probabilities(forward: Forward, x: Any, tta: bool = False) -> Any:
    """`forward(x)` as float32 probabilities; with `tta`, the mean over the 8 mirrorings of the
    spatial axes (each prediction mirrored back), run as one batch of 8·B."""
    if not tta:
        return ops.cast(forward(x), "float32")
    n = x.shape[0]
    probs = ops.cast(forward(ops.concatenate([_mirror(x, axes) for axes in MIRRORS], axis=0)), "float32")
    total = 0.0
    for i, axes in enumerate(MIRRORS):
        total = total + _mirror(probs[i * n:(i + 1) * n], axes)
    return total / len(MIRRORS)


def accumulate_windows(forward: Forward, volume: Any, sums: Any, starts: Any, importance: Any,
                       tta: bool = False) -> Any:
    """`sums` (1, D, H, W, classes) plus the importance-weighted probabilities of the windows of
    `volume` (1, D, H, W, C) that start at `starts` (k, 3). The window's size is the map's shape."""
    window = tuple(importance.shape)
    corners = [[0, starts[j, 0], starts[j, 1], starts[j, 2], 0] for j in range(starts.shape[0])]
    crops = [ops.slice(volume, corner, (1,) + window + (volume.shape[-1],)) for corner in corners]
    probs = window_probabilities(forward, ops.concatenate(crops, axis=0), tta)
    weighted = probs * ops.reshape(importance, (1,) + window + (1,))
    size = (1,) + window + (sums.shape[-1],)
    for j, corner in enumerate(corners):
        sums = ops.slice_update(sums, corner, ops.slice(sums, corner, size) + weighted[j:j + 1])
    return sums


def normalise(sums: Any, weight_sum: Any) -> Any:
    """The blended probabilities: `sums` over the volume's own grid (the padding cropped off)
    divided by the summed importance maps `weight_sum` (1, D, H, W, 1)."""
    d, h, w = weight_sum.shape[1:4]
    return sums[:, :d, :h, :w] / weight_sum


def argmax_mask(probs: Any) -> Any:
    """The int8 argmax of probabilities over the class axis."""
    return ops.cast(ops.argmax(probs, axis=-1), "int8")


@dataclass
class Layout:
    """The sliding windows of one volume shape: the padded shape, the batches of window starts,
    the importance map and the summed maps over the volume's grid (device tensors)."""
    padded: tuple
    batches: list
    importance: object
    weight_sum: object


class Inference:
    """Class probabilities, masks and scores of batches, on an engine's compiled steps.

    `window` None: the batch's own window (the centred window of the pipelines), in one pass;
    otherwise each volume is covered with sliding windows of that size, overlapping by at least
    `overlap` of a window, in batches of `sw_batch_size`. `tta` averages the 8 mirrorings. `members`, a
    list of weight handles from `engine.snapshot()`, are averaged as an ensemble (None: the
    model's weights). `report(done, total)` is called after each batch of windows.
    """

    def __init__(self, engine, n_classes, members=None, window=None, overlap=0.5, sw_batch_size=2,
                 tta=False):
        self.engine, self.n_classes = engine, n_classes
        self.members = members or [None]
        self.window, self.overlap, self.sw_batch_size = window, overlap, sw_batch_size
        metrics_fn = engine.metrics_fn
        self._centred = engine.compile(lambda forward, x: window_probabilities(forward, x, tta))
        self._accumulate = engine.compile(
            lambda forward, volume, sums, starts, importance:
                accumulate_windows(forward, volume, sums, starts, importance, tta),
            donate=(1,))
        self._normalise = engine.compile(lambda forward, sums, weight_sum: normalise(sums, weight_sum))
        self._mask = engine.compile(lambda forward, probs: argmax_mask(probs))
        self._scores = engine.compile(lambda forward, y, probs: metrics_fn(y, probs))
        self._layouts = {}

    def probabilities(self, x: Any, report: Optional[Report] = None) -> Any:
        """Probabilities of a batch x (B, D, H, W, C): a device tensor (B, D, H, W, classes), float32,
        the mean over the ensemble's members."""
        x = ops.convert_to_tensor(x)
        total = None
        for member in self.members:
            if member is not None:
                self.engine.use_weights(member)
            probs = self._centred(x) if self.window is None else self._sliding(x, report)
            total = probs if total is None else total + probs
        return total if len(self.members) == 1 else total / len(self.members)

    def masks(self, x: Any, report: Optional[Report] = None,
              probabilities: bool = False) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(int8 argmax masks (B, D, H, W), and with `probabilities` the float16 probabilities
        (B, D, H, W, classes), else None), as NumPy."""
        probs = self.probabilities(x, report)
        masks = ops.convert_to_numpy(self._mask(probs))
        return masks, ops.convert_to_numpy(ops.cast(probs, "float16")) if probabilities else None

    def scores(self, x: Any, y: Any, report: Optional[Report] = None, masks: bool = False
               ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], np.ndarray]:
        """The metrics of a batch scored on the probabilities: {name: (B,) NumPy array}; with
        `masks`, (that, the int8 argmax masks (B, D, H, W) as NumPy)."""
        probs = self.probabilities(x, report)
        scores = self._scores(ops.convert_to_tensor(y), probs)
        scores = {key: ops.convert_to_numpy(value) for key, value in scores.items()}
        return (scores, ops.convert_to_numpy(self._mask(probs))) if masks else scores

    def _sliding(self, x, report):
        blended = []
        shape = tuple(x.shape[1:4])
        layout = self._layout(shape)
        for b in range(x.shape[0]):
            volume = x[b:b + 1]
            if layout.padded != shape:
                volume = ops.pad(volume, [[0, 0]] + [[0, p - s] for p, s in zip(layout.padded, shape)]
                                 + [[0, 0]])
            sums = ops.zeros((1,) + layout.padded + (self.n_classes,), "float32")
            for done, starts in enumerate(layout.batches, start=1):
                sums = self._accumulate(volume, sums, starts, layout.importance)
                if report is not None:
                    report(done, len(layout.batches))
            blended.append(self._normalise(sums, layout.weight_sum))
        return blended[0] if len(blended) == 1 else ops.concatenate(blended, axis=0)

    def _layout(self, shape):
        if shape not in self._layouts:
            padded, starts = window_grid(shape, self.window, self.overlap)
            importance = gaussian_importance(self.window)
            weight_sum = importance_sum(padded, self.window, starts, importance)
            weight_sum = weight_sum[:shape[0], :shape[1], :shape[2]][None, ..., None]
            # A last, smaller batch costs one more compilation, not the network on filler windows.
            k = self.sw_batch_size
            batches = [ops.convert_to_tensor(starts[i:i + k]) for i in range(0, len(starts), k)]
            self._layouts[shape] = Layout(padded, batches, ops.convert_to_tensor(importance),
                                          ops.convert_to_tensor(weight_sum))
        return self._layouts[shape]
