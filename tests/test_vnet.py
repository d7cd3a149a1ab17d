"""V-Net on MSD data: the network, SimpleITK reading and resampling, every mode, bad input."""
import json
import os

import keras
import numpy as np
import pytest
import SimpleITK as sitk

from dataset.msd import load_case, read_dataset_json
from main import main
from model.losses import soft_dice_per_sample, vnet_dice_loss
from model.vnet import build_vnet
from common.errors import UserError
from tests.conftest import MSD_SPACING as SPACING
from tests.conftest import assert_one_line_error, checkpoint_weights, main_here, run_cli


def conv_params(k, c_in, c_out, norm=True):
    """A convolution layer: kernel, bias, and batchnorm's gamma, beta, moving mean and variance."""
    return k ** 3 * c_in * c_out + c_out + (4 * c_out if norm else 0)


def test_default_vnet_layer_by_layer():
    model = build_vnet((32, 32, 32, 1), seed=0)
    # By hand, with the default flags: 16 channels at 32³, down blocks of 3, 3, 3; the output
    # convolution has the blocks' 3×3×3 kernel, as in the reference's output_block (model/layers.py
    # of NVIDIA's V-Net), not 1×1×1.
    expected = conv_params(3, 1, 16)                                   # input block
    for c in (16, 32, 64):                                             # down blocks
        expected += conv_params(2, c, 2 * c) + 3 * conv_params(3, 2 * c, 2 * c)
    expected += conv_params(2, 128, 64) + 3 * conv_params(3, 128, 128)  # up block, skip of 64
    expected += conv_params(2, 128, 32) + 3 * conv_params(3, 64, 64)    # up block, skip of 32
    expected += conv_params(2, 64, 16) + conv_params(3, 16, 3, norm=False)  # output block
    assert model.count_params() == expected == 3_602_947

    kinds = [type(layer).__name__ for layer in model.layers]
    conv = ["Conv3D", "BatchNormalization", "Activation"]
    up = ["UpConv2x", "BatchNormalization", "Activation"]
    sequence = ["InputLayer"] + conv + ["Add"]
    for _ in range(3):
        sequence += conv + conv * 3 + ["Add"]
    for _ in range(2):
        sequence += up + ["Concatenate"] + conv * 3 + ["Add"]
    sequence += up + ["Conv3D", "Softmax"]
    assert kinds == sequence
    shapes = [layer.output.shape for layer in model.layers if type(layer).__name__ == "Add"]
    assert [s[1:] for s in shapes] == [(32, 32, 32, 16), (16, 16, 16, 32), (8, 8, 8, 64), (4, 4, 4, 128),
                                       (8, 8, 8, 128), (16, 16, 16, 64)]
    assert model.output_shape == (None, 32, 32, 32, 3)


def test_vnet_dice_loss_matches_numpy():
    rng = np.random.default_rng(0)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=(2, 4, 4, 4))]
    p = rng.dirichlet(np.ones(3), size=(2, 4, 4, 4)).astype(np.float32)
    dice = (2 * (p * y).sum((1, 2, 3)) + 1e-6) / ((p + y).sum((1, 2, 3)) + 1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(soft_dice_per_sample(y, p)), dice, rtol=1e-5)
    assert float(vnet_dice_loss(y, p)) == pytest.approx(np.sum(1 - dice.mean(0)), rel=1e-5)


@pytest.fixture(scope="module")
def task(msd_phantom):
    """conftest's MSD phantom: 10 training cases (the first one 4-D) and 3 test cases."""
    return msd_phantom


def test_resampling_matches_simpleitk(task):
    meta = read_dataset_json(task)
    assert meta["labels"] == ["background", "Anterior", "Posterior"]
    for image_path, label_path in meta["training"][:3]:
        image, labels = load_case(image_path, label_path, (32, 24, 16), "linear", normalize=True)
        assert image.shape == (32, 24, 16, 1) and labels.shape == (32, 24, 16)
        # SimpleITK called directly: the last volume, a grid of 32×24×16 covering the same extent.
        source = sitk.ReadImage(image_path)
        if source.GetDimension() == 4:
            source = sitk.Extract(source, list(source.GetSize()[:3]) + [0], [0, 0, 0, source.GetSize()[3] - 1])
        source = sitk.Cast(source, sitk.sitkFloat32)
        spacing = [sp * n / m for sp, n, m in zip(source.GetSpacing(), source.GetSize(), (32, 24, 16))]
        np.testing.assert_allclose(spacing[0] * 32, SPACING[0] * source.GetSize()[0])
        direct = sitk.Resample(source, [32, 24, 16], sitk.Transform(), sitk.sitkLinear, source.GetOrigin(),
                               spacing, source.GetDirection(), 0.0, sitk.sitkFloat32)
        expected = sitk.GetArrayFromImage(direct).transpose(2, 1, 0)
        expected = (expected - expected.mean()) / expected.std()
        np.testing.assert_allclose(image[..., 0], expected, rtol=1e-5, atol=1e-5)
        label = sitk.ReadImage(label_path)
        direct = sitk.Resample(label, [32, 24, 16], sitk.Transform(), sitk.sitkNearestNeighbor,
                               label.GetOrigin(), spacing, label.GetDirection(), 0, label.GetPixelID())
        np.testing.assert_array_equal(labels, sitk.GetArrayFromImage(direct).transpose(2, 1, 0))
        assert set(np.unique(labels)) == {0, 1, 2}


def vnet_flags(task, tmp_path, *extra, name="run"):
    """One convolution a block (the default network is checked layer by layer above and trained
    end to end by tests/test_export.py)."""
    return ["--model", "vnet", "--data_dir", task, "--model_dir", str(tmp_path / name / "model"),
            "--log_dir", str(tmp_path / name / "logs"), "--batch_size", "2", "--train_split", "0.8",
            "--input_shape", "32", "32", "16", "--downscale_blocks", "1", "1", "1", "--upscale_blocks",
            "1", "1", "--log_every", "2", *extra]


def read_log(tmp_path, name="run"):
    with open(tmp_path / name / "logs" / "log.json") as handle:
        return [json.loads(line) for line in handle]


def test_every_mode_and_nifti_geometry(task, tmp_path):
    assert main(vnet_flags(task, tmp_path, "--exec_mode", "train", "--train_epochs", "2")) == 0
    steps = [e["step"] for e in read_log(tmp_path) if e["type"] == "train"]
    assert steps[-1] == 2 * 4  # ⌈8 cases / batch 2⌉ per epoch, 2 epochs
    assert main(vnet_flags(task, tmp_path, "--exec_mode", "evaluate")) == 0
    scores = [e for e in read_log(tmp_path) if e["type"] == "eval"][-1]["data"]
    assert set(scores) == {f"{n}_{kind}" for n in ("background", "anterior", "posterior")
                           for kind in ("dice", "hard_dice")}
    assert main(vnet_flags(task, tmp_path, "--exec_mode", "predict", "--save_nifti")) == 0
    model_dir = tmp_path / "run" / "model"
    for name in ("hippocampus_010", "hippocampus_011", "hippocampus_012"):
        mask = np.load(model_dir / f"{name}.npy")
        assert mask.shape == (32, 32, 16) and mask.dtype == np.int8
        source = sitk.ReadImage(os.path.join(task, "imagesTs", f"{name}.nii.gz"))
        written = sitk.ReadImage(str(model_dir / "nifti" / f"{name}.nii.gz"))
        assert written.GetSize() == source.GetSize()
        np.testing.assert_allclose(written.GetSpacing(), source.GetSpacing(), rtol=1e-6)
        np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-6)
        np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    assert main(vnet_flags(task, tmp_path, "--exec_mode", "train_and_evaluate", name="chain1")) == 0
    assert {e["type"] for e in read_log(tmp_path, "chain1")} == {"train", "eval"}
    assert main(vnet_flags(task, tmp_path, "--exec_mode", "train_and_predict", "--disable_ckpt_saving",
                           name="chain2")) == 0
    assert {e["type"] for e in read_log(tmp_path, "chain2")} == {"train"}
    assert os.path.exists(tmp_path / "chain2" / "model" / "hippocampus_012.npy")
    assert not os.path.exists(tmp_path / "chain2" / "model" / "checkpoints")


def test_seeded_runs_repeat_their_losses_and_weights(task, tmp_path):
    # Fresh processes: a seeded run on CPU sets TensorFlow's threading before TensorFlow starts,
    # which a run inside this test process (TensorFlow long started) cannot.
    runs = []
    for name in ("first", "second"):
        # Batch 8 of 32³ (a batch 2 of 32×32×16 repeated without the fix).
        result = run_cli(*vnet_flags(task, tmp_path, "--exec_mode", "train", "--seed", "0",
                                     "--batch_size", "8", "--input_shape", "32", "32", "32",
                                     "--train_epochs", "8", "--log_every", "1", name=name))
        assert result.returncode == 0, result.stderr[-3000:]
        losses = [e["data"]["loss"] for e in read_log(tmp_path, name) if e["type"] == "train"]
        runs.append((losses, checkpoint_weights(tmp_path / name / "model")))
    (losses, (step, weights)), (again, (step_again, weights_again)) = runs
    assert len(losses) == 8 and losses == again
    assert step == step_again == 8
    for a, b in zip(weights, weights_again):
        np.testing.assert_array_equal(a, b)


def test_training_and_evaluation_on_the_jax_backend(task, tmp_path, jax_env):
    # Prediction runs the same engine step on either network: tests/test_jax.py covers it.
    result = run_cli("--backend", "jax", *vnet_flags(task, tmp_path, "--exec_mode", "train_and_evaluate",
                                                     "--seed", "0", "--train_epochs", "1"), env=jax_env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(tmp_path)
    losses = [e["data"]["loss"] for e in log if e["type"] == "train"]
    assert [e["step"] for e in log if e["type"] == "train"][-1] == 4 and np.all(np.isfinite(losses))
    (scores,) = [e["data"] for e in log if e["type"] == "eval"]
    assert all(0 <= scores[f"{n}_hard_dice"] <= 1 for n in ("anterior", "posterior"))


def copy_task(task, dest):
    import shutil
    shutil.copytree(task, dest)
    return str(dest)


def test_bad_msd_folders(task, tmp_path, capsys):
    missing = tmp_path / "missing"
    missing.mkdir()
    assert_one_line_error(main_here(capsys, *vnet_flags(str(missing), tmp_path)), str(missing / "dataset.json"))

    malformed = copy_task(task, tmp_path / "malformed")
    with open(os.path.join(malformed, "dataset.json"), "w") as handle:
        handle.write('{"labels": {"0": "background"}, "training": [')
    with pytest.raises(UserError, match="dataset.json: not valid JSON"):
        read_dataset_json(malformed)
    with open(os.path.join(malformed, "dataset.json"), "w") as handle:
        json.dump({"labels": {"0": "background"}}, handle)
    with pytest.raises(UserError, match="not an MSD dataset.json"):
        read_dataset_json(malformed)

    absent = copy_task(task, tmp_path / "absent")
    os.remove(os.path.join(absent, "labelsTr", "hippocampus_003.nii.gz"))
    assert_one_line_error(main_here(capsys, *vnet_flags(absent, tmp_path)),
                          os.path.join(absent, "labelsTr", "hippocampus_003.nii.gz"))

    grid = copy_task(task, tmp_path / "grid")
    label_path = os.path.join(grid, "labelsTr", "hippocampus_002.nii.gz")
    label = sitk.ReadImage(label_path)
    label.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(label, label_path)
    assert_one_line_error(main_here(capsys, *vnet_flags(grid, tmp_path)), f"{label_path}: its grid")


def test_model_specific_flags_are_rejected(capsys):
    assert_one_line_error(main_here(capsys, "--model", "vnet", "--fold", "1"), "--fold")
    assert_one_line_error(main_here(capsys, "--base_lr", "0.1"), "--base_lr")
    assert_one_line_error(main_here(capsys, "--model", "vnet", "--loss", "ce"), "--loss")
    assert_one_line_error(main_here(capsys, "--model", "vnet", "--downscale_blocks", "3", "3",
                                    "--upscale_blocks", "3", "3"), "--upscale_blocks")
