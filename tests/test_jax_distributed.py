"""The JAX backend on several CPU devices: one process with two devices and two processes on
localhost (gloo collectives, under mpirun and with the coordinator flags) read the same global
batches of distinct volumes and end with the same weights; a SIGTERM to one stops both after the
same step with one checkpoint, a killed process stops the other, and each resumes exactly, the
kill's under the other layout. (TF_CONFIG with the JAX backend, one process: test_jax.py.)

The runs train the tool's smallest network (conftest's `tiny_vnet_flags`): what is tested here,
the processes, their collectives, stops and resumes, is the same code for either network."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime.setup.cluster import JAX_HEARTBEAT_TIMEOUT_S
from tests.conftest import (checkpoint_weights as weights, ROOT, assert_one_stop, free_ports, stop_one,
                            tiny_vnet_flags)

# The tests that launch several processes run on one test worker (pytest -n 2 --dist loadgroup), one
# after another: their reference run (a module fixture) is then made once, and two launches of
# several processes do not share the 2 cores of a CI machine.
pytestmark = pytest.mark.xdist_group("processes")

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
MPI_ENV = {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
# Global steps of a global batch of 2 (one volume a device), past two stop agreements (AGREE_EVERY):
# 5 training cases (an odd count: two devices cannot split them evenly), ⌈5 / 2⌉ = 3 steps an epoch.
STEPS_PER_EPOCH = 3
STEPS = 4 * STEPS_PER_EPOCH
TWO_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
TEST_IMAGES = ["hippocampus_010.npy", "hippocampus_011.npy", "hippocampus_012.npy"]


def jax_flags(task, out, *extra, mode="train", epochs=STEPS // STEPS_PER_EPOCH):
    """Batch 1 per device, half the cases to train and half to validate."""
    return ["main.py", *tiny_vnet_flags(task, out, "--batch_size", "1", "--train_split", "0.5",
                                        "--exec_mode", mode, "--train_epochs", str(epochs), *extra)]


def one_process(env, records, out, *extra, mode="train"):
    """One JAX process with two CPU devices (two stand-ins for two GPUs, which share each batch)."""
    result = subprocess.run([sys.executable, *jax_flags(records, out, *extra, mode=mode)], cwd=ROOT,
                            env={**env, **TWO_DEVICES}, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def two_devices(msd_phantom, jax_env, tmp_path_factory):
    """The output folder of STEPS training steps and an evaluation by one process with two devices."""
    out = tmp_path_factory.mktemp("two_devices")
    one_process(jax_env, msd_phantom, out, mode="train_and_evaluate")
    return out


def test_one_process_with_two_devices_trains_and_evaluates(two_devices):
    log = [json.loads(line) for line in open(two_devices / "logs" / "log.json")]
    train = [e for e in log if e["type"] == "train"]
    assert [e["step"] for e in train] == list(range(1, STEPS + 1))
    assert all(np.isfinite(e["data"]["loss"]) for e in train)
    (evaluation,) = [e["data"] for e in log if e["type"] == "eval"]
    assert set(evaluation) == {f"{n}_{kind}" for n in ("background", "anterior", "posterior")
                               for kind in ("dice", "hard_dice")}
    assert all(0 <= v <= 1 for v in evaluation.values())


def assert_same(model_dir, two_devices):
    """The checkpoint in `model_dir` holds the weights of one process with two devices (to 1e-5)
    after STEPS steps."""
    (step, found), (ref_step, reference) = weights(model_dir), weights(two_devices / "model")
    assert step == ref_step == STEPS
    assert len(found) == len(reference)
    for a, b in zip(found, reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def assert_workers_agree(out, two_devices):
    """Both processes hold the same weights (bit for bit), those of one process with two devices."""
    (_, w0), (_, w1) = weights(out / "model" / "worker_0"), weights(out / "model" / "worker_1")
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    assert_same(out / "model" / "worker_0", two_devices)


def log_of(out, worker):
    return [json.loads(line) for line in open(out / "logs" / f"worker_{worker}" / "log.json")]


def test_two_processes_under_mpirun_read_the_batches_of_one_process_with_two_devices(
        msd_phantom, jax_env, two_devices, tmp_path):
    result = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable,
                             *jax_flags(msd_phantom, tmp_path, "--log_all_workers",
                                        mode="train_and_predict")],
                            cwd=ROOT, env={**jax_env, **MPI_ENV}, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_workers_agree(tmp_path, two_devices)
    assert [e["step"] for e in log_of(tmp_path, 0) if e["type"] == "train"] == list(range(1, STEPS + 1))
    # Process 0 alone predicts the test images, on its own device.
    masks = {w: sorted(f for f in os.listdir(tmp_path / "model" / f"worker_{w}") if f.endswith(".npy"))
             for w in (0, 1)}
    assert masks == {0: TEST_IMAGES, 1: []}
    mask = np.load(tmp_path / "model" / "worker_0" / TEST_IMAGES[0])
    assert mask.shape == (16, 16, 16) and mask.dtype == np.int8


def coordinated(env, records, out, *extra, mode="train", stderr_dir=None):
    """Two background processes joined by the coordinator flags, process 0 first; their stderr
    goes to stderr_dir/stderr<i>.txt when given, else to a pipe."""
    (port,) = free_ports(1)
    procs = []
    for index in range(2):
        err = open(stderr_dir / f"stderr{index}.txt", "w") if stderr_dir else subprocess.PIPE
        procs.append(subprocess.Popen([sys.executable, *jax_flags(records, out, *extra, mode=mode),
                                       "--coordinator_address", f"localhost:{port}", "--num_processes",
                                       "2", "--process_id", str(index)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
        if stderr_dir:
            err.close()
    return procs


def test_a_sigterm_stops_both_a_killed_process_stops_the_other_and_each_resumes(
        msd_phantom, jax_env, two_devices, tmp_path):
    # One chain of launches in one model_dir, so that the two stops share their launches.
    # 1. Two processes with the coordinator flags; a SIGTERM to process 1 after the first step
    # stops both at the next agreement, with one checkpoint.
    procs = coordinated(jax_env, msd_phantom, tmp_path, stderr_dir=tmp_path)
    stopped = assert_one_stop(stop_one(procs, tmp_path, victim=1), tmp_path / "model")
    assert stopped + 1 < STEPS

    # 2. Both resume from it (process 0 broadcasts its checkpoint: weights, the optimizer's state,
    # the data streams, the step) with a checkpoint every step; once process 0 has saved the next
    # step, process 1 is killed: process 0 stops with one line, at once.
    chief, other = coordinated(jax_env, msd_phantom, tmp_path, "--resume_training",
                               "--ckpt_every", "1", "--train_epochs", "1000")
    saved = tmp_path / "model" / "checkpoints" / f"ckpt-{stopped + 1}.npz"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and not saved.exists() and chief.poll() is None:
            time.sleep(0.2)
        assert saved.exists(), chief.communicate()[1][-3000:]
        other.send_signal(signal.SIGKILL)
        killed = time.time()
        _, stderr = chief.communicate(timeout=JAX_HEARTBEAT_TIMEOUT_S + 60)
        assert time.time() - killed < JAX_HEARTBEAT_TIMEOUT_S
        resumed, _ = other.communicate(timeout=60)
    finally:
        for proc in (chief, other):
            proc.kill()
    assert chief.returncode == 1
    assert "Traceback" not in stderr and "Check failure" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "lost contact with the other workers" in errors[0], stderr
    assert f"resuming from the checkpoint of process 0 at step {stopped}" in resumed

    # 3. Stopped as two processes of one device, resumed as one process of two: the same batches,
    # so the steps to STEPS end where STEPS uninterrupted steps of one process with two devices
    # do; then it evaluates.
    one_process(jax_env, msd_phantom, tmp_path, "--resume_training", mode="train_and_evaluate")
    assert_same(tmp_path / "model", two_devices)
    log = [json.loads(line) for line in open(tmp_path / "logs" / "log.json")]
    assert [e["step"] for e in log if e["type"] == "train"][-(STEPS - stopped - 1):] == \
        list(range(stopped + 2, STEPS + 1))
    assert len([e for e in log if e["type"] == "eval"]) == 1
