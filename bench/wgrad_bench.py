"""The tool's weight-gradient kernel (runtime/engines/mosaic_wgrad.py) against XLA's (cuDNN), alone, on a GPU.

usage: python bench/wgrad_bench.py [--reps 20] [--shapes 2x128x32x32 4x128x32x32 ...] [--rows 128 32]
For each BATCHxEDGExC_INxC_OUT (bf16, channels-last, 3×3×3 stride 1) prints the median ms and
TFLOP/s of the kernel gradient through XLA, through XLA on the batch split into chunks of 2 and
summed (the weight gradient of cuDNN slows down from batch 4 at 128³), and through the kernel for
each number of rows per program, with each one's largest difference from a float32 XLA gradient
relative to that gradient's largest value.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.setup.xla_flags import prefer_channels_last_convolutions  # noqa: E402

prefer_channels_last_convolutions()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from bench.conv_roofline import median_ms  # noqa: E402
from runtime.engines import mosaic_conv, mosaic_wgrad  # noqa: E402

SHAPES = ["2x128x32x32", "4x128x32x32", "2x128x64x32", "2x128x8x32", "2x128x32x4", "8x128x32x32"]


def xla_weight_grad(x, g):
    """XLA's kernel gradient of conv3d(x, ·) for the output gradient g, in the dtype of x."""
    kernel = jnp.zeros((3, 3, 3, x.shape[-1], g.shape[-1]), x.dtype)
    return jax.vjp(lambda k: mosaic_conv.xla_convolution(x, k), kernel)[1](g)[0]


def split_weight_grad(x, g, chunk=2):
    """XLA's kernel gradient summed over batch chunks of `chunk` (float32 sums)."""
    total = None
    for start in range(0, x.shape[0], chunk):
        part = xla_weight_grad(x[start:start + chunk], g[start:start + chunk]).astype(jnp.float32)
        total = part if total is None else total + part
    return total


def reference(x, g):
    """The float32 kernel gradient at the highest precision (no TF32)."""
    x32, g32 = x.astype(jnp.float32), g.astype(jnp.float32)
    kernel = jnp.zeros((3, 3, 3, x.shape[-1], g.shape[-1]), jnp.float32)

    def conv(k):
        return lax.conv_general_dilated(x32, k, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
                                        precision=lax.Precision.HIGHEST)

    return jax.vjp(conv, kernel)[1](g32)[0]


def main():
    """Time each shape and print one line per implementation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", nargs="*", default=SHAPES, help="BATCHxEDGExC_INxC_OUT")
    parser.add_argument("--rows", nargs="*", type=int, default=[128, 32], help="rows per program of the kernel")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, bf16, median of {args.reps} calls", flush=True)
    for shape in args.shapes:
        batch, edge, c_in, c_out = (int(v) for v in shape.split("x"))
        keys = jax.random.split(jax.random.PRNGKey(batch * 1000 + c_in + c_out), 2)
        x = jax.random.normal(keys[0], (batch, edge, edge, edge, c_in), jnp.bfloat16)
        g = jax.random.normal(keys[1], (batch, edge, edge, edge, c_out), jnp.bfloat16)
        flop = 2 * batch * edge ** 3 * 27 * c_in * c_out
        ref = jax.jit(reference)(x, g)
        scale = float(jnp.max(jnp.abs(ref)))
        print(f"{shape}: {flop / 1e12:.3f} TFLOP", flush=True)
        runs = [("XLA", jax.jit(xla_weight_grad))]
        if batch > 2:
            runs.append(("XLA, batch in chunks of 2", jax.jit(split_weight_grad)))
        runs += [(f"kernel, {rows} rows", jax.jit(lambda a, b, r=rows: mosaic_wgrad.weight_grad(a, b, rows=r)))
                 for rows in args.rows]
        for label, fn in runs:
            try:
                value = fn(x, g)
                error = float(jnp.max(jnp.abs(value.astype(jnp.float32) - ref))) / scale
                ms = median_ms(fn, x, g, reps=args.reps)
            except Exception as exc:  # a configuration that does not compile is reported, not fatal
                print(f"  {label:28s} failed: {str(exc).splitlines()[0][:300]}", flush=True)
                continue
            print(f"  {label:28s} {ms:7.3f} ms {flop / ms / 1e9:6.1f} TFLOP/s  difference {error:.1e}", flush=True)


if __name__ == "__main__":
    main()
