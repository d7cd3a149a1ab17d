"""A 3×3×3 convolution as cuDNN's 3-D kernel against three ways of writing it with 2-D ones.

usage: python bench/conv_as_2d.py [--reps 20]
cuDNN's 2-D kernels are better tuned than its 3-D ones, and a 3×3×3 convolution is a sum over
its three depth taps of 3×3 convolutions of depth slices. For the 32-, 64- and 128-channel
shapes of UNet3D's step (batch 2, bf16, channels-last) this prints the forward and the two
gradients (data and weight, one jitted call) of:
  conv3d    the 3-D convolution (what the tool runs);
  fold_in   the three depth neighbours stacked on the channels, one 2-D convolution of 3·c_in;
  fold_out  one 2-D convolution to 3·c_out channels, then the three outputs summed, shifted;
  sum3      three 2-D convolutions of shifted inputs, summed;
each as the median of `--reps` calls, its TFLOP/s and its largest difference from conv3d
relative to conv3d's largest value.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from runtime.xla_flags import prefer_channels_last_convolutions  # noqa: E402

prefer_channels_last_convolutions()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from bench.conv_roofline import median_ms  # noqa: E402

# (batch, edge, c_in, c_out): the 3×3×3 'same' convolutions of stride 1 at the 128³, 64³ and 32³ levels.
SHAPES = ((2, 128, 32, 32), (2, 128, 64, 32), (2, 64, 64, 64), (2, 64, 128, 64), (2, 32, 128, 128))


def conv3d(x, w):
    """The plain 3-D convolution."""
    return lax.conv_general_dilated(x, w, (1, 1, 1), "SAME", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def _conv2d(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _depth_padded(x):
    return jnp.pad(x, ((0, 0), (1, 1)) + ((0, 0),) * (x.ndim - 2))


def fold_in(x, w):
    """Depth neighbours stacked on the channels: one 2-D convolution of 3·c_in channels."""
    n, d, h, wd, c = x.shape
    padded = _depth_padded(x)
    stacked = jnp.concatenate([padded[:, k:k + d] for k in range(3)], axis=-1)
    kernel = jnp.transpose(w, (1, 2, 0, 3, 4)).reshape(3, 3, 3 * c, w.shape[-1])
    return _conv2d(stacked.reshape(n * d, h, wd, 3 * c), kernel).reshape(n, d, h, wd, -1)


def fold_out(x, w):
    """One 2-D convolution to 3·c_out channels, its three parts summed with their depth shifts."""
    n, d, h, wd, c = x.shape
    o = w.shape[-1]
    kernel = jnp.transpose(w, (1, 2, 3, 0, 4)).reshape(3, 3, c, 3 * o)
    taps = _depth_padded(_conv2d(x.reshape(n * d, h, wd, c), kernel).reshape(n, d, h, wd, 3, o))
    return sum(taps[:, k:k + d, :, :, k, :] for k in range(3))


def sum3(x, w):
    """Three 2-D convolutions of the depth-shifted input, summed."""
    n, d, h, wd, c = x.shape
    padded = _depth_padded(x)
    return sum(_conv2d(padded[:, k:k + d].reshape(n * d, h, wd, c), w[k]).reshape(n, d, h, wd, -1)
               for k in range(3))


VARIANTS = {"conv3d": conv3d, "fold_in": fold_in, "fold_out": fold_out, "sum3": sum3}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, bf16, median of {args.reps} calls", flush=True)
    for n, edge, c_in, c_out in SHAPES:
        keys = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(keys[0], (n, edge, edge, edge, c_in), jnp.bfloat16)
        w = (0.05 * jax.random.normal(keys[1], (3, 3, 3, c_in, c_out))).astype(jnp.bfloat16)
        g = jax.random.normal(keys[2], (n, edge, edge, edge, c_out), jnp.bfloat16)
        flop = 2 * n * edge ** 3 * 27 * c_in * c_out
        reference = conv3d(x, w).astype(jnp.float32)
        for name, variant in VARIANTS.items():
            error = float(jnp.max(jnp.abs(variant(x, w).astype(jnp.float32) - reference))
                          / jnp.max(jnp.abs(reference)))
            forward = median_ms(jax.jit(variant), x, w, reps=args.reps)
            loss = lambda x, w, g, f=variant: jnp.sum(f(x, w).astype(jnp.float32) * g.astype(jnp.float32))  # noqa: E731
            grads = median_ms(jax.jit(jax.grad(loss, argnums=(0, 1))), x, w, g, reps=args.reps)
            print(f"{n}x{edge}^3 {c_in:>3}->{c_out:<3} {name:8s} forward {forward:6.3f} ms "
                  f"({flop / forward / 1e9:5.1f} TFLOP/s)  gradients {grads:6.3f} ms "
                  f"({2 * flop / grads / 1e9:5.1f} TFLOP/s)  difference {error:.1e}", flush=True)


if __name__ == "__main__":
    main()
