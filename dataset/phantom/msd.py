"""A phantom Medical Segmentation Decathlon hippocampus data set (like MSD Task04_Hippocampus).

Each case is a small MRI-like crop of brain tissue around a curved, banana-shaped hippocampus made of a
bulky head (label 1, "Anterior") and a thinner body/tail (label 2, "Posterior") that touch along the
long axis (about y), slightly brighter than the tissue around them, next to a dark CSF-filled
ventricle. Shapes are built in voxel units; everything is deterministic from the seed.
"""
import json
import os

import numpy as np
import SimpleITK as sitk

LABELS = {"0": "background", "1": "Anterior", "2": "Posterior"}
SAMPLES = 48  # points along the hippocampus centre line


def _blur(a, sigma):
    """Separable Gaussian blur of a 3-D array (sigma in voxels), borders mirrored."""
    radius = int(np.ceil(3 * sigma))
    w = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    w = (w / w.sum()).astype(np.float32)
    for axis in range(3):
        n = a.shape[axis]
        padded = np.pad(a, [(radius, radius) if i == axis else (0, 0) for i in range(3)], mode="reflect")
        a = sum(wk * padded.take(np.arange(k, k + n), axis=axis) for k, wk in enumerate(w))
    return a


def _noise(shape, rng, sigma):
    """Smooth random field of unit spread with correlation length `sigma` voxels."""
    n = _blur(rng.standard_normal(shape, dtype=np.float32), sigma)
    return n / n.std()


def _rotation(rng):
    """A random rotation of at most ~20 degrees about each axis, as a 3x3 matrix on (z, y, x) vectors."""
    rot = np.eye(3)
    for axes, angle in zip(((1, 2), (0, 2), (0, 1)), np.radians(rng.uniform(-20, 20, 3))):
        r = np.eye(3)
        (i, j), c, s = axes, np.cos(angle), np.sin(angle)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        rot = r @ rot
    return rot


def _centre_line(shape, rng):
    """Centre-line points (SAMPLES x 3, (z, y, x) voxels) of the hippocampus, its radius at each point
    and the fraction of the line that is head (anterior).

    A curve about along y with random parabolic bends in x and z, rotated and placed so that the tube
    stays inside the grid; the radius is large over the head and tapers along the tail.
    """
    t = np.linspace(0, 1, SAMPLES)
    length = rng.uniform(0.55, 0.7) * shape[1]
    r_head, r_tail = rng.uniform(4.5, 5.8), rng.uniform(2.9, 3.6)
    split = rng.uniform(0.32, 0.42)
    radius = (r_tail + (r_head - r_tail) / (1 + np.exp((t - split) / 0.06))) * (1 - 0.3 * t ** 2)
    bend_x, bend_z = rng.uniform(0.15, 0.35) * length * rng.choice([-1, 1]), rng.uniform(0, 0.25) * length
    local = np.stack([bend_z * t ** 2,
                      length * (t - 0.5),
                      bend_x * 4 * (t - 0.5) ** 2], axis=1)
    points = (local - local.mean(0)) @ _rotation(rng).T
    lo = r_head + 1 - points.min(0)  # centre range keeping a margin to the grid edges
    hi = np.array(shape) - r_head - 2 - points.max(0)
    centre = (lo + hi) / 2 + np.maximum(hi - lo, 0) * rng.uniform(-0.5, 0.5, 3)
    return points + centre, radius, split


def _anatomy(shape, rng):
    """Label map (0, 1 anterior, 2 posterior) and ventricle mask of one case of array shape (z, y, x)."""
    points, radius, split = _centre_line(shape, rng)
    flat = np.array([rng.uniform(0.75, 1.0), 1.0, 1.0])  # cross-section a little flatter in z
    grid = np.indices(shape, dtype=np.float32)
    best = np.full(shape, np.inf, np.float32)  # smallest distance/radius over the centre-line points
    nearest = np.zeros(shape, np.int32)
    for k, (p, r) in enumerate(zip(points, radius)):
        d = np.sqrt(sum(((g - c) / f) ** 2 for g, c, f in zip(grid, p, flat))) / r
        closer = d < best
        best[closer], nearest[closer] = d[closer], k
    inside = best + 0.12 * np.clip(_noise(shape, rng, 1.5), -2.5, 2.5) < 1
    labels = np.where(inside, np.where(nearest < split * (SAMPLES - 1), 1, 2), 0).astype(np.uint8)

    # Temporal horn of the lateral ventricle: an elongated ellipsoid touching the hippocampus.
    k = int(rng.uniform(0.2, 0.5) * (SAMPLES - 1))
    side = np.array([1.0, 0.0, rng.uniform(-1, 1)])
    radii = rng.uniform([1.6, 5.0, 1.6], [2.6, 8.0, 2.6])
    centre = points[k] + side / np.linalg.norm(side) * (radius[k] + 0.7 * radii[0])
    ventricle = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1
    return labels, ventricle & (labels == 0)


def make_case(size, rng):
    """One case for the SimpleITK size `size` = (x, y, z), as arrays of shape (z, y, x): a float32 MRI-like
    image (about 50 to 400) and uint8 labels (0 background, 1 anterior, 2 posterior, both present)."""
    shape = tuple(int(n) for n in size[::-1])
    labels, ventricle = _anatomy(shape, rng)
    level = rng.uniform(190, 250)
    tissue = level * (1 + 0.15 * np.clip(_noise(shape, rng, 6.0), -2.5, 2.5))  # grey/white-matter-ish
    tissue[ventricle] = rng.uniform(0.25, 0.4) * level
    hippo = labels > 0
    tissue[hippo] = rng.uniform(1.18, 1.3) * np.maximum(tissue[hippo], level)  # brighter locally and overall
    image = _blur(tissue, 0.6) * (1 + 0.04 * _noise(shape, rng, 1.0))  # partial volume, fine texture
    image += rng.uniform(0.04, 0.07) * level * rng.standard_normal(shape, dtype=np.float32)
    return np.clip(image, 0, None).astype(np.float32), labels


def _write(path, array, spacing, origin, direction):
    """Writes `array` (z, y, x) as a NIfTI file of the given geometry."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetOrigin(origin)
    img.SetDirection(tuple(float(d) for d in direction))
    sitk.WriteImage(img, path)


def write_msd_phantom(out_dir, n_train, n_test=0, seed=0, size_range=((34, 40), (46, 56), (32, 38)),
                      spacing=(1.0, 1.0, 1.0), direction=None):
    """Writes out_dir/dataset.json, out_dir/imagesTr/hippocampus_NNN.nii.gz,
    out_dir/labelsTr/hippocampus_NNN.nii.gz and out_dir/imagesTs/hippocampus_NNN.nii.gz; returns out_dir.

    Case i (training 0..n_train-1, then test cases) draws from np.random.default_rng([seed, i]) its
    size (x, y, z), each within the inclusive (min, max) of `size_range`, a non-zero origin and its
    content. `spacing` (x, y, z) and `direction` (9 numbers, identity if None) apply to every file.
    """
    direction = (1, 0, 0, 0, 1, 0, 0, 0, 1) if direction is None else direction
    lo, hi = np.array(size_range).T
    training, test = [], []
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        os.makedirs(os.path.join(out_dir, folder), exist_ok=True)
    for index in range(n_train + n_test):
        rng = np.random.default_rng([seed, index])
        size = rng.integers(lo, hi + 1)
        origin = tuple(float(o) for o in np.round(rng.uniform(-120, -60, 3), 2))
        image, labels = make_case(size, rng)
        name = f"hippocampus_{index:03d}.nii.gz"
        if index < n_train:
            _write(os.path.join(out_dir, "imagesTr", name), image, spacing, origin, direction)
            _write(os.path.join(out_dir, "labelsTr", name), labels, spacing, origin, direction)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _write(os.path.join(out_dir, "imagesTs", name), image, spacing, origin, direction)
            test.append(f"./imagesTs/{name}")
    meta = {"name": "Hippocampus", "description": "phantom", "tensorImageSize": "3D",
            "modality": {"0": "MRI"}, "labels": LABELS, "numTraining": n_train, "numTest": n_test,
            "training": training, "test": test}
    with open(os.path.join(out_dir, "dataset.json"), "w") as f:
        json.dump(meta, f, indent=4)
    return out_dir
