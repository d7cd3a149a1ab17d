"""The tool's Mosaic GPU 3×3×3 convolution kernel against XLA's cuDNN convolution, alone, on a GPU.

usage: python bench/pallas_conv.py [--reps 20] [--shapes 128x32x32 128x64x32 ...] [--mosaic 128 32 8]
For stride-1 convolutions of UNet3D (by default the 128³ level's 32 → 32 and 64 → 32; batch 2, bf16,
channels-last) prints the median ms of the forward pass, the data gradient and the weight gradient
through XLA (cuDNN) and the forward pass and data gradient of runtime/engines/mosaic_conv.py for each
number of rows per program (up to 32 channels), with the largest difference from XLA relative to
XLA's largest value. (The Triton kernels once timed here are in git history, commit 81bf703.)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.setup.xla_flags import prefer_channels_last_convolutions  # noqa: E402

prefer_channels_last_convolutions()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.conv_roofline import median_ms  # noqa: E402
from runtime.engines import mosaic_conv  # noqa: E402


def _error(value, reference):
    reference = reference.astype(jnp.float32)
    return float(jnp.max(jnp.abs(value.astype(jnp.float32) - reference)) / jnp.max(jnp.abs(reference)))


def _report(label, fn, args, reference, flop, reps):
    compiled = jax.jit(fn)
    try:
        value = compiled(*args)
        ms = median_ms(compiled, *args, reps=reps)
    except Exception as error:  # a configuration that does not compile is reported, not fatal
        print(f"  {label:34s} failed: {str(error).splitlines()[0][:150]}", flush=True)
        return
    print(f"  {label:34s} {ms:7.3f} ms {flop / ms / 1e9:6.1f} TFLOP/s  difference {_error(value, reference):.1e}",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", nargs="*", default=["128x32x32", "128x64x32"],
                        help="EDGExC_INxC_OUT, batch 2")
    parser.add_argument("--mosaic", nargs="*", default=["128", "32", "8"],
                        help="Mosaic GPU kernel configurations: output rows per program")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, bf16, batch 2, median of {args.reps} calls",
          flush=True)
    for shape in args.shapes:
        edge, c_in, c_out = (int(v) for v in shape.split("x"))
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(keys[0], (2, edge, edge, edge, c_in), jnp.bfloat16)
        w = (0.05 * jax.random.normal(keys[1], (3, 3, 3, c_in, c_out))).astype(jnp.bfloat16)
        g = jax.random.normal(keys[2], (2, edge, edge, edge, c_out), jnp.bfloat16)
        flop = 2 * 2 * edge ** 3 * 27 * c_in * c_out
        conv = mosaic_conv.xla_convolution
        ref_fwd = jax.jit(conv)(x, w)
        ref_dx, ref_dw = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))(x, w, g)
        print(f"{edge}^3, {c_in} -> {c_out}", flush=True)
        _report("XLA forward", conv, (x, w), ref_fwd, flop, args.reps)
        _report("XLA data gradient", lambda w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0], (w, g), ref_dx,
                flop, args.reps)
        _report("XLA weight gradient", lambda x, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0], (x, g), ref_dw,
                flop, args.reps)
        for rows in args.mosaic if max(c_in, c_out) <= 32 else []:
            _report(f"Mosaic forward {rows}", lambda a, b, r=int(rows): mosaic_conv.forward(a, b, rows=r), (x, w),
                    ref_fwd, flop, args.reps)
            _report(f"Mosaic data gradient {rows}",
                    lambda a, b, r=int(rows): mosaic_conv.data_grad(b, a, rows=r), (w, g), ref_dx, flop, args.reps)

if __name__ == "__main__":
    main()
