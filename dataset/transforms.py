"""Per-volume transforms of the BraTS pipeline (tf.data), in the reference's order.

Volumes are (D, H, W, C). Randomness comes from stateless ops fed a per-volume seed, a (2,)
int tensor, so that a stream is reproducible from `--seed` whatever the parallelism.
"""
import tensorflow as tf

from dataset.device_transform import ZSCORE_EPS
from dataset.windows import N_CLASSES


def _seeds(seed, n):
    return tf.unstack(tf.random.experimental.stateless_split(seed, num=n))


def random_crop(x, y, crop_shape, seed):
    """Crop `crop_shape` voxels; each start is uniform in [0, size − crop) (0 when they match)."""
    starts = [tf.random.stateless_uniform([], axis_seed, minval=0, maxval=max(size - crop, 1),
                                          dtype=tf.int32)
              for axis_seed, size, crop in zip(_seeds(seed, 3), x.shape[:3], crop_shape)]
    x = tf.slice(x, starts + [0], list(crop_shape) + [-1])
    y = tf.slice(y, starts, list(crop_shape))
    return x, y


def draw_augmentation(flip_seed, bright_seed, channels, augment):
    """(flip, brighten, factor): one example's random decisions, flip axis 1 (p 0.5), brighten
    (p 0.5) and the per-channel brightness factor, U[0.9, 1.1]. Without `augment`, neither."""
    apply_seed, factor_seed = _seeds(bright_seed, 2)
    factor = tf.random.stateless_uniform([channels], factor_seed, minval=0.9, maxval=1.1)
    if not augment:
        return tf.constant(False), tf.constant(False), factor
    return (tf.random.stateless_uniform([], flip_seed) > 0.5,
            tf.random.stateless_uniform([], apply_seed) > 0.5, factor)


def zscore(x, mean, stdev):
    """Foreground z-score per channel: (x − mean)/(stdev + 1e-8) where x > 0, 0 elsewhere."""
    return tf.where(x > 0, (x - mean) / (stdev + ZSCORE_EPS), x)


def train_transform(x, y, mean, stdev, seed, crop_shape, augment):
    """One training example as shipped to the device: ({"image": uint8 crop, "mean", "stdev",
    "flip", "brighten", "factor"}, uint8 label crop). The crop and every random decision are
    drawn here from `seed`; dataset/device_transform.py applies them inside the training step."""
    crop_seed, flip_seed, bright_seed = _seeds(seed, 3)
    x, y = random_crop(x, y, crop_shape, crop_seed)
    flip, brighten, factor = draw_augmentation(flip_seed, bright_seed, x.shape[-1], augment)
    return {"image": x, "mean": mean, "stdev": stdev, "flip": flip, "brighten": brighten,
            "factor": factor}, y


def fit_window(x, window):
    """Centre-crop or end-pad the three spatial axes of `x` to `window`."""
    begin, size, pad = [], [], []
    for dim, target in zip(x.shape[:3], window):
        crop = max(dim - target, 0)
        begin.append(crop // 2)
        size.append(min(dim, target))
        pad.append([0, max(target - dim, 0)])
    rest = len(x.shape) - 3
    x = tf.slice(x, begin + [0] * rest, size + [-1] * rest)
    return tf.pad(x, pad + [[0, 0]] * rest)


def eval_transform(x, y, mean, stdev, window, n_classes=N_CLASSES):
    """Window, cast, z-score and one-hot over `n_classes`: one evaluation example (padded voxels
    have no class). With `window` None the whole volume is kept."""
    x = zscore(tf.cast(x, tf.float32), mean, stdev)
    y = tf.one_hot(tf.cast(y, tf.int32), n_classes)
    if window is None:
        return x, y
    return fit_window(x, window), fit_window(y, window)


def test_transform(x, mean, stdev, window):
    """Window, cast and z-score the image alone: one prediction input (`window` None: whole)."""
    x = zscore(tf.cast(x, tf.float32), mean, stdev)
    return x if window is None else fit_window(x, window)

