"""Every 3×3×3 convolution of UNet3D's training step timed alone on a GPU, against the card's roofline.

usage: KERAS_BACKEND=jax python bench/conv_roofline.py [--batch 2] [--size 128] [--dtype bf16]
Measures the card's two ceilings first (a large bf16 matrix product, a large device-to-device
copy), then times the forward, data-gradient and weight-gradient convolution of every 3×3×3
convolution in the network (channels-last, as the tool compiles them), each alone under jit,
and prints per kernel: ms, TFLOP/s from its shapes, the fraction of the measured matrix rate, and
its fewest bytes (inputs and output once) over the measured bandwidth. The table is sorted by
time, so its head names the convolutions that bound the step.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.setup.xla_flags import prefer_channels_last_convolutions  # noqa: E402

prefer_channels_last_convolutions()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

DIMS = ("NDHWC", "DHWIO", "NDHWC")


def unet3d_convs(size, in_channels=4, n_classes=4):
    """(name, input edge, stride, c_in, c_out) of every 3×3×3 convolution of UNet3D."""
    enc, dec = (32, 64, 128, 256, 320, 320), (320, 256, 128, 64, 32)
    convs = [("input_0", size, 1, in_channels, enc[0]), ("input_1", size, 1, enc[0], enc[0])]
    edge = size
    for depth in range(1, len(enc)):
        convs.append((f"down{depth}_0", edge, 2, enc[depth - 1], enc[depth]))
        edge //= 2
        convs.append((f"down{depth}_1", edge, 1, enc[depth], enc[depth]))
    for depth, filters in enumerate(dec):
        edge *= 2
        skip = enc[len(enc) - 2 - depth]
        convs.append((f"up{depth}_0", edge, 1, filters + skip, filters))
        convs.append((f"up{depth}_1", edge, 1, filters, filters))
    convs.append(("output", size, 1, dec[-1], n_classes))
    return convs


def median_ms(fn, *args, reps=20):
    """Median wall ms of `fn(*args)` over `reps` calls, each waited for, after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times))


def ceilings(dtype):
    """(matrix TFLOP/s, copy GB/s) measured on this device."""
    key = jax.random.key(0)
    n = 8192
    a = jax.random.normal(key, (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    ms = median_ms(jax.jit(jnp.dot), a, b)
    tflops = 2 * n ** 3 / ms / 1e9
    big = jax.random.normal(key, (256 * 1024 * 1024,), jnp.float32)  # 1 GiB
    copy_ms = median_ms(jax.jit(lambda v: v * 1.0 + 0.0), big)
    return tflops, 2 * big.nbytes / copy_ms / 1e6


def time_conv(batch, edge, stride, c_in, c_out, dtype, rng, multiple=1):
    """{kind: (ms, flop, fewest bytes)} of the forward, data- and weight-gradient convolution.

    With `multiple`, the channel counts are padded up to a multiple of it (as ChannelPaddedConv3D
    does); the flop and bytes stay those of the unpadded convolution.
    """
    conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, (stride,) * 3, "SAME", dimension_numbers=DIMS)
    pad_in, pad_out = c_in + -c_in % multiple, c_out + -c_out % multiple
    x = jnp.asarray(rng.standard_normal((batch, edge, edge, edge, pad_in)), dtype)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, pad_in, pad_out)) * 0.05, dtype)
    y = jax.jit(conv)(x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape), dtype)
    flop = 2 * (y.size // pad_out) * 27 * c_in * c_out
    item = jnp.dtype(dtype).itemsize
    x_bytes, w_bytes = x.size // pad_in * c_in * item, 27 * c_in * c_out * item
    y_bytes = y.size // pad_out * c_out * item
    fwd = jax.jit(conv)
    dgrad = jax.jit(lambda w, dy: jax.vjp(lambda x_: conv(x_, w), x)[1](dy)[0])
    wgrad = jax.jit(lambda x, dy: jax.vjp(lambda w_: conv(x, w_), w)[1](dy)[0])
    nbytes = x_bytes + w_bytes + y_bytes  # each kind reads two of them and writes the third
    return {"fwd": (median_ms(fwd, x, w), flop, nbytes),
            "dgrad": (median_ms(dgrad, w, dy), flop, nbytes),
            "wgrad": (median_ms(wgrad, x, dy), flop, nbytes)}


def main():
    """Measure the ceilings and every convolution, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--channel_multiple", type=int, nargs="*", default=[1],
                        help="pad channel counts to multiples of each (1: none), as ChannelPaddedConv3D")
    parser.add_argument("--narrow_only", action="store_true",
                        help="only the convolutions with a channel count not a multiple of 8")
    args = parser.parse_args()
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    peak, bandwidth = ceilings(dtype)
    print(f"device {jax.devices()[0].device_kind}: matrix {peak:.0f} TFLOP/s ({args.dtype}), "
          f"copy {bandwidth:.0f} GB/s; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}", flush=True)
    rng = np.random.default_rng(0)
    rows, totals = [], {}
    for name, edge, stride, c_in, c_out in unet3d_convs(args.size):
        if args.narrow_only and not (c_in % 8 or c_out % 8):
            continue
        for multiple in args.channel_multiple:
            timed = time_conv(args.batch, edge, stride, c_in, c_out, dtype, rng, multiple)
            for kind, (ms, flop, nbytes) in timed.items():
                if name == "input_0" and kind == "dgrad":
                    continue  # the step never differentiates the image
                padded = f" pad{multiple}" if multiple > 1 else ""
                rows.append((ms, name, kind, f"{edge}^3 s{stride} {c_in}->{c_out}{padded}", flop, nbytes))
                totals[multiple] = totals.get(multiple, 0.0) + ms
    for multiple, total in totals.items():
        print(f"\nthe convolutions alone, channels padded to multiples of {multiple}: {total:.1f} ms "
              f"(batch {args.batch})")
    print("\n| conv | kind | shape | ms | TFLOP/s | of matrix peak | fewest bytes GB/s | of bandwidth "
          "| floor ms |")
    print("|---|---|---|---|---|---|---|---|---|")
    for ms, name, kind, shape, flop, nbytes in sorted(rows, reverse=True):
        tflops, gbs = flop / ms / 1e9, nbytes / ms / 1e6
        floor = max(flop / peak / 1e9, nbytes / bandwidth / 1e6)
        print(f"| {name} | {kind} | {shape} | {ms:.2f} | {tflops:.0f} | {100 * tflops / peak:.0f}% | "
              f"{gbs:.0f} | {100 * gbs / bandwidth:.0f}% | {floor:.3f} |")


if __name__ == "__main__":
    main()
