"""Many workers on localhost (CPU): tf.distribute through TF_CONFIG and mpirun, a lost worker, a
SIGTERM to one worker that stops both and resumes exactly, Horovod.

The workers train the tool's smallest network (conftest's `tiny_vnet_flags`): the processes, the
all-reduce, the stops and resumes are the same code for either network. Horovod's wiring is
checked in this process, against a stand-in module."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from main import main
from tests.conftest import (checkpoint_weights as weights, ROOT, assert_one_line_error, assert_one_stop,
                            free_ports, main_here, stop_one, tiny_vnet_flags)

# The tests that launch several processes run on one test worker (pytest -n 2 --dist loadgroup), one
# after another: their reference runs (session fixtures) are then made once, and two launches of
# several processes do not share the 2 cores of a CI machine.
pytestmark = pytest.mark.xdist_group("processes")

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
STEPS = 2  # steps of each worker, and of the single worker of batch 2: 4 training cases, 1 epoch


def pair_flags(task, out, batch, epochs, *extra, split="0.4"):
    """The tiny V-Net on `task`, trained by Adam at 2e-4 (UNet3D's), the first `split` of the
    cases training: 0.4 is 4 cases, 2 global batches of 2."""
    return ["main.py", *tiny_vnet_flags(task, out, "--batch_size", str(batch), "--train_split", split,
                                        "--optimizer", "adam", "--base_lr", "0.0002", "--exec_mode",
                                        "train", "--train_epochs", str(epochs), *extra)]


@pytest.fixture(scope="module")
def same_volume_task(msd_phantom, tmp_path_factory):
    """conftest's MSD phantom with every training case replaced by case 001: with no augmentation
    every batch of every worker is that volume, whatever the sharding and shuffling, so two workers
    of batch 1 and one worker of batch 2 compute the same gradients."""
    task = str(tmp_path_factory.mktemp("same_task") / "task")
    shutil.copytree(msd_phantom, task)
    for folder in ("imagesTr", "labelsTr"):
        source = os.path.join(task, folder, "hippocampus_001.nii.gz")
        for name in os.listdir(os.path.join(task, folder)):
            if name != "hippocampus_001.nii.gz":
                shutil.copy(source, os.path.join(task, folder, name))
    return task


def tf_config_envs(n):
    """The environments of n workers on localhost, joined through TF_CONFIG."""
    ports = free_ports(n)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return [{**env, "TF_CONFIG": json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                                              "task": {"type": "worker", "index": index}})}
            for index in range(n)]


def launch_tf_config(task, out, n=2, epochs=1, extra=()):
    return [subprocess.Popen([sys.executable, *pair_flags(task, out, 1, epochs, *extra)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for env in tf_config_envs(n)]


@pytest.fixture(scope="module")
def single_worker(same_volume_task, tmp_path_factory):
    """(step, weights) of one worker after STEPS steps of batch 2 (in this process)."""
    single = tmp_path_factory.mktemp("single")
    assert main(pair_flags(same_volume_task, single, 2, 1)[1:]) == 0
    return weights(str(single / "model"))


def assert_matches_single_worker(single_worker, out):
    step0, w0 = weights(str(out / "model" / "worker_0"))
    step1, w1 = weights(str(out / "model" / "worker_1"))
    assert step0 == step1 == STEPS  # 4 cases in global batches of 2
    for a, b in zip(w0, w1):  # the replicas are mirrored: bit for bit the same
        np.testing.assert_array_equal(a, b)
    step, ws = single_worker
    assert step == STEPS
    # Same batches and the same mean gradient: only the order of float32 sums differs (the
    # all-reduce adds two half-batch gradients, the single worker sums one batch of two), which
    # changes a gradient by ~1e-7 of its size. Adam divides each gradient by its own running size,
    # so for a weight whose gradient is near 0 that rounding can turn the step around: Adam moves a
    # weight by about one learning rate (2e-4) a step at most, so two runs can part by twice that a
    # step, 8e-4 after 2 steps (CI saw 1.1e-4 after 3 on 4 of 1.8 million weights). That is the bound for
    # any one weight. For the network as a whole (weights and Adam's slots) the mean difference
    # stays far below a step: 6.9e-7 seen on a loaded 2-core machine. Adam moves most weights by
    # close to the learning rate each step, so a worker that trained on other batches or skipped
    # the all-reduce would part them by far more than 1e-5 on average.
    diffs = []
    for a, b in zip(ws, w0):
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * 2e-4 * STEPS)
        diffs.append(np.abs(a - b).ravel())
    assert np.concatenate(diffs).mean() < 1e-5


def test_two_workers_with_tf_config(same_volume_task, single_worker, tmp_path):
    out = tmp_path / "tfconfig"
    procs = launch_tf_config(same_volume_task, out, extra=("--log_all_workers",))
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
    logs = [json.loads(line) for line in open(out / "logs" / "worker_0" / "log.json")]
    assert [e["step"] for e in logs if e["type"] == "train"] == list(range(1, STEPS + 1))
    assert_matches_single_worker(single_worker, out)


def test_a_dead_worker_stops_the_others(same_volume_task, tmp_path):
    out = tmp_path / "dead"
    chief, other = launch_tf_config(same_volume_task, out, epochs=1000)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:  # wait until training runs
            if os.path.exists(out / "logs" / "log.json") and os.path.getsize(out / "logs" / "log.json"):
                break
            time.sleep(0.5)
        other.send_signal(signal.SIGKILL)
        killed = time.time()
        _, stderr = chief.communicate(timeout=200)
        assert time.time() - killed < 180
    finally:
        for proc in (chief, other):
            proc.kill()
    assert chief.returncode == 1
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "lost contact with the other workers" in errors[0], stderr


# Past two stop agreements (AGREE_EVERY), so that the resumed pair has steps to go: 5 training cases
# (an odd count), ⌈5 / 2⌉ = 3 global batches an epoch, 4 epochs.
STOP_STEPS = 12
STOP_EPOCHS = 4


def stop_pair(task, out, *extra):
    """Two TF_CONFIG workers of batch 1 on `task` (augmented) for STOP_STEPS steps, their stderr
    in out/stderr<i>.txt."""
    os.makedirs(out, exist_ok=True)
    argv = pair_flags(task, out, 1, STOP_EPOCHS, "--augment", *extra, split="0.5")
    procs = []
    for index, env in enumerate(tf_config_envs(2)):
        with open(out / f"stderr{index}.txt", "w") as err:
            procs.append(subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                                          stdout=subprocess.PIPE, stderr=err))
    return procs


def finish(procs, out):
    for proc in procs:
        proc.communicate(timeout=1200)
        assert proc.returncode == 0, open(out / "stderr0.txt").read()[-3000:]


@pytest.fixture(scope="module")
def mpirun_pair(msd_phantom, tmp_path_factory):
    """The output folder of two workers under mpirun (each with its own model_dir and log) for
    STOP_STEPS augmented steps of distinct volumes: the uninterrupted run of the SIGTERM test."""
    out = tmp_path_factory.mktemp("mpi")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    env.pop("TF_CONFIG", None)
    argv = pair_flags(msd_phantom, out, 1, STOP_EPOCHS, "--augment", "--log_all_workers", split="0.5")
    result = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable, *argv], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_workers_with_mpirun(mpirun_pair):
    step0, w0 = weights(str(mpirun_pair / "model" / "worker_0"))
    step1, w1 = weights(str(mpirun_pair / "model" / "worker_1"))
    assert step0 == step1 == STOP_STEPS
    for a, b in zip(w0, w1):  # the replicas are mirrored: bit for bit the same
        np.testing.assert_array_equal(a, b)
    logs = [json.loads(line) for line in open(mpirun_pair / "logs" / "worker_1" / "log.json")]
    assert [e["step"] for e in logs if e["type"] == "train"] == list(range(1, STOP_STEPS + 1))
    # That they trained together, on the batches of a TF_CONFIG pair, is shown by the SIGTERM test:
    # a TF_CONFIG pair stopped and resumed ends on these weights.


def test_sigterm_to_one_worker_stops_both_and_the_pair_resumes_exactly(msd_phantom, mpirun_pair,
                                                                       tmp_path):
    out = tmp_path / "stopped"
    assert_one_stop(stop_one(stop_pair(msd_phantom, out), out, victim=1), out / "model")

    finish(stop_pair(msd_phantom, out, "--resume_training"), out)
    (step, resumed) = weights(out / "model")
    (ref_step, uninterrupted) = weights(mpirun_pair / "model" / "worker_0")
    assert step == ref_step == STOP_STEPS
    for a, b in zip(resumed, uninterrupted):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


HOROVOD_STANDIN = '''
"""A stand-in for horovod.tensorflow: Horovod does not build against TensorFlow 2.21, so the
tool's wiring (init, rank, size, broadcast, all-reduce) is exercised against this recorder."""
import json, os

def _record(**entry):
    with open(os.environ["HOROVOD_STANDIN_LOG"], "a") as handle:
        handle.write(json.dumps(entry) + "\\n")

def init():
    _record(call="init")

def rank():
    return 0

def local_rank():
    return 0

def size():
    return 2

def broadcast_variables(variables, root_rank):
    _record(call="broadcast_variables", count=len(variables), root_rank=root_rank)

Max = "max"

def allreduce(tensor, op=None):
    _record(call="allreduce", shape=list(tensor.shape), op=op)
    return tensor
'''


def test_use_horovod_without_horovod_names_the_alternative(same_volume_task, tmp_path, capsys):
    result = main_here(capsys, *pair_flags(same_volume_task, tmp_path, 1, 1)[1:], "--use_horovod")
    assert result.returncode == 1
    assert_one_line_error(result, "Horovod is not installed")
    assert "tf.distribute" in result.stderr


@pytest.fixture
def horovod_standin(tmp_path, monkeypatch):
    """The stand-in package importable as horovod.tensorflow in this process, and its call log."""
    package = tmp_path / "standin" / "horovod"
    (package / "tensorflow").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tensorflow" / "__init__.py").write_text(HOROVOD_STANDIN)
    log = tmp_path / "calls.jsonl"
    monkeypatch.syspath_prepend(str(tmp_path / "standin"))
    monkeypatch.setenv("HOROVOD_STANDIN_LOG", str(log))
    yield log
    for name in [m for m in sys.modules if m == "horovod" or m.startswith("horovod.")]:
        del sys.modules[name]


def test_horovod_wiring_with_a_stand_in(same_volume_task, horovod_standin, tmp_path):
    log = horovod_standin
    out = tmp_path / "hvd"
    assert main(pair_flags(same_volume_task, out, 1, 1)[1:] + ["--use_horovod"]) == 0
    calls = [json.loads(line) for line in open(log)]
    assert calls[0] == {"call": "init"}
    (broadcast,) = [c for c in calls if c["call"] == "broadcast_variables"]
    # The model's 34 trainable variables and Adam's two slots of each, at least.
    assert broadcast["root_rank"] == 0 and broadcast["count"] >= 3 * 34
    reduced = [c for c in calls if c["call"] == "allreduce" and c["op"] is None]
    # One per trainable variable of the tiny V-Net, in the traced step: 6 convolutions and 2
    # up-convolutions with a norm (kernel, bias, scale, offset), the output convolution.
    assert len(reduced) == 8 * 4 + 2
    assert reduced[0]["shape"] == [3, 3, 3, 1, 16]
    train_steps = [json.loads(l)["step"] for l in open(out / "logs" / "log.json") if '"train"' in l]
    assert train_steps == [1, 2]  # size 2: 4 training cases in global batches of 2
    # The workers agree on a stop (runtime/loops/stopping.py) every AGREE_EVERY steps and after the last
    # one (step 2 here): the largest signal number any of them received, by Horovod's all-reduce.
    agreed = [c for c in calls if c["call"] == "allreduce" and c["op"] == "max"]
    assert agreed == [{"call": "allreduce", "shape": [], "op": "max"}]
