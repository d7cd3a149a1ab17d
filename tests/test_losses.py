"""Losses and metrics of the reference's model/losses.py against a float64 NumPy implementation written here."""
import keras
import numpy as np
import pytest

from model.losses import ce_loss, dice_ce_loss, dice_loss, eval_dice_per_sample, get_loss

RTOL = 1e-5


# ---- the reference's formulas in float64 NumPy --------------------------------------------------------
def np_dice(y, p):
    inter = (y * p).sum(axis=(1, 2, 3))
    return 2 * inter / (y.sum(axis=(1, 2, 3)) + p.sum(axis=(1, 2, 3)) + 1e-5)  # (B, C)


def np_losses(y, p, include_background):
    y, p = y.astype(np.float64), p.astype(np.float64)
    if not include_background:
        y, p = y[..., 1:], p[..., 1:]
    dice = np.sum(1 - np_dice(y, p).mean(axis=0))
    # Keras 2's binary_crossentropy: clip to [ε, 1 − ε] in the input's float32, then log(p + ε).
    eps32 = np.float32(1e-7)
    pc = np.clip(p.astype(np.float32), eps32, np.float32(1) - eps32).astype(np.float64)
    ce = np.sum((-(y * np.log(pc + 1e-7) + (1 - y) * np.log(1 - pc + 1e-7))).mean(axis=(0, 1, 2, 3)))
    return {"dice": dice, "ce": ce, "dice+ce": dice + ce}


def np_metrics(y, p):
    y = y.astype(np.float64)
    hard = (p > 0.5).astype(np.float64)
    dice = np_dice(y, hard)
    whole = np_dice(y[..., 1:].max(-1, keepdims=True), hard[..., 1:].max(-1, keepdims=True))
    return {"TumorCore": dice[:, 1], "PeritumoralEdema": dice[:, 2], "EnhancingTumor": dice[:, 3],
            "MeanDice": dice[:, 1:].mean(-1), "WholeTumor": whole[:, 0]}


# ---- cases --------------------------------------------------------------------------------------
def one_hot(labels, n=4):
    return np.eye(n, dtype=np.float32)[labels]


def random_case(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, size=(2, 6, 5, 4))
    logits = rng.normal(size=(2, 6, 5, 4, 4))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return one_hot(labels), probs.astype(np.float32)


def perfect_case():
    labels = np.random.default_rng(3).integers(0, 4, size=(2, 4, 4, 4))
    return one_hot(labels), one_hot(labels)


def empty_prediction_case():
    labels = np.random.default_rng(4).integers(0, 4, size=(2, 4, 4, 4))
    return one_hot(labels), one_hot(np.zeros_like(labels))  # everything predicted background


def empty_truth_case():
    labels = np.random.default_rng(5).integers(0, 4, size=(2, 4, 4, 4))
    return one_hot(np.zeros_like(labels)), one_hot(labels)


CASES = {"random": random_case(0), "random2": random_case(1), "perfect": perfect_case(),
         "empty_prediction": empty_prediction_case(), "empty_truth": empty_truth_case()}


def as_float(x):
    return float(keras.ops.convert_to_numpy(x))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("name", ["dice", "ce", "dice+ce"])
def test_losses_match_numpy(case, include_background, name):
    y, p = CASES[case]
    expected = np_losses(y, p, include_background)[name]
    got = as_float(get_loss(name, include_background)(y, p))
    assert got == pytest.approx(expected, rel=RTOL, abs=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_metrics_match_numpy(case):
    y, p = CASES[case]
    expected = np_metrics(y, p)
    got = eval_dice_per_sample(y, p)
    assert set(got) == set(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got[key]), value, rtol=RTOL, atol=1e-7)


def test_hand_made_values():
    y, p = perfect_case()
    # Perfect prediction: dice 1 for every present class (up to the 1e-5 in the denominator).
    assert as_float(dice_loss(y, p)) == pytest.approx(0.0, abs=1e-5)
    scores = eval_dice_per_sample(y, p)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores["WholeTumor"]), 1.0, atol=1e-5)
    # Empty prediction: every tumour dice 0, the dice loss is the number of classes.
    y, p = empty_prediction_case()
    assert as_float(dice_loss(y, p)) == pytest.approx(3.0, abs=1e-6)
    assert as_float(dice_loss(y, p, include_background=True)) < 4.0  # background overlaps
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(eval_dice_per_sample(y, p)["MeanDice"]), 0.0)
    # Probability exactly 0 or 1 is clipped, so the cross-entropy stays finite.
    assert np.isfinite(as_float(ce_loss(y, p)))
    assert as_float(dice_ce_loss(y, p)) == pytest.approx(as_float(dice_loss(y, p)) + as_float(ce_loss(y, p)))


def test_metrics_with_background_add_a_background_score():
    y, p = random_case(2)
    scores = eval_dice_per_sample(y, p, include_background=True)
    hard = (p > 0.5).astype(np.float64)
    dice = np_dice(y.astype(np.float64), hard)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores["Background"]), dice[:, 0], rtol=RTOL)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores["MeanDice"]), dice.mean(-1), rtol=RTOL)
