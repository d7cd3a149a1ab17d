"""Whole-volume inference: sliding windows with Gaussian blending, mirroring (TTA) and ensembles
against brute-force NumPy re-computations, on both backends; the flags end to end and their errors."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from dataset.window_layout import gaussian_importance, sliding_window_shape, window_starts
from tests.conftest import ROOT, assert_one_line_error, main_here, phantom_records

MIRRORS = [axes for r in range(4) for axes in itertools.combinations((0, 1, 2), r)]


def next_voxels(x):
    """Each voxel's channels and those of its next neighbour along each spatial axis (0 beyond)."""
    from keras import ops
    shifted = [ops.pad(x[:, 1:], [[0, 0], [0, 1], [0, 0], [0, 0], [0, 0]]),
               ops.pad(x[:, :, 1:], [[0, 0], [0, 0], [0, 1], [0, 0], [0, 0]]),
               ops.pad(x[:, :, :, 1:], [[0, 0], [0, 0], [0, 0], [0, 1], [0, 0]])]
    return ops.concatenate([x] + shifted, axis=-1)


def tiny_model(seed):
    """2 channels to 3 classes: each voxel with its next neighbours, a dense layer, a softmax.
    Windows see their borders, and a mirrored input gives another output. (XLA's 3-D
    convolutions and pooling are too slow on CPU for a test.)"""
    import keras
    inputs = keras.Input((None, None, None, 2))
    logits = keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(stddev=1.0, seed=seed),
                                bias_initializer=keras.initializers.RandomNormal(seed=seed + 1))(
        keras.layers.Lambda(next_voxels)(inputs))
    return keras.Model(inputs, keras.layers.Softmax()(logits))


def make_engine(model):
    import keras
    if keras.backend.backend() == "jax":
        from runtime.engines.jax_engine import JaxEngine
        return JaxEngine(model, None, None, None)
    from runtime.engines.tf_engine import TFEngine
    return TFEngine(model, None, None, None)


def gaussian(window):
    """σ = window/8 per axis, centred, peak 1, floored at 1e-3: written out here on its own."""
    grids = np.meshgrid(*[np.arange(w, dtype=np.float64) for w in window], indexing="ij")
    exponent = sum(((g - (w - 1) / 2) / (w / 8)) ** 2 for g, w in zip(grids, window))
    g = np.exp(-0.5 * exponent)
    return np.maximum(g / g.max(), 1e-3)


def predict_window(model, crop, tta):
    """The model's probabilities of one (w, w, w, C) crop; with tta the mean of its 8 mirrorings."""
    from keras import ops
    if not tta:
        return ops.convert_to_numpy(model(crop[None]))[0].astype(np.float64)
    flipped = [np.flip(ops.convert_to_numpy(model(np.flip(crop, axes)[None].copy()))[0], axes)
               for axes in MIRRORS]
    return np.mean(np.array(flipped, np.float64), axis=0)


def brute_force(model, volume, window, starts, tta):
    """Every window in turn, weighted by the Gaussian, summed, divided by the summed weights."""
    padded = np.zeros([max(d, w) for d, w in zip(volume.shape[:3], window)] + [volume.shape[3]], np.float32)
    padded[:volume.shape[0], :volume.shape[1], :volume.shape[2]] = volume
    sums = np.zeros(padded.shape[:3] + (3,))
    weights = np.zeros(padded.shape[:3])
    g = gaussian(window)
    for corner in itertools.product(*starts):
        where = tuple(slice(s, s + w) for s, w in zip(corner, window))
        sums[where] += g[..., None] * predict_window(model, padded[where], tta)
        weights[where] += g
    blended = sums / weights[..., None]
    return blended[:volume.shape[0], :volume.shape[1], :volume.shape[2]]


def check_against_brute_force():
    """Sliding windows (with and without TTA), the centred window with TTA and an ensemble of two
    weight sets, each against its NumPy re-computation, on the current Keras backend."""
    from runtime.loops.inference import Inference
    rng = np.random.default_rng(0)
    model = tiny_model(seed=1)
    engine = make_engine(model)
    # An awkward size (2 windows per axis, the last flush with the border) and one smaller than
    # its window along every axis (padded, then cropped back).
    cases = [((150, 170, 90), (128, 128, 64), [[0, 22], [0, 42], [0, 26]], [False]),
             ((45, 51, 37), (32, 32, 32), [[0, 13], [0, 10, 19], [0, 5]], [False, True]),
             ((20, 24, 28), (32, 32, 32), [[0], [0], [0]], [False, True])]
    for shape, window, starts, ttas in cases:
        assert sliding_window_shape(shape) == window
        volume = rng.normal(size=shape + (2,)).astype(np.float32)
        for tta in ttas:
            inference = Inference(engine, 3, window=window, overlap=0.5, sw_batch_size=3, tta=tta)
            probs = np.asarray(inference.probabilities(volume[None]))[0]
            expected = brute_force(model, volume, window, starts, tta)
            assert probs.shape == shape + (3,)
            assert np.max(np.abs(probs - expected)) <= 1e-5, (shape, tta)
            assert np.max(np.abs(probs.sum(axis=-1) - 1.0)) <= 1e-5

    batch = rng.normal(size=(2, 32, 32, 32, 2)).astype(np.float32)
    centred = np.asarray(Inference(engine, 3, tta=True).probabilities(batch))
    expected = np.stack([predict_window(model, image, tta=True) for image in batch])
    assert np.max(np.abs(centred - expected)) <= 1e-5

    first = engine.snapshot()
    other = tiny_model(seed=7)
    model.set_weights(other.get_weights())
    second = engine.snapshot()
    ensemble = Inference(engine, 3, members=[first, second], window=(32, 32, 32))
    averaged = np.asarray(ensemble.probabilities(batch[:1, :, :, :20]))[0]
    model_a, model_b = tiny_model(seed=1), other
    expected = [brute_force(m, batch[0, :, :, :20], (32, 32, 32), [[0], [0], [0]], False)
                for m in (model_a, model_b)]
    assert np.max(np.abs(averaged - np.mean(expected, axis=0))) <= 1e-5


def test_sliding_window_tta_and_ensemble_match_numpy_on_tensorflow():
    check_against_brute_force()


def test_sliding_window_tta_and_ensemble_match_numpy_on_jax(jax_env):
    env = jax_env
    code = "from tests.test_sliding_window import check_against_brute_force as c; c()"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_window_starts_follow_nnunet():
    assert window_starts(240, 128, 0.5) == [0, 56, 112]
    assert window_starts(155, 128, 0.5) == [0, 27]
    assert window_starts(128, 128, 0.5) == [0]
    assert window_starts(100, 128, 0.5) == [0]
    assert window_starts(300, 100, 0.0) == [0, 100, 200]
    assert window_starts(301, 100, 0.0) == [0, 67, 134, 201]
    importance = gaussian_importance((8, 12, 16))
    np.testing.assert_allclose(importance, gaussian((8, 12, 16)), rtol=1e-6)
    assert importance.dtype == np.float32 and importance.min() >= 1e-3


@pytest.fixture(scope="module")
def trained_dirs(tmp_path_factory):
    """Phantom records (one validation volume of 48×48×40) and three checkpoint folders: two
    UNet3Ds of other seeds, and one of another network (batch normalization)."""
    from model.unet3d import build_unet3d
    from runtime.loops import checkpoint
    root = tmp_path_factory.mktemp("ensemble")
    records = phantom_records(str(root), 3, (48, 48, 40), seed=4)
    dirs = {}
    for name, seed, norm in (("a", 1, "instancenorm"), ("b", 2, "instancenorm"), ("c", 1, "batchnorm")):
        dirs[name] = str(root / name)
        checkpoint.save(dirs[name], 5, build_unet3d(in_channels=4, normalization=norm, seed=seed))
    return records, dirs, root


def cli(records, root, *extra):
    return ["--data_dir", records, "--num_folds", "3", "-d", "fp32", "--log_dir", str(root / "logs"),
            "--sliding_window", *extra]


def test_ensemble_of_two_checkpoints_is_the_mean_of_their_probabilities(trained_dirs):
    from dataset.data_loader import BratsData
    from main import main
    records, dirs, root = trained_dirs
    for name in ("a", "b"):
        assert main(cli(records, root, "--exec_mode", "predict", "--model_dir", dirs[name],
                        "--save_probabilities", "--output_dir", str(root / f"out_{name}"))) == 0
    assert main(cli(records, root, "--exec_mode", "predict", "--model_dir", dirs["a"], dirs["b"],
                    "--save_probabilities")) == 0
    single = [np.load(root / f"out_{name}" / "vol_0.npz")["probabilities"].astype(np.float32)
              for name in ("a", "b")]
    ensemble = np.load(os.path.join(dirs["a"], "vol_0.npz"))["probabilities"]
    assert ensemble.dtype == np.float16 and ensemble.shape == (48, 48, 40, 4)  # the whole grid
    assert np.max(np.abs(ensemble - np.mean(single, axis=0))) <= 1e-3  # float16 files
    assert not np.allclose(single[0], single[1], atol=1e-2)
    mask = np.load(os.path.join(dirs["a"], "vol_0.npy"))
    assert np.mean(mask == np.argmax(ensemble, axis=-1)) > 0.999
    assert not [f for f in os.listdir(dirs["b"]) if f.startswith("vol_")]  # written once

    # Evaluation scores the whole grid: the logged dice is the NumPy dice of the saved ensemble.
    assert main(cli(records, root, "--exec_mode", "evaluate", "--model_dir", dirs["a"], dirs["b"])) == 0
    import json
    logged = [json.loads(line) for line in open(root / "logs" / "log.json")][-1]["data"]
    (_, labels), = list(BratsData(records, 1, num_folds=3).eval_volumes().as_numpy_iterator())
    labels, predicted = labels[0][..., 1:], np.round(ensemble.astype(np.float32))[..., 1:]
    dice = 2 * np.sum(labels * predicted, axis=(0, 1, 2)) / (labels.sum((0, 1, 2)) + predicted.sum((0, 1, 2)) + 1e-5)
    np.testing.assert_allclose([logged["TumorCore"], logged["PeritumoralEdema"], logged["EnhancingTumor"]],
                               dice, atol=1e-3)


def test_bad_inference_flags_give_one_line_errors(trained_dirs, capsys):
    records, dirs, root = trained_dirs
    assert_one_line_error(main_here(capsys, "--model", "vnet", "--exec_mode", "predict", "--sliding_window"),
                          "--sliding_window")
    for overlap in ("1.0", "-0.1"):
        assert_one_line_error(main_here(capsys, "--exec_mode", "predict", "--overlap", overlap), "--overlap")
    assert_one_line_error(main_here(capsys, "--exec_mode", "train", "--model_dir", "x", "y"), "--model_dir")
    assert_one_line_error(main_here(capsys, *cli(records, root, "--exec_mode", "predict", "--model_dir",
                                                 dirs["a"], dirs["c"])),
                          f"--model_dir {dirs['c']}")
