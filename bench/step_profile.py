"""Where UNet3D's JAX training step spends its time on a GPU.

usage: KERAS_BACKEND=jax python bench/step_profile.py [--dtype bf16] [--size 128] [--trace DIR]
                                                    [--image_channel_multiple 8] [--loss_check 50]
                                                    [--conv_kernels xla mosaic]
Times the jitted training step (batch 2, Adam, dice+ce, a compact uint8 batch finished in the
step) with the batch already on the device and with a host batch copied each step, then traces a
few steps and prints the GPU kernels that take the most time per step. The step uses XLA's
convolutions; --conv_kernels also times it, in the same process, with each kernel named
(`mosaic`: runtime/engines/mosaic_conv.py's forward pass and input gradient, XLA's kernel gradient;
`wgrad`: the same and runtime/engines/mosaic_wgrad.py's kernel gradient, what the tool runs on a
Hopper GPU), traces the last one named,
and --loss_check checks each. XLA gets the tool's flags (runtime/setup/xla_flags.py); set
XLA_FLAGS=--xla_gpu_force_conv_nhwc=false to see XLA's own layout choice instead.
"""
import argparse
import collections
import glob
import gzip
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

from runtime.engines import mosaic_conv  # noqa: E402
from dataset.device_transform import finish_train_batch  # noqa: E402
from model.losses import get_loss  # noqa: E402
from model.unet3d import build_unet3d  # noqa: E402
from runtime.engines.jax_engine import JaxEngine  # noqa: E402
from runtime.tasks.unet3d import GPU_CHANNEL_MULTIPLE  # noqa: E402

CONV_KERNELS = {"xla": None,
                "mosaic": mosaic_conv.routed_implementation_of({(True, False): mosaic_conv.convolution},
                                                               mosaic_conv.takes, lambda shape, c_out: False),
                "wgrad": mosaic_conv.routed_implementation_of(mosaic_conv.CONVOLUTIONS, mosaic_conv.takes,
                                                              mosaic_conv.weight_grad_takes)}


def time_steps(engine, x, y, steps, warmup):
    """Median ms of `steps` training steps after `warmup`, each waited for."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        float(engine.train_step(x, y))
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def top_kernels(trace_dir, steps, count=15):
    """(GPU ms per step, [(ms per step, launches per step, kernel name)]) from a JAX trace."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as handle:
        events = json.load(handle)["traceEvents"]
    gpus = {e["pid"] for e in events if e.get("name") == "process_name" and "GPU" in e["args"]["name"]}
    total, launches = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["pid"] in gpus:
            total[e["name"]] += e["dur"] / 1000 / steps
            launches[e["name"]] += 1
    rows = [(ms, launches[name] // steps, name) for name, ms in total.most_common(count)]
    return sum(total.values()), rows


def compact_batch(rng, shape):
    """A random compact training batch (uint8 crops and labels, drawn augmentation) of `shape`."""
    b, channels = shape[0], 4
    inputs = {"image": rng.integers(0, 256, size=shape + (channels,), dtype=np.uint8),
              "mean": rng.uniform(40, 80, size=(b, channels)).astype(np.float32),
              "stdev": rng.uniform(10, 20, size=(b, channels)).astype(np.float32),
              "flip": rng.random(b) > 0.5, "brighten": rng.random(b) > 0.5,
              "factor": rng.uniform(0.9, 1.1, size=(b, channels)).astype(np.float32)}
    return inputs, rng.integers(0, 4, size=shape, dtype=np.uint8)


def make_engine(image_channel_multiple, kind="xla"):
    """A JaxEngine of UNet3D (seed 0; its convolutions by kernel `kind`), Adam and dice+ce that
    finishes compact batches."""
    model = build_unet3d(4, seed=0, image_channel_multiple=image_channel_multiple or None,
                         conv_implementation=CONV_KERNELS[kind])
    optimizer = keras.optimizers.Adam(1e-4)
    optimizer.build(model.trainable_variables)
    return JaxEngine(model, optimizer, get_loss("dice+ce"), None, finish_batch=finish_train_batch)


def first_losses(multiple, kind, batches, steps):
    """The first `steps` losses of a fresh engine (seed 0) on `batches` in turn."""
    engine = make_engine(multiple, kind)
    return np.array([float(engine.train_step(*batches[i % len(batches)])) for i in range(steps)])


def loss_check(args, shape, steps, kind):
    """The first `steps` losses with the image's channels padded and the convolutions of kernel
    `kind` against plain XLA convolutions, same seed and batches: prints the largest relative
    difference and whether it is within 2 %."""
    rng = np.random.default_rng(1)
    batches = [compact_batch(rng, shape) for _ in range(4)]
    reference = first_losses(0, "xla", batches, steps)
    chosen = first_losses(args.image_channel_multiple, kind, batches, steps)
    worst = float(np.max(np.abs(chosen - reference) / np.abs(reference)))
    print(json.dumps({"loss_check_steps": steps, "image_channel_multiple": args.image_channel_multiple,
                      "conv_kernels": kind, "max_relative_difference": worst,
                      "within_2_percent": worst <= 0.02, "first": [reference[0], chosen[0]],
                      "last": [reference[-1], chosen[-1]]}), flush=True)


def main():
    """Time the step, trace it, print the summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--size", type=int, default=128, help="crop edge (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--image_channel_multiple", type=int, default=GPU_CHANNEL_MULTIPLE,
                        help="pad the image convolution's channels to this multiple, as the tool "
                        "does on a GPU (0: none; default: %(default)s)")
    parser.add_argument("--trace", default=None,
                        help="trace 5 steps into DIR (of the last --conv_kernels) and list the top kernels")
    parser.add_argument("--loss_check", type=int, default=0, metavar="N",
                        help="also compare the first N losses with plain convolutions (2 %% tolerance)")
    parser.add_argument("--conv_kernels", nargs="*", default=[], choices=tuple(CONV_KERNELS),
                        help="also time the step with these kernels taking the convolutions they can")
    args = parser.parse_args()
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16" if args.dtype == "bf16" else "float32")
    shape = (args.batch,) + (args.size,) * 3
    x_host, y_host = compact_batch(np.random.default_rng(0), shape)
    engine = make_engine(args.image_channel_multiple)
    x_dev, y_dev = jax.device_put(x_host), jax.device_put(y_host)
    result = {"dtype": args.dtype, "image_channel_multiple": args.image_channel_multiple,
              "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
              "device": jax.devices()[0].device_kind,
              "step_ms_device_batch": time_steps(engine, x_dev, y_dev, args.steps, 10),
              "step_ms_host_batch": time_steps(engine, x_host, y_host, args.steps, 3)}
    print(json.dumps(result), flush=True)
    for kind in args.conv_kernels:
        engine = make_engine(args.image_channel_multiple, kind)
        ms = time_steps(engine, x_dev, y_dev, args.steps, 10)
        print(json.dumps({"conv_kernels": kind, "step_ms_device_batch": ms}), flush=True)
    if args.trace:
        jax.profiler.start_trace(args.trace)
        time_steps(engine, x_dev, y_dev, 5, 0)
        jax.profiler.stop_trace()
        busy, rows = top_kernels(args.trace, 5)
        print(f"GPU busy {busy:.1f} ms per step; top kernels (ms/step, launches/step):")
        for ms, n, name in rows:
            print(f"{ms:7.2f} {n:5d}  {name[:110]}")
    if args.loss_check:
        for kind in args.conv_kernels or ["xla"]:
            loss_check(args, shape, args.loss_check, kind)


if __name__ == "__main__":
    main()
