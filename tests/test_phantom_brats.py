"""The phantom BraTS generator: layout, types, determinism, workers and the MR contrasts it claims."""
import os

import nibabel as nib
import numpy as np
import pytest

from dataset.phantom.brats import (BG, CSF, ENHANCING, GM, NECROSIS, OEDEMA, WM, _anatomy, make_case,
                             write_brats_phantom)

SHAPE, SEED, N = (64, 64, 48), 4, 3
KEYS = ("t1", "t1ce", "t2", "flair", "seg")


def read_case(folder):
    """{key: array} of one written case."""
    name = os.path.basename(folder)
    return {k: np.asanyarray(nib.load(os.path.join(folder, f"{name}_{k}.nii.gz")).dataobj) for k in KEYS}


def file_bytes(folders):
    """Raw bytes of every file of the given case folders, in a fixed order."""
    return [open(os.path.join(f, n), "rb").read() for f in folders for n in sorted(os.listdir(f))]


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("phantom"))
    return out, write_brats_phantom(out, N, shape=SHAPE, seed=SEED)


@pytest.fixture(scope="module")
def cases(written):
    return [read_case(f) for f in written[1]]


def test_layout_types_and_shapes(written):
    out, folders = written
    names = [f"Phantom_{i:03d}" for i in range(N)]
    assert folders == [os.path.join(out, n) for n in names]
    assert sorted(os.listdir(out)) == names
    for folder, name in zip(folders, names):
        assert sorted(os.listdir(folder)) == sorted(f"{name}_{k}.nii.gz" for k in KEYS)
        for key in KEYS:
            img = nib.load(os.path.join(folder, f"{name}_{key}.nii.gz"))
            assert img.shape == SHAPE
            assert img.get_data_dtype() == (np.uint8 if key == "seg" else np.int16)
            np.testing.assert_array_equal(img.affine, np.eye(4))


def test_intensities_and_background(cases):
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) / (n / 2) for n in SHAPE], indexing="ij")
    outside = sum(g ** 2 for g in grid) > 1  # beyond the largest head the generator can draw
    for case in cases:
        head = case["t1"] != 0
        assert 0.25 < head.mean() < 0.6
        for key in KEYS:
            assert case[key].min() >= 0
            assert not case[key][outside].any()
        for key in KEYS[:4]:
            assert 300 < case[key].max() < 3000
        assert head[case["seg"] > 0].all()


def test_labels(cases):
    for case in cases:
        seg = case["seg"]
        assert set(np.unique(seg)) <= {0, 1, 2, 4}
        assert (seg == 1).any() and (seg == 2).any()
    assert any((c["seg"] == 4).any() for c in cases)


def test_make_case():
    images, seg = make_case(SHAPE, np.random.default_rng(0))
    assert sorted(images) == ["flair", "t1", "t1ce", "t2"] and seg.dtype == np.uint8
    zero = images["t1"] == 0
    for image in images.values():
        assert image.shape == SHAPE and image.dtype.kind == "f" and image.min() >= 0
        np.testing.assert_array_equal(image == 0, zero)


def test_deterministic(written, tmp_path):
    same = write_brats_phantom(str(tmp_path / "same"), N, shape=SHAPE, seed=SEED)
    other = write_brats_phantom(str(tmp_path / "other"), N, shape=SHAPE, seed=SEED + 1)
    assert file_bytes(same) == file_bytes(written[1])
    assert all(a != b for a, b in zip(file_bytes(other), file_bytes(same)))


def test_workers(cases, tmp_path):
    folders = write_brats_phantom(str(tmp_path), N, shape=SHAPE, seed=SEED, workers=2)
    for case, folder in zip(cases, folders):
        for key, array in read_case(folder).items():
            np.testing.assert_array_equal(array, case[key])


def test_contrasts(cases):
    """Tissue and tumour contrasts like real scans, on the written int16 images."""
    for i, case in enumerate(cases):
        tissue, seg = _anatomy(SHAPE, np.random.default_rng([SEED, i]))
        np.testing.assert_array_equal(seg, case["seg"])
        assert (case["t1"][tissue == BG] == 0).all()
        t1, t1ce, t2, flair = (
            {c: case[k][tissue == c].mean() for c in (CSF, GM, WM, OEDEMA, ENHANCING, NECROSIS)}
            for k in KEYS[:4])
        brain = {k: case[k][(tissue == GM) | (tissue == WM)].mean() for k in KEYS[:4]}
        assert t1[WM] > t1[GM] > t1[CSF]
        assert t2[CSF] > t2[GM] > t2[WM]
        assert flair[GM] > flair[WM] > flair[CSF]
        assert flair[OEDEMA] > brain["flair"] and t2[OEDEMA] > brain["t2"]
        assert t1[OEDEMA] < t1[WM]
        assert t1[NECROSIS] < brain["t1"] and t1ce[NECROSIS] < brain["t1ce"]
        assert t2[NECROSIS] > t2[WM]
        if (tissue == ENHANCING).any():
            assert t1ce[ENHANCING] > brain["t1ce"] and t1ce[ENHANCING] > t1[ENHANCING]
