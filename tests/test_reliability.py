"""Reliability in one process: stops on SIGTERM, SIGINT and SIGUSR1 that resume exactly (SIGTERM's
in a process of its own, whose exit status is checked; the others in the test's process), one
training run per model_dir, and outputs on a full disk (a real tmpfs in a mount namespace).

The runs train the tool's smallest network (conftest's `tiny_vnet_flags`) on 32³ batches of 8,
whose steps take long enough for a signal sent after one step to arrive in the next: the stops,
the lock and the writes are the same code for either network. (UNet3D's resume after a killed
process: tests/test_modes.py.)"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest

from runtime.loops import checkpoint
from main import main
from tests.conftest import (ROOT, assert_one_line_error, main_here, checkpoint_weights as weights_of,
                            tiny_vnet_flags)

# One test worker runs this file (pytest -n 2 --dist loadgroup), so that the reference run is made
# once.
pytestmark = pytest.mark.xdist_group("reliability")

STEPS = 10


@pytest.fixture(scope="module")
def records(msd_phantom):
    """conftest's MSD phantom: 8 training cases (train_split 0.8) and 3 test images."""
    return msd_phantom


def flags(records, out, *extra):
    """Training in 32³ batches of the 8 training cases: one step an epoch."""
    return tiny_vnet_flags(records, out, "--exec_mode", "train", "--train_split", "0.8", "--batch_size",
                           "8", "--input_shape", "32", "32", "32", *extra)




@pytest.fixture(scope="module")
def reference(records, tmp_path_factory):
    """An uninterrupted run of STEPS steps (in this process)."""
    out = tmp_path_factory.mktemp("reference")
    assert main(flags(records, out, "--train_epochs", str(STEPS))) == 0
    return out


def signal_at(argv, step, signum, err_path, timeout=600):
    """main.py with `argv` in a subprocess; `signum` is sent once it has logged training step
    `step` (or a later one). Returns (exit status, the stderr lines that main.py wrote)."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, text=True,
                                stdout=subprocess.PIPE, stderr=err)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    try:
        sent = False
        for line in proc.stdout:
            found = re.match(r"train step (\d+) \|", line)
            if found and int(found.group(1)) >= step and not sent:
                proc.send_signal(signum)
                sent = True
        proc.wait()
    finally:
        watchdog.cancel()
        proc.kill()
    lines = [line for line in open(err_path).read().splitlines() if line.startswith("main.py:")]
    return proc.returncode, lines


def signal_here(argv, step, signum, log, capsys):
    """main() with `argv` in this process; `signum` is sent to this process once `log` (its
    log.json) holds training step `step` (or a later one). Returns main_here's result."""
    sent = threading.Event()

    def reached():
        entries = map(json.loads, open(log)) if os.path.exists(log) else ()
        return any(e["type"] == "train" and e["step"] >= step for e in entries)

    def watch():
        while not sent.wait(0.01):
            if reached():
                os.kill(os.getpid(), signum)
                sent.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        return main_here(capsys, *argv)
    finally:
        sent.set()
        watcher.join()


def stop_and_check(argv, at, signum, tmp_path, capsys):
    """Stop a run by `signum` at training step `at` (or the next); checks the one line, the exit
    status and the checkpoint, and returns the step it stopped after. SIGTERM stops main.py in a
    process of its own; the other signals stop main() in this process."""
    if signum == signal.SIGTERM:
        code, lines = signal_at(argv, at, signum, tmp_path / "stderr.txt")
    else:
        result = signal_here(argv, at, signum, tmp_path / "logs" / "log.json", capsys)
        code, lines = result.returncode, result.stderr.strip().splitlines()
    name = signal.Signals(signum).name
    assert code == 128 + signum, lines
    assert len(lines) == 1, lines
    found = re.search(rf"stopped by {name} after training step (\d+); checkpoint of step (\d+) "
                      r"written in .*; continue with the same command and --resume_training", lines[0])
    assert found and found.group(1) == found.group(2), lines
    step = int(found.group(1))
    assert at <= step <= at + 1  # the step in progress when the signal came, at the latest
    assert weights_of(tmp_path / "model")[0] == step
    return step


def test_stops_by_signal_resume_to_the_uninterrupted_weights(records, reference, tmp_path, capsys):
    argv = flags(records, tmp_path, "--train_epochs", str(STEPS))
    stopped = []
    for target, signum in ((2, signal.SIGTERM), (4, signal.SIGINT), (6, signal.SIGUSR1)):
        at = max([target] + [s + 1 for s in stopped])
        stopped.append(stop_and_check(argv + (["--resume_training"] if stopped else []), at, signum,
                                      tmp_path, capsys))
    assert main(argv + ["--resume_training"]) == 0
    logged = [line for line in open(tmp_path / "logs" / "log.json") if '"type": "train"' in line]
    assert [int(re.search(r'"step": (\d+)', line).group(1)) for line in logged] == list(range(1, STEPS + 1))
    (step, resumed), (ref_step, uninterrupted) = weights_of(tmp_path / "model"), weights_of(reference / "model")
    assert step == ref_step == STEPS
    for a, b in zip(resumed, uninterrupted):  # the bound of tests/test_modes.py's resume test
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_one_training_run_per_model_dir(records, tmp_path, capsys):
    argv = flags(records, tmp_path, "--train_epochs", "1000")
    first = subprocess.Popen([sys.executable, "main.py", *argv], cwd=ROOT, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for line in first.stdout:  # training, so the lock is held
            if line.startswith("train step 1 "):
                break
        second = main_here(capsys, *argv, "--resume_training")
        assert_one_line_error(second, f"--model_dir {tmp_path / 'model'}: another training run uses "
                                      f"it (process {first.pid} on host {socket.gethostname()})")
        # Evaluation only reads: it does not need the lock (no checkpoint yet: its own error).
        assert_one_line_error(main_here(capsys, *argv, "--exec_mode", "evaluate"), "no checkpoint")
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock
        first.wait()
    assert main([*argv, "--train_epochs", "1", "--resume_training"]) == 0


def in_tmpfs(size, script, tmp_path, timeout=600):
    """`script` (sh) in a new mount namespace where $MNT is a fresh tmpfs of `size`; skips the
    test where mount namespaces or tmpfs mounts are not permitted."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {mnt}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no tmpfs in a mount namespace here ({probe.stderr.strip()})")
    return subprocess.run(["unshare", "-m", "sh", "-c",
                           f"mount -t tmpfs -o size={size} tmpfs {mnt} && {script}"],
                          cwd=ROOT, env={**os.environ, "MNT": str(mnt)}, capture_output=True,
                          text=True, timeout=timeout)


def main_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("main.py:")]


def test_no_room_for_the_next_checkpoint_is_refused_before_the_write(records, reference, tmp_path):
    size = os.path.getsize(checkpoint.latest_checkpoint(str(reference / "model"))[1])
    out = tmp_path / "copy"
    argv = " ".join(flags(records, tmp_path, "--train_epochs", "2", "--ckpt_every", "1",
                          "--model_dir", "$MNT/model"))
    result = in_tmpfs(f"{size * 3 // 2}", f"{sys.executable} main.py {argv}; echo status $?; "
                                          f"cp -a $MNT {out}", tmp_path)
    assert "status 1" in result.stdout, result.stderr[-3000:]
    (line,) = main_lines(result.stderr)
    found = re.search(r"checkpoints: the checkpoint of step 2 needs ([\d.]+) MB and ([\d.]+) MB are "
                      r"free; the checkpoint of step 1 is kept", line)
    assert found and float(found.group(2)) < float(found.group(1)), line
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(out / "model" / "checkpoints")) == ["ckpt-1.npz"]  # no temporary file
    assert weights_of(out / "model")[0] == 1


def test_a_full_disk_in_a_mask_or_a_log_line_leaves_no_partial_file(reference, records, tmp_path):
    # 40 KiB: room for one 32³ int8 mask (32 KiB and its header), not for two (of 3 test images).
    predict = " ".join(flags(records, reference, "--exec_mode", "predict", "--output_dir", "$MNT/masks",
                             "--log_dir", str(tmp_path / "logs")))
    # A full file system under log_dir: the evaluation's record cannot be appended to log.json.
    evaluate = " ".join(flags(records, reference, "--exec_mode", "evaluate", "--log_dir", "$MNT/logs"))
    script = (f"{sys.executable} main.py {predict}; echo status $?; cp -a $MNT/masks {tmp_path}/masks; "
              f"rm -r $MNT/masks; mkdir $MNT/logs; cat /dev/zero > $MNT/fill 2>/dev/null; "
              f"{sys.executable} main.py {evaluate}; echo status $?; ls -A $MNT/logs")
    result = in_tmpfs("40k", script, tmp_path)
    assert result.stdout.count("status 1") == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    mask_error, log_error = main_lines(result.stderr)
    assert re.search(r"masks/hippocampus_011\.npy: could not be written \(No space left on device\)",
                     mask_error)
    assert sorted(os.listdir(tmp_path / "masks")) == ["hippocampus_010.npy"]
    assert np.load(tmp_path / "masks" / "hippocampus_010.npy").shape == (32, 32, 32)
    assert re.search(r"logs/log\.json: could not be written \(No space left on device\)", log_error)
    assert result.stdout.strip().endswith("status 1")  # and the log folder is left empty
