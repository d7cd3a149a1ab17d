"""The Pallas 3×3×3 convolution kernels (Triton and Mosaic GPU) against XLA's cuDNN convolution, alone, on a GPU.

usage: python bench/pallas_conv.py [--reps 20] [--shapes 128x32x32 128x64x32 ...]
For stride-1 convolutions of UNet3D (by default the 128³ level's 32 → 32 and 64 → 32; batch 2, bf16, channels-last)
prints the median ms of the forward pass, the data gradient and the weight gradient through XLA
(cuDNN) and through the kernels of bench/pallas_conv3d.py for each configuration tried
(block_m, warps, pipeline stages, and the loop or tap grouping) and of runtime/mosaic_conv.py (rows
per program; forward pass and data gradient, up to 32 channels), with the largest difference from XLA
relative to XLA's largest value.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.xla_flags import prefer_channels_last_convolutions  # noqa: E402

prefer_channels_last_convolutions()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.conv_roofline import median_ms  # noqa: E402
from bench import pallas_conv3d  # noqa: E402
from runtime import mosaic_conv  # noqa: E402


def _error(value, reference):
    reference = reference.astype(jnp.float32)
    return float(jnp.max(jnp.abs(value.astype(jnp.float32) - reference)) / jnp.max(jnp.abs(reference)))


def _report(label, fn, args, reference, flop, reps):
    compiled = jax.jit(fn)
    try:
        value = compiled(*args)
        ms = median_ms(compiled, *args, reps=reps)
    except Exception as error:  # a configuration Triton cannot compile is reported, not fatal
        print(f"  {label:34s} failed: {str(error).splitlines()[0][:150]}", flush=True)
        return
    print(f"  {label:34s} {ms:7.3f} ms {flop / ms / 1e9:6.1f} TFLOP/s  difference {_error(value, reference):.1e}",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", nargs="*", default=["128x32x32", "128x64x32"],
                        help="EDGExC_INxC_OUT, batch 2")
    parser.add_argument("--forward", nargs="*", default=[
        "256,8,1,0", "128,8,1,0", "128,4,2,1", "128,4,3,1", "128,8,2,1", "128,8,3,1", "256,4,2,1",
        "256,4,3,1", "256,8,2,1", "256,8,3,1", "64,4,3,1", "64,4,4,1"],
                        help="forward configurations block_m,num_warps,num_stages,loop")
    parser.add_argument("--data_grad", nargs="*", default=["256,8,1,0", "128,8,1,0", "128,4,2,1"],
                        help="data-gradient configurations, as --forward")
    parser.add_argument("--wgrad", nargs="*", default=[
        "128,4,1,9", "64,4,2,9", "64,4,1,3", "64,4,2,3", "128,4,1,3", "128,4,2,3", "128,8,2,3",
        "64,4,2,1", "128,4,3,1", "64,8,1,27"],
                        help="weight-gradient configurations block_m,num_warps,num_stages,taps")
    parser.add_argument("--gathered", nargs="*", default=[
        "128,4,2,4", "128,4,3,4", "128,8,2,8", "256,8,2,4", "64,4,2,8", "128,4,2,2"],
                        help="gathered forward configurations block_m,num_warps,num_stages,taps")
    parser.add_argument("--gathered_wgrad", nargs="*", default=[
        "64,4,2,4", "64,4,1,8", "128,4,2,4", "64,8,2,8", "32,4,2,8"],
                        help="gathered weight-gradient configurations block_m,num_warps,num_stages,taps")
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
        conv = pallas_conv3d.reference
        ref_fwd = jax.jit(conv)(x, w)
        ref_dx, ref_dw = jax.jit(lambda x, w, g: jax.vjp(conv, x, w)[1](g))(x, w, g)
        print(f"{edge}^3, {c_in} -> {c_out}", flush=True)
        _report("XLA forward", conv, (x, w), ref_fwd, flop, args.reps)
        _report("XLA data gradient", lambda w, g: jax.vjp(lambda x_: conv(x_, w), x)[1](g)[0], (w, g), ref_dx,
                flop, args.reps)
        _report("XLA weight gradient", lambda x, g: jax.vjp(lambda w_: conv(x, w_), w)[1](g)[0], (x, g), ref_dw,
                flop, args.reps)
        runs = [("forward", pallas_conv3d.forward, args.forward, "loop", (x, w), ref_fwd),
                ("data gradient", lambda w, g, **o: pallas_conv3d.data_grad(g, w, **o), args.data_grad, "loop",
                 (w, g), ref_dx),
                ("weight gradient", pallas_conv3d.weight_grad, args.wgrad, "taps", (x, g), ref_dw),
                ("gathered forward", pallas_conv3d.gathered_forward, args.gathered, "taps", (x, w), ref_fwd),
                ("gathered weight gradient", pallas_conv3d.gathered_weight_grad, args.gathered_wgrad, "taps",
                 (x, g), ref_dw)]
        for rows in args.mosaic if max(c_in, c_out) <= 32 else []:
            _report(f"Mosaic forward {rows}", lambda a, b, r=int(rows): mosaic_conv.forward(a, b, rows=r), (x, w),
                    ref_fwd, flop, args.reps)
            _report(f"Mosaic data gradient {rows}",
                    lambda a, b, r=int(rows): mosaic_conv.data_grad(b, a, rows=r), (w, g), ref_dx, flop, args.reps)
        for name, kernel, specs, last, operands, reference in runs:
            for spec in specs:
                block, warps, stages, value = (int(v) for v in spec.split(","))
                options = dict(block_m=block, num_warps=warps, num_stages=stages, **{last: value})
                _report(f"Pallas {name} {spec}", lambda a, b, k=kernel, o=options: k(a, b, **o), operands,
                        reference, flop, args.reps)


if __name__ == "__main__":
    main()
