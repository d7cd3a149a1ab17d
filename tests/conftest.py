"""Shared test setup: the project root on sys.path, quiet TensorFlow, the Keras backend."""
import os
import shutil
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
    from dataset.phantom import write_brats_phantom
    from dataset.preprocess_data import preprocess
    write_brats_phantom(os.path.join(root, "nifti"), cases, shape=shape, seed=seed)
    preprocess(os.path.join(root, "nifti"), os.path.join(root, "records"), vol_per_file=1,
               single_data_dir=True, seed=0, workers=1)
    return os.path.join(root, "records")


def run_cli(*argv, timeout=300, env=None):
    """main.py with `argv` in a subprocess (environment `env`, default this one's); the
    CompletedProcess, output captured as text."""
    import subprocess
    return subprocess.run([sys.executable, "main.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def main_here(capsys, *argv):
    """main.py's main() with `argv` in this process (faster than a subprocess: TensorFlow is
    already imported); a CompletedProcess of its exit code and captured output, as run_cli's."""
    import subprocess
    from main import main
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["main.py", *argv], code, captured.out, captured.err)


def assert_one_line_error(result, text):
    """The run failed with a single stderr line that holds `text`, and no traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


@pytest.fixture(scope="session")
def same_volume_records(tmp_path_factory):
    """Six record files holding one and the same 32³ volume: with no augmentation every batch of
    every worker is then that volume, whatever the sharding and shuffling, so two workers of batch
    1 and one worker of batch 2 compute the same gradients."""
    from dataset.phantom import write_brats_phantom
    from dataset.preprocess_data import preprocess
    root = tmp_path_factory.mktemp("same")
    write_brats_phantom(str(root / "nifti"), 1, shape=(32, 32, 32), seed=2)
    (path,) = preprocess(str(root / "nifti"), str(root / "one"), single_data_dir=True, seed=0)
    os.makedirs(root / "records")
    for k in range(6):
        shutil.copy(path, root / "records" / f"volume-{k}.tfrecord")
    return str(root / "records")


def free_ports(n):
    """`n` TCP ports of localhost that were free a moment ago."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
