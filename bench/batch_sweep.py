"""UNet3D's JAX training step at several batch sizes, in one process on one GPU: which batch trains fastest.

usage: KERAS_BACKEND=jax python bench/batch_sweep.py [--runs wgrad:2 wgrad:4 mosaic:2 ...] [--steps 20]
                                                   [--budget 480]
For each KERNELS:BATCH in the order given, KERNELS a choice of bench/step_profile.py (`xla`,
`mosaic`: the forward and input-gradient kernel, `wgrad`: also the weight-gradient kernel, what the
tool runs on a Hopper GPU; one engine each, reused across batches): the median ms of `--steps` training steps (bf16, 128³ crops, Adam, dice+ce, the
compact batch already on the device, after 5 warm-up steps, the first of which compiles, each step
waited for as the tool's --benchmark does) and the images per second; then the same steps
dispatched back to back with the loss read once at the end, as training runs between log lines
(the host's dispatch of a step then overlaps the step before). Starts no new measurement once `--budget` seconds have passed; prints one JSON
line per measurement (or the error of one that failed) and a table at the end.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.setup.xla_flags import prefer_channels_last_convolutions  # noqa: E402

prefer_channels_last_convolutions()

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

from bench.step_profile import CONV_KERNELS, compact_batch, make_engine, time_steps  # noqa: E402
from runtime.tasks.unet3d import GPU_CHANNEL_MULTIPLE  # noqa: E402


def main():
    """Measure each (kernels, batch) and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="*", default=[f"wgrad:{b}" for b in (2, 4, 1, 8, 3, 6, 5, 7)],
                        help="KERNELS:BATCH, KERNELS one of " + ", ".join(CONV_KERNELS))
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=480.0)
    args = parser.parse_args()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    start = time.perf_counter()
    rows = []
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, Keras {keras.__version__}", flush=True)
    engines = {}
    for run in args.runs:
        kind, batch = run.split(":")
        batch = int(batch)
        if time.perf_counter() - start > args.budget:
            print(json.dumps({"skipped": run, "reason": "budget"}), flush=True)
            continue
        try:
            if kind not in engines:
                engines[kind] = make_engine(GPU_CHANNEL_MULTIPLE, kind)
            x, y = compact_batch(np.random.default_rng(batch), (batch,) + (args.size,) * 3)
            x, y = jax.device_put(x), jax.device_put(y)
            began = time.perf_counter()
            float(engines[kind].train_step(x, y))  # compiles
            compile_s = time.perf_counter() - began
            ms = time_steps(engines[kind], x, y, args.steps, 4)
            began = time.perf_counter()  # the same steps dispatched back to back, the loss read once
            for _ in range(args.steps):
                loss = engines[kind].train_step(x, y)
            float(loss)
            ahead_ms = 1000 * (time.perf_counter() - began) / args.steps
        except Exception as error:  # a configuration that fails is reported, not fatal
            print(json.dumps({"failed": run, "error": str(error)[:600]}), flush=True)
            continue
        row = {"conv_kernels": kind, "batch": batch, "step_ms": round(ms, 2),
               "img_s": round(1000 * batch / ms, 2), "ahead_ms": round(ahead_ms, 2),
               "ahead_img_s": round(1000 * batch / ahead_ms, 2), "compile_s": round(compile_s, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| kernels | batch | ms/step | img/s | dispatched ahead: ms/step | img/s |\n|---|---|---|---|---|---|")
    for row in sorted(rows, key=lambda r: (r["conv_kernels"], r["batch"])):
        print(f"| {row['conv_kernels']} | {row['batch']} | {row['step_ms']:.1f} | {row['img_s']:.2f} | "
              f"{row['ahead_ms']:.1f} | {row['ahead_img_s']:.2f} |")


if __name__ == "__main__":
    main()
