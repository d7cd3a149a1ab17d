"""Shared test setup: the project root on sys.path, quiet TensorFlow, the Keras backend, helpers to
run the tool, and the tiny phantom data and runs that several test files share.

The suite must stay well under 10 minutes on 2 cores (`pytest -n 2 --dist loadgroup`). A new test
earns its seconds:
- reuse the session fixtures below instead of writing and training your own: a phantom BraTS set
  (`unet3d_records`), a UNet3D trained on it (`unet3d_run`), an MSD hippocampus phantom
  (`msd_phantom`);
- what does not depend on the network (processes, signals, resume, locks, hooks, disks) trains the
  tool's smallest network, `tiny_vnet_flags` on `msd_phantom`: UNet3D's 31 million weights make
  each of its runs slow to trace, step and checkpoint;
- run the tool in this process (`main_here`, or `main.main`) unless the test is about the process
  itself (exit on a signal, several processes): a subprocess imports TensorFlow again;
- tiny volumes (32³), 1-4 steps, float64 only where float32 cannot tell the answer;
- give a JAX subprocess `jax_env`: it shares one compilation cache.
Session fixtures are made once per xdist worker. Tests that launch several processes carry
`pytest.mark.xdist_group("processes")` (one worker runs them in turn); tests that use
`unet3d_run` carry `pytest.mark.xdist_group("unet3d_run")`, so that it is trained once.
"""
import os
import re
import socket
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def phantom_records(root, cases, shape, seed):
    """Write `cases` phantom BraTS cases under root/nifti and their TFRecords (one volume per
    file) under root/records; returns the records folder."""
    from dataset.phantom.brats import write_brats_phantom
    from dataset.preprocess_data import preprocess
    write_brats_phantom(os.path.join(root, "nifti"), cases, shape=shape, seed=seed)
    preprocess(os.path.join(root, "nifti"), os.path.join(root, "records"), vol_per_file=1,
               single_data_dir=True, seed=0, workers=1)
    return os.path.join(root, "records")


def run_cli(*argv, timeout=300, env=None):
    """main.py with `argv` in a subprocess (environment `env`, default this one's); the
    CompletedProcess, output captured as text. Only for what needs its own process (another
    backend or environment, signals); otherwise `main_here`."""
    import subprocess
    return subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def main_here(capsys, *argv, main=None):
    """main.py's main() with `argv` in this process (faster than a subprocess: TensorFlow is
    already imported); a CompletedProcess of its exit code and captured output, as run_cli's.
    An argparse exit (a flag error, --help) gives its SystemExit code. `main`: another tool's
    main(argv) (default main.py's)."""
    import subprocess
    if main is None:
        from main import main
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["main.py", *argv], code, captured.out, captured.err)


def assert_one_line_error(result, text):
    """The run failed with a single stderr line that holds `text`, and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def checkpoint_weights(model_dir):
    """(step, arrays) of the newest checkpoint in `model_dir`; its stored step must match its name."""
    from runtime.loops import checkpoint
    step, path = checkpoint.latest_checkpoint(str(model_dir))
    arrays, stored = checkpoint.load(path)
    assert stored == step
    return step, arrays


def unet3d_flags(records, out, *extra):
    """UNet3D's command line on `records` into out/model and out/logs: batch 2, fp32, 3 folds,
    seed 3, a log line every step; `extra` flags last."""
    return ["--data_dir", str(records), "--model_dir", str(out / "model"), "--log_dir", str(out / "logs"),
            "--batch_size", "2", "-d", "fp32", "--num_folds", "3", "--seed", "3", "--log_every", "1",
            *extra]


@pytest.fixture(scope="session")
def unet3d_records(tmp_path_factory):
    """Six phantom BraTS cases of 32³ as TFRecords, one volume a file (seed 5): with 3 folds,
    4 training and 2 validation files; the crop and the evaluation window are the whole volume.
    Read only: copy it before changing a file."""
    return phantom_records(str(tmp_path_factory.mktemp("unet3d_records")), 6, (32, 32, 32), seed=5)


@pytest.fixture(scope="session")
def unet3d_run(unet3d_records, tmp_path_factory):
    """The folder of a UNet3D trained for 4 steps on `unet3d_records` with `unet3d_flags`
    (`--exec_mode train --max_steps 4`): its checkpoint of step 4 and settings.json in
    <folder>/model, its log in <folder>/logs/log.json. Evaluate or predict on it freely (predict
    adds masks to model/, or use --output_dir); train only into another folder. Mark a test that
    uses it `pytest.mark.xdist_group("unet3d_run")`, so that one xdist worker trains it once."""
    from main import main
    out = tmp_path_factory.mktemp("unet3d_run")
    assert main(unet3d_flags(unet3d_records, out, "--exec_mode", "train", "--max_steps", "4")) == 0
    return out


def tiny_vnet_flags(task, out, *extra):
    """The tool's smallest network on the MSD phantom `task`, into out/model and out/logs: a V-Net
    of one convolution a block on a 16³ grid, instance normalization (a sample's numbers do not
    depend on the rest of its batch), fp32, seed 3, a log line every step; `extra` flags last.
    For what does not depend on the network (processes, signals, resume): its steps are short and
    it traces in a fraction of UNet3D's time."""
    return ["--model", "vnet", "--data_dir", str(task), "--model_dir", str(out / "model"),
            "--log_dir", str(out / "logs"), "--input_shape", "16", "16", "16", "--downscale_blocks",
            "1", "1", "--upscale_blocks", "1", "--normalization_layer", "instancenorm", "-d", "fp32",
            "--seed", "3", "--log_every", "1", *extra]


MSD_SPACING = (0.8, 1.3, 2.1)
MSD_DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


@pytest.fixture(scope="session")
def msd_phantom(tmp_path_factory):
    """A phantom MSD hippocampus task: 10 training cases (hippocampus_000-009), 3 test cases
    (010-012), voxels of MSD_SPACING with the axes turned by MSD_DIRECTION (seed 1). The first
    training image is 4-D, two volumes of which the last is the one to keep. Read only: copy it
    (shutil.copytree) before changing a file."""
    import numpy as np
    import SimpleITK as sitk
    from dataset.phantom.msd import write_msd_phantom
    root = str(tmp_path_factory.mktemp("msd"))
    write_msd_phantom(root, 10, 3, seed=1, spacing=MSD_SPACING, direction=MSD_DIRECTION)
    path = os.path.join(root, "imagesTr", "hippocampus_000.nii.gz")
    image = sitk.ReadImage(path)
    array = sitk.GetArrayFromImage(image)
    four = sitk.GetImageFromArray(np.stack([np.zeros_like(array), array]), isVector=False)
    four.SetSpacing(MSD_SPACING + (1.0,))
    four.SetOrigin(image.GetOrigin() + (0.0,))
    direction4 = np.eye(4)
    direction4[:3, :3] = np.reshape(MSD_DIRECTION, (3, 3))
    four.SetDirection(direction4.ravel().tolist())
    sitk.WriteImage(four, path)
    return root


@pytest.fixture(scope="session")
def jax_env(tmp_path_factory):
    """The environment of a JAX subprocess on CPU, with one compilation cache for this test
    worker's JAX runs that keeps every program, however quickly it compiled: a run after the first
    loads the model's initializers and the training step instead of compiling them again.
    Random bits come from JAX's non-partitionable threefry, which XLA on CPU compiles much faster
    for the initializers of a first run; its numbers differ from the default's, and the tests
    compare JAX runs with each other or with weights they set, never with a default JAX run."""
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
            "JAX_THREEFRY_PARTITIONABLE": "0",
            "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_cache")),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


STOP_BOUND_S = 120  # docs/distributed.md: every worker exits within this after the signal


def stop_one(procs, stderr_dir, victim):
    """SIGTERM to procs[victim] once process 0 has logged a training step on its stdout (a pipe);
    every process must then exit 143 within STOP_BOUND_S. Their stderr is in
    stderr_dir/stderr<i>.txt; returns each one's lines from main.py."""
    import signal
    import threading
    import time

    def drain(proc, seen):
        for line in proc.stdout:
            if line.startswith("train step "):
                seen.set()

    seen = [threading.Event() for _ in procs]
    for proc, event in zip(procs, seen):
        threading.Thread(target=drain, args=(proc, event), daemon=True).start()
    try:
        deadline = time.time() + 1200
        while not seen[0].wait(1) and time.time() < deadline:
            if any(proc.poll() is not None for proc in procs):
                break  # a process ended before training: its stderr says why
        assert seen[0].wait(5), [open(stderr_dir / f"stderr{i}.txt").read()[-3000:]
                                  for i in range(len(procs))]
        procs[victim].send_signal(signal.SIGTERM)
        sent = time.time()
        for proc in procs:
            proc.wait(timeout=STOP_BOUND_S)
        assert time.time() - sent < STOP_BOUND_S
    finally:
        for proc in procs:
            proc.kill()
    lines = [[line for line in open(stderr_dir / f"stderr{i}.txt").read().splitlines()
              if line.startswith("main.py:")] for i in range(len(procs))]
    assert [proc.returncode for proc in procs] == [143, 143], lines
    return lines


def assert_one_stop(lines, model_dir):
    """`stop_one`'s `lines` of two workers say that both stopped after the same training step, the
    next stop agreement or the one after (a signal sent after step 1 may land after the first
    one: the tiny network's steps are short); worker 0 wrote the one checkpoint, in `model_dir`.
    Returns the step."""
    from runtime.loops import checkpoint
    from runtime.loops.stopping import AGREE_EVERY
    (chief,), (other,) = lines
    found = re.search(r"worker 0 of 2: stopped by SIGTERM after training step (\d+); checkpoint of "
                      r"step (\d+) written in ", chief)
    assert found and found.group(1) == found.group(2), lines
    step = int(found.group(1))
    assert f"worker 1 of 2: stopped by SIGTERM after training step {step}; worker 0 writes" in other
    assert step in (AGREE_EVERY, 2 * AGREE_EVERY)
    assert [s for s, _ in checkpoint.list_checkpoints(str(model_dir))] == [step]
    assert sorted(os.listdir(model_dir)) == [".lock", "checkpoints", "settings.json"]
    return step


def free_ports(n):
    """`n` TCP ports of localhost that were free a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
