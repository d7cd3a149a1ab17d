"""Predicted masks as NIfTI files of the source grid: the source's own label values for UNet3D, MSD
images' grids for V-Net."""
import os

import nibabel as nib
import numpy as np

from common.output_files import replacing
from dataset.windows import unfit_window


def brats_nifti(mask, record, convention):
    """A window mask (the network's classes) as a NIfTI image of the case's own grid, in the source's
    label values.

    `record` is the case's metadata (shape, affine): the window is undone, the preprocessing's
    swap of axes 0 and 1 is reversed, and each class goes back to its label value in
    `convention` (a LabelConvention; brats2021's class 3 is label 4).
    """
    volume = unfit_window(np.asarray(mask, np.uint8), record["shape"])
    volume = convention.to_source(np.swapaxes(volume, 0, 1))
    return nib.Nifti1Image(volume, record["affine"])


def brats_nifti_writer(out_dir, records, convention):
    """A `mask_fn(i, mask)` that saves mask i as out_dir/<case>.nii.gz (vol_<i> without a name), in
    the label values of `convention`."""
    os.makedirs(out_dir, exist_ok=True)

    def write(index, mask):
        name = records[index]["case"] or f"vol_{index}"
        with replacing(os.path.join(out_dir, f"{name}.nii.gz"), keep_extension=True) as tmp:
            nib.save(brats_nifti(mask, records[index], convention), tmp)

    return write


def msd_nifti_writer(out_dir, paths, names):
    """A `mask_fn(i, mask)` that resamples mask i back onto the grid of the MSD image paths[i] and
    saves it as out_dir/<names[i]>.nii.gz."""
    import SimpleITK as sitk

    from dataset.msd import mask_to_source_grid
    os.makedirs(out_dir, exist_ok=True)

    def write(index, mask):
        path = os.path.join(out_dir, f"{names[index]}.nii.gz")
        with replacing(path, errors=(RuntimeError,), keep_extension=True) as tmp:  # SimpleITK's
            sitk.WriteImage(mask_to_source_grid(mask, paths[index]), tmp)

    return write
