"""Crop and evaluation-window sizes of the BraTS pipelines, in NumPy: no TensorFlow here."""
import numpy as np

BRATS_SHAPE = (240, 240, 155)
N_MODALITIES = 4
N_CLASSES = 4
MULTIPLE = 32
MAX_CROP = 128


def train_crop_shape(volume_shape):
    """The training crop per axis: the largest multiple of 32 that fits, at most 128."""
    return tuple(min(MAX_CROP, (size // MULTIPLE) * MULTIPLE) for size in volume_shape)


def eval_window(volume_shape):
    """The evaluation window per axis: the multiple of 32 nearest to the size (ties go down).

    A window smaller than the volume is a centred crop, a larger one is zero padding at the end:
    BraTS' 240×240×155 gives 224×224×160, the crop at offset (8, 8, 0) and 5 slices of padding.
    """
    window = []
    for size in volume_shape:
        below = max(MULTIPLE, (size // MULTIPLE) * MULTIPLE)
        above = below + MULTIPLE
        window.append(above if above - size < size - below else below)
    return tuple(window)


def window_array(volume, window):
    """Centre-crop or end-pad the three spatial axes of a NumPy volume to `window`."""
    crops = tuple(slice(max(d - w, 0) // 2, max(d - w, 0) // 2 + min(d, w))
                  for d, w in zip(volume.shape[:3], window))
    pads = [(0, max(w - d, 0)) for d, w in zip(volume.shape[:3], window)]
    return np.pad(volume[crops], pads + [(0, 0)] * (volume.ndim - 3))


def unfit_window(mask, volume_shape):
    """Undo the evaluation window on a NumPy (D, H, W) mask: back to `volume_shape`, zeros outside."""
    out = np.zeros(volume_shape, dtype=mask.dtype)
    src, dst = [], []
    for dim, target in zip(volume_shape, mask.shape):
        start = max(dim - target, 0) // 2
        size = min(dim, target)
        dst.append(slice(start, start + size))
        src.append(slice(0, size))
    out[tuple(dst)] = mask[tuple(src)]
    return out
