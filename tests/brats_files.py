"""Helpers that write small BraTS-layout NIfTI cases with nibabel for the tests."""
import os

import nibabel as nib
import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
# BraTS-like orientation: x and y flipped, 1 mm voxels, an offset origin.
AFFINE = np.array([[-1.0, 0, 0, 120], [0, -1.0, 0, 120], [0, 0, 1.0, -60], [0, 0, 0, 1]])


def write_case(root, name, shape=(40, 36, 33), seed=0, labels=(0, 1, 2, 4)):
    """Write root/name/name_{t1,t1ce,t2,flair,seg}.nii.gz with random int16 data; returns the arrays."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, name)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for i, modality in enumerate(MODALITIES):
        data = rng.integers(0, 300 + 500 * i, size=shape).astype(np.int16)
        data[:3] = 0  # a background slab, as in a real scan
        arrays[modality] = data
    arrays["seg"] = rng.choice(np.array(labels, dtype=np.uint8), size=shape)
    for key, data in arrays.items():
        nib.save(nib.Nifti1Image(data, AFFINE), os.path.join(folder, f"{name}_{key}.nii.gz"))
    return arrays


def expected_record(arrays):
    """The reference's conversion (dataset/preprocess_data.py) of one case, written out step by step."""
    channels = []
    for modality in MODALITIES:
        vol = np.swapaxes(arrays[modality].astype(np.int16), 0, 1).astype(np.float32)
        top = np.float32(0.85 * float(vol.max()))
        vol = np.where(vol > top, top, vol)
        channels.append(np.trunc(np.float32(255) * vol / top).astype(np.uint8))
    x = np.stack(channels, axis=-1)
    y = np.swapaxes(arrays["seg"], 0, 1).astype(np.uint8)
    y = np.where(y == 4, 3, y).astype(np.uint8)
    mean = np.float32([x[..., i][x[..., i] > 0].astype(np.float64).mean() for i in range(4)])
    stdev = np.float32([x[..., i][x[..., i] > 0].astype(np.float64).std() for i in range(4)])
    return x, y, mean, stdev
