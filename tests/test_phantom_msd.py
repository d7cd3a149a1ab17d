"""The phantom MSD hippocampus generator: dataset.json, geometry, sizes, labels, determinism, contrast."""
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk

from dataset.phantom.msd import make_case, write_msd_phantom

N_TRAIN, N_TEST, SEED = 4, 2, 3
SPACING = (1.0, 1.5, 2.0)
c, s = np.cos(0.3), np.sin(0.3)
DIRECTION = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
SIZE_RANGE = ((34, 40), (46, 56), (32, 38))


def read(path):
    """(image, array) of one NIfTI file."""
    img = sitk.ReadImage(path)
    return img, sitk.GetArrayFromImage(img)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("msd"))
    assert write_msd_phantom(out, N_TRAIN, N_TEST, seed=SEED, spacing=SPACING, direction=DIRECTION) == out
    with open(os.path.join(out, "dataset.json")) as f:
        meta = json.load(f)
    return out, meta


@pytest.fixture(scope="module")
def training(written):
    out, meta = written
    return [(read(os.path.join(out, e["image"])), read(os.path.join(out, e["label"])))
            for e in meta["training"]]


def test_dataset_json(written):
    out, meta = written
    assert meta["name"] == "Hippocampus" and meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "MRI"}
    assert meta["labels"] == {"0": "background", "1": "Anterior", "2": "Posterior"}
    assert (meta["numTraining"], meta["numTest"]) == (N_TRAIN, N_TEST)
    assert meta["training"] == [{"image": f"./imagesTr/hippocampus_{i:03d}.nii.gz",
                                 "label": f"./labelsTr/hippocampus_{i:03d}.nii.gz"} for i in range(N_TRAIN)]
    assert meta["test"] == [f"./imagesTs/hippocampus_{i:03d}.nii.gz"
                            for i in range(N_TRAIN, N_TRAIN + N_TEST)]
    paths = [p for e in meta["training"] for p in e.values()] + meta["test"]
    assert all(os.path.isfile(os.path.join(out, p)) for p in paths)
    folders = ("imagesTr", "labelsTr", "imagesTs")
    assert sum(len(os.listdir(os.path.join(out, d))) for d in folders) == len(paths)


def test_geometry_and_sizes(written, training):
    out, meta = written
    tests = [read(os.path.join(out, p)) for p in meta["test"]]
    sizes = []
    for img, arr in [image for image, _ in training] + tests:
        assert img.GetSpacing() == SPACING
        np.testing.assert_allclose(img.GetDirection(), DIRECTION, atol=1e-6)
        assert any(img.GetOrigin())
        assert arr.dtype == np.float32 and arr.shape == img.GetSize()[::-1]
        assert all(lo <= n <= hi for n, (lo, hi) in zip(img.GetSize(), SIZE_RANGE))
        sizes.append(img.GetSize())
    assert len(set(sizes)) > 1
    for (img, _), (lab, lab_arr) in training:
        assert lab_arr.dtype == np.uint8
        assert lab.GetSize() == img.GetSize() and lab.GetSpacing() == img.GetSpacing()
        assert lab.GetOrigin() == img.GetOrigin() and lab.GetDirection() == img.GetDirection()


def test_default_geometry(tmp_path):
    write_msd_phantom(str(tmp_path), 1, seed=SEED)
    img, _ = read(str(tmp_path / "imagesTr" / "hippocampus_000.nii.gz"))
    assert img.GetSpacing() == (1.0, 1.0, 1.0)
    assert img.GetDirection() == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert not os.listdir(tmp_path / "imagesTs")


def test_labels_adjacent_and_brighter(training):
    for (_, image), (_, labels) in training:
        assert set(np.unique(labels)) == {0, 1, 2}
        anterior = labels == 1
        touching = np.zeros_like(anterior)
        for axis in range(3):
            for shift in (1, -1):
                touching |= np.roll(labels, shift, axis=axis) == 2
        assert (anterior & touching).any()
        assert image[labels > 0].mean() > 1.05 * image[labels == 0].mean()


def test_determinism(tmp_path, training):
    again = write_msd_phantom(str(tmp_path / "a"), N_TRAIN, seed=SEED)
    other = write_msd_phantom(str(tmp_path / "b"), N_TRAIN, seed=SEED + 1)
    for i, ((_, image), (_, labels)) in enumerate(training):
        name = f"hippocampus_{i:03d}.nii.gz"
        np.testing.assert_array_equal(read(os.path.join(again, "imagesTr", name))[1], image)
        np.testing.assert_array_equal(read(os.path.join(again, "labelsTr", name))[1], labels)
        different = read(os.path.join(other, "imagesTr", name))[1]
        assert different.shape != image.shape or not np.array_equal(different, image)


def test_make_case_shape_and_ranges():
    image, labels = make_case((36, 50, 34), np.random.default_rng(0))
    assert image.shape == labels.shape == (34, 50, 36)
    assert image.dtype == np.float32 and labels.dtype == np.uint8
    assert 0 <= image.min() and image.max() < 600
