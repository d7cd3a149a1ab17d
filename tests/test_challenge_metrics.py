"""The challenge's metrics (runtime/loops/challenge_metrics.py) on hand-made cases whose answers are
worked out here: lesions missed and invented, empty masks, touching lesions, anisotropic voxels,
and the 2021 and 2023 label values of the same tumour."""
import numpy as np
import pytest

from dataset.conventions import CONVENTIONS
from runtime.loops.challenge_metrics import COLUMNS, HD95_INFINITE, ChallengeMetrics, record_spacing

SHAPE = (24, 24, 24)
CUBE = 4 ** 3  # voxels of a 4×4×4 lesion
CUBE_SURFACE = CUBE - 2 ** 3  # its voxels next to the outside: all but the 2×2×2 core


@pytest.fixture(scope="module")
def brats2021():
    return ChallengeMetrics(CONVENTIONS["brats2021"])


def cube(mask, corner, value, size=4):
    """Set a size³ lesion of `value` at `corner` of `mask` (in place); returns the mask."""
    i, j, k = corner
    mask[i:i + size, j:j + size, k:k + size] = value
    return mask


def by_region(rows):
    assert all(tuple(row) == COLUMNS for row in rows)
    return {row["region"]: row for row in rows}


def surface(mask):
    """The voxels of `mask` with a 6-neighbour outside it (outside the array counts as outside)."""
    padded = np.pad(mask, 1)
    inside = np.ones_like(mask)
    for axis in range(3):
        for shift in (-1, 1):
            inside &= np.roll(padded, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return mask & ~inside


def brute_force_hd95(a, b, spacing):
    """panoptica's HD95: the 95th percentile (linear interpolation) of the distances (mm) of
    every surface voxel of a to the nearest surface voxel of b, pooled with those of b to a."""
    pa, pb = (np.argwhere(surface(m)) * np.asarray(spacing) for m in (a, b))
    distances = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([distances.min(1), distances.min(0)]), 95))


def test_two_lesions_of_which_one_is_missed(brats2021):
    reference = cube(cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 4), (14, 14, 14), 4)
    prediction = cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 4)
    rows = by_region(brats2021.case("two", prediction, reference))
    assert set(rows) == {"ET", "TC", "WT"}
    for row in rows.values():  # label 4 (enhancing) is in all three regions
        assert (row["lesion_tp"], row["lesion_fp"], row["lesion_fn"]) == (1, 0, 1)
        assert row["lesion_f1"] == pytest.approx(2 * 1 / (2 * 1 + 0 + 1))
        # The matched lesion is perfect; the missed one counts only in the F1.
        assert (row["lesion_dice"], row["lesion_nsd"], row["lesion_hd95"]) == (1.0, 1.0, 0.0)
        assert row["dice"] == pytest.approx(2 * CUBE / (CUBE + 2 * CUBE))
        # NSD as panoptica: the mean of the share of the reference's surface near the
        # prediction's (1/2) and of the prediction's near the reference's (1), over that share
        # plus the shares that are not (1/2 and 0).
        assert row["nsd"] == pytest.approx((0.5 + 1.0) / (0.5 + 1.0 + 0.5 + 0.0))
        assert row["hd95"] == pytest.approx(brute_force_hd95(reference > 0, prediction > 0, (1, 1, 1)))
        assert row["hd95"] > 10  # the missed lesion's surface is far away


def test_a_false_positive(brats2021):
    reference = cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 2)  # oedema: whole tumour only
    prediction = cube(cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 2), (14, 2, 2), 2)
    rows = by_region(brats2021.case("fp", prediction, reference))
    wt = rows["WT"]
    assert (wt["lesion_tp"], wt["lesion_fp"], wt["lesion_fn"]) == (1, 1, 0)
    assert wt["lesion_f1"] == pytest.approx(2 / 3)
    assert wt["lesion_dice"] == 1.0 and wt["dice"] == pytest.approx(2 * CUBE / (3 * CUBE))
    for name in ("ET", "TC"):  # empty in both: the ranking's perfect scores
        assert (rows[name]["dice"], rows[name]["hd95"], rows[name]["lesion_f1"]) == (1.0, 0.0, 1.0)


def test_empty_against_empty_scores_perfectly(brats2021):
    empty = np.zeros(SHAPE, np.uint8)
    for row in brats2021.case("empty", empty, empty):
        assert {k: row[k] for k in COLUMNS[2:]} == {
            "dice": 1.0, "nsd": 1.0, "hd95": 0.0, "lesion_tp": 0, "lesion_fp": 0, "lesion_fn": 0,
            "lesion_f1": 1.0, "lesion_dice": 1.0, "lesion_nsd": 1.0, "lesion_hd95": 0.0}


def test_empty_against_non_empty_has_no_true_positive(brats2021):
    empty = np.zeros(SHAPE, np.uint8)
    tumour = cube(cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 1), (14, 14, 14), 1)  # two cores
    worst = {"dice": 0.0, "nsd": 0.0, "hd95": HD95_INFINITE, "lesion_tp": 0, "lesion_f1": 0.0,
             "lesion_dice": 0.0, "lesion_nsd": 0.0, "lesion_hd95": HD95_INFINITE}
    missed = by_region(brats2021.case("missed", empty, tumour))
    invented = by_region(brats2021.case("invented", tumour, empty))
    for name in ("TC", "WT"):
        assert {k: missed[name][k] for k in worst} == worst
        assert {k: invented[name][k] for k in worst} == worst
        assert (missed[name]["lesion_fn"], missed[name]["lesion_fp"]) == (2, 0)
        assert (invented[name]["lesion_fn"], invented[name]["lesion_fp"]) == (0, 2)
    assert missed["ET"]["dice"] == 1.0  # no enhancing tumour in either


def test_touching_lesions_are_one_lesion(brats2021):
    # Two cubes meeting at a corner are one connected component (26-neighbourhood).
    reference = cube(cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 4), (6, 6, 6), 4)
    prediction = cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 4)
    et = by_region(brats2021.case("touching", prediction, reference))["ET"]
    assert (et["lesion_tp"], et["lesion_fp"], et["lesion_fn"]) == (1, 0, 0)
    assert et["lesion_f1"] == 1.0
    assert et["lesion_dice"] == pytest.approx(2 * CUBE / (CUBE + 2 * CUBE))


def test_hd95_in_mm_on_anisotropic_voxels(brats2021):
    reference = cube(np.zeros(SHAPE, np.uint8), (4, 4, 4), 4, size=6)
    prediction = cube(np.zeros(SHAPE, np.uint8), (5, 3, 6), 4, size=5)
    spacing = (1.0, 2.0, 3.5)
    et = by_region(brats2021.case("aniso", prediction, reference, spacing))["ET"]
    expected = brute_force_hd95(reference > 0, prediction > 0, spacing)
    assert et["hd95"] == pytest.approx(expected)
    assert et["lesion_hd95"] == pytest.approx(expected)  # one lesion each: the same pair
    in_voxels = by_region(brats2021.case("aniso", prediction, reference))["ET"]
    assert in_voxels["hd95"] == pytest.approx(brute_force_hd95(reference > 0, prediction > 0, (1, 1, 1)))
    assert et["hd95"] != pytest.approx(in_voxels["hd95"])
    # NSD is measured in voxels, as the official evaluation does, whatever the spacing.
    assert (et["nsd"], et["lesion_nsd"]) == (in_voxels["nsd"], in_voxels["lesion_nsd"])
    assert et["dice"] == pytest.approx(2 * (5 * 4 * 4) / (6 ** 3 + 5 ** 3))  # overlap 5×4×4


def test_record_spacing_undoes_the_swap_of_the_first_two_axes():
    rotation = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.9, 1.2, 3.0])  # voxels of 0.9 × 1.2 × 3 mm, turned
    assert record_spacing({"affine": affine}) == pytest.approx((1.2, 0.9, 3.0))


def test_2021_and_2023_labels_give_the_same_regions(brats2021):
    def tumour(et):
        mask = cube(np.zeros(SHAPE, np.uint8), (2, 2, 2), 2, size=10)  # oedema around
        cube(mask, (4, 4, 4), 1, size=6)  # the necrotic core
        return cube(mask, (5, 5, 5), et, size=3)  # the enhancing part

    def guess(et):
        mask = cube(np.zeros(SHAPE, np.uint8), (3, 2, 2), 2, size=9)
        cube(mask, (4, 5, 4), et, size=5)
        return cube(mask, (16, 16, 16), 1, size=3)

    old = brats2021.case("x", guess(4), tumour(4))
    new = ChallengeMetrics(CONVENTIONS["brats-gli"]).case("x", guess(3), tumour(3))
    assert old == new
    rows = by_region(new)
    assert rows["WT"]["lesion_fp"] == 1 and rows["ET"]["lesion_tp"] == 1
    assert len({rows[r]["dice"] for r in ("ET", "TC", "WT")}) == 3  # the regions differ
