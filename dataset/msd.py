"""Medical Segmentation Decathlon (MSD) task folders: dataset.json, reading and resampling with SimpleITK.

No TensorFlow here. Arrays come out in (x, y, z) order, the reverse of SimpleITK's (z, y, x).
"""
import json
import os

import numpy as np
import SimpleITK as sitk

from common.errors import UserError

INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor,
                 "bspline": sitk.sitkBSpline}
GRID_TOLERANCE = 1e-4


def read_dataset_json(data_dir):
    """The task description: {'labels': [names by index], 'modality': {...}, 'training': [(image, label)],
    'test': [image]}, every path absolute and checked to exist."""
    path = os.path.join(data_dir, "dataset.json")
    if not os.path.isfile(path):
        raise UserError(f"{path}: missing; --data_dir must be an MSD task folder with a dataset.json")
    try:
        with open(path) as handle:
            task = json.load(handle)
        labels = task["labels"]
        names = [str(labels[k]) for k in sorted(labels, key=int)]
        training = [(entry["image"], entry["label"]) for entry in task["training"]]
        test = list(task.get("test", []))
        modality = dict(task.get("modality", {"0": "MRI"}))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{path}: not an MSD dataset.json (needs 'labels' and 'training' with "
                        f"'image'/'label' entries; {type(err).__name__}: {err})") from None

    def resolve(relative):
        full = os.path.normpath(os.path.join(data_dir, relative))
        if not os.path.isfile(full):
            raise UserError(f"{full}: listed in {path} but missing")
        return full

    return {"labels": names, "modality": modality,
            "training": [(resolve(i), resolve(l)) for i, l in training],
            "test": [resolve(i) for i in test]}


def read_image(path):
    """A 3-D float32 SimpleITK image; of a 4-D image, the last volume with its 3-D geometry."""
    try:
        image = sitk.ReadImage(path)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[-1] if str(err).strip() else "unreadable"
        raise UserError(f"{path}: unreadable image ({first})") from None
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        index = [0, 0, 0, size[3] - 1]
        image = sitk.Extract(image, size[:3] + [0], index)
    if image.GetDimension() != 3:
        raise UserError(f"{path}: expected a 3-D or 4-D image, got {image.GetDimension()}-D")
    return sitk.Cast(image, sitk.sitkFloat32)


def check_same_grid(image, label, image_path, label_path):
    """A UserError naming `label_path` unless its grid equals its image's."""
    same = (image.GetSize() == label.GetSize()
            and np.allclose(image.GetSpacing(), label.GetSpacing(), atol=GRID_TOLERANCE)
            and np.allclose(image.GetOrigin(), label.GetOrigin(), atol=GRID_TOLERANCE)
            and np.allclose(image.GetDirection(), label.GetDirection(), atol=GRID_TOLERANCE))
    if not same:
        raise UserError(f"{label_path}: its grid (size {label.GetSize()}, spacing "
                        f"{np.round(label.GetSpacing(), 4).tolist()}) differs from its image "
                        f"{image_path} (size {image.GetSize()}, spacing "
                        f"{np.round(image.GetSpacing(), 4).tolist()}, or origin/direction)")


def resample(image, shape, interpolator):
    """`image` on a grid of `shape` (x, y, z) voxels with the same origin, direction and extent."""
    size = image.GetSize()
    spacing = [sp * n / m for sp, n, m in zip(image.GetSpacing(), size, shape)]
    return sitk.Resample(image, [int(s) for s in shape], sitk.Transform(), interpolator,
                         image.GetOrigin(), spacing, image.GetDirection(), 0.0, image.GetPixelID())


def to_array(image):
    """The voxels of a SimpleITK image as an (x, y, z) array."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def zscore(volume):
    """(v − mean)/std over the whole volume."""
    std = volume.std()
    return (volume - volume.mean()) / (std if std > 0 else 1.0)


def load_case(image_path, label_path, shape, interpolator="linear", normalize=True):
    """(image (x, y, z, 1) float32, labels (x, y, z) uint8 or None) resampled onto `shape`."""
    image = read_image(image_path)
    array = to_array(resample(image, shape, INTERPOLATORS[interpolator])).astype(np.float32)
    if normalize:
        array = zscore(array)
    labels = None
    if label_path is not None:
        label = read_image(label_path)
        check_same_grid(image, label, image_path, label_path)
        labels = to_array(resample(label, shape, sitk.sitkNearestNeighbor))
        labels = np.rint(labels).astype(np.uint8)
    return array[..., None], labels


def mask_to_source_grid(mask, source_path):
    """A (x, y, z) mask of the resampled grid as a SimpleITK image on the source image's own grid."""
    source = read_image(source_path)
    small = sitk.GetImageFromArray(np.transpose(np.asarray(mask, np.uint8), (2, 1, 0)))
    size = source.GetSize()
    small.SetSpacing([sp * n / m for sp, n, m in zip(source.GetSpacing(), size, mask.shape)])
    small.SetOrigin(source.GetOrigin())
    small.SetDirection(source.GetDirection())
    return sitk.Resample(small, source, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
