"""Reading one BraTS case from NIfTI and converting it as the reference's preprocessing does.

No TensorFlow here: these functions run in worker processes of dataset/preprocess_data.py.
"""
import os

import nibabel as nib
import numpy as np

from common.errors import UserError

MODALITIES = ("t1", "t1ce", "t2", "flair")
SEG = "seg"
BRATS_LABELS = (0, 1, 2, 4)
CLIP_FRACTION = 0.85


def case_files(case_dir):
    """{modality or 'seg': path} of the five NIfTI files of the case folder `case_dir`."""
    name = os.path.basename(os.path.normpath(case_dir))
    return {key: os.path.join(case_dir, f"{name}_{key}.nii.gz") for key in MODALITIES + (SEG,)}


def load_nifti(path):
    """The volume as int16 with axes 0 and 1 swapped, as the reference reads it."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; every case folder needs the t1, t1ce, t2, flair and "
                        "seg NIfTI files")
    try:
        data = np.asarray(nib.load(path).get_fdata())
    except Exception as err:  # nibabel raises many types for damaged files
        raise UserError(f"{path}: unreadable NIfTI ({type(err).__name__}: {err}); replace the file") from None
    if data.ndim != 3 or data.size == 0:
        raise UserError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return np.swapaxes(data.astype(np.int16), 0, 1)


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


def convert_images(paths, clip_fraction=CLIP_FRACTION):
    """(volume uint8 (D, H, W, C), mean float32[C], stdev float32[C]) of the modality files
    `paths`, in channel order: each read and scaled (`scale_modality`), stacked, and the
    foreground (voxels > 0) mean and standard deviation of each channel."""
    channels, shape = [], None
    for path in paths:
        raw = load_nifti(path)
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


def convert_case(case_dir):
    """(name, volume uint8 (D,H,W,4), labels uint8 (D,H,W), mean float32[4], stdev float32[4], affine).

    `affine` is the segmentation file's 4×4 voxel-to-world matrix, kept so that predicted masks
    can be written back in the case's own geometry.
    """
    files = case_files(case_dir)
    volume, mean, stdev = convert_images([files[key] for key in MODALITIES])
    shape = volume.shape[:3]
    seg = load_nifti(files[SEG])
    if seg.shape != shape:
        raise UserError(f"{files[SEG]}: shape {seg.shape} differs from the images' {shape}")
    unexpected = sorted(set(np.unique(seg).tolist()) - set(BRATS_LABELS))
    if unexpected:
        raise UserError(f"{files[SEG]}: labels {unexpected} outside the BraTS labels {{0, 1, 2, 4}}")
    labels = seg.astype(np.uint8)
    labels[labels == 4] = 3
    name = os.path.basename(os.path.normpath(case_dir))
    affine = nib.load(files[SEG]).affine
    return name, volume, labels, mean, stdev, affine
