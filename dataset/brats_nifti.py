"""Reading one brain-tumour case from NIfTI and converting it as the reference's preprocessing does.

The case's files come from dataset/layouts.py (any layout); every channel is converted the
reference's way, so BraTS 2019–2021 records keep the reference's bytes. No TensorFlow here: these
functions run in worker processes of dataset/preprocess_data.py.
"""
import os

import nibabel as nib
import numpy as np

from common.errors import UserError
from dataset.conventions import CONVENTIONS

CLIP_FRACTION = 0.85
AFFINE_TOLERANCE = 1e-3  # mm: headers of one grid written by different tools agree to far better


def _read(path):
    """(nibabel image, its data as float64) of `path`; a UserError naming it when unreadable."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing")
    try:
        image = nib.load(path)
        return image, np.asarray(image.get_fdata())
    except Exception as err:  # nibabel raises many types for damaged files
        raise UserError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err}); replace the file") from None


def _as_volume(data):
    """A 3-D array as int16 with axes 0 and 1 swapped, as the reference reads it."""
    return np.swapaxes(data.astype(np.int16), 0, 1)


def load_nifti(path):
    """The 3-D volume of `path` as int16 with axes 0 and 1 swapped, and its affine."""
    image, data = _read(path)
    if data.ndim != 3 or data.size == 0:
        raise UserError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return _as_volume(data), image.affine


def load_channels(source):
    """[(path, int16 swapped volume)] of each input channel of `source` (a CaseSource), and the
    images' affine. A 4-D image must hold the channels its dataset.json names."""
    if source.image4d is None:
        loaded = [(path,) + load_nifti(path) for path in source.images]
        return [(path, volume) for path, volume, _ in loaded], loaded[0][2]
    path = source.image4d
    image, data = _read(path)
    if data.ndim != 4 or data.shape[3] != source.n_file_channels:
        found = data.shape[3] if data.ndim == 4 else f"no channel axis (shape {data.shape})"
        raise UserError(f"{path}: {found} channels, but dataset.json's 'modality' names "
                        f"{source.n_file_channels}; replace the image or fix dataset.json")
    return [(path, _as_volume(data[..., c])) for c in source.channel_order], image.affine


def scale_modality(volume, clip_fraction=CLIP_FRACTION):
    """Clip at 0.85·max (`clip_fraction`), scale to 255/new max and truncate to uint8, in the
    reference's float32 steps."""
    vol = volume.astype(np.float32)
    # The reference ran on NumPy 1, where 0.85 * float32 scalar was a float64 product; keep that
    # rounding so the bytes match.
    top = np.float32(clip_fraction * float(vol.max()))
    vol[vol > top] = top
    vol = 255 * vol / vol.max()
    return vol.astype(np.uint8)


def convert_images(loaded, clip_fraction=CLIP_FRACTION):
    """(volume uint8 (D, H, W, C), mean float32[C], stdev float32[C]) of the channels `loaded`
    ([(path, int16 volume)], in channel order): each scaled (`scale_modality`), stacked, and the
    foreground (voxels > 0) mean and standard deviation of each channel."""
    channels, shape = [], None
    for path, raw in loaded:
        if shape is not None and raw.shape != shape:
            raise UserError(f"{path}: shape {raw.shape} differs from the case's {shape}")
        shape = raw.shape
        if raw.max() <= 0:
            raise UserError(f"{path}: the volume is empty (no voxel above 0)")
        channels.append(scale_modality(raw, clip_fraction))
    volume = np.stack(channels, axis=-1)
    mean, stdev = [], []
    for i in range(volume.shape[-1]):
        foreground = volume[..., i][volume[..., i] > 0]
        mean.append(np.mean(foreground))
        stdev.append(np.std(foreground))
    return volume, np.float32(mean), np.float32(stdev)


def convert_case(source):
    """(name, volume uint8 (D,H,W,C), classes uint8 (D,H,W), mean float32[C], stdev float32[C], affine)
    of one case (a CaseSource).

    The mask's values become the classes of the case's label convention; `affine` is the mask's
    4×4 voxel-to-world matrix, kept so that predicted masks can be written back in the case's own
    geometry. A mask on another grid than its images, or holding values outside the convention,
    is a UserError naming the file.
    """
    loaded, image_affine = load_channels(source)
    volume, mean, stdev = convert_images(loaded)
    shape = volume.shape[:3]

    seg, affine = load_nifti(source.seg)
    if seg.shape != shape:
        raise UserError(f"{source.seg}: shape {seg.shape} differs from the images' {shape}; the "
                        "mask must be on its images' grid")
    if not np.allclose(affine, image_affine, atol=AFFINE_TOLERANCE):
        raise UserError(f"{source.seg}: its affine (voxel-to-world matrix) differs from the "
                        f"images' {np.round(image_affine, 3).tolist()}; the mask must be on its "
                        "images' grid")
    convention = CONVENTIONS[source.convention]
    try:
        labels = convention.to_classes(seg)
    except ValueError as err:
        raise UserError(f"{source.seg}: {err}; is this case in another dataset's folder?") from None
    return source.name, volume, labels, mean, stdev, affine
