"""The runtime end to end on a tiny phantom set: every mode, resume, benchmark, determinism, errors."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from main import main
from runtime.loops import checkpoint
from runtime.loops.hooks import benchmark_stats
from tests.conftest import (ROOT, assert_one_line_error, main_here, tiny_vnet_flags, unet3d_flags,
                            checkpoint_weights as weights_of)

METRICS = {"TumorCore", "PeritumoralEdema", "EnhancingTumor", "MeanDice", "WholeTumor"}
# The tests that use the shared trained run (conftest's unet3d_run) run on one xdist worker.
TRAINED = pytest.mark.xdist_group("unet3d_run")


@pytest.fixture(scope="module")
def records(unet3d_records):
    return unet3d_records


def flags(records, tmp_path, *extra, name="run"):
    return unet3d_flags(records, tmp_path / name, *extra)


def read_log(folder, name="run"):
    """The log.json entries of folder/name (name None: of folder itself)."""
    path = (folder / name if name else folder) / "logs" / "log.json"
    with open(path) as handle:
        return [json.loads(line) for line in handle]




@TRAINED
def test_every_mode(records, unet3d_run, tmp_path):
    model_dir = str(unet3d_run / "model")
    assert checkpoint.latest_checkpoint(model_dir)[0] == 4

    run = lambda *extra: unet3d_flags(records, unet3d_run, *extra)
    assert main(run("--exec_mode", "evaluate")) == 0
    evals = [e for e in read_log(unet3d_run, None) if e["type"] == "eval"]
    assert set(evals[-1]["data"]) == METRICS and evals[-1]["step"] == 4

    out = tmp_path / "predicted"
    assert main(run("--exec_mode", "predict", "--save_nifti", "--output_dir", str(out))) == 0
    masks = sorted(f for f in os.listdir(out) if f.startswith("vol_"))
    assert masks == ["vol_0.npy", "vol_1.npy"]  # fold 0 of 3 over 6 files: 2 volumes
    mask = np.load(out / "vol_0.npy")
    assert mask.shape == (32, 32, 32) and mask.dtype == np.int8 and mask.max() <= 3
    assert len(os.listdir(out / "nifti")) == 2
    # train_and_evaluate and train_and_predict chain the same steps for either network:
    # tests/test_vnet.py runs them.


def test_every_synthetic_test_image_gets_a_mask_name():
    from dataset.synthetic import SyntheticData
    from runtime.arguments import parse_args
    from runtime.tasks.base import make_task
    data = SyntheticData(3, seed=0)
    (images,) = data.test_dataset()
    settings = parse_args(["--synth_data", "--batch_size", "3"])
    names = make_task("unet3d", settings.network, settings.data).mask_names(data, data.n_test)
    assert len(images) == 3 and names == ["vol_0", "vol_1", "vol_2"]
    with pytest.raises(SystemExit):
        parse_args(["--synth_data", "--save_nifti"])


def test_resume_continues_and_matches_an_uninterrupted_run(msd_phantom, tmp_path):
    # On the tool's smallest network (a V-Net); UNet3D's resume to the same bound: the SIGKILL test
    # below. 8 training cases in batches of 2: 4 steps an epoch.
    run = lambda name, *extra: main(tiny_vnet_flags(msd_phantom, tmp_path / name, "--exec_mode", "train",
                                                    "--train_split", "0.8", "--batch_size", "2",
                                                    "--augment", *extra)) == 0
    assert run("whole", "--train_epochs", "2")
    assert run("split", "--train_epochs", "1")
    assert run("split", "--train_epochs", "2", "--resume_training")
    steps = [e["step"] for e in read_log(tmp_path, "split") if e["type"] == "train"]
    assert steps == list(range(1, 9))
    whole_step, whole = weights_of(str(tmp_path / "whole" / "model"))
    split_step, split = weights_of(str(tmp_path / "split" / "model"))
    assert whole_step == split_step == 8
    for a, b in zip(whole, split):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    losses = lambda name: [e["data"]["loss"] for e in read_log(tmp_path, name) if e["type"] == "train"]
    whole_losses, split_losses = losses("whole"), losses("split")
    assert len(whole_losses) == 8
    # Same seed, same machine: the first epoch of both runs logs the very same numbers.
    assert whole_losses[:4] == split_losses[:4]
    np.testing.assert_allclose(whole_losses, split_losses, rtol=1e-5)


def test_benchmark_statistics_on_known_times():
    times = [0.5, 0.25, 0.25, 1.0]
    stats = benchmark_stats(times, batch_size=2, mode="train")
    mean, std = 0.5, np.std(times)
    assert stats["throughput_train"] == pytest.approx(np.mean([4.0, 8.0, 8.0, 2.0]))
    assert stats["latency_train"] == pytest.approx(500.0)
    for name, z in (("90%", 1.645), ("95%", 1.960), ("99%", 2.576)):
        assert stats[f"Latency_train {name}"] == pytest.approx(1000 * (mean + z * std / 2))


def test_benchmark_reports_train_and_predict(msd_phantom, tmp_path):
    # On the tool's smallest network: the timing hooks are the same for either. With
    # --warmup_steps 1, a benchmark runs 2 steps and times the second.
    for mode in ("train", "predict"):
        out = tmp_path / mode
        assert main(tiny_vnet_flags(msd_phantom, out, "--exec_mode", mode, "--benchmark",
                                    "--warmup_steps", "1", "--batch_size", "2")) == 0
        bench = [e for e in read_log(out, None) if e["type"] == "benchmark"]
        assert len(bench) == 1
        assert set(bench[0]["data"]) == {f"throughput_{mode}", f"latency_{mode}", f"Latency_{mode} 90%",
                                         f"Latency_{mode} 95%", f"Latency_{mode} 99%"}
        assert not os.path.exists(out / "model" / "checkpoints")
        assert not [f for f in os.listdir(out / "model") if f.endswith(".npy")]


@TRAINED
def test_sigkill_while_saving_resumes_from_the_last_whole_checkpoint_to_the_uninterrupted_weights(
        records, unet3d_run, tmp_path):
    # The flags of the shared unet3d_run (4 steps), with a checkpoint every step.
    argv = flags(records, tmp_path, "--exec_mode", "train", "--max_steps", "4", "--ckpt_every", "1")
    proc = subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt_dir = tmp_path / "run" / "model" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # wait for a write in progress after a first whole one
            names = os.listdir(ckpt_dir) if ckpt_dir.exists() else []
            if any(n.endswith(".tmp") for n in names) and any(n.endswith(".npz") for n in names):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        else:
            pytest.fail("no checkpoint write was caught in progress")
    finally:
        proc.kill()
        proc.wait()
    whole = checkpoint.latest_checkpoint(str(tmp_path / "run" / "model"))
    assert whole is not None and whole[0] < 4
    assert main(argv + ["--resume_training"]) == 0
    log = [e for e in read_log(tmp_path) if e["type"] == "train"]
    assert [e["step"] for e in log][-(4 - whole[0]):] == list(range(whole[0] + 1, 5))
    (step, resumed), (ref_step, uninterrupted) = weights_of(str(tmp_path / "run" / "model")), \
        weights_of(str(unet3d_run / "model"))
    assert step == ref_step == 4
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    reference = [e["data"]["loss"] for e in read_log(unet3d_run, None) if e["type"] == "train"]
    np.testing.assert_allclose([e["data"]["loss"] for e in log][-(4 - whole[0]):], reference[whole[0]:],
                               rtol=1e-5)


def test_bad_input_gives_one_line_errors(records, tmp_path, capsys):
    # In this process (main() is what the command line calls); the "one" case runs the real
    # command, to see its exit code and its whole stderr (TensorFlow's own lines too) as a user does.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(main_here(capsys, *flags(str(empty), tmp_path, "--exec_mode", "train")), str(empty))

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for name in sorted(os.listdir(records)):
        (corrupt / name).write_bytes(open(os.path.join(records, name), "rb").read())
    bad = corrupt / sorted(os.listdir(corrupt))[0]
    bad.write_bytes(bad.read_bytes()[:-100])
    assert_one_line_error(main_here(capsys, *flags(str(corrupt), tmp_path, "--exec_mode", "train",
                                                   name="corrupt_run")), str(bad))

    for mode in ("evaluate", "predict"):
        assert_one_line_error(main_here(capsys, *flags(records, tmp_path, "--exec_mode", mode, name="fresh")),
                              "no checkpoint")

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert_one_line_error(main_here(capsys, *flags(records, tmp_path, "--exec_mode", "train"),
                                    "--model_dir", str(blocker / "m")), "not writable")

    assert_one_line_error(main_here(capsys, *flags(records, tmp_path, "--exec_mode", "train"),
                                    "--num_folds", "8", "--fold", "7"), "no validation files")

    one = tmp_path / "one"  # one record file and the default five folds: fold 0 has nothing to train
    one.mkdir()
    first = sorted(f for f in os.listdir(records) if f.endswith(".tfrecord"))[0]
    (one / first).write_bytes(open(os.path.join(records, first), "rb").read())
    result = main_here(capsys, "--data_dir", str(one), "--model_dir", str(tmp_path / "one_run"),
                       "--log_dir", str(tmp_path / "one_logs"), "-d", "fp32", "--exec_mode",
                       "train_and_evaluate")
    assert result.returncode == 1
    assert_one_line_error(result, "--num_folds 5: only 1 record files for 5 folds, so fold 0 leaves "
                                  "no training files")

    result = main_here(capsys, *flags(str(empty), tmp_path, "--exec_mode", "train"), "--tf_verbosity", "0")
    assert result.returncode != 0 and "Traceback" in result.stderr


@TRAINED
def test_existing_checkpoint_is_never_overwritten_without_resume(records, unet3d_run, capsys):
    before = weights_of(str(unet3d_run / "model"))
    result = main_here(capsys, *unet3d_flags(records, unet3d_run, "--exec_mode", "train", "--max_steps", "6"))
    assert_one_line_error(result, "--resume_training")
    after = weights_of(str(unet3d_run / "model"))
    assert before[0] == after[0] == 4
    for a, b in zip(before[1], after[1]):
        np.testing.assert_array_equal(a, b)
