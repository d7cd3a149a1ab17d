"""Inference of the BraTS evaluation window on a GPU: UNet3D forward and argmax, batch 1.

usage: KERAS_BACKEND=jax python bench/inference_window.py [--root DIR] [--dtype bf16] [--steps 30] [--conv_kernel auto]
Builds the tool's UNet3D as its task does (the tree at --root, default this one), compiles its
inference (forward pass, argmax to int8) for a 224×224×160×4 window already on the device, and
prints one JSON line: the median ms of `--steps` calls, each waited for, and volumes/s.
"""
import argparse
import json
import os
import sys
import tempfile
import time


def main():
    """Build, compile, time, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--window", type=int, nargs=3, default=(224, 224, 160))
    parser.add_argument("--conv_kernel", choices=("auto", "keras"), default=None,
                        help="the tool's --conv_kernel (default: the tree's own default)")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = "jax"
    sys.path.insert(0, os.path.abspath(args.root))
    from runtime.setup.xla_flags import prefer_channels_last_convolutions
    prefer_channels_last_convolutions()
    import jax
    import numpy as np

    from runtime.settings import DataSettings, PrecisionSettings, RunSettings, Settings
    from runtime.setup.machine import resolve_machine
    from runtime.tasks.base import make_task

    folder = tempfile.mkdtemp(prefix="inference-window-")
    settings = Settings(run=RunSettings(model_dirs=(folder,), log_dir=folder),
                        data=DataSettings(synth_data=True, seed=0),
                        precision=PrecisionSettings(backend="jax", dtype=args.dtype,
                                                    **({"conv_kernel": args.conv_kernel} if args.conv_kernel else {})))
    model = make_task("unet3d", settings.network, settings.data, resolve_machine(settings)).model()
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    @jax.jit
    def predict(trainable, non_trainable, x):
        probs, _ = model.stateless_call(trainable, non_trainable, x, training=False)
        return jax.numpy.argmax(probs, axis=-1).astype("int8")

    x = jax.device_put(np.random.default_rng(0).normal(size=(1, *args.window, 4)).astype(np.float32))
    for _ in range(3):
        predict(trainable, non_trainable, x).block_until_ready()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        predict(trainable, non_trainable, x).block_until_ready()
        times.append(1000 * (time.perf_counter() - start))
    ms = float(np.median(times))
    print(json.dumps({"root": args.root, "dtype": args.dtype, "window": list(args.window),
                      "conv_kernel": args.conv_kernel,
                      "ms_median": ms, "vol_s": 1000 / ms}))


if __name__ == "__main__":
    main()
