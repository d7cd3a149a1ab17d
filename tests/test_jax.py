"""The JAX backend on CPU: the same numbers as TensorFlow, a synthetic benchmark in a virtual
environment without TensorFlow, the copy-ahead to the device, XLA's layout flag and TF_CONFIG
refused. (Training, evaluation and prediction on two devices and in two processes:
test_jax_distributed.py.)"""
import json
import os
import subprocess
import sys
import sysconfig
import threading

import numpy as np
import pytest
import tensorflow as tf

from model.losses import get_loss
from model.unet3d import build_unet3d
from runtime.engines.jax_engine import prefetch_to_device
from runtime.setup.xla_flags import prefer_channels_last_convolutions
from tests.conftest import ROOT, assert_one_line_error, run_cli

JAX_GRADIENTS = """
import sys
import jax, keras, numpy as np
keras.mixed_precision.set_dtype_policy(sys.argv[3])
from model.losses import get_loss
from model.unet3d import build_unet3d
data = np.load(sys.argv[1])
model = build_unet3d(in_channels=4, normalization="instancenorm")
model.set_weights([data[f"w{i}"] for i in range(len(model.weights))])
loss_fn = get_loss("dice+ce")
def loss_of(trainable):
    probs, _ = model.stateless_call(trainable, [v.value for v in model.non_trainable_variables], data["x"])
    return loss_fn(data["y"], probs)
loss, grads = jax.jit(jax.value_and_grad(loss_of))([v.value for v in model.trainable_variables])
np.savez(sys.argv[2], loss=np.asarray(loss), **{f"g{i}": np.asarray(g) for i, g in enumerate(grads)})
"""


def loss_and_gradients_on_both_backends(tmp_path, dtype, jax_env):
    """(loss, gradients, variable paths) from TensorFlow here and from JAX in a subprocess."""
    import keras
    keras.mixed_precision.set_dtype_policy(dtype)
    try:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(1, 64, 32, 32, 4)).astype(dtype)
        y = np.eye(4, dtype=dtype)[rng.integers(0, 4, size=(1, 64, 32, 32))]
        model = build_unet3d(in_channels=4, normalization="instancenorm", seed=3)
        np.savez(tmp_path / "inputs.npz", x=x, y=y, **{f"w{i}": w for i, w in enumerate(model.get_weights())})
        with tf.GradientTape() as tape:
            loss = get_loss("dice+ce")(y, model(x))
        grads = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        paths = [v.path for v in model.trainable_variables]
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    script = tmp_path / "jax_grads.py"
    script.write_text(JAX_GRADIENTS)
    env = {**jax_env, "PYTHONPATH": ROOT, "JAX_ENABLE_X64": "1" if dtype == "float64" else "0"}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "inputs.npz"),
                             str(tmp_path / "jax.npz"), dtype], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = np.load(tmp_path / "jax.npz")
    return (float(loss), grads), (float(out["loss"]), [out[f"g{i}"] for i in range(len(grads))]), paths


def test_jax_and_tensorflow_agree_on_loss_and_gradients(tmp_path, jax_env):
    # In float64, so that the comparison is of the two backends' mathematics: in float32 the
    # gradients of the deepest layers, whose instance norms see only a few voxels (2 at this
    # 64×32×32 input), amplify rounding to ~1e-2 relative on either backend alone (measured at
    # 64×64×32; float64 agrees to ~1e-9).
    (tf_loss, tf_grads), (jax_loss, jax_grads), paths = loss_and_gradients_on_both_backends(tmp_path, "float64", jax_env)
    assert jax_loss == pytest.approx(tf_loss, rel=1e-4)
    scale = max(np.linalg.norm(g) for g in tf_grads)
    compared = 0
    for path, a, b in zip(paths, tf_grads, jax_grads):
        if np.linalg.norm(a) < 1e-12 * scale:
            # A convolution's bias right before an instance norm: its gradient is zero in exact
            # arithmetic (the norm removes the mean), so both backends must give ~0.
            assert path.endswith("conv/bias") and np.linalg.norm(b) < 1e-12 * scale, path
            continue
        assert np.linalg.norm(a - b) / np.linalg.norm(a) < 1e-4, path
        compared += 1
    assert compared == 100 - 22  # every kernel, norm scale and offset, and the unnormalized biases


def venv_without_tensorflow(path):
    """A fresh virtual environment at `path` that sees this one's packages except TensorFlow and
    TensorBoard (through a .pth file of links): TensorFlow is not installed there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    python = str(path / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    here = sysconfig.get_paths()["purelib"]
    links = path / "links"
    links.mkdir()
    for name in os.listdir(here):
        if not name.startswith(("tensorflow", "tensorboard", "tf_keras")) and not name.endswith(".pth"):
            os.symlink(os.path.join(here, name), links / name)
    with open(os.path.join(site, "links.pth"), "w") as handle:
        handle.write(f"{links}\n")
    return python


def test_synthetic_benchmark_on_jax_runs_without_tensorflow_installed(tmp_path, jax_env):
    python = venv_without_tensorflow(tmp_path / "venv")
    missing = subprocess.run([python, "-c", "import tensorflow"], capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'tensorflow'" in missing.stderr
    result = subprocess.run([python, "main.py", "--synth_data", "--benchmark", "--exec_mode", "predict",
                             "--batch_size", "1", "--warmup_steps", "1", "-d", "fp32",
                             "--model_dir", str(tmp_path / "m"), "--log_dir", str(tmp_path / "l")],
                            cwd=ROOT, env=jax_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "throughput_predict" in result.stdout and "Latency_predict 99%" in result.stdout


def double(*batch):
    return [2 * b for b in batch]


def test_prefetch_to_device_keeps_the_order_and_raises_the_readers_error():
    assert list(prefetch_to_device(iter([(1, 10), (2, 20), (3, 30)]), double)) == [[2, 20], [4, 40], [6, 60]]

    def truncated():
        yield (1,)
        raise OSError("part-3.tfrecord is truncated")

    batches = prefetch_to_device(truncated(), double)
    assert next(batches) == [2]
    with pytest.raises(OSError, match="part-3.tfrecord"):
        next(batches)


def test_prefetch_to_device_stops_its_thread_when_training_stops():
    endless = ((i,) for i in iter(int, 1))
    batches = prefetch_to_device(endless, double)
    assert next(batches) == [0]
    batches.close()  # waits for the thread
    assert not any(t.name == "prefetch-to-device" for t in threading.enumerate())


def test_xla_is_asked_for_channels_last_convolutions_unless_the_user_chose_a_layout():
    assert prefer_channels_last_convolutions({}) == "--xla_gpu_force_conv_nhwc=true"
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/hlo"}
    assert prefer_channels_last_convolutions(env) == "--xla_dump_to=/tmp/hlo --xla_gpu_force_conv_nhwc=true"
    for chosen in ("--xla_gpu_force_conv_nchw=true", "--xla_gpu_force_conv_nhwc=false"):
        assert prefer_channels_last_convolutions({"XLA_FLAGS": chosen}) == chosen


def test_tf_config_with_the_jax_backend_is_a_one_line_error(tmp_path, jax_env):
    env = {**jax_env, "TF_CONFIG": json.dumps({"cluster": {"worker": ["localhost:1", "localhost:2"]},
                                               "task": {"type": "worker", "index": 0}})}
    result = run_cli("--synth_data", "--exec_mode", "train", "--model_dir", str(tmp_path / "m"),
                     "--log_dir", str(tmp_path / "l"), env=env, timeout=120)
    assert_one_line_error(result, "TF_CONFIG is set")
