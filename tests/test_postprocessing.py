"""Postprocessing per region (dataset/postprocessing.py) and its choice on validation cases
(runtime/loops/postprocessing_choice.py), on hand-made 24³ label maps whose answers are worked
out here. Maps are drawn in the BraTS 2023 glioma labels: 1 core (NETC), 2 oedema (SNFH),
3 enhancing (ET)."""
import json

import numpy as np
import pytest

from common.errors import UserError
from dataset.conventions import CONVENTIONS
from dataset.postprocessing import (apply_region, check_operations, postprocess,
                                    read_postprocessing, region_order, write_postprocessing)

SHAPE = (24, 24, 24)
GLI = CONVENTIONS["brats-gli"]
TO_2021 = np.array([0, 1, 2, 4], np.uint8)  # 2023 glioma label → BraTS 2021 label


def box(mask, corner, size, value):
    """Set the size³ cube of `value` at `corner` of `mask` (in place); returns the mask."""
    i, j, k = corner
    mask[i:i + size, j:j + size, k:k + size] = value
    return mask


def tumour():
    """An 8³ oedema cube at (2,2,2) around a 4³ core at (4,4,4) around a 3³ enhancing cube."""
    mask = box(np.zeros(SHAPE, np.uint8), (2, 2, 2), 8, 2)
    return box(box(mask, (4, 4, 4), 4, 1), (4, 4, 4), 3, 3)


def remove(n):
    return {"op": "remove_small", "voxels": n}


def test_a_small_false_positive_is_removed_at_n_and_kept_below():
    prediction = box(tumour(), (18, 18, 18), 2, 2)  # an 8-voxel oedema speck far away
    removed = postprocess(prediction, {"WT": remove(9)}, GLI)
    assert np.array_equal(removed, tumour())  # the speck leaves the whole tumour: background
    assert np.array_equal(postprocess(prediction, {"WT": remove(8)}, GLI), prediction)
    # 26-neighbour: a speck touching the tumour by a corner alone is part of it, and stays.
    touching = tumour()
    touching[10, 10, 10] = 2  # diagonal to the oedema's corner (9, 9, 9)
    assert np.array_equal(postprocess(touching, {"WT": remove(100)}, GLI), touching)


def test_a_removed_voxel_takes_the_label_of_the_next_larger_region_around_it():
    prediction = tumour()
    prediction[7, 8, 8] = 3  # enhancing speck inside the core: becomes core
    prediction[9, 2, 2] = 3  # enhancing speck inside oedema, away from the core: oedema
    prediction[20, 20, 20] = 3  # enhancing speck in the background: background
    prediction[2, 9, 9] = 1  # core speck inside oedema: oedema
    expected = tumour()
    expected[7, 8, 8] = 1
    out = postprocess(prediction, {"ET": remove(2), "TC": remove(2)}, GLI)
    assert np.array_equal(out, expected)
    # The whole tumour's operation comes first: the background speck leaves every region.
    assert postprocess(prediction, {"WT": remove(2)}, GLI)[20, 20, 20] == 0


def test_keep_largest():
    prediction = box(box(tumour(), (16, 16, 16), 3, 2), (16, 2, 16), 2, 1)
    out = postprocess(prediction, {"WT": {"op": "keep_largest"}}, GLI)
    assert np.array_equal(out, tumour())
    assert np.array_equal(postprocess(tumour(), {"WT": {"op": "keep_largest"}}, GLI), tumour())
    # Of the core, the 4³ one is kept; the separate 2³ core becomes background (none around it).
    out = postprocess(prediction, {"TC": {"op": "keep_largest"}}, GLI)
    assert np.array_equal(out, box(box(tumour(), (16, 16, 16), 3, 2), (16, 2, 16), 2, 0))


def test_enhancing_tumour_relabelled_as_core_below_t():
    prediction = tumour()  # 27 enhancing voxels
    out = postprocess(prediction, {"ET": {"op": "relabel_small", "voxels": 28}}, GLI)
    assert np.array_equal(out, np.where(prediction == 3, 1, prediction))
    assert np.array_equal(postprocess(prediction, {"ET": {"op": "relabel_small", "voxels": 27}},
                                      GLI), prediction)
    # The core label is the convention's own: paediatric NETC is 2, MSD non-enhancing tumour 2.
    ped = np.array([0, 2, 4, 1], np.uint8)[prediction]  # NETC 2, ED 4, ET 1
    out = postprocess(ped, {"ET": {"op": "relabel_small", "voxels": 28}}, CONVENTIONS["brats-ped"])
    assert set(np.unique(out[prediction == 3])) == {2}
    msd = np.array([0, 2, 1, 3], np.uint8)[prediction]
    out = postprocess(msd, {"ET": {"op": "relabel_small", "voxels": 28}}, CONVENTIONS["msd-brain"])
    assert set(np.unique(out[prediction == 3])) == {2}


def noisy_tumour(seed):
    """A tumour with a dozen random specks of random labels, some touching it."""
    rng = np.random.default_rng(seed)
    mask = tumour()
    for _ in range(12):
        box(mask, rng.integers(0, 22, 3), int(rng.integers(1, 3)), int(rng.integers(1, 4)))
    return mask


OPERATIONS = [remove(5), remove(30), {"op": "keep_largest"}, {"op": "relabel_small", "voxels": 40}]


def test_2021_and_2023_labels_give_the_same_result():
    for seed in range(3):
        prediction = noisy_tumour(seed)
        for region in ("ET", "TC", "WT"):
            for operation in OPERATIONS[:3] + ([OPERATIONS[3]] if region == "ET" else []):
                out = postprocess(prediction, {region: operation}, GLI)
                out_2021 = postprocess(TO_2021[prediction], {region: operation},
                                       CONVENTIONS["brats2021"])
                assert np.array_equal(TO_2021[out], out_2021), (seed, region, operation)


@pytest.mark.parametrize("name", sorted(CONVENTIONS))
def test_each_conventions_regions(name):
    """Every operation on every region of every convention gives a map of the convention's
    labels, the same on class indices, and leaves the region without the removed parts."""
    convention = CONVENTIONS[name]
    labels = np.asarray(convention.labels, np.uint8)
    regions = dict(convention.regions)
    assert sorted(region_order(convention)) == sorted(regions)
    prediction = labels[noisy_tumour(1) % len(labels)]
    for region, values in regions.items():
        for operation in OPERATIONS:
            try:
                check_operations({region: operation}, convention)
            except ValueError:
                assert operation["op"] == "relabel_small" and (region != "ET" or len(regions) == 1)
                continue
            out = apply_region(prediction, region, operation, convention)
            assert set(np.unique(out)) <= set(convention.labels)
            classes = apply_region(convention.to_classes(prediction), region, operation,
                                   convention, in_classes=True)
            assert np.array_equal(convention.to_source(classes), out)
            plain = apply_region(prediction, region, operation, convention.as_dict())
            assert np.array_equal(plain, out)  # metadata.json's form of the convention
            kept = np.isin(out, values) & np.isin(prediction, values)
            assert np.array_equal(kept, np.isin(out, values)), "nothing joins a region"
            if operation["op"] == "remove_small":
                from scipy import ndimage
                components, _ = ndimage.label(np.isin(out, values), np.ones((3, 3, 3)))
                assert np.bincount(components.ravel())[1:].min(initial=99) >= operation["voxels"]


def test_bad_postprocessing_json_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "postprocessing.json"
    for body, words in (({"operations": {"RC": {"op": "keep_largest"}}}, "'RC'"),
                        ({"operations": {"WT": {"op": "grow"}}}, "grow"),
                        ({"operations": {"WT": {"op": "remove_small", "voxels": -3}}}, "positive"),
                        ({"operations": {"TC": {"op": "relabel_small", "voxels": 9}}}, "ET"),
                        ({"criterion": ["dice"]}, "operations"),
                        ("{not json", "")):
        path.write_text(body if isinstance(body, str) else json.dumps(body))
        with pytest.raises(UserError) as caught:
            read_postprocessing(str(path), GLI)
        message = str(caught.value)
        assert message.startswith(str(path)) and "\n" not in message and words in message
    with pytest.raises(UserError, match="postprocessing.json"):
        read_postprocessing(str(tmp_path / "missing" / "postprocessing.json"), GLI)


def cases():
    """Two validation cases: A, the tumour predicted with an 8-voxel oedema speck far away; B, a
    tumour without enhancing part predicted with an 8-voxel enhancing speck inside its core."""
    reference_b = np.where(tumour() == 3, 1, tumour())
    prediction_b = reference_b.copy()
    prediction_b[5:7, 5:7, 5:7] = 3
    return [("A", box(tumour(), (18, 18, 18), 2, 2), tumour(), (1.0, 1.0, 1.0)),
            ("B", prediction_b, reference_b, (1.0, 1.0, 1.0))]


def test_the_choice_on_validation_cases(tmp_path):
    from runtime.loops.challenge_metrics import ChallengeMetrics
    from runtime.loops.postprocessing_choice import candidates, choose_postprocessing
    grid = candidates(GLI, remove_sizes=(5, 20), relabel_sizes=(20,))
    assert [op["op"] for op in grid["ET"]] == ["remove_small", "remove_small", "keep_largest",
                                               "relabel_small"]
    assert "relabel_small" not in [op["op"] for op in grid["TC"]]
    choice = choose_postprocessing(cases(), GLI, grid=grid)
    description = choice.description
    # Removing the speck of A (N=20, not 5) and the enhancing speck of B (into the core around
    # it: B's reference has no enhancing tumour, so its ET Dice and F1 go from 0 to 1).
    assert description["operations"] == {"WT": remove(20), "TC": {"op": "none"}, "ET": remove(20)}
    wt_before = (2 * 512 / (512 + 520) + 2 / 3) / 2  # A's WT: Dice and F1 (1 TP, 1 FP)
    et_before = (0 + 0) / 2  # B's ET: Dice 0 and F1 0 (1 FP)
    before = np.mean([(wt_before + 1) / 2, 1.0, (1 + et_before) / 2])
    assert description["score_before"] == pytest.approx(before)
    assert description["score_after"] == pytest.approx(1.0)
    for (_, _, reference, _), prediction in zip(cases(), choice.predictions):
        assert np.array_equal(prediction, reference)
    chosen = [(row["region"], row["operation"]) for row in description["candidates"]
              if row["chosen"]]
    assert chosen == [("WT", remove(20)), ("TC", {"op": "none"}), ("ET", remove(20))]
    # The per-region scoring gives the challenge's own rows.
    metrics = ChallengeMetrics(GLI)
    assert choice.raw_rows == [row for name, prediction, reference, spacing in cases()
                               for row in metrics.case(name, prediction, reference, spacing)]
    assert all(row["dice"] == 1.0 and row["lesion_f1"] == 1.0 for row in choice.rows)
    # The description is postprocessing.json, read back as its operations.
    path = str(tmp_path / "postprocessing.json")
    write_postprocessing(path, description)
    assert read_postprocessing(path, GLI) == description["operations"]
    assert json.load(open(path))["validation_cases"] == ["A", "B"]
    # A margin larger than any gain keeps everything as it was.
    unchanged = choose_postprocessing(cases(), GLI, margin=1.0, grid=grid).description
    assert set(op["op"] for op in unchanged["operations"].values()) == {"none"}
    assert unchanged["score_after"] == unchanged["score_before"]


def test_criterion():
    from runtime.loops.postprocessing_choice import DEFAULT_CRITERION, criterion_columns
    from runtime.settings import InferenceSettings
    assert InferenceSettings.postprocessing_criterion == ",".join(DEFAULT_CRITERION)
    assert criterion_columns("dice,lesion_f1") == (("dice", "lesion_f1"), 1)
    assert criterion_columns("hd95") == (("hd95",), -1)
    for bad in ("dice,hd95", "ET_dice", ""):
        with pytest.raises(ValueError):
            criterion_columns(bad)


@pytest.mark.parametrize("body, words", [
    ({"operations": {"RC": {"op": "keep_largest"}}}, "not a usable postprocessing file (names "
                                                     "region 'RC', which the brats2021 convention "
                                                     "lacks"),
    ("{not json", "not a usable postprocessing file (Expecting property name"),
], ids=["region", "unreadable"])
def test_a_bad_postprocessing_json_stops_predict_and_evaluate_in_one_line(tmp_path, capsys, body,
                                                                         words):
    """Read before the data and the model: one line naming the file; --no_postprocessing runs
    without it (here up to the missing checkpoint)."""
    from tests.conftest import assert_one_line_error, main_here
    path = tmp_path / "model" / "postprocessing.json"
    path.parent.mkdir()
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    common = ["--model_dir", str(path.parent), "--log_dir", str(tmp_path / "logs"), "--dtype", "fp32"]
    for mode in (["predict"], ["evaluate", "--sliding_window", "--challenge_metrics"]):
        result = main_here(capsys, *common, "--exec_mode", *mode)
        assert_one_line_error(result, f"{path}: {words}")
    result = main_here(capsys, *common, "--exec_mode", "predict", "--no_postprocessing",
                       "--synth_data")
    assert_one_line_error(result, "no checkpoint to predict with")
