"""The JAX backend on several CPU devices: one process with two, and two processes on localhost
(gloo collectives) under mpirun and with the coordinator flags, and a lost process. (TF_CONFIG
with the JAX backend, one process: test_jax.py.)"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from setup.cluster import JAX_HEARTBEAT_TIMEOUT_S
from tests.conftest import checkpoint_weights as weights, ROOT, free_ports

# The tests that launch several processes run on one test worker (pytest -n 2 --dist loadgroup), one
# after another: their reference runs (session fixtures) are then made once, and two launches of
# several processes do not share the 2 cores of a CI machine.
pytestmark = pytest.mark.xdist_group("processes")

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")


@pytest.fixture(scope="session")
def jax_env(tmp_path_factory):
    """JAX on CPU, with a compilation cache that the runs of two processes share: each run after
    the first loads the compiled training step instead of compiling it again."""
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache"))}


def jax_flags(records, out, max_steps=8, *extra, mode="train"):
    """Batch 1 per device: with two devices in all, max_steps 8 is 4 steps of a global batch of 2."""
    return ["main.py", "--data_dir", records, "--model_dir", str(out / "model"), "--log_dir",
            str(out / "logs"), "--batch_size", "1", "-d", "fp32", "--num_folds", "3", "--seed", "3",
            "--log_every", "1", "--no-augment", "--exec_mode", mode, "--max_steps", str(max_steps),
            *extra]




@pytest.fixture(scope="session")
def two_devices(same_volume_records, jax_env, tmp_path_factory):
    """The output folder of 4 training steps and an evaluation by one process with two CPU devices
    (two stand-ins for two GPUs, which share each batch). With six folds the validation set is a
    single volume, a batch that cannot be split in two. Every record file holds the same volume, so
    the training batches are those of the processes' runs with three folds."""
    out = tmp_path_factory.mktemp("two_devices")
    env = {**jax_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, *jax_flags(same_volume_records, out, 8, "--num_folds", "6",
                                                        mode="train_and_evaluate")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_one_process_with_two_devices_trains_and_evaluates(two_devices):
    log = [json.loads(line) for line in open(two_devices / "logs" / "log.json")]
    train = [e for e in log if e["type"] == "train"]
    assert [e["step"] for e in train] == [1, 2, 3, 4]  # the samples of 8 steps, 2 per step
    assert all(np.isfinite(e["data"]["loss"]) for e in train)
    (evaluation,) = [e["data"] for e in log if e["type"] == "eval"]
    assert set(evaluation) == {"TumorCore", "PeritumoralEdema", "EnhancingTumor", "MeanDice", "WholeTumor"}
    assert all(0 <= v <= 1 for v in evaluation.values())


def assert_same_as_two_devices(out, two_devices):
    """Both processes hold the same weights (bit for bit), those of one process with two devices
    (to 1e-5), after 4 steps."""
    step0, w0 = weights(out / "model" / "worker_0")
    step1, w1 = weights(out / "model" / "worker_1")
    step, reference = weights(two_devices / "model")
    assert step0 == step1 == step == 4
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    assert len(w0) == len(reference)
    for a, b in zip(w0, reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)


def log_of(out, worker):
    return [json.loads(line) for line in open(out / "logs" / f"worker_{worker}" / "log.json")]


def test_two_processes_under_mpirun(same_volume_records, jax_env, two_devices, tmp_path):
    env = {**jax_env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    result = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable,
                             *jax_flags(same_volume_records, tmp_path, 8, "--log_all_workers",
                                        mode="train_and_predict")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_as_two_devices(tmp_path, two_devices)
    assert [e["step"] for e in log_of(tmp_path, 0) if e["type"] == "train"] == [1, 2, 3, 4]
    # Process 0 alone predicts the two validation volumes (fold 0 of 3), on its own device.
    masks = {w: sorted(f for f in os.listdir(tmp_path / "model" / f"worker_{w}") if f.endswith(".npy"))
             for w in (0, 1)}
    assert masks == {0: ["vol_0.npy", "vol_1.npy"], 1: []}
    mask = np.load(tmp_path / "model" / "worker_0" / "vol_0.npy")
    assert mask.shape == (32, 32, 32) and mask.dtype == np.int8


def launch(env, records, out, max_steps, *extra, mode="train"):
    """Two background processes joined by the coordinator flags, process 0 first."""
    (port,) = free_ports(1)
    return [subprocess.Popen([sys.executable, *jax_flags(records, out, max_steps, *extra, mode=mode),
                              "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                              "--process_id", str(index)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for index in range(2)]


def test_coordinator_flags_a_killed_process_and_a_resume(same_volume_records, jax_env, two_devices,
                                                         tmp_path):
    # Two processes with the coordinator flags train with a checkpoint every 2 steps; once
    # process 0 has saved step 2, process 1 is killed: process 0 stops with one line, at once.
    chief, other = launch(jax_env, same_volume_records, tmp_path, 4000, "--log_all_workers",
                          "--ckpt_every", "2")
    saved = tmp_path / "model" / "worker_0" / "checkpoints" / "ckpt-2.npz"
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not saved.exists() and chief.poll() is None:
            time.sleep(0.2)
        assert saved.exists(), chief.communicate()[1][-3000:]
        other.send_signal(signal.SIGKILL)
        killed = time.time()
        _, stderr = chief.communicate(timeout=JAX_HEARTBEAT_TIMEOUT_S + 60)
        assert time.time() - killed < JAX_HEARTBEAT_TIMEOUT_S
    finally:
        for proc in (chief, other):
            proc.kill()
    assert chief.returncode == 1
    assert "Traceback" not in stderr and "Check failure" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "lost contact with the other workers" in errors[0], stderr

    # Both started again with --resume_training: process 0 broadcasts its checkpoint (weights,
    # Adam's state, step 2), the two steps to step 4 end where 4 uninterrupted steps of one
    # process with two devices do, and process 0 alone evaluates while process 1 waits for it.
    procs = launch(jax_env, same_volume_records, tmp_path, 8, "--log_all_workers", "--resume_training",
                   mode="train_and_evaluate")
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    assert "resuming from the checkpoint of process 0 at step 2" in outputs[1][0]
    assert_same_as_two_devices(tmp_path, two_devices)
    assert [e["step"] for e in log_of(tmp_path, 0) if e["type"] == "train"][-2:] == [3, 4]
    assert [len([e for e in log_of(tmp_path, w) if e["type"] == "eval"]) for w in (0, 1)] == [1, 0]
