"""Settings decided once: typed sections build a task and its network alone, and a model_dir's
settings.json binds the network of every later run on it."""
import json
import os

import keras
import pytest

from runtime.settings import DataSettings, UNet3DSettings, VNetSettings
from runtime.tasks.base import make_task
from tests.conftest import assert_one_line_error, main_here

# One test worker runs this file and the other users of conftest's UNet3D run (pytest -n 2 --dist
# loadgroup), so that the groupnorm run here and that instancenorm run are each made once.
pytestmark = pytest.mark.xdist_group("unet3d_run")


@pytest.fixture(scope="module")
def records(unet3d_records):
    return unet3d_records


def test_a_task_and_its_network_from_settings_objects_alone():
    task = make_task("unet3d", UNet3DSettings(normalization="groupnorm"), DataSettings(seed=0))
    model = task.model()
    kinds = {type(layer).__name__ for layer in model.layers if "norm" in layer.name}
    assert kinds == {"GroupNormalization"}
    assert model.output.shape[-1] == 4 and model.input.shape[-1] == 4
    assert make_task("vnet", VNetSettings(), DataSettings(seed=0)).last_step(None, 1, 5) == 10


def flags(records, model_dir, log_dir, *extra):
    return ["--data_dir", records, "--model_dir", model_dir, "--log_dir", log_dir, "--num_folds", "3",
            "-d", "fp32", "--batch_size", "1", *extra]


def evals(log_dir):
    with open(os.path.join(log_dir, "log.json")) as handle:
        return [json.loads(line)["data"] for line in handle if '"eval"' in line]


@pytest.fixture(scope="module")
def trained(records, unet3d_run, tmp_path_factory):
    """A groupnorm run of 2 steps evaluated after training, and conftest's instancenorm run."""
    root = tmp_path_factory.mktemp("runs")
    model_dir, log_dir = str(root / "groupnorm"), str(root / "groupnorm-logs")
    argv = flags(records, model_dir, log_dir, "--exec_mode", "train_and_evaluate", "--max_steps", "2",
                 "--seed", "0", "--normalization", "groupnorm")
    assert main_here(_NoCapture(), *argv).returncode == 0
    return {"groupnorm": (model_dir, log_dir),
            "instancenorm": (str(unet3d_run / "model"), str(unet3d_run / "logs"))}


class _NoCapture:
    """capsys's interface for a module-scoped fixture, which cannot take capsys."""

    @staticmethod
    def readouterr():
        return type("Captured", (), {"out": "", "err": ""})()


def test_the_saved_settings_bind_evaluate(records, trained, tmp_path, capsys):
    model_dir, log_dir = trained["groupnorm"]
    with open(os.path.join(model_dir, "settings.json")) as handle:
        saved = json.load(handle)
    assert saved["network"]["normalization"] == "groupnorm" and saved["run"]["dtype"] == "fp32"
    assert saved["network"]["model"] == "unet3d" and saved["version"]
    after_training = evals(log_dir)[-1]
    # Only --model_dir and --data_dir (and where to log): the groupnorm network is evaluated.
    result = main_here(capsys, "--exec_mode", "evaluate", "--model_dir", model_dir, "--data_dir",
                       records, "--num_folds", "3", "--log_dir", str(tmp_path / "logs"), "-d", "fp32")
    assert result.returncode == 0, result.stderr
    assert evals(str(tmp_path / "logs"))[-1] == pytest.approx(after_training, abs=1e-6)
    keras.mixed_precision.set_dtype_policy("float32")


def test_a_contradicting_flag_and_a_mixed_ensemble_are_one_line_errors(records, trained, capsys):
    model_dir, _ = trained["groupnorm"]
    result = main_here(capsys, "--exec_mode", "evaluate", "--model_dir", model_dir, "--data_dir",
                       records, "--num_folds", "3", "--normalization", "batchnorm")
    assert_one_line_error(result, "--normalization: batchnorm contradicts groupnorm")
    assert model_dir in result.stderr and result.returncode == 2
    other, _ = trained["instancenorm"]
    result = main_here(capsys, "--exec_mode", "evaluate", "--model_dir", model_dir, other,
                       "--data_dir", records, "--num_folds", "3")
    assert_one_line_error(result, "hold different networks")
    assert model_dir in result.stderr and other in result.stderr
    assert "normalization groupnorm and instancenorm" in result.stderr


def test_a_model_dir_without_settings_runs_from_the_flags_after_a_notice(trained, tmp_path, capsys):
    import shutil

    from runtime.arguments import parse_args
    old = str(tmp_path / "old")
    shutil.copytree(trained["groupnorm"][0], old)
    os.remove(os.path.join(old, "settings.json"))
    capsys.readouterr()
    settings = parse_args(["--exec_mode", "evaluate", "--model_dir", old])
    assert capsys.readouterr().out.splitlines() == [
        f"{old} holds no settings.json (trained before version 2.0): its network comes from the flags"]
    assert settings.network.normalization == "instancenorm"  # the flags' default, not the saved one
    assert parse_args(["--exec_mode", "evaluate", "--model_dir", trained["groupnorm"][0]]
                      ).network.normalization == "groupnorm"


def test_a_network_of_other_records_refuses_the_phantom_in_one_line(tmp_path, capsys):
    """Without --data_dir the run uses the built-in phantom (BraTS 2019-2021 data): a model_dir
    trained on records of another convention is refused by the settings, before any run."""
    model_dir = tmp_path / "ped"
    model_dir.mkdir()
    network = {"model": "unet3d", "convention": "brats-ped", "in_channels": 4, "n_classes": 5,
               "normalization": "instancenorm", "include_background": False}
    (model_dir / "settings.json").write_text(json.dumps({"network": network, "run": {}}))
    result = main_here(capsys, "--exec_mode", "evaluate", "--model_dir", str(model_dir))
    assert_one_line_error(result, "argument --data_dir: left out, the built-in phantom's records "
                                  "(convention brats2021, n_classes 4) do not fit the network")
    assert result.returncode == 2 and str(model_dir) in result.stderr


def test_records_bind_only_a_unet3d_network():
    """A V-Net model_dir with --data_dir and no --model: the data fixes nothing of V-Net's."""
    from runtime.settings import resolve
    records = {"convention": "brats2021", "in_channels": 4, "n_classes": 4}
    saved = ("runs/vnet", {"model": "vnet", "data_normalization": "zscore"})
    settings = resolve({"exec_mode": "evaluate"}, environ={}, saved=saved, records=records)
    assert settings.run.model == "vnet" and isinstance(settings.network, VNetSettings)
