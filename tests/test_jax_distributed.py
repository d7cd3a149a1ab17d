"""Several JAX processes on localhost (CPU devices, gloo collectives): mpirun, the coordinator
flags, and a lost process."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from runtime import checkpoint
from runtime.cluster import JAX_HEARTBEAT_TIMEOUT_S
from tests.conftest import ROOT, free_ports

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")


@pytest.fixture(scope="module")
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


def weights(model_dir):
    step, path = checkpoint.latest_checkpoint(str(model_dir))
    arrays, stored_step = checkpoint.load(path)
    assert stored_step == step
    return step, arrays


@pytest.fixture(scope="module")
def two_devices(same_volume_records, jax_env, tmp_path_factory):
    """(step, weights) after 4 steps of one process with two CPU devices."""
    out = tmp_path_factory.mktemp("two_devices")
    env = {**jax_env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run([sys.executable, *jax_flags(same_volume_records, out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return weights(out / "model")


def assert_same_as_two_devices(out, two_devices):
    """Both processes hold the same weights (bit for bit), those of one process with two devices
    (to 1e-5), after 4 steps; process 0 logged every step."""
    step0, w0 = weights(out / "model" / "worker_0")
    step1, w1 = weights(out / "model" / "worker_1")
    step, reference = two_devices
    assert step0 == step1 == step == 4
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    assert len(w0) == len(reference)
    for a, b in zip(w0, reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    logs = [json.loads(line) for line in open(out / "logs" / "worker_0" / "log.json")]
    assert [e["step"] for e in logs if e["type"] == "train"] == [1, 2, 3, 4]


def test_two_processes_under_mpirun_stopped_and_resumed(same_volume_records, jax_env, two_devices,
                                                       tmp_path):
    # 2 steps, then 2 more with --resume_training: process 0 broadcasts its checkpoint (step 2,
    # weights and Adam's state), and the 4 steps end where 4 uninterrupted ones do.
    env = {**jax_env, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    for max_steps, extra in ((4, ()), (8, ("--resume_training",))):
        result = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable,
                                 *jax_flags(same_volume_records, tmp_path, max_steps,
                                            "--log_all_workers", *extra)],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming from the checkpoint of process 0 at step 2" in result.stdout
    assert_same_as_two_devices(tmp_path, two_devices)


def launch(env, records, out, max_steps, *extra, mode="train"):
    """Two background processes joined by the coordinator flags, process 0 first."""
    (port,) = free_ports(1)
    return [subprocess.Popen([sys.executable, *jax_flags(records, out, max_steps, *extra, mode=mode),
                              "--coordinator_address", f"localhost:{port}", "--num_processes", "2",
                              "--process_id", str(index)],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for index in range(2)]


def test_two_processes_with_the_coordinator_flags(same_volume_records, jax_env, two_devices, tmp_path):
    # A checkpoint at step 2 as well: process 0 saves alone while process 1 trains on; at the end
    # process 0 alone evaluates, on its own device, while process 1 waits for it.
    procs = launch(jax_env, same_volume_records, tmp_path, 8, "--log_all_workers", "--ckpt_every", "2",
                   mode="train_and_evaluate")
    for proc in procs:
        _, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-3000:]
    assert_same_as_two_devices(tmp_path, two_devices)
    for worker, evaluations in ((0, 1), (1, 0)):
        log = [json.loads(line) for line in open(tmp_path / "logs" / f"worker_{worker}" / "log.json")]
        assert len([e for e in log if e["type"] == "eval"]) == evaluations


def test_a_dead_process_stops_the_other_with_one_line(same_volume_records, jax_env, tmp_path):
    chief, other = launch(jax_env, same_volume_records, tmp_path, 4000)
    log = tmp_path / "logs" / "log.json"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and log.stat().st_size):
            time.sleep(0.5)  # until process 0 has logged a training step
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
