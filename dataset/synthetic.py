"""Deterministic synthetic BraTS data for benchmarks, in NumPy alone (no TensorFlow needed).

One random BraTS-sized volume (uint8 inputs in [0, 255), labels in [0, 4)) gives the training
examples in the compact form of the tf.data pipeline: a random 128³ uint8 crop and its labels,
mean 0 and stdev 1, and the random flip and brightness decisions, which the training step
applies (dataset/device_transform.py). `POOL` examples per batch slot are made once and cycled,
so the input side costs nothing while the accelerator is timed.
"""
import numpy as np

from dataset.windows import (BRATS_SHAPE, N_CLASSES, N_MODALITIES, eval_window, train_crop_shape,
                             window_array)

POOL = 4
TEST_SHAPE = (64, 64, 64)


def base_seed(seed):
    """A pipeline's seed: `seed` itself, or a fresh random one when None."""
    if seed is not None:
        return int(seed)
    return int(np.random.SeedSequence().entropy % (2 ** 31))


def _train_example(x, y, crop, rng, augment):
    starts = [int(rng.integers(0, max(size - c, 1))) for size, c in zip(x.shape[:3], crop)]
    window = tuple(slice(s, s + c) for s, c in zip(starts, crop))
    channels = x.shape[-1]
    flip = bool(augment and rng.random() > 0.5)
    brighten = bool(augment and rng.random() > 0.5)
    factor = rng.uniform(0.9, 1.1, size=channels) if brighten else np.ones(channels)
    inputs = {"image": np.ascontiguousarray(x[window]), "mean": np.zeros(channels, np.float32),
              "stdev": np.ones(channels, np.float32), "flip": np.bool_(flip),
              "brighten": np.bool_(brighten), "factor": factor.astype(np.float32)}
    return inputs, np.ascontiguousarray(y[window])


def _stack(examples):
    """One batch ({name: stacked array}, stacked labels) from (inputs, labels) examples."""
    inputs = {key: np.stack([e[0][key] for e in examples]) for key in examples[0][0]}
    return inputs, np.stack([e[1] for e in examples])


class SyntheticData:
    """Synthetic batches as NumPy arrays: `train_dataset()` endless, eval and test one batch."""

    def __init__(self, batch_size, seed=None, augment=True):
        self.batch_size, self.augment = batch_size, augment
        self.seed = base_seed(seed)
        rng = np.random.default_rng(self.seed)
        self.x = rng.integers(0, 255, size=BRATS_SHAPE + (N_MODALITIES,), dtype=np.uint8)
        self.y = rng.integers(0, N_CLASSES, size=BRATS_SHAPE, dtype=np.uint8)
        self.volume_shape = BRATS_SHAPE
        self.crop_shape, self.window = train_crop_shape(BRATS_SHAPE), eval_window(BRATS_SHAPE)
        self.n_train = self.n_eval = 1
        self.n_test = batch_size  # the test batch's images
        self.eval_records = [{"case": "synthetic", "shape": BRATS_SHAPE, "affine": np.eye(4)}]

    def train_dataset(self, start_step=0):
        """An endless iterator of compact batches (as BratsData.train_dataset's), resumable at
        `start_step`."""
        rng = np.random.default_rng([self.seed, 1])
        pool = [_train_example(self.x, self.y, self.crop_shape, rng, self.augment)
                for _ in range(POOL * self.batch_size)]
        batches = [_stack(pool[i:i + self.batch_size]) for i in range(0, len(pool), self.batch_size)]

        def stream():
            step = start_step
            while True:
                yield batches[step % len(batches)]
                step += 1

        return stream()

    def eval_dataset(self):
        """The volume once through the evaluation window, as one batch."""
        x, y = self._eval_arrays()
        return [(window_array(x, self.window)[None], window_array(y, self.window)[None])]

    def eval_volumes(self):
        """The volume once, whole, as one batch."""
        x, y = self._eval_arrays()
        return [(x[None], y[None])]

    def _eval_arrays(self):
        return self.x.astype(np.float32), np.eye(N_CLASSES, dtype=np.float32)[self.y]

    def test_dataset(self):
        """One batch of truncated-normal (±2σ) 64³×4 images."""
        rng = np.random.default_rng([self.seed, 2])
        images = rng.standard_normal((self.batch_size,) + TEST_SHAPE + (N_MODALITIES,))
        while np.any(outside := np.abs(images) > 2.0):  # redraw the tails: a truncated normal
            images[outside] = rng.standard_normal(int(outside.sum()))
        return [images.astype(np.float32)]

    def test_volumes(self):
        """The BraTS-sized volume (240×240×155×4) alone, as a batch of one."""
        return [self.x.astype(np.float32)[None]]
