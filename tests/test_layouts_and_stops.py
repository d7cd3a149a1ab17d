"""Several workers: a SIGTERM to one of two JAX processes or two TensorFlow workers stops both
after the same step with one checkpoint, and the resumed pair ends where an uninterrupted pair
does; on distinct volumes, two JAX processes and one process of two devices read the same
global batches, so a run stopped under one layout resumes under the other exactly."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from loops import checkpoint
from loops.stopping import AGREE_EVERY
from tests.conftest import checkpoint_weights as weights, ROOT, free_ports, phantom_records

pytestmark = pytest.mark.xdist_group("processes")  # one launch of several processes at a time

MPIRUN = os.path.join(os.path.dirname(sys.executable), "mpirun")
STEPS = 6  # of a global batch of 2 (one volume per device)
STOP_BOUND_S = 120  # README.md, Reliability: every worker exits within this after the signal


@pytest.fixture(scope="module")
def distinct(tmp_path_factory):
    """Six distinct 32³ phantom volumes, one a record file."""
    return phantom_records(str(tmp_path_factory.mktemp("distinct")), 6, (32, 32, 32), seed=7)


@pytest.fixture(scope="module")
def jax_env(tmp_path_factory):
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
            "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache"))}


def flags(records, out, steps, *extra, backend="jax"):
    """Batch 1 per device, two devices in all: max_steps is twice the steps."""
    return ["main.py", "--data_dir", records, "--model_dir", str(out / "model"), "--log_dir",
            str(out / "logs"), "--batch_size", "1", "-d", "fp32", "--num_folds", "3", "--seed", "3",
            "--log_every", "1", "--exec_mode", "train", "--max_steps", str(2 * steps),
            "--backend", backend, *extra]




def assert_same(out, reference, bound=1e-5):
    (step, a), (ref_step, b) = weights(out / "model"), weights(reference / "model")
    assert step == ref_step == STEPS
    for x, y in zip(a, b):
        np.testing.assert_allclose(x, y, rtol=0, atol=bound)


def one_process(env, records, out, steps, *extra):
    """One JAX process with two CPU devices."""
    result = subprocess.run([sys.executable, *flags(records, out, steps, *extra)], cwd=ROOT,
                            env={**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]


def two_processes(env, records, out, steps, *extra):
    """Two JAX processes of one CPU device each, under mpirun."""
    result = subprocess.run([MPIRUN, "-np", "2", "--oversubscribe", sys.executable,
                             *flags(records, out, steps, *extra)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def jax_pair(distinct, jax_env, tmp_path_factory):
    """STEPS uninterrupted steps of two JAX processes."""
    out = tmp_path_factory.mktemp("jax_pair")
    two_processes(jax_env, distinct, out, STEPS)
    return out


def test_two_jax_processes_and_one_of_two_devices_read_the_same_batches(distinct, jax_env, jax_pair,
                                                                        tmp_path):
    one_process(jax_env, distinct, tmp_path, STEPS)
    assert_same(tmp_path, jax_pair)


def test_stopped_under_one_layout_resumed_under_the_other(distinct, jax_env, jax_pair, tmp_path):
    one_process(jax_env, distinct, tmp_path, 2)
    two_processes(jax_env, distinct, tmp_path, STEPS, "--resume_training")
    assert_same(tmp_path, jax_pair)


def launch(argv_of, envs):
    """Processes `argv_of(i)` with environment envs[i], their stderr in files."""
    procs = []
    for index, env in enumerate(envs):
        err = open(env["STDERR_FILE"], "w")
        procs.append(subprocess.Popen([sys.executable, *argv_of(index)], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=err))
        err.close()
    return procs


def stop_one(procs, envs, victim):
    """SIGTERM to procs[victim] once process 0 has logged a training step; every process must
    then exit 143 within STOP_BOUND_S. Returns each one's lines from main.py."""
    def drain(proc, seen):
        for line in proc.stdout:
            if line.startswith("train step "):
                seen.set()

    seen = [threading.Event() for _ in procs]
    readers = [threading.Thread(target=drain, args=(p, s), daemon=True) for p, s in zip(procs, seen)]
    for reader in readers:
        reader.start()
    try:
        assert seen[0].wait(600), open(envs[0]["STDERR_FILE"]).read()[-3000:]
        procs[victim].send_signal(signal.SIGTERM)
        sent = time.time()
        for proc in procs:
            proc.wait(timeout=STOP_BOUND_S)
        assert time.time() - sent < STOP_BOUND_S
    finally:
        for proc in procs:
            proc.kill()
    lines = [[line for line in open(env["STDERR_FILE"]).read().splitlines() if line.startswith("main.py:")]
             for env in envs]
    assert [proc.returncode for proc in procs] == [143, 143], lines
    return lines


def assert_one_stop(lines, out):
    """Both workers stopped after the same step; worker 0 wrote the one checkpoint."""
    (chief,), (other,) = lines
    found = re.search(r"worker 0 of 2: stopped by SIGTERM after training step (\d+); checkpoint of "
                      r"step (\d+) written in ", chief)
    assert found and found.group(1) == found.group(2), lines
    step = int(found.group(1))
    assert f"worker 1 of 2: stopped by SIGTERM after training step {step}; worker 0 writes" in other
    assert step in (AGREE_EVERY, STEPS)  # signalled after step 1: the next agreement
    assert [s for s, _ in checkpoint.list_checkpoints(str(out / "model"))] == [step]
    assert sorted(os.listdir(out / "model")) == [".lock", "checkpoints", "settings.json"]
    return step


def jax_pair_envs(env, out):
    return [{**env, "STDERR_FILE": str(out / f"stderr{i}.txt")} for i in range(2)]


def test_sigterm_to_one_jax_process_stops_both(distinct, jax_env, jax_pair, tmp_path):
    envs = jax_pair_envs(jax_env, tmp_path)

    def argv_of(*extra):
        (port,) = free_ports(1)
        return lambda index: [*flags(distinct, tmp_path, STEPS, *extra), "--coordinator_address",
                              f"localhost:{port}", "--num_processes", "2", "--process_id", str(index)]

    assert_one_stop(stop_one(launch(argv_of(), envs), envs, victim=1), tmp_path)
    procs = launch(argv_of("--resume_training"), envs)
    for proc in procs:
        proc.communicate(timeout=600)
        assert proc.returncode == 0, open(envs[0]["STDERR_FILE"]).read()[-3000:]
    assert_same(tmp_path, jax_pair)


def tf_envs(out, ports):
    envs = []
    for index in range(2):
        config = {"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                  "task": {"type": "worker", "index": index}}
        env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
        envs.append({**env, "TF_CONFIG": json.dumps(config), "STDERR_FILE": str(out / f"stderr{index}.txt")})
    return envs


def tf_pair(records, out, *extra):
    """Two TensorFlow workers (MultiWorkerMirroredStrategy through TF_CONFIG)."""
    os.makedirs(out, exist_ok=True)
    envs = tf_envs(out, free_ports(2))
    return envs, launch(lambda index: flags(records, out, STEPS, *extra, backend="tensorflow"), envs)


def test_sigterm_to_one_tensorflow_worker_stops_both(distinct, tmp_path):
    reference = tmp_path / "uninterrupted"
    envs, procs = tf_pair(distinct, reference)
    for proc in procs:
        proc.communicate(timeout=600)
        assert proc.returncode == 0, open(envs[0]["STDERR_FILE"]).read()[-3000:]
    out = tmp_path / "stopped"
    envs, procs = tf_pair(distinct, out)
    assert_one_stop(stop_one(procs, envs, victim=1), out)
    envs, procs = tf_pair(distinct, out, "--resume_training")
    for proc in procs:
        proc.communicate(timeout=600)
        assert proc.returncode == 0, open(envs[0]["STDERR_FILE"]).read()[-3000:]
    assert_same(out, reference)
